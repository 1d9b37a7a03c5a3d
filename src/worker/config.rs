//! How a worker runs: its settings, and the session settings its connections carry.

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

use crate::channel::Channels;
use crate::job::Backoff;

/// Adds the session settings a worker's connections should carry, so that the server itself
/// releases the jobs of a worker that died or froze, without waiting for TCP to notice:
///
/// - `client_connection_check_interval = 1s`: a backend whose worker was killed (SIGKILL, OOM)
///   while a statement ran, or waited on a lock, notices within a second and rolls back: its
///   claimed jobs are pending again for the other workers.
/// - `idle_in_transaction_session_timeout = 10s`: a worker frozen (SIGSTOP, a hung process)
///   between the statements of a transaction loses its session, and its claims, after 10s. The
///   built-in batch is one statement; a handler's batch, and a job taken alone, hold a
///   transaction open between statements, for as long as the handlers take.
///
/// Every function of the contract that claims sets the same two for the rest of its transaction,
/// with the lock wait limit (`lock_timeout = 2s`: a lock another session holds is not the job's
/// fault, so the wait costs no attempt), in `ackloop.limit_claim_session`, the one place the
/// lock limit is written. The server arms the connection check when a statement starts, though,
/// so a claim made in one statement (the built-in batch) is watched only if the session carries
/// it: hence these.
///
/// `ackloop worker` uses these; build an embedded worker's pool with them too. They need
/// PostgreSQL 14 or later.
///
/// ```no_run
/// # async fn demo(options: sqlx::postgres::PgConnectOptions) -> Result<(), sqlx::Error> {
/// let pool = sqlx::postgres::PgPoolOptions::new()
///     .max_connections(4)
///     .connect_with(ackloop::worker_session_options(options))
///     .await?;
/// # Ok(()) }
/// ```
pub fn worker_session_options(options: PgConnectOptions) -> PgConnectOptions {
    options.options([
        ("client_connection_check_interval", "1s"),
        ("idle_in_transaction_session_timeout", "10s"),
    ])
}

/// How a [`Worker`](crate::Worker) runs. `WorkerConfig::default()` suits most deployments.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Processing loops in this process, each with at most one transaction open. Claiming in
    /// batches, a few loops keep a server busy; many only contend for the same rows.
    pub concurrency: usize,
    /// Jobs claimed and completed per transaction. Commits (and their fsyncs) are the cost, so
    /// larger batches mean more jobs per second under load, at no cost when the queue is short.
    pub batch_size: u16,
    /// How often to look for jobs when no notification came: the bound on how late a job whose
    /// notification was lost is picked up.
    pub poll_interval: Duration,
    /// Attempts before a job is marked failed. Errors that retrying cannot fix (a constraint or
    /// data error) fail the job at once.
    pub max_attempts: u32,
    /// The wait between attempts.
    pub backoff: Backoff,
    /// The channels shared with the signup side.
    pub channels: Channels,
    /// Where the wake-up listener connects, when the pool's server is not right for LISTEN (a
    /// transaction-mode pgbouncer). Defaults to the pool's own connect options.
    pub listen_options: Option<PgConnectOptions>,
    /// Do not LISTEN at all: find jobs only by polling every `poll_interval` (make it short,
    /// 100 to 500ms). For setups where no connection can carry LISTEN; a job then waits up to
    /// one interval before it is claimed.
    pub poll_only: bool,
    /// On shutdown, how long in-flight batches may take to finish before they are abandoned
    /// (their transactions roll back and the jobs are pending again for the next worker).
    pub shutdown_timeout: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 2,
            batch_size: 32,
            poll_interval: Duration::from_secs(2),
            max_attempts: 5,
            backoff: Backoff::default(),
            channels: Channels::default(),
            listen_options: None,
            poll_only: false,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}
