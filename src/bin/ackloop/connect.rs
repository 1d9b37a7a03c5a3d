//! How the binary reaches the database: the connection flags read as libpq would, pools that
//! say at once why a connection failed, and the signup side with this invocation's channels.

use std::time::Duration;

use ackloop::{Channels, ConnectConfig, Signups, SignupsConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::args::ConnectionArgs;
use crate::exit::Failure;

/// With --poll-only, how often a waiting signup looks for its player: a tenth of a second added
/// to each signup, at one cheap indexed query per interval for all waiting signups together.
const POLL_ONLY_CONFIRM_INTERVAL: Duration = Duration::from_millis(100);

/// How long to wait for the database before giving up with exit code 7, unless the connection
/// string's `connect_timeout` says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long start-up keeps trying a server that cannot be reached yet (down, restarting,
/// failing over), and how long each try may take. A refusal (a wrong password, an unknown
/// database, TLS refused) ends it at once.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    /// Until when to try again: a command's `--timeout`, or the connect timeout for the others;
    /// none for a worker, which waits for its database, logging each failed try.
    deadline: Option<tokio::time::Instant>,
    /// The connect timeout: what one try may take.
    per_try: Duration,
    /// Whether the deadline is the command's own `--timeout` (said when it cuts a try short).
    own_deadline: bool,
}

impl Patience {
    /// What is left until the deadline, within the connect timeout. The first try gets at least
    /// [`FIRST_TRY`], so that a short `--timeout` (even `0s`, "how does it stand?") on a
    /// healthy server does not fail for want of time to connect; later tries at least
    /// [`LAST_TRY`].
    fn try_limit(self, first: bool) -> Duration {
        match self.deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let floor = if first { FIRST_TRY } else { LAST_TRY };
                self.per_try.min(left.max(floor))
            }
            None => self.per_try,
        }
    }

    /// Waits before try number `failed + 1`, or returns false when no time is left for one.
    /// The waits are spread a little, so that processes started together do not retry together.
    async fn wait_to_retry(self, failed: u32, err: &sqlx::Error) -> bool {
        let mut delay = spread(START_BACKOFF.delay(failed));
        match self.deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left <= LAST_TRY {
                    return false;
                }
                // A last try just before the deadline, rather than none.
                delay = delay.min(left - LAST_TRY);
                tracing::debug!(error = %ackloop::describe_db_error(err), attempt = failed, "cannot reach the database yet; retrying");
            }
            None => {
                tracing::warn!(error = %ackloop::describe_db_error(err), attempt = failed, "cannot reach the database yet; retrying");
            }
        }
        tokio::time::sleep(delay).await;
        true
    }
}

/// Waits between tries at start-up: quick at first (a restart takes about a second), capped so
/// that a worker waiting out a long outage logs a line every few seconds.
const START_BACKOFF: ackloop::Backoff = ackloop::Backoff {
    base: Duration::from_millis(100),
    max: Duration::from_secs(5),
};

/// The least time the first try is given, whatever the deadline: a healthy server answers
/// within it, across a network and TLS too.
const FIRST_TRY: Duration = Duration::from_secs(1);

/// The least time a try is given, the last one before a deadline included: a connection on a
/// local socket takes milliseconds, one with TLS across a network some tens.
const LAST_TRY: Duration = Duration::from_millis(250);

/// `delay` less up to a quarter, by the clock's nanoseconds: enough to spread processes that
/// started in the same instant.
fn spread(delay: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    delay.mul_f64(1.0 - f64::from(nanos % 1000) / 4000.0)
}

impl ConnectionArgs {
    /// DATABASE_URL read as libpq would, or libpq's environment variables when it is unset.
    pub fn connect_config(&self) -> Result<ConnectConfig, Failure> {
        match self.database_url.as_deref() {
            Some(url) => parse_url(url, "DATABASE_URL"),
            None => ConnectConfig::from_libpq_env().map_err(|source| Failure::BadUrl {
                which: "PG* environment variables",
                source,
            }),
        }
    }

    pub fn connect_options(&self) -> Result<PgConnectOptions, Failure> {
        Ok(self.connect_config()?.into_options())
    }

    pub fn listen_options(&self) -> Result<Option<PgConnectOptions>, Failure> {
        let Some(url) = self.listen_url.as_deref() else {
            return Ok(None);
        };
        let config = parse_url(url, "ACKLOOP_LISTEN_URL")?;
        if config.hosts().len() > 1 {
            return Err(Failure::BadUrl {
                which: "ACKLOOP_LISTEN_URL",
                source: ackloop::BadConnectionString::from_problem(
                    "a listen URL takes one host: leave it unset and the listeners follow \
                     DATABASE_URL's hosts, across a failover too",
                ),
            });
        }
        Ok(Some(config.into_options()))
    }

    /// A pool (as [`ConnectionArgs::pool`]) on a database whose schema this version can use.
    pub async fn migrated_pool(&self, connections: u32, patience: Patience) -> Result<PgPool, Failure> {
        let pool = self.pool(connections, patience).await?;
        checked_schema(&pool, patience).await?;
        Ok(pool)
    }

    pub fn channels(&self) -> Result<Channels, Failure> {
        Ok(Channels::new(&self.jobs_channel, &self.done_channel)?)
    }

    /// The signup side, with this invocation's channels, listen URL and polling.
    pub async fn signups(&self, pool: PgPool) -> Result<Signups, Failure> {
        let config = SignupsConfig {
            channels: self.channels()?,
            listen_options: self.listen_options()?,
            poll_only: self.poll_only.then_some(POLL_ONLY_CONFIRM_INTERVAL),
            ..SignupsConfig::default()
        };
        Ok(Signups::connect_with(pool, config).await?)
    }

