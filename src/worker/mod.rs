//! The player side: claim pending jobs, create their players, mark them done and confirm them.
//!
//! One listener task turns notifications on the jobs channel into wake-ups; `concurrency`
//! processing loops each claim and complete batches until the queue is empty, then wait for a
//! wake-up, a retry coming due, or the poll tick that catches anything a lost notification hid.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Acquire, PgConnection, PgPool};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::channel::{Channels, Event, IgnoredPayloads, Subscription, parse_job_id};
use crate::connect::Described;
use crate::job::Backoff;
use crate::store::{self, ClaimedJob, Due};
use crate::telemetry;

mod handler;

pub use handler::{Handler, InsertPlayer, Job, JobError};

/// Waits after the database could not be reached, before trying again.
const UNAVAILABLE_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(100),
    max: Duration::from_secs(5),
};

/// How long a loop keeps taking jobs alone after it starts or its session died, at least: a
/// job that killed a session stays locked by the dying backend for a moment, so a loop that
/// found nothing due at once looks again before it goes back to batches.
const ALONE_AT_LEAST: Duration = Duration::from_secs(1);

/// How soon to look again for a retry that is due but held by someone (another worker's
/// attempt, or the backend of a session a job just killed).
const RETRY_RECHECK: Duration = Duration::from_millis(250);

/// The longest one pass (a batch, or one job alone) may take before the loop gives its
/// connection up: a connection that stopped answering without closing (a NAT or load balancer
/// that dropped it) would otherwise hold the loop until TCP gives up, minutes later. A pass takes
/// milliseconds; lock waits end sooner, at the session's `lock_timeout` (see
/// [`worker_session_options`]), as an error that costs no attempt.
const PASS_LIMIT: Duration = Duration::from_secs(10);

/// The longest a worker statement waits for a lock another session holds (a `CREATE INDEX`, an
/// `ALTER TABLE`, a row someone keeps locked), set by [`worker_session_options`]. Then the
/// statement fails, the worker backs off and tries again, and the wait is not counted as an
/// attempt of any job: a lock is the database's state, not the job's fault.
const LOCK_WAIT: &str = "2s";

/// Adds the session settings a worker's connections should carry, so that the server itself
/// releases the jobs of a worker that died or froze, without waiting for TCP to notice:
///
/// - `client_connection_check_interval = 1s`: a backend whose worker was killed (SIGKILL, OOM)
///   while a statement ran, or waited on a lock, notices within a second and rolls back: its
///   claimed jobs are pending again for the other workers.
/// - `idle_in_transaction_session_timeout = 10s`: a worker frozen (SIGSTOP, a hung process)
///   between the statements of a transaction loses its session, and its claims, after 10s. Only
///   the one-job-per-savepoint path holds a transaction open between statements, and never for
///   longer than a few statements.
/// - `lock_timeout = 2s`: a statement waiting on a lock another session holds gives up; the
///   worker backs off and tries again without counting an attempt. Without it, a wait longer
///   than the worker's 10 s limit on a pass is taken for a dead connection, and a job being tried
///   alone then keeps that attempt.
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
        ("lock_timeout", LOCK_WAIT),
    ])
}

/// How a [`Worker`] runs. `WorkerConfig::default()` suits most deployments.
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

/// What stops a worker from running. A failing *job* is not one of these: it is recorded in its
/// row, logged, and retried or marked failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// A setting is out of range.
    #[error("invalid worker configuration: {0}")]
    Config(&'static str),
    /// The worker could not start listening for jobs (bad URL, server down, no permission).
    #[error("cannot listen on channel {channel}")]
    Listen {
        /// The jobs channel.
        channel: String,
        /// What the driver reported.
        #[source]
        source: sqlx::Error,
    },
}

