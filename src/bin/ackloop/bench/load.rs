//! The load the bench puts on the loop: callers signing users up and awaiting their players, or
//! a queue filled first and drained by the workers alone; workers in this process or as child
//! processes; and, with `--garbage`, a flood of notifications that are not jobs.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ackloop::{Channels, NewUser, SignupError, Signups, SignupsConfig, Worker, WorkerConfig};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::handler::InsertPlayerAsUser;
use super::histogram::Histogram;
use super::report::{BenchReport, clear_progress, peak_rss_mb, show_progress};
use crate::args::{BenchConfig, BenchHandler};

/// How long one signup may wait before it counts as timed out (and the run as failed).
const SIGNUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the workers: in this process, or as `ackloop worker` child processes.
struct Workers {
    shutdown: CancellationToken,
    in_process: Vec<tokio::task::JoinHandle<Result<(), ackloop::WorkerError>>>,
    children: Vec<tokio::process::Child>,
}

impl Workers {
    fn start(
        pool: &PgPool,
        options: &PgConnectOptions,
        config: &BenchConfig,
        per_process: usize,
    ) -> Result<Self, sqlx::Error> {
        let shutdown = CancellationToken::new();
        let mut workers = Self {
            shutdown: shutdown.clone(),
            in_process: Vec::new(),
            children: Vec::new(),
        };
        if config.worker_processes == 0 {
            let worker_config = WorkerConfig {
                concurrency: per_process,
                batch_size: config.batch_size,
                poll_only: config.poll_every.is_some(),
                poll_interval: config.poll_every.unwrap_or(WorkerConfig::default().poll_interval),
                ..WorkerConfig::default()
            };
            let worker = Worker::new(pool.clone(), worker_config);
            let task = match config.handler {
                BenchHandler::BuiltIn => tokio::spawn(worker.run(shutdown)),
                BenchHandler::Custom => tokio::spawn(worker.with_handler(InsertPlayerAsUser).run(shutdown)),
            };
            workers.in_process.push(task);
            return Ok(workers);
        }
        if config.handler == BenchHandler::Custom {
            return Err(sqlx::Error::Configuration(
                "--handler custom runs in this process's workers; drop --worker-processes".into(),
            ));
        }
        let exe = std::env::current_exe().map_err(sqlx::Error::Io)?;
        let url = options.to_url_lossy().to_string();
        for _ in 0..config.worker_processes {
            let child = tokio::process::Command::new(&exe)
                .args(["worker", "--concurrency", &per_process.to_string()])
                .args(["--batch-size", &config.batch_size.to_string()])
                .env("DATABASE_URL", &url)
                .env("RUST_LOG", "ackloop=warn")
                .env("ACKLOOP_LOG_FORMAT", config.log_format.name())
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(sqlx::Error::Io)?;
            workers.children.push(child);
        }
        Ok(workers)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.in_process {
            let _ = task.await;
        }
        for mut child in self.children {
            if let Some(pid) = child.id() {
                let _ = tokio::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            let _ = child.wait().await;
        }
    }
}

pub(super) async fn signups(
    pool: &PgPool,
    options: &PgConnectOptions,
    config: &BenchConfig,
    per_process: usize,
) -> Result<BenchReport, sqlx::Error> {
    let workers = Workers::start(pool, options, config, per_process)?;
    let signups_config = SignupsConfig {
        writers: config.writers,
        max_batch: config.max_batch,
        poll_only: config.poll_every,
        ..SignupsConfig::default()
    };
    let handle = Arc::new(
        Signups::connect_with(pool.clone(), signups_config)
            .await
            .map_err(into_sqlx)?,
    );
    let next = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let progress = tokio::spawn(show_progress(Arc::clone(&finished), config.signups));
    let latencies = Arc::new(Histogram::new());
    let started = Instant::now();
    let mut callers = JoinSet::new();
    for _ in 0..config.concurrency {
        let (handle, next, finished, total) = (
            Arc::clone(&handle),
            Arc::clone(&next),
            Arc::clone(&finished),
            config.signups,
        );
        let latencies = Arc::clone(&latencies);
        callers.spawn(async move {
            let (mut timeouts, mut errors) = (0, 0);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let user = NewUser::new(format!("bench-{n}@example.com"), format!("Bench {n}"))
                    .expect("bench users are valid");
                let begun = Instant::now();
                match handle.create_user_and_await_player(&user, SIGNUP_TIMEOUT).await {
                    Ok(_) => latencies.record(begun.elapsed()),
                    Err(SignupError::TimedOut { .. }) => timeouts += 1,
                    Err(err) => {
                        errors += 1;
                        let job_id = err.job_id().map(tracing::field::display);
                        tracing::error!(job.id = job_id, error = %err, "bench signup failed");
                    }
                }
                finished.fetch_add(1, Ordering::Relaxed);
            }
            (timeouts, errors)
        });
    }
    let (mut timeouts, mut errors) = (0, 0);
    while let Some(caller) = callers.join_next().await {
        let (t, e) = caller.expect("bench caller panicked");
        timeouts += t;
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    progress.abort();
    clear_progress();
    workers.stop().await;

    let percentile = |p: f64| latencies.percentile_ms(p);
    Ok(BenchReport {
        system: "ackloop",
        variant: "ackloop",
        handler: config.handler.name(),
        n: config.signups,
        c: config.concurrency,
        w: config.workers,
        p: config.worker_processes,
        rtt_ms: 0.0,
        secs,
        throughput: latencies.count() as f64 / secs,
        p50_ms: percentile(0.50),
        p95_ms: percentile(0.95),
        p99_ms: percentile(0.99),
        max_ms: latencies.max_ms(),
        connections: 0,
        peak_rss_mb: peak_rss_mb(),
        garbage_sent: 0,
        timeouts,
        errors,
        ok: true,
        verification: String::new(),
    })
}

/// Enqueues every job first (no worker running), then times the workers alone.
pub(super) async fn drain(
    pool: &PgPool,
    options: &PgConnectOptions,
    config: &BenchConfig,
    per_process: usize,
) -> Result<BenchReport, sqlx::Error> {
    let channels = Channels::default();
    let next = Arc::new(AtomicUsize::new(0));
    let mut enqueuers = JoinSet::new();
    for _ in 0..config.concurrency.max(1) {
        let (pool, next, channels, total) =
            (pool.clone(), Arc::clone(&next), channels.clone(), config.signups);
        enqueuers.spawn(async move {
            let mut conn = pool.acquire().await.map_err(SignupError::Database)?;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return Ok::<(), SignupError>(());
                }
                let user = NewUser::new(format!("drain-{n}@example.com"), format!("Drain {n}"))
                    .expect("bench users are valid");
                ackloop::create_user(&mut conn, &channels, &user).await?;
            }
        });
    }
    while let Some(enqueuer) = enqueuers.join_next().await {
        enqueuer.expect("enqueuer panicked").map_err(into_sqlx)?;
    }
    sqlx::raw_sql("analyze player_creation_jobs")
        .execute(pool)
        .await?;

    let started = Instant::now();
    let workers = Workers::start(pool, options, config, per_process)?;
    let mut conn = PgConnection::connect_with(options).await?;
    loop {
        let pending: i64 =
            sqlx::query_scalar("select count(*) from player_creation_jobs where status = 'pending'")
                .fetch_one(&mut conn)
                .await?;
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    workers.stop().await;
    Ok(BenchReport {
        system: "ackloop",
        variant: "drain",
        handler: config.handler.name(),
        n: config.signups,
        c: config.concurrency,
        w: config.workers,
        p: config.worker_processes,
        rtt_ms: 0.0,
        secs,
        throughput: config.signups as f64 / secs,
        p50_ms: 0.0,
        p95_ms: 0.0,
        p99_ms: 0.0,
        max_ms: 0.0,
        connections: 0,
        peak_rss_mb: peak_rss_mb(),
        garbage_sent: 0,
        timeouts: 0,
        errors: 0,
        ok: true,
        verification: String::new(),
    })
}

/// Notifies garbage on both channels as fast as one connection can: payloads that are not job
/// ids, 8 kB ones, and ids of no job, 10 of each kind per statement.
pub(super) async fn flood_garbage(options: PgConnectOptions, sent: Arc<AtomicU64>) {
    let Ok(mut conn) = PgConnection::connect_with(&options).await else {
        return;
    };
    loop {
        let result = sqlx::query(
            "select pg_notify(channel, payload)
             from unnest(array['player_jobs', 'player_jobs_done']) as channel,
                  lateral (select unnest(array['garbage', repeat('x', 7990), gen_random_uuid()::text]) || n
                           from generate_series(1, 10) as n) as payloads(payload)",
        )
        .execute(&mut conn)
        .await;
        if result.is_err() {
            return;
        }
        sent.fetch_add(60, Ordering::Relaxed);
    }
}

/// The bench fails with `sqlx::Error`s; a signup error that wraps none keeps its message.
fn into_sqlx(err: SignupError) -> sqlx::Error {
    match err {
        SignupError::Unavailable { source, .. } | SignupError::Database(source) => source,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}
