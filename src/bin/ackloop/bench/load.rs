//! The load the bench puts on the loop: callers signing users up and awaiting their players (in
//! this process or in auth processes), or a queue filled first and drained by the workers alone;
//! and, with `--garbage`, a flood of notifications that are not jobs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ackloop::{Channels, NewUser, SignupError};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinSet;

use super::auth::AuthProcesses;
use super::callers::{self, Measured, into_sqlx};
use super::histogram::Histogram;
use super::report::{BenchReport, CpuTicks, clear_progress, peak_rss_mb, show_progress};
use super::workers::Workers;
use crate::args::BenchConfig;

pub(super) async fn signups(
    pool: &PgPool,
    options: &PgConnectOptions,
    config: &BenchConfig,
    per_process: usize,
) -> Result<BenchReport, sqlx::Error> {
    let mut workers = Workers::start(pool, options, config, per_process)?;
    workers.ready().await?;
    let measured = if config.auth_processes == 0 {
        in_process(pool, config).await?
    } else {
        AuthProcesses::start(options, config).await?.run().await?
    };
    workers.stop().await;

    let Measured {
        latencies,
        misses,
        secs,
        peak_rss_mb,
        cpu_busy_pct,
    } = measured;
    let percentile = |p: f64| latencies.percentile_ms(p);
    Ok(BenchReport {
        system: "ackloop",
        variant: "ackloop",
        handler: config.handler.name(),
        n: config.signups,
        c: config.concurrency,
        w: config.workers,
        p: config.worker_processes,
        auth_processes: config.auth_processes,
        rtt_ms: 0.0,
        secs,
        throughput: latencies.count() as f64 / secs,
        p50_ms: percentile(0.50),
        p95_ms: percentile(0.95),
        p99_ms: percentile(0.99),
        max_ms: latencies.max_ms(),
        connections: 0,
        signup_commits: 0,
        worker_commits: 0,
        cpu_busy_pct,
        peak_rss_mb,
        garbage_sent: 0,
        timeouts: misses.timeouts,
        errors: misses.errors,
        ok: true,
        verification: String::new(),
    })
}

/// Every caller in this process, on one `Signups` sharing the bench's pool.
async fn in_process(pool: &PgPool, config: &BenchConfig) -> Result<Measured, sqlx::Error> {
    let handle = Arc::new(callers::connect(pool.clone(), config).await?);
    let finished = Arc::new(AtomicUsize::new(0));
    let progress = tokio::spawn(show_progress(Arc::clone(&finished), config.signups));
    let latencies = Arc::new(Histogram::new());
    let cpu = CpuTicks::now();
    let started = Instant::now();
    let misses = callers::sign_up(
        handle,
        0..config.signups,
        config.concurrency,
        Arc::clone(&latencies),
        finished,
    )
    .await;
    let secs = started.elapsed().as_secs_f64();
    let cpu_busy_pct = cpu.busy_pct_since();
    progress.abort();
    clear_progress();
    Ok(Measured {
        latencies,
        misses,
        secs,
        peak_rss_mb: peak_rss_mb(),
        cpu_busy_pct,
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
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return Ok::<(), SignupError>(());
                }
                let user = NewUser::new(format!("drain-{n}@example.com"), format!("Drain {n}"))
                    .expect("bench users are valid");
                // A connection per signup, not per enqueuer: the pool holds fewer connections
                // than there are enqueuers (it is sized for the writers and worker loops), and
                // an enqueuer holding one for the whole fill would leave the others waiting past
                // the pool's acquire timeout whenever the fill takes longer than that.
                let mut conn = pool.acquire().await.map_err(SignupError::Database)?;
                ackloop::create_user(&mut conn, &channels, &user).await?;
            }
        });
    }
    while let Some(enqueuer) = enqueuers.join_next().await {
        enqueuer.expect("enqueuer panicked").map_err(into_sqlx)?;
    }
    sqlx::raw_sql("analyze ackloop.player_creation_jobs")
        .execute(pool)
        .await?;

    let cpu = CpuTicks::now();
    let started = Instant::now();
    let workers = Workers::start(pool, options, config, per_process)?;
    let mut conn = PgConnection::connect_with(options).await?;
    loop {
        let pending: i64 = sqlx::query_scalar(
            "select count(*) from ackloop.player_creation_jobs where status in ('pending', 'running')",
        )
        .fetch_one(&mut conn)
        .await?;
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu_busy_pct = cpu.busy_pct_since();
    workers.stop().await;
    Ok(BenchReport {
        system: "ackloop",
        variant: "drain",
        handler: config.handler.name(),
        n: config.signups,
        c: config.concurrency,
        w: config.workers,
        p: config.worker_processes,
        auth_processes: 0,
        rtt_ms: 0.0,
        secs,
        throughput: config.signups as f64 / secs,
        p50_ms: 0.0,
        p95_ms: 0.0,
        p99_ms: 0.0,
        max_ms: 0.0,
        connections: 0,
        signup_commits: 0,
        worker_commits: 0,
        cpu_busy_pct,
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