/// The player worker. Run it with [`Worker::run`] as a service of its own (`ackloop worker`) or
/// inside another tokio service. It runs the built-in [`InsertPlayer`] unless given a
/// [`Handler`] of your own with [`Worker::with_handler`].
pub struct Worker<H = InsertPlayer> {
    pool: PgPool,
    config: WorkerConfig,
    handler: H,
    /// Whether `handler` is the built-in one that [`Worker::new`] set, which completes a whole
    /// batch in one statement.
    built_in: bool,
}

impl Worker {
    /// A worker that claims jobs through `pool`. Size the pool for `config.concurrency`
    /// connections (the listener has one of its own).
    ///
    /// ```no_run
    /// # async fn demo(options: sqlx::postgres::PgConnectOptions) -> Result<(), sqlx::Error> {
    /// use std::time::Duration;
    /// use ackloop::{Worker, WorkerConfig, worker_session_options};
    ///
    /// let pool = sqlx::postgres::PgPoolOptions::new()
    ///     .max_connections(3)
    ///     .connect_with(worker_session_options(options))
    ///     .await?;
    /// let config = WorkerConfig { concurrency: 2, poll_interval: Duration::from_secs(1), ..WorkerConfig::default() };
    /// let worker = Worker::new(pool, config);
    /// # Ok(()) }
    /// ```
    pub fn new(pool: PgPool, config: WorkerConfig) -> Self {
        Self {
            pool,
            config,
            handler: InsertPlayer,
            built_in: true,
        }
    }
}

impl<H: Handler> Worker<H> {
    /// The same worker running `handler` for each job instead of the built-in player insert.
    /// See [`Handler`] for what a handler may do and how its answers are taken.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) {
    /// use ackloop::{Handler, Job, JobError, Worker, WorkerConfig};
    /// use sqlx::PgConnection;
    ///
    /// struct CreatePlayer;
    ///
    /// impl Handler for CreatePlayer {
    ///     async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<(), JobError> {
    ///         sqlx::query("insert into players (user_id, display_name) values ($1, $2)")
    ///             .bind(job.user_id.get())
    ///             .bind(&job.display_name)
    ///             .execute(&mut *conn)
    ///             .await?;
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let worker = Worker::new(pool, WorkerConfig::default()).with_handler(CreatePlayer);
    /// # }
    /// ```
    pub fn with_handler<G: Handler>(self, handler: G) -> Worker<G> {
        Worker {
            pool: self.pool,
            config: self.config,
            handler,
            built_in: false,
        }
    }

    /// Processes jobs until `shutdown` is cancelled, then lets in-flight batches finish (up to
    /// `shutdown_timeout`) and returns. The database going away is not an error: the worker logs,
    /// waits and carries on when it is back.
    ///
    /// # Errors
    /// [`WorkerError::Config`] for a setting out of range; [`WorkerError::Listen`] when the first
    /// connection to listen for jobs fails.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) -> Result<(), ackloop::WorkerError> {
    /// use ackloop::{Worker, WorkerConfig};
    /// use tokio_util::sync::CancellationToken;
    ///
    /// let shutdown = CancellationToken::new();
    /// let worker = tokio::spawn(Worker::new(pool, WorkerConfig::default()).run(shutdown.clone()));
    /// // ... later, when the service stops:
    /// shutdown.cancel();
    /// worker.await.expect("worker panicked")?;
    /// # Ok(()) }
    /// ```
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let config = self.config;
        if config.concurrency == 0 {
            return Err(WorkerError::Config("concurrency must be at least 1"));
        }
        if config.batch_size == 0 {
            return Err(WorkerError::Config("batch size must be at least 1"));
        }
        if config.max_attempts == 0 {
            return Err(WorkerError::Config("max attempts must be at least 1"));
        }
        if config.poll_interval.is_zero() {
            return Err(WorkerError::Config("poll interval must be more than zero"));
        }
        let subscription = if config.poll_only {
            None
        } else {
            let listen_options = config
                .listen_options
                .clone()
                .unwrap_or_else(|| (*self.pool.connect_options()).clone());
            let subscription = Subscription::connect(listen_options, config.channels.jobs.clone())
                .await
                .map_err(|source| WorkerError::Listen {
                    channel: config.channels.jobs.to_string(),
                    source,
                })?;
            Some(subscription)
        };

