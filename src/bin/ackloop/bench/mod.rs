//! `ackloop bench`: drives the full loop through the public library API on a scratch database and
//! prints figures. It asserts nothing about speed; it does verify that every signup got exactly
//! one player.

use std::io::{IsTerminal, Write as _};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ackloop::{Channels, NewUser, SignupError, Signups, SignupsConfig, Worker, WorkerConfig};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::args::BenchConfig;

mod proxy;

/// Finished rows put in the scratch database before measuring: on empty tables each backend
/// caches a sequential-scan plan for the foreign-key check, and throughput halves as they grow.
const PREFILL_ROWS: i64 = 20_000;
/// How long one signup may wait before it counts as timed out (and the run as failed).
const SIGNUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The figures, also the `--json` line.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    system: &'static str,
    variant: &'static str,
    n: usize,
    c: usize,
    w: usize,
    p: usize,
    rtt_ms: f64,
    secs: f64,
    throughput: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    connections: i64,
    peak_rss_mb: f64,
    garbage_sent: u64,
    timeouts: usize,
    errors: usize,
    ok: bool,
    verification: String,
}

impl BenchReport {
    pub fn ok(&self) -> bool {
        self.ok
    }

    pub fn print(&self, json: bool) {
        if json {
            println!(
                "{}",
                serde_json::to_string(self).expect("a report always serialises")
            );
            return;
        }
        let what = if self.variant == "drain" {
            "jobs"
        } else {
            "acknowledged signups"
        };
        println!(
            "{} {what} in {:.2}s: {:.0}/s  (c={} w={} p={} rtt={}ms)",
            self.n, self.secs, self.throughput, self.c, self.w, self.p, self.rtt_ms
        );
        if self.variant != "drain" {
            println!(
                "latency ms: p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
                self.p50_ms, self.p95_ms, self.p99_ms, self.max_ms
            );
        }
        println!(
            "connections used: {}   peak RSS: {:.1} MiB",
            self.connections, self.peak_rss_mb
        );
        if self.garbage_sent > 0 {
            println!("garbage notifications sent meanwhile: {}", self.garbage_sent);
        }
        println!(
            "verification: {} ({})",
            if self.ok { "ok" } else { "FAILED" },
            self.verification
        );
    }
}

/// Runs one benchmark on a scratch database next to the one `admin` points at.
pub async fn run(admin: PgConnectOptions, config: BenchConfig) -> Result<BenchReport, sqlx::Error> {
    let scratch = format!("ackloop_bench_{}", std::process::id());
    let mut admin_conn = admin.connect().await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("drop database if exists {scratch}")))
        .execute(&mut admin_conn)
        .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {scratch}")))
        .execute(&mut admin_conn)
        .await?;
    let options = admin.clone().database(&scratch);
    let result = run_on(options, &config).await;
    if !config.keep {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "drop database if exists {scratch} with (force)"
        )))
        .execute(&mut admin_conn)
        .await?;
    }
    admin_conn.close().await?;
    result
}

