//! Notification channels: validated names, untrusted payloads, and a listener that survives
//! reconnects.
//!
//! A notification is only ever a hint. Its payload is one job id, which is checked against the
//! tables before anything acts on it; a lost notification costs latency (the table sweeps find
//! the job), never correctness.

use std::fmt;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgNotification, PgPool, PgPoolOptions};

use crate::connect::Described;
use crate::job::{Backoff, JobId};

/// The default channel that wakes workers: payload = the new job's id.
pub const DEFAULT_JOBS_CHANNEL: &str = "player_jobs";
/// The default channel that confirms jobs to waiting callers: payload = the finished job's id.
pub const DEFAULT_DONE_CHANNEL: &str = "player_jobs_done";

/// Waits between attempts to reconnect a lost listener: quick at first (a restarted backend is
/// usually back at once), then capped so a long outage logs a line every few seconds, not a flood.
const RECONNECT_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(100),
    max: Duration::from_secs(5),
};

/// How long a listener may hear nothing before it checks that its connection still answers.
const LIVENESS_IDLE: Duration = Duration::from_secs(5);

/// How long that check may take before the connection is deemed dead and replaced. A dead
/// listener is therefore noticed within [`LIVENESS_IDLE`] + `LIVENESS_ANSWER` (8 s); waiting
/// callers do not wait for that, as their jobs are re-read from the tables every second.
const LIVENESS_ANSWER: Duration = Duration::from_secs(3);

/// A Postgres channel name that is safe to `LISTEN` on: `^[a-z_][a-z0-9_]{0,62}$`.
///
/// `LISTEN` cannot take a bind parameter, so the name is validated once, here, and every other
/// part of the crate handles only `ChannelName`s.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelName(String);

impl ChannelName {
    /// Validates `name` as a channel name.
    ///
    /// # Errors
    /// [`InvalidChannelName`] when `name` is empty, longer than 63 bytes, or holds anything but
    /// lower-case ASCII letters, digits and underscores (a digit may not come first).
    ///
    /// ```
    /// assert!(ackloop::ChannelName::new("signup_jobs").is_ok());
    /// assert!(ackloop::ChannelName::new("jobs; drop table users").is_err());
    /// ```
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidChannelName> {
        let name = name.into();
        let mut bytes = name.bytes();
        let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
        let rest_ok = bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if first_ok && rest_ok && name.len() <= 63 {
            Ok(Self(name))
        } else {
            Err(InvalidChannelName(name))
        }
    }

    /// The name as text, for `pg_notify` and `LISTEN`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A channel name that [`ChannelName::new`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid channel name {0:?}: use 1 to 63 lower-case letters, digits and underscores, not starting with a digit"
)]
pub struct InvalidChannelName(pub String);

/// The pair of channels one deployment uses. Both sides must agree on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channels {
    /// Wakes workers when a job is committed.
    pub jobs: ChannelName,
    /// Tells waiting callers that a job finished (done or failed).
    pub done: ChannelName,
}

impl Default for Channels {
    fn default() -> Self {
        Self {
            jobs: ChannelName(DEFAULT_JOBS_CHANNEL.to_owned()),
            done: ChannelName(DEFAULT_DONE_CHANNEL.to_owned()),
        }
    }
}

impl Channels {
    /// Both channel names, validated.
    ///
    /// # Errors
    /// [`InvalidChannelName`] for the first name that is not a valid channel name, or when both
    /// names are the same (workers would take confirmations for wake-ups and the reverse).
    ///
    /// ```
    /// let channels = ackloop::Channels::new("signup_jobs", "signup_jobs_done")?;
    /// assert_eq!(channels.jobs.as_str(), "signup_jobs");
    /// # Ok::<(), ackloop::InvalidChannelName>(())
    /// ```
    pub fn new(jobs: &str, done: &str) -> Result<Self, InvalidChannelName> {
        let channels = Self {
            jobs: ChannelName::new(jobs)?,
            done: ChannelName::new(done)?,
        };
        if channels.jobs == channels.done {
            return Err(InvalidChannelName(done.to_owned()));
        }
        Ok(channels)
    }
}

/// Reads a notification payload as a job id. Payloads are untrusted: anyone who can connect can
/// `NOTIFY` any channel, so only the exact text Postgres prints for a uuid is accepted.
///
/// # Errors
/// [`BadPayload`] with a shortened copy of the payload for the log line.
///
/// ```
/// let id = ackloop::JobId::new();
/// assert_eq!(ackloop::parse_job_id(&id.to_string()), Ok(id));
/// assert!(ackloop::parse_job_id("{\"job\": 1}").is_err());
/// ```
pub fn parse_job_id(payload: &str) -> Result<JobId, BadPayload> {
    const HYPHENATED_UUID_LEN: usize = 36;
    if payload.len() == HYPHENATED_UUID_LEN
        && let Ok(id) = payload.parse()
    {
        return Ok(id);
    }
    Err(BadPayload::of(payload))
}