        let processor = Arc::new(Processor {
            pool: self.pool,
            wake: Notify::new(),
            config,
            handler: self.handler,
            built_in: self.built_in,
        });
        let listener = subscription.map(|subscription| {
            tokio::spawn(
                wake_on_notifications(subscription, Arc::clone(&processor), shutdown.clone())
                    .instrument(tracing::info_span!("listener", channel = %processor.config.channels.jobs)),
            )
        });
        let mut loops = JoinSet::new();
        for index in 0..processor.config.concurrency {
            spawn_loop(&mut loops, &processor, &shutdown, index);
        }
        tracing::info!(
            concurrency = processor.config.concurrency,
            batch.size = processor.config.batch_size,
            poll_only = processor.config.poll_only,
            "worker started"
        );

        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(ended) = loops.join_next_with_id() => {
                    // Loops only return on shutdown; anything else is a panic. Keep the worker at
                    // full strength: its transaction rolled back, so no job was harmed.
                    if let Err(err) = ended {
                        tracing::error!(error = %err, "processing loop panicked; starting another");
                        spawn_loop(&mut loops, &processor, &shutdown, 0);
                    }
                }
            }
        }

        if let Some(listener) = listener {
            listener.abort();
        }
        let drained = tokio::time::timeout(processor.config.shutdown_timeout, async {
            while loops.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                loops = loops.len(),
                "in-flight batches did not finish in time; abandoning them (their jobs are pending again)"
            );
            loops.shutdown().await;
        }
        tracing::info!("worker stopped");
        Ok(())
    }
}

fn spawn_loop<H: Handler>(
    loops: &mut JoinSet<()>,
    processor: &Arc<Processor<H>>,
    shutdown: &CancellationToken,
    index: usize,
) {
    let span = tracing::info_span!("loop", index);
    loops.spawn(
        Arc::clone(processor)
            .process_until(shutdown.clone())
            .instrument(span),
    );
}

/// Turns notifications into wake-ups. The payload is checked only to tell garbage from job ids;
/// which jobs to take is decided by the claim, from the table.
async fn wake_on_notifications<H: Handler>(
    mut subscription: Subscription,
    processor: Arc<Processor<H>>,
    shutdown: CancellationToken,
) {
    let loops = processor.config.concurrency;
    let mut ignored = IgnoredPayloads::new(subscription.channel().clone());
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = subscription.next() => event,
        };
        let wake_ups = match event {
            Event::Notification(first) => {
                let mut jobs = usize::from(is_job_id(first.payload(), &mut ignored));
                while let Some(next) = subscription.next_buffered() {
                    jobs += usize::from(is_job_id(next.payload(), &mut ignored));
                }
                jobs.min(loops)
            }
            // Jobs committed while we were away sent their notifications to nobody.
            Event::Resubscribed => loops,
        };
        for _ in 0..wake_ups {
            processor.wake.notify_one();
        }
    }
}

fn is_job_id(payload: &str, ignored: &mut IgnoredPayloads) -> bool {
    match parse_job_id(payload) {
        Ok(_) => true,
        Err(err) => {
            ignored.record(&err);
            false
        }
    }
}

struct Processor<H> {
    pool: PgPool,
    wake: Notify,
    config: WorkerConfig,
    handler: H,
    built_in: bool,
}

/// What one pass over the queue did.
struct Pass {
    claimed: usize,
    /// The earliest retry this pass scheduled.
    retry_at: Option<Instant>,
}