async fn run_on(options: PgConnectOptions, config: &BenchConfig) -> Result<BenchReport, sqlx::Error> {
    let setup = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await?;
    ackloop::run_migrations(&setup)
        .await
        .map_err(|err| sqlx::Error::Migrate(Box::new(err)))?;
    prefill(&setup).await?;
    setup.close().await;

    // The loop itself (signups, workers, their listeners) goes through the delaying proxy when
    // asked; set-up, sampling and verification connect directly.
    let direct = options;
    let options = match config.rtt {
        Some(rtt) => through_proxy(&direct, rtt)?,
        None => direct.clone(),
    };
    let workers_per_process = config.workers.div_ceil(config.worker_processes.max(1)).max(1);
    // Independent of the number of callers: writers and worker loops hold one connection each
    // while they work, and two more cover confirmation reads and final checks.
    let pool_size = u32::try_from(config.writers + workers_per_process + 2).unwrap_or(u32::MAX);
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .min_connections(pool_size)
        .test_before_acquire(config.ping_on_acquire)
        .connect_with(options.clone())
        .await?;
    let peak_connections = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn(sample_connections(direct.clone(), Arc::clone(&peak_connections)));
    let garbage_sent = Arc::new(AtomicU64::new(0));
    let flood = config
        .garbage
        .then(|| tokio::spawn(flood_garbage(direct.clone(), Arc::clone(&garbage_sent))));

    let report = if config.drain {
        drain(&pool, &options, config, workers_per_process).await?
    } else {
        signups(&pool, &options, config, workers_per_process).await?
    };
    sampler.abort();
    if let Some(flood) = flood {
        flood.abort();
    }
    let connections = i64::try_from(peak_connections.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
    let (ok, verification) = verify(&pool, config.signups).await?;
    pool.close().await;
    Ok(BenchReport {
        connections,
        rtt_ms: config.rtt.map_or(0.0, |rtt| rtt.as_secs_f64() * 1000.0),
        garbage_sent: garbage_sent.load(Ordering::Relaxed),
        ok: ok && report.timeouts == 0 && report.errors == 0,
        verification,
        ..report
    })
}

/// Connect options that reach the same database through a local proxy adding `rtt` per round
/// trip. `PgConnectOptions` cannot drop a socket path once set, so the URL is rebuilt.
fn through_proxy(direct: &PgConnectOptions, rtt: Duration) -> Result<PgConnectOptions, sqlx::Error> {
    let upstream = match direct.get_socket() {
        Some(dir) => proxy::Upstream::Unix(dir.join(format!(".s.PGSQL.{}", direct.get_port()))),
        None => proxy::Upstream::Tcp(format!("{}:{}", direct.get_host(), direct.get_port())),
    };
    let port = proxy::start(upstream, rtt / 2).map_err(sqlx::Error::Io)?;
    let url = direct.to_url_lossy().to_string();
    // postgres://user[:password]@HOST:PORT/database?params: replace HOST:PORT.
    let after_at = url.rfind('@').map_or(0, |at| at + 1);
    let path = url[after_at..]
        .find('/')
        .map_or(url.len(), |slash| after_at + slash);
    let proxied = format!("{}127.0.0.1:{port}{}", &url[..after_at], &url[path..]);
    proxied.parse()
}

/// Inserts finished users, jobs and players, then analyses, so plans are those of a live system.
async fn prefill(pool: &PgPool) -> Result<(), sqlx::Error> {
    let sql = format!(
        "insert into users (email, display_name)
             select 'prefill-' || n || '@example.com', 'Prefill ' || n from generate_series(1, {PREFILL_ROWS}) as n;
         insert into player_creation_jobs (id, user_id, status, attempts, completed_at)
             select gen_random_uuid(), id, 'done', 1, now() from users;
         insert into players (user_id, display_name) select id, display_name from users;
         analyze users; analyze player_creation_jobs; analyze players;"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
    Ok(())
}

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
            workers.in_process.push(tokio::spawn(
                Worker::new(pool.clone(), worker_config).run(shutdown),
            ));
            return Ok(workers);
        }
        let exe = std::env::current_exe().map_err(sqlx::Error::Io)?;
        let url = options.to_url_lossy().to_string();
        for _ in 0..config.worker_processes {
            let child = tokio::process::Command::new(&exe)
                .args(["worker", "--concurrency", &per_process.to_string()])
                .args(["--batch-size", &config.batch_size.to_string()])
                .env("DATABASE_URL", &url)
                .env("RUST_LOG", "ackloop=warn")
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

async fn signups(
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
                        tracing::error!(error = %err, "bench signup failed");
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
async fn drain(
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

/// Latencies in 10µs buckets up to 1s (and one bucket beyond): a fixed 400 KiB however many
/// signups run, so the peak RSS reported is the loop's, not the bench's bookkeeping.
struct Histogram {
    buckets: Vec<AtomicU32>,
    max_us: AtomicU64,
}

impl Histogram {
    const BUCKET_US: u64 = 10;
    const BUCKETS: usize = 100_001;

    fn new() -> Self {
        Self {
            buckets: (0..Self::BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            max_us: AtomicU64::new(0),
        }
    }

    fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let index =
            usize::try_from(us / Self::BUCKET_US).map_or(Self::BUCKETS - 1, |i| i.min(Self::BUCKETS - 1));
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.buckets
            .iter()
            .map(|b| u64::from(b.load(Ordering::Relaxed)))
            .sum()
    }

    /// The upper edge of the bucket holding the `p` quantile, in ms.
    fn percentile_ms(&self, p: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let rank = ((total as f64 * p).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, bucket) in self.buckets.iter().enumerate() {
            seen += u64::from(bucket.load(Ordering::Relaxed));
            if seen >= rank {
                return ((index as u64 + 1) * Self::BUCKET_US) as f64 / 1000.0;
            }
        }
        self.max_ms()
    }

    fn max_ms(&self) -> f64 {
        self.max_us.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

/// Users = players = jobs done (beyond the prefill), no user with two players, nothing pending.
async fn verify(pool: &PgPool, expected: usize) -> Result<(bool, String), sqlx::Error> {
    let (users, players, done, pending, doubled): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "select
             (select count(*) from users) - $1,
             (select count(*) from players) - $1,
             (select count(*) from player_creation_jobs where status = 'done') - $1,
             (select count(*) from player_creation_jobs where status <> 'done'),
             (select count(*) from (select user_id from players group by user_id having count(*) > 1) as d)",
    )
    .bind(PREFILL_ROWS)
    .fetch_one(pool)
    .await?;
    let expected = i64::try_from(expected).unwrap_or(i64::MAX);
    let ok = users == expected && players == expected && done == expected && pending == 0 && doubled == 0;
    Ok((
        ok,
        format!("users {users}, players {players}, jobs done {done}, not done {pending}, doubled {doubled}"),
    ))
}

/// Notifies garbage on both channels as fast as one connection can: payloads that are not job
/// ids, 8 kB ones, and ids of no job, 10 of each kind per statement.
async fn flood_garbage(options: PgConnectOptions, sent: Arc<AtomicU64>) {
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

/// Samples the scratch database's backends every 50ms and keeps the largest count.
async fn sample_connections(options: PgConnectOptions, peak: Arc<AtomicU64>) {
    let Ok(mut conn) = PgConnection::connect_with(&options).await else {
        return;
    };
    loop {
        let count: Result<i64, _> = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()",
        )
        .fetch_one(&mut conn)
        .await;
        if let Ok(count) = count {
            peak.fetch_max(u64::try_from(count).unwrap_or(0), Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn show_progress(finished: Arc<AtomicUsize>, total: usize) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    loop {
        let done = finished.load(Ordering::Relaxed);
        let width = 40;
        let filled = done * width / total.max(1);
        eprint!(
            "\r[{}{}] {done}/{total}",
            "#".repeat(filled),
            " ".repeat(width - filled)
        );
        let _ = std::io::stderr().flush();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn clear_progress() {
    if std::io::stderr().is_terminal() {
        eprint!("\r{}\r", " ".repeat(70));
    }
}

/// This process's peak resident set (VmHWM), in MiB; 0 where /proc is not available.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn into_sqlx(err: SignupError) -> sqlx::Error {
    match err {
        SignupError::Unavailable { source, .. } | SignupError::Database(source) => source,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}