/// A payload that is not a job id. Holds at most the first 64 characters, so that a log line
/// about a flood of 8 kB payloads stays short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payload is not a job id: {shown:?} ({len} bytes)")]
pub struct BadPayload {
    shown: String,
    len: usize,
}

impl BadPayload {
    fn of(payload: &str) -> Self {
        Self {
            shown: payload.chars().take(64).collect(),
            len: payload.len(),
        }
    }
}

/// How often to log about ignored payloads during a flood of them.
const IGNORED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Logs payloads that are not job ids without flooding the log: the first at once, then one line
/// per [`IGNORED_LOG_INTERVAL`] counting those not shown.
pub(crate) struct IgnoredPayloads {
    channel: ChannelName,
    last_logged: Option<tokio::time::Instant>,
    not_logged: u64,
}

impl IgnoredPayloads {
    pub(crate) fn new(channel: ChannelName) -> Self {
        Self {
            channel,
            last_logged: None,
            not_logged: 0,
        }
    }

    pub(crate) fn record(&mut self, err: &BadPayload) {
        ::metrics::counter!(crate::telemetry::PAYLOADS_IGNORED, "channel" => self.channel.to_string())
            .increment(1);
        let now = tokio::time::Instant::now();
        if self
            .last_logged
            .is_some_and(|last| now.duration_since(last) < IGNORED_LOG_INTERVAL)
        {
            self.not_logged += 1;
            return;
        }
        tracing::warn!(
            channel = %self.channel,
            error = %err,
            ignored_since_last_line = self.not_logged,
            "ignored a payload that is not a job id"
        );
        self.last_logged = Some(now);
        self.not_logged = 0;
    }
}

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
    /// Where the listener connects, for the fresh pool that replaces a silent connection's.
    options: PgConnectOptions,
    channel: ChannelName,
    listener: Option<PgListener>,
    failed_reconnects: u32,
}

impl Subscription {
    /// Connects and starts listening; returns once `LISTEN` is in effect, so anything committed
    /// from then on is delivered.
    pub(crate) async fn connect(
        options: PgConnectOptions,
        channel: ChannelName,
    ) -> Result<Self, sqlx::Error> {
        let pool = listener_pool(options.clone());
        let listener = listen(&pool, &channel).await?;
        Ok(Self {
            pool,
            options,
            channel,
            listener: Some(listener),
            failed_reconnects: 0,
        })
    }

    /// The next notification, or news that the listener reconnected. Never fails: a lost
    /// connection is retried until it comes back (each failure logged), so callers select on
    /// this alongside their shutdown signal.
    pub(crate) async fn next(&mut self) -> Event {
        loop {
            let Some(listener) = self.listener.as_mut() else {
                if self.failed_reconnects > 0 {
                    tokio::time::sleep(RECONNECT_BACKOFF.delay(self.failed_reconnects)).await;
                }
                match listen(&self.pool, &self.channel).await {
                    Ok(listener) => {
                        self.listener = Some(listener);
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
                        tokio::time::timeout(LIVENESS_ANSWER, crate::store::ping(&mut *listener)).await;
                    if !matches!(ping, Ok(Ok(()))) {
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

async fn listen(pool: &PgPool, channel: &ChannelName) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel.as_str()).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_follow_postgres_identifier_rules() {
        for good in ["player_jobs", "_x", "a", "jobs_2", &"a".repeat(63)] {
            assert!(ChannelName::new(good).is_ok(), "{good:?} should be accepted");
        }
        for bad in [
            "",
            "2jobs",
            "Player_jobs",
            "jobs;drop table users",
            "jobs\"",
            "jobs-done",
            "jöbs",
            &"a".repeat(64),
        ] {
            assert!(ChannelName::new(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn channels_must_differ() {
        assert!(Channels::new("same", "same").is_err());
        assert!(Channels::new("a", "b").is_ok());
    }

    #[test]
    fn payload_must_be_exactly_a_hyphenated_uuid() {
        let id = JobId::new();
        assert_eq!(parse_job_id(&id.to_string()).unwrap(), id);
        let simple = id.as_uuid().simple().to_string();
        let braced = format!("{{{id}}}");
        let padded = format!(" {id}");
        for bad in [
            "",
            "hello",
            simple.as_str(),
            braced.as_str(),
            padded.as_str(),
            "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz",
        ] {
            assert!(parse_job_id(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn bad_payload_message_is_short_for_huge_payloads() {
        let err = parse_job_id(&"x".repeat(7999)).unwrap_err();
        let message = err.to_string();
        assert!(message.len() < 120, "{message}");
        assert!(message.contains("7999 bytes"));
    }
}
