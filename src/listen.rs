//! The reconnecting LISTEN subscription, one per side per process: it survives reconnects,
//! notices a connection that stopped answering, and says when notifications may have been lost.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgNotification, PgPool, PgPoolOptions};

use crate::channel::ChannelName;
use crate::connect::Described;
use crate::job::Backoff;

/// Waits between attempts to reconnect a lost listener: quick at first (a restarted backend is
/// usually back at once), then capped so a long outage logs a line every few seconds, not a flood.
const RECONNECT_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(100),
    max: Duration::from_secs(5),
};

/// How long [`Subscription::connect_or_later`] waits for its first `LISTEN` before it leaves
/// the rest to the reader: long enough for a healthy server, short enough not to hold a caller.
const FIRST_LISTEN_WAIT: Duration = Duration::from_secs(1);

/// How long a listener may hear nothing before it checks that its connection still answers.
const LIVENESS_IDLE: Duration = Duration::from_secs(5);

/// How long that check may take before the connection is deemed dead and replaced. A dead
/// listener is therefore noticed within [`LIVENESS_IDLE`] + `LIVENESS_ANSWER` (8 s); waiting
/// callers do not wait for that, as their jobs are re-read from the tables every second.
const LIVENESS_ANSWER: Duration = Duration::from_secs(3);

/// A listener's own pool: lazily connected, never expiring its connection.
fn listener_pool(options: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        // Two: a replacement can connect while a dead connection is still being dropped.
        .max_connections(2)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options)
}

/// Where a [`Subscription`] connects.
#[derive(Debug, Clone)]
pub(crate) enum ListenTarget {
    /// Always these options.
    Fixed(Box<PgConnectOptions>),
    /// Wherever this pool connects now: a pool that moves to another server (a failover, see
    /// `ConnectConfig::connect_pool`) takes the listener with it.
    Pool(PgPool),
}

impl ListenTarget {
    fn options(&self) -> PgConnectOptions {
        match self {
            Self::Fixed(options) => (**options).clone(),
            Self::Pool(pool) => (*pool.connect_options()).clone(),
        }
    }
}

/// Whether two sets of options reach the same server.
fn same_server(a: &PgConnectOptions, b: &PgConnectOptions) -> bool {
    a.get_socket() == b.get_socket() && a.get_host() == b.get_host() && a.get_port() == b.get_port()
}

/// What a [`Subscription`] reports.
pub(crate) enum Event {
    /// A notification; its payload is still untrusted.
    Notification(PgNotification),
    /// The listener has just (re)connected and is listening again. Anything sent while it was
    /// away is lost for good: whoever holds the subscription must look at the tables now.
    Resubscribed,
}

/// A `LISTEN` on one channel, over a connection of its own that is never inside a transaction,
/// reconnecting by itself with capped backoff whenever the connection is lost.
pub(crate) struct Subscription {
    /// A pool of its own, so the listener never takes a connection the application needs and a
    /// transaction-mode pooler in front of the application pool can be bypassed.
    pool: PgPool,
    /// Where the listener connects.
    target: ListenTarget,
    /// The options its pool was made with: the target's at that moment.
    options: PgConnectOptions,
    channel: ChannelName,
    listener: Option<PgListener>,
    /// The server process of the listener's connection, when known: a liveness check that finds
    /// another one caught sqlx reconnecting by itself inside a read the check cancelled, which
    /// no event reported (notifications sent in between are lost).
    backend_pid: Option<i32>,
    failed_reconnects: u32,
}

impl Subscription {
    /// Connects and starts listening; returns once `LISTEN` is in effect, so anything committed
    /// from then on is delivered. A server that cannot be reached yet (down, restarting,
    /// failing over) is no error: the subscription starts without a connection and
    /// [`Subscription::next`] keeps trying, reporting [`Event::Resubscribed`] once `LISTEN` is
    /// in effect, so that its owner checks the tables for whatever it missed. A refusal (a wrong
    /// password, an unknown database, TLS refused) is returned at once.
    pub(crate) async fn connect_or_later(
        target: ListenTarget,
        channel: ChannelName,
    ) -> Result<Self, sqlx::Error> {
        let options = target.options();
        let pool = listener_pool(options.clone());
        // The pool retries an unreachable server until its acquire timeout: bound the first try
        // so that a caller with a short deadline is not held here.
        let first = tokio::time::timeout(FIRST_LISTEN_WAIT, listen(&pool, &channel)).await;
        let (listener, backend_pid, failed_reconnects) = match first {
            Ok(Ok((listener, pid))) => (Some(listener), Some(pid), 0),
            Ok(Err(err)) if !crate::store::is_worth_waiting_for(&err) => return Err(err),
            Ok(Err(err)) => {
                tracing::warn!(channel = %channel, error = %Described(&err), "cannot listen yet; retrying");
                (None, None, 1)
            }
            Err(_) => {
                tracing::warn!(channel = %channel, "cannot listen yet (no answer); retrying");
                (None, None, 1)
            }
        };
        Ok(Self {
            pool,
            target,
            options,
            channel,
            listener,
            backend_pid,
            failed_reconnects,
        })
    }

