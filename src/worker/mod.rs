//! The player side: claim pending jobs, create their players, mark them done and confirm them.
//!
//! One listener task turns notifications on the jobs channel into wake-ups; `concurrency`
//! processing loops each claim and complete batches until the queue is empty, then wait for a
//! wake-up, a retry coming due, or the poll tick that catches anything a lost notification hid.
//!
//! Layout, arrows pointing down: this module (the [`Worker`] and its listener) → `loops` (one
//! processing loop and its state) → `passes` (a pass's transactions) → `handler` (the
//! [`Handler`] trait, the built-in insert) and `config` (settings).

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::channel::{IgnoredPayloads, parse_job_id};
use crate::listen::{Event, ListenTarget, Subscription};

mod batch;
mod config;
mod handler;
mod loops;
mod passes;

pub use config::{WorkerConfig, worker_session_options};
pub use handler::{BatchForm, Created, Handler, InsertPlayer, Job, JobError, JobResultExt};
use passes::Processor;

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
        }
    }
}

impl<H: Handler> Worker<H> {
    /// The same worker running `handler` for each job instead of the built-in player insert.
    /// See [`Handler`] for what a handler may do and how its answers are taken.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) {
    /// use ackloop::{Created, Handler, Job, JobError, Worker, WorkerConfig};
    /// use sqlx::PgConnection;
    ///
    /// /// The player service's own `players (id bigserial, user_id text unique, name text)`.
    /// struct CreatePlayer;
    ///
    /// impl Handler for CreatePlayer {
    ///     async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<Created, JobError> {
    ///         let id: i64 = sqlx::query_scalar(
    ///             "insert into players (user_id, name) values ($1, $2)
    ///              on conflict (user_id) do update set name = players.name
    ///              returning id",
    ///         )
    ///         .bind(job.user_id.as_str())
    ///         .bind(&job.display_name)
    ///         .fetch_one(&mut *conn)
    ///         .await?;
    ///         Ok(Created::new(id))
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
        }
    }

    /// The wake-up subscription on the jobs channel, unless the worker only polls. A server
    /// not reachable yet is no error: the subscription keeps trying, and the worker's sweeps and
    /// polls find the jobs meanwhile.
    async fn subscribe(&self) -> Result<Option<Subscription>, WorkerError> {
        let config = &self.config;
        if config.poll_only {
            return Ok(None);
        }
        let target = match config.listen_options.clone() {
            Some(options) => ListenTarget::Fixed(Box::new(options)),
            // Wherever the pool goes, across a failover too.
            None => ListenTarget::Pool(self.pool.clone()),
        };
        let subscription = Subscription::connect_or_later(target, config.channels.jobs.clone())
            .await
            .map_err(|source| WorkerError::Listen {
                channel: config.channels.jobs.to_string(),
                source,
            })?;
        Ok(Some(subscription))
    }

    /// Processes jobs until `shutdown` is cancelled, then lets in-flight batches finish (up to
    /// `shutdown_timeout`) and returns. The database going away is not an error: the worker logs,
    /// waits and carries on when it is back.
    ///
    /// # Errors
    /// [`WorkerError::Config`] for a setting out of range; [`WorkerError::Listen`] when the
    /// server refuses the connection to listen for jobs for good (a wrong password, an unknown
    /// database, TLS refused). A server not reachable yet is no error: the worker keeps trying,
    /// and sweeps and polls the table meanwhile.
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
        check_config(&self.config)?;
        let subscription = self.subscribe().await?;
        let config = self.config;
        let processor = Arc::new(Processor {
            pool: self.pool,
            wake: Notify::new(),
            config,
            handler: self.handler,
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

/// Refuses settings out of range before anything starts.
fn check_config(config: &WorkerConfig) -> Result<(), WorkerError> {
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
    Ok(())
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
                // A grouped signup sends one wake-up per 32 jobs, so each may stand for a batch.
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