    /// A pool of at most `connections` on `DATABASE_URL`.
    pub async fn pool(&self, connections: u32, patience: Patience) -> Result<PgPool, Failure> {
        connect(self, |options| options, connections, patience).await
    }

    /// Start-up's patience for a command without a timeout of its own: the connect timeout.
    pub fn default_patience(&self) -> Result<Patience, Failure> {
        let per_try = self.connect_timeout()?;
        Ok(Patience {
            deadline: Some(tokio::time::Instant::now() + per_try),
            per_try,
            own_deadline: false,
        })
    }

    /// Start-up's patience for a command that bounds its whole call by `timeout`.
    pub fn patience_for(&self, timeout: Duration) -> Result<Patience, Failure> {
        Ok(Patience {
            deadline: Some(tokio::time::Instant::now() + timeout),
            per_try: self.connect_timeout()?,
            own_deadline: true,
        })
    }

    /// Start-up's patience for a worker: until it connects.
    pub fn patience_until_connected(&self) -> Result<Patience, Failure> {
        Ok(Patience {
            deadline: None,
            per_try: self.connect_timeout()?,
            own_deadline: false,
        })
    }

    /// The connect timeout: the connection string's, or ackloop's default.
    fn connect_timeout(&self) -> Result<Duration, Failure> {
        Ok(self
            .connect_config()?
            .connect_timeout()
            .unwrap_or(CONNECT_TIMEOUT))
    }
}

/// Checks that this version can use the schema, trying again while the server cannot be reached
/// (a restart ends the first connections: "terminating connection", "the database system is
/// starting up").
pub async fn checked_schema(pool: &PgPool, patience: Patience) -> Result<(), Failure> {
    let mut failed = 0;
    loop {
        let limit = patience.try_limit(failed == 0);
        let err = match tokio::time::timeout(limit, ackloop::check_schema(pool)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(ackloop::SchemaError::Database(err)))
                if ackloop::is_unavailable(&err) && !ackloop::is_refusal(&err) =>
            {
                err
            }
            Ok(Err(err)) => return Err(err.into()),
            Err(_) => sqlx::Error::PoolTimedOut,
        };
        failed += 1;
        if !patience.wait_to_retry(failed, &err).await {
            return Err(ackloop::SchemaError::Database(err).into());
        }
    }
}

/// A pool of at most `connections`, with `adjust` applied to the connect options. One direct
/// connection is made first: the pool would retry a refused connection until its timeout and
/// then report only that it timed out, where a user needs the reason at once.
pub async fn connect(
    connection: &ConnectionArgs,
    adjust: impl Fn(PgConnectOptions) -> PgConnectOptions,
    connections: u32,
    patience: Patience,
) -> Result<PgPool, Failure> {
    let mut failed = 0;
    loop {
        let limit = patience.try_limit(failed == 0);
        let cut_short = patience.own_deadline && limit < patience.per_try;
        match connect_once(connection, &adjust, connections, limit, cut_short).await {
            Err(Failure::Connect {
                source,
                target,
                from_env,
            }) if ackloop::is_unavailable(&source) && !ackloop::is_refusal(&source) => {
                failed += 1;
                if !patience.wait_to_retry(failed, &source).await {
                    return Err(Failure::Connect {
                        target,
                        from_env,
                        source,
                    });
                }
            }
            other => return other,
        }
    }
}

/// One try of [`connect`], given `limit`.
async fn connect_once(
    connection: &ConnectionArgs,
    adjust: &impl Fn(PgConnectOptions) -> PgConnectOptions,
    connections: u32,
    limit: Duration,
    cut_short: bool,
) -> Result<PgPool, Failure> {
    let config = connection.connect_config()?;
    let target = config.to_string();
    let config_timeout = config.connect_timeout();
    let timeout = config_timeout.unwrap_or(CONNECT_TIMEOUT);
    let failed = |source| Failure::Connect {
        target: target.clone(),
        from_env: connection.database_url.is_none(),
        source,
    };
    // Say which limit ran out: the command's own timeout (what was left of it), connect_timeout
    // from the string, or the default.
    let timed_out = || {
        let limit = if cut_short {
            format!(
                "no answer within the {} ms left of the command's timeout",
                limit.as_millis()
            )
        } else if config_timeout.is_some() {
            format!("no answer within connect_timeout={} s", timeout.as_secs())
        } else {
            format!(
                "no answer within {} s (set connect_timeout to change it)",
                timeout.as_secs()
            )
        };
        sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, limit))
    };
    let pool_options = PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(timeout)
        // sqlx pings every connection it hands out by default: a round trip before each query.
        // A connection a restart killed fails its query instead, which the worker retries and
        // a signup reports as Unavailable.
        .test_before_acquire(false);
    if config.hosts().len() > 1 || config.target_session_attrs() != ackloop::TargetSessionAttrs::Any {
        // Several hosts: the first one that is what target_session_attrs asks for, followed
        // across a failover. Each host gets the connect timeout.
        let hosts = config.connect_pool_within(pool_options, adjust, limit);
        return tokio::time::timeout(limit, hosts)
            .await
            .map_err(|_| failed(timed_out()))?
            .map_err(failed);
    }
    let options = adjust(config.into_options());
    let probe = tokio::time::timeout(limit, options.connect())
        .await
        .map_err(|_| failed(timed_out()))?
        .map_err(failed)?;
    let pool = pool_options.connect_lazy_with(options);
    // Hand the probe to nobody: closing it keeps the pool's connection count honest.
    let _ = probe.close().await;
    Ok(pool)
}

fn parse_url(url: &str, which: &'static str) -> Result<ConnectConfig, Failure> {
    // The parse error never repeats the URL, so no password reaches the terminal or the logs.
    ConnectConfig::parse(url).map_err(|source| Failure::BadUrl { which, source })
}