/// Where a processing loop stands between passes.
struct LoopState {
    /// Jobs still to take one at a time, each attempt counted in its own committed transaction
    /// before it is made. Set when the loop starts (the last process may have died of a job)
    /// and after any pass the session did not survive (a job may have killed it), so a job that
    /// kills sessions is counted, retried with backoff and failed, instead of taking its batch
    /// down with it for ever.
    careful: usize,
    /// When `careful` was last set.
    careful_since: Instant,
    /// When a retry this loop knows of comes due.
    next_retry: Option<Instant>,
    /// Look for jobs tried before that are due again (they are never taken in a batch).
    look_for_retries: bool,
    /// The last look that found no retry due: retries are looked for at least once a poll
    /// interval, even while wake-ups keep the loop busy with batches.
    last_retry_look: Instant,
    /// Failed passes in a row, for the backoff.
    unavailable: u32,
}

/// What one lone attempt did.
enum Lone {
    /// No due job was left to take.
    NoneDue,
    /// A job was taken: done, failed, scheduled for a retry, or found changed.
    Taken {
        /// When its retry is due, if one was scheduled.
        retry_at: Option<Instant>,
    },
}

impl<H: Handler> Processor<H> {
    /// One processing loop: drain the queue, then wait for a reason to look again.
    async fn process_until(self: Arc<Self>, shutdown: CancellationToken) {
        let mut poll = tokio::time::interval_at(
            Instant::now() + self.config.poll_interval,
            self.config.poll_interval,
        );
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut state = LoopState {
            careful: usize::from(self.config.batch_size),
            // No dying backend of this loop's holds a job yet: an empty queue ends it at once.
            careful_since: Instant::now()
                .checked_sub(ALONE_AT_LEAST)
                .unwrap_or_else(Instant::now),
            next_retry: None,
            look_for_retries: true,
            last_retry_look: Instant::now(),
            unavailable: 0,
        };
        loop {
            // Drain: on start, after every wake-up and tick, until nothing due is left.
            while !shutdown.is_cancelled() {
                match self.drain_step(&mut state).await {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(err) => {
                        state.unavailable += 1;
                        let delay = if state.unavailable == 1 && !store::is_lock_timeout(&err) {
                            // At once, one job alone: if a job killed the session, its attempt is
                            // counted before the other loops' batches meet it too.
                            Duration::ZERO
                        } else {
                            UNAVAILABLE_BACKOFF.delay(state.unavailable - 1)
                        };
                        if store::is_lock_timeout(&err) {
                            tracing::warn!(
                                retry_in_ms = delay.as_millis() as u64,
                                "jobs wait for a lock another session holds; retrying"
                            );
                        } else {
                            // The session may have died of a job: take the next ones alone.
                            state.careful = usize::from(self.config.batch_size);
                            state.careful_since = Instant::now();
                            tracing::warn!(
                                error = %Described(&err),
                                retry_in_ms = delay.as_millis() as u64,
                                "cannot process jobs; retrying (the next jobs one at a time)"
                            );
                        }
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
            let next_retry = state.next_retry;
            let retry_due = async {
                match next_retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = retry_due => {
                    state.next_retry = None;
                    state.look_for_retries = true;
                }
                _ = poll.tick() => state.look_for_retries = true,
            }
        }
    }

    /// One step of a drain; true while there may be more to do.
    async fn drain_step(&self, state: &mut LoopState) -> Result<bool, sqlx::Error> {
        if state.careful > 0 {
            let lone = self.attempt_alone(Due::Any, state).await?;
            state.unavailable = 0;
            match lone {
                Lone::Taken { .. } => state.careful -= 1,
                Lone::NoneDue if state.careful_since.elapsed() >= ALONE_AT_LEAST => state.careful = 0,
                Lone::NoneDue => {
                    // Nothing due that nobody holds: look again (alone) a little later.
                    let again = state.careful_since + ALONE_AT_LEAST;
                    state.next_retry = earliest(state.next_retry, Some(again));
                    return Ok(false);
                }
            }
            return Ok(true);
        }
        // Retries first when they may be due, so that a busy queue cannot starve them.
        let now = Instant::now();
        let retry_due = state.next_retry.is_some_and(|at| at <= now);
        if state.look_for_retries
            || retry_due
            || now.duration_since(state.last_retry_look) >= self.config.poll_interval
        {
            let lone = self.attempt_alone(Due::Retries, state).await?;
            state.unavailable = 0;
            if let Lone::NoneDue = lone {
                state.look_for_retries = false;
                state.last_retry_look = now;
                // Ask the table when the next retry is due (any worker's), so that none waits
                // for a poll tick; one due but held by someone is looked at again shortly.
                let due_in = self.next_retry_due_in().await?;
                state.next_retry = due_in.map(|secs| {
                    let wait = Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX);
                    now + wait.clamp(RETRY_RECHECK, self.config.poll_interval.max(RETRY_RECHECK))
                });
            }
            return Ok(true);
        }
        let pass = self.pass().await?;
        state.unavailable = 0;
        state.next_retry = earliest(state.next_retry, pass.retry_at);
        Ok(pass.claimed == usize::from(self.config.batch_size))
    }

    /// Seconds until the next retry is due (see [`store::next_retry_due_in`]), within the pass
    /// limit like every other statement of a loop.
    async fn next_retry_due_in(&self) -> Result<Option<f64>, sqlx::Error> {
        self.on_own_connection(async |conn| store::next_retry_due_in(conn).await)
            .await
    }

    /// Runs `work` on a pool connection of its own within [`PASS_LIMIT`]. A connection whose
    /// work failed for want of the database (or ran out of time) is closed, not handed to the
    /// next pass: its session may be gone, or never answer again.
    async fn on_own_connection<T>(
        &self,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let result = tokio::time::timeout(PASS_LIMIT, work(&mut conn))
            .await
            .unwrap_or_else(|_| Err(store::no_answer_in_time()));
        if result.as_ref().is_err_and(store::is_unavailable) {
            conn.close_on_drop();
        }
        result
    }

    /// Takes the next due job of the kind asked for, alone: counts the attempt and
    /// pushes the job's next try back by its backoff in one committed transaction, then makes
    /// the attempt in another. If the attempt kills the session (or the process), the job keeps
    /// its count and waits out its backoff; once it has used every attempt it is failed here,
    /// before another is made.
    async fn attempt_alone(&self, due: Due, state: &mut LoopState) -> Result<Lone, sqlx::Error> {
        let mut unfinished_due = None;
        let result = self
            .on_own_connection(async |conn| self.attempt_alone_on(conn, due, &mut unfinished_due).await)
            .await;
        match &result {
            Ok(Lone::Taken { retry_at }) => state.next_retry = earliest(state.next_retry, *retry_at),
            Ok(Lone::NoneDue) => {}
            // The attempt may not have finished: look again when its job is due.
            Err(_) => state.next_retry = earliest(state.next_retry, unfinished_due),
        }
        result
    }

    /// [`Self::attempt_alone`] on `conn`; sets `unfinished_due` to when the job is due again
    /// should the attempt it counted never finish.
    async fn attempt_alone_on(
        &self,
        conn: &mut PgConnection,
        due: Due,
        unfinished_due: &mut Option<Instant>,
    ) -> Result<Lone, sqlx::Error> {
        let config = &self.config;
        let mut tx = conn.begin().await?;
        let Some(job) = store::lock_next_due_job(&mut tx, due).await? else {
            tx.commit().await?;
            return Ok(Lone::NoneDue);
        };
        let made = u32::try_from(job.attempts).unwrap_or(u32::MAX);
        if made >= config.max_attempts {
            // Its last attempt never recorded an outcome: it ended with its session.
            let reason = match &job.last_error {
                Some(last) => format!("gave up after {made} attempts; {last}"),
                None => format!("gave up after {made} attempts"),
            };
            store::mark_job_failed(&mut tx, job.id, &reason, &config.channels.done).await?;
            tx.commit().await?;
            ::metrics::counter!(telemetry::JOBS_FAILED).increment(1);
            tracing::error!(job.id = %job.id, attempts = made, error = reason, "job failed");
            return Ok(Lone::Taken { retry_at: None });
        }
        if job.attempts > 0 && job.last_error.as_deref() == Some(&*unfinished(job.attempts)) {
            tracing::warn!(job.id = %job.id, attempt = job.attempts, "job's last attempt ended with its session; retrying it alone");
        }
        let attempt = job.attempts + 1;
        // At least a second: between this commit and the next transaction's row lock, the job is
        // held only by being not yet due, and a loaded machine can pause a task for a while.
        let lease = config.backoff.delay(made + 1).max(ALONE_AT_LEAST);
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        store::start_attempt(&mut tx, job.id, attempt, &unfinished(attempt), lease_ms).await?;
        tx.commit().await?;
        *unfinished_due = Some(Instant::now() + lease);
        ::metrics::histogram!(telemetry::COMMIT_TO_CLAIM).record(job.waited_secs);
        let started = Instant::now();

        let claimed = ClaimedJob {
            id: job.id,
            user_id: job.user_id,
            display_name: job.display_name,
            attempts: attempt,
            waited_secs: job.waited_secs,
        };
        let span = tracing::debug_span!("process_job", job.id = %job.id, attempt);
        match self.make_attempt(conn, &claimed, started).instrument(span).await {
            Ok(retry_at) => Ok(Lone::Taken { retry_at }),
            // A lock held elsewhere is not the job's fault: the attempt is given back.
            Err(err) if store::is_lock_timeout(&err) => {
                let delay = config.backoff.delay(made + 1);
                let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                let blocked = format!(
                    "attempt {attempt} waited over {LOCK_WAIT} for a lock another session holds; \
                     it will be tried again, not counted"
                );
                let mut tx = conn.begin().await?;
                store::give_back_attempt(&mut tx, job.id, attempt, &blocked, delay_ms).await?;
                tx.commit().await?;
                tracing::warn!(job.id = %job.id, attempt, retry_in_ms = delay_ms, "job waited for a lock; will retry");
                Ok(Lone::Taken {
                    retry_at: Some(Instant::now() + delay),
                })
            }
            Err(err) => Err(err),
        }
    }

    /// Makes attempt `job.attempts`, already counted, in a transaction of its own: completes the
    /// job, or records its failure while still holding its row. Returns when a retry is due, if
    /// one was scheduled.
    async fn make_attempt(
        &self,
        conn: &mut PgConnection,
        job: &ClaimedJob,
        claimed_at: Instant,
    ) -> Result<Option<Instant>, sqlx::Error> {
        let mut tx = conn.begin().await?;
        if !store::lock_started_attempt(&mut tx, job.id, job.attempts).await? {
            tx.commit().await?;
            return Ok(None);
        }
        store::job_savepoint(&mut tx).await?;
        match self.attempt(&mut tx, job, Then::Release).await? {
            Ok(()) => {
                store::mark_jobs_done(&mut tx, &[job.id], &self.config.channels.done).await?;
                tx.commit().await?;
                ::metrics::counter!(telemetry::JOBS_DONE).increment(1);
                ::metrics::histogram!(telemetry::CLAIM_TO_DONE).record(claimed_at.elapsed().as_secs_f64());
                Ok(None)
            }
            Err(err) => {
                let retry_at = self.record_failure(&mut tx, job, &err).await?;
                tx.commit().await?;
                Ok(retry_at)
            }
        }
    }

    /// Claims and completes one batch in one statement. If that fails, something in the batch is
    /// bad: go through a batch again one job per savepoint, to complete the good jobs and record
    /// the bad one's error.
    async fn pass(&self) -> Result<Pass, sqlx::Error> {
        self.on_own_connection(async |conn| self.pass_on(conn).await)
            .await
    }

    async fn pass_on(&self, conn: &mut PgConnection) -> Result<Pass, sqlx::Error> {
        let limit = i64::from(self.config.batch_size);
        if !self.built_in {
            return self.pass_one_by_one(conn, limit).await;
        }
        let started = Instant::now();
        match store::complete_due_jobs(&mut *conn, limit, &self.config.channels.done).await {
            Ok(done) => {
                if !done.is_empty() {
                    tracing::debug!(jobs = done.len(), "batch done");
                    let took = started.elapsed().as_secs_f64();
                    for job in &done {
                        tracing::debug!(job.id = %job.id, waited_secs = job.waited_secs, "job done");
                        ::metrics::histogram!(telemetry::COMMIT_TO_CLAIM).record(job.waited_secs);
                        ::metrics::histogram!(telemetry::CLAIM_TO_DONE).record(took);
                    }
                    ::metrics::counter!(telemetry::JOBS_DONE).increment(done.len() as u64);
                }
                Ok(Pass {
                    claimed: done.len(),
                    retry_at: None,
                })
            }
            Err(err) if is_not_the_jobs_fault(&err) => Err(err),
            // On the same connection: Postgres reports a failed statement before it has finished
            // aborting it, so for a moment the batch's rows are still locked, and a claim on
            // another connection would skip them and find nothing to do. This connection's next
            // command waits for the abort.
            Err(err) => {
                tracing::debug!(error = %Described(&err), "batch failed; completing its jobs one at a time");
                self.pass_one_by_one(conn, limit).await
            }
        }
    }

    /// Claims a batch and runs the handler on each job in a savepoint of its own, then marks the
    /// jobs it finished done, in one transaction. Between two jobs, one round trip releases the
    /// last job's savepoint and sets the next one's: what a handler costs beyond its own
    /// statements.
    async fn pass_one_by_one(&self, conn: &mut PgConnection, limit: i64) -> Result<Pass, sqlx::Error> {
        let started = Instant::now();
        let mut tx = conn.begin().await?;
        let jobs = store::claim_due_jobs(&mut tx, limit).await?;
        let mut done = Vec::with_capacity(jobs.len());
        let mut retry_at = None;
        if !jobs.is_empty() {
            store::job_savepoint(&mut tx).await?;
        }
        for (index, job) in jobs.iter().enumerate() {
            let more = index + 1 < jobs.len();
            let then = if more { Then::Renew } else { Then::Release };
            let span = tracing::debug_span!("process_job", job.id = %job.id, attempt = job.attempts);
            match self.attempt(&mut tx, job, then).instrument(span).await? {
                Ok(()) => done.push(job.id),
                Err(err) => {
                    retry_at = earliest(retry_at, self.record_failure(&mut tx, job, &err).await?);
                    // The record is kept (released into the transaction) before the next job
                    // starts, so that job's rollback cannot undo it.
                    if more {
                        store::renew_job_savepoint(&mut tx).await?;
                    }
                }
            }
        }
        if !done.is_empty() {
            store::mark_jobs_done(&mut tx, &done, &self.config.channels.done).await?;
        }
        tx.commit().await?;
        let took = started.elapsed().as_secs_f64();
        for job in jobs.iter().filter(|job| done.contains(&job.id)) {
            ::metrics::histogram!(telemetry::COMMIT_TO_CLAIM).record(job.waited_secs);
            ::metrics::histogram!(telemetry::CLAIM_TO_DONE).record(took);
        }
        ::metrics::counter!(telemetry::JOBS_DONE).increment(done.len() as u64);
        Ok(Pass {
            claimed: jobs.len(),
            retry_at,
        })
    }

    /// Runs the handler on `job` in the savepoint set for it: on success the savepoint is released
    /// (and, with [`Then::Renew`], a new one set for the next job); otherwise it is rolled back
    /// to, undoing the job's writes, and left set for the failure to be recorded in. The inner
    /// error is the job's (to be recorded); the outer one is the pass's (the database could not
    /// be reached, or a lock wait ran out), for which the whole transaction is given up and no
    /// attempt counted.
    async fn attempt(
        &self,
        conn: &mut PgConnection,
        job: &ClaimedJob,
        then: Then,
    ) -> Result<Result<(), JobError>, sqlx::Error> {
        let handed = Job {
            id: job.id,
            user_id: job.user_id,
            display_name: job.display_name.clone(),
            attempt: u32::try_from(job.attempts).unwrap_or(u32::MAX),
        };
        let error = match handler::run_caught(&self.handler, &handed, conn).await {
            Ok(()) => {
                let kept = match then {
                    Then::Renew => store::renew_job_savepoint(conn).await,
                    Then::Release => store::release_job_savepoint(conn).await,
                };
                match kept {
                    Ok(()) => return Ok(Ok(())),
                    Err(err) if is_not_the_jobs_fault(&err) => return Err(err),
                    // A statement of the handler's failed and it returned success anyway: the
                    // transaction is aborted and nothing it wrote can be kept.
                    Err(_) => JobError::retry_later(
                        "the handler returned success after one of its statements failed; nothing \
                         it wrote was kept",
                    ),
                }
            }
            Err(JobError::Database(err)) if is_not_the_jobs_fault(&err) => return Err(err),
            Err(err) => err,
        };
        store::rollback_to_job_savepoint(conn).await?;
        Ok(Err(error))
    }

    /// Marks the job failed (and tells its caller) or schedules its retry. Returns when the retry
    /// is due.
    async fn record_failure(
        &self,
        conn: &mut PgConnection,
        job: &ClaimedJob,
        err: &JobError,
    ) -> Result<Option<Instant>, sqlx::Error> {
        let (error, permanent) = match err {
            JobError::Database(err) => (crate::describe_db_error(err), store::is_permanent(err)),
            JobError::RetryLater(reason) => (handler::storable_reason(reason), false),
            JobError::Fail(reason) => (handler::storable_reason(reason), true),
        };
        let attempts = u32::try_from(job.attempts).unwrap_or(u32::MAX);
        if permanent || attempts >= self.config.max_attempts {
            store::mark_job_failed(conn, job.id, &error, &self.config.channels.done).await?;
            ::metrics::counter!(telemetry::JOBS_FAILED).increment(1);
            tracing::error!(job.id = %job.id, attempts, error, "job failed");
            return Ok(None);
        }
        let delay = self.config.backoff.delay(attempts);
        let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        store::schedule_retry(conn, job.id, &error, delay_ms).await?;
        ::metrics::counter!(telemetry::JOBS_RETRIED).increment(1);
        tracing::warn!(job.id = %job.id, attempt = attempts, retry_in_ms = delay_ms, error = %error, "job attempt failed; will retry");
        Ok(Some(Instant::now() + delay))
    }
}

/// What to do with a job's savepoint once its handler succeeded.
#[derive(Debug, Clone, Copy)]
enum Then {
    /// Release it and set the next job's, in one round trip.
    Renew,
    /// Release it: no job follows.
    Release,
}

/// Whether a statement failed for want of the database (or of a lock another session holds)
/// rather than for anything in the job: then the pass is given up, not the job's attempt.
fn is_not_the_jobs_fault(err: &sqlx::Error) -> bool {
    store::is_unavailable(err) || store::is_lock_timeout(err)
}

/// A job's error while an attempt is under way, and for good if the attempt never finishes.
fn unfinished(attempt: i32) -> String {
    format!(
        "attempt {attempt} did not finish: its database session ended (a crash or terminated \
         backend, an out-of-memory kill, or the worker stopped), unless it is running now"
    )
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