    /// The next notification, or news that the listener reconnected. Never fails: a lost
    /// connection is retried until it comes back (each failure logged), so callers select on
    /// this alongside their shutdown signal.
    pub(crate) async fn next(&mut self) -> Event {
        loop {
            self.follow_target();
            let Some(listener) = self.listener.as_mut() else {
                if self.failed_reconnects > 0 {
                    tokio::time::sleep(RECONNECT_BACKOFF.delay(self.failed_reconnects)).await;
                }
                match listen(&self.pool, &self.channel).await {
                    Ok((listener, pid)) => {
                        self.listener = Some(listener);
                        self.backend_pid = Some(pid);
                        self.failed_reconnects = 0;
                        self.count_reconnect();
                        tracing::info!(channel = %self.channel, "listener reconnected");
                        return Event::Resubscribed;
                    }
                    Err(err) => {
                        self.failed_reconnects += 1;
                        tracing::warn!(
                            channel = %self.channel,
                            error = %Described(&err),
                            attempt = self.failed_reconnects,
                            "cannot listen; retrying"
                        );
                        continue;
                    }
                }
            };
            // A connection can stop answering without closing (an idle drop by a NAT or a load
            // balancer, a failover behind a VIP): reads then hang until TCP gives up, minutes
            // later. So a listener that hears nothing for a while asks the server something.
            let received = match tokio::time::timeout(LIVENESS_IDLE, listener.try_recv()).await {
                Ok(received) => received,
                Err(_) => {
                    let ping =
                        tokio::time::timeout(LIVENESS_ANSWER, crate::store::backend_pid(&mut *listener))
                            .await;
                    if let Ok(Ok(pid)) = ping {
                        let known = self.backend_pid.replace(pid);
                        if known.is_some_and(|known| known != pid) {
                            self.count_reconnect();
                            tracing::info!(channel = %self.channel, "listener reconnected");
                            return Event::Resubscribed;
                        }
                    } else {
                        tracing::warn!(
                            channel = %self.channel,
                            "listener connection did not answer a liveness check; replacing it"
                        );
                        // Dropping a listener sends UNLISTEN and hands its connection back to its
                        // pool, neither with a time limit: on a connection that stopped answering
                        // that never ends and keeps the pool's slot. So reconnect from a new pool.
                        self.listener = None;
                        self.pool = listener_pool(self.options.clone());
                    }
                    continue;
                }
            };
            match received {
                Ok(Some(notification)) => return Event::Notification(notification),
                // sqlx has already reconnected and re-issued LISTEN before returning this.
                Ok(None) => {
                    // Learnt at the next liveness check (a statement now would hide the LISTEN
                    // from pg_stat_activity).
                    self.backend_pid = None;
                    self.count_reconnect();
                    tracing::info!(channel = %self.channel, "listener reconnected");
                    return Event::Resubscribed;
                }
                Err(err) => {
                    // Some errors (a FATAL from pg_terminate_backend, a reset socket) leave
                    // sqlx's connection in place; drop the listener so the next pass builds a
                    // fresh one instead of reading a dead socket in a loop.
                    tracing::warn!(channel = %self.channel, error = %Described(&err), "listener connection lost");
                    self.listener = None;
                }
            }
        }
    }

    /// Moves to where the target connects now, if that is another server: a listener left on a
    /// demoted primary would hear nothing, with nothing wrong with its connection.
    fn follow_target(&mut self) {
        let ListenTarget::Pool(_) = &self.target else {
            return;
        };
        let options = self.target.options();
        if same_server(&options, &self.options) {
            return;
        }
        tracing::info!(
            channel = %self.channel,
            to = %crate::connect::server_name(&options),
            "listener moving to another server"
        );
        self.listener = None;
        self.pool = listener_pool(options.clone());
        self.options = options;
        self.failed_reconnects = 0;
    }

    /// A notification that has already arrived, without waiting; for draining bursts in one go.
    pub(crate) fn next_buffered(&mut self) -> Option<PgNotification> {
        self.listener.as_mut()?.next_buffered()
    }

    fn count_reconnect(&self) {
        ::metrics::counter!(crate::telemetry::LISTENER_RECONNECTS, "channel" => self.channel.to_string())
            .increment(1);
    }

    /// The channel listened on.
    pub(crate) fn channel(&self) -> &ChannelName {
        &self.channel
    }
}

async fn listen(pool: &PgPool, channel: &ChannelName) -> Result<(PgListener, i32), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Before the LISTEN, which stays the session's last statement until a liveness check (what
    // an operator, or a test, finds listeners by in pg_stat_activity).
    let pid = crate::store::backend_pid(&mut listener).await?;
    listener.listen(channel.as_str()).await?;
    Ok((listener, pid))
}
