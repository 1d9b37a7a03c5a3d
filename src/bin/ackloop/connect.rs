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
/// failing over). A refusal (a wrong password, an unknown database, TLS refused) ends it at once.
#[derive(Debug, Clone, Copy)]
pub enum Patience {
    /// Until this moment: a command's `--timeout`, or the connect timeout for the others.
    Until(tokio::time::Instant),
    /// Until it connects, logging each failed try: a worker waits for its database.
    Forever,
}

impl Patience {
    /// Until `timeout` from now.
    pub fn for_(timeout: Duration) -> Self {
        Self::Until(tokio::time::Instant::now() + timeout)
    }

    /// How long one try may take: what is left, or `limit`.
    fn try_limit(self, limit: Duration) -> Duration {
        match self {
            Self::Until(deadline) => {
                limit.min(deadline.saturating_duration_since(tokio::time::Instant::now()))
            }
            Self::Forever => limit,
        }
    }

    /// Waits before try number `failed + 1`, or returns false if the deadline comes first.
    async fn wait_to_retry(self, failed: u32, err: &sqlx::Error) -> bool {
        let delay = START_BACKOFF.delay(failed);
        match self {
            Self::Until(deadline) => {
                if tokio::time::Instant::now() + delay >= deadline {
                    return false;
                }
                tracing::debug!(error = %ackloop::describe_db_error(err), attempt = failed, "cannot reach the database yet; retrying");
            }
            Self::Forever => {
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
        Ok(Patience::for_(self.connect_timeout()?))
    }

    /// The connect timeout: the connection string's, or ackloop's default.
    pub fn connect_timeout(&self) -> Result<Duration, Failure> {
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
        let limit = patience.try_limit(CONNECT_TIMEOUT);
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
        match connect_once(connection, &adjust, connections, patience).await {
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

/// One try of [`connect`], within what `patience` leaves.
async fn connect_once(
    connection: &ConnectionArgs,
    adjust: &impl Fn(PgConnectOptions) -> PgConnectOptions,
    connections: u32,
    patience: Patience,
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
    // Say which limit ran out: connect_timeout from the string, or the default.
    let timed_out = || {
        let limit = match config_timeout {
            Some(_) => format!("no answer within connect_timeout={} s", timeout.as_secs()),
            None => format!(
                "no answer within {} s (set connect_timeout to change it)",
                timeout.as_secs()
            ),
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
        return config
            .connect_pool_with(pool_options, adjust)
            .await
            .map_err(failed);
    }
    let options = adjust(config.into_options());
    let probe = tokio::time::timeout(patience.try_limit(timeout), options.connect())
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
