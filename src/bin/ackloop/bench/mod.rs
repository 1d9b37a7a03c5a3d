//! `ackloop bench`: drives the full loop through the public library API on a scratch database and
//! prints figures. It asserts nothing about speed; it does verify that every signup got exactly
//! one player.
//!
//! Layout: `load` drives signups or a drain (and garbage notifications) through `callers` (the
//! signing tasks) and `workers` (loops in this process or `ackloop worker` processes); `auth`
//! runs the callers in auth processes instead, and is also the child's side of that;
//! `histogram` records latencies, `report` prints the figures and the progress bar, `proxy` adds
//! a round-trip time, `handler` is the trivial custom handler of `--handler custom`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::args::{BenchConfig, BenchHandler};

mod auth;
mod callers;
mod handler;
mod histogram;
mod load;
mod proxy;
mod report;
mod workers;

pub use auth::run_child as run_auth_process;
pub use report::BenchReport;

/// Finished rows put in the scratch database before measuring: on empty tables each backend
/// caches a sequential-scan plan for the foreign-key check, and throughput halves as they grow.
/// bench/prefill.sql writes them (its `generate_series(1, 20000)`); this counts them.
const PREFILL_ROWS: i64 = 20_000;

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
    // while they work, and two more cover confirmation reads and final checks. Only what runs
    // in this process counts: other processes have pools of their own, and with both sides
    // elsewhere this pool opens a connection only for the final checks.
    let signup_side = if config.auth_processes == 0 {
        config.writers
    } else {
        0
    };
    let worker_side = if config.worker_processes == 0 {
        workers_per_process
    } else {
        0
    };
    let in_process = signup_side + worker_side;
    let pool_size = u32::try_from(in_process + 2).unwrap_or(u32::MAX);
    let pool_options = PgPoolOptions::new()
        .max_connections(pool_size)
        .test_before_acquire(config.ping_on_acquire);
    let pool = if in_process == 0 {
        pool_options.connect_lazy_with(options.clone())
    } else {
        pool_options
            .min_connections(pool_size)
            .connect_with(options.clone())
            .await?
    };
    let peak_connections = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn(sample_connections(direct.clone(), Arc::clone(&peak_connections)));
    let garbage_sent = Arc::new(AtomicU64::new(0));
    let flood = config
        .garbage
        .then(|| tokio::spawn(load::flood_garbage(direct.clone(), Arc::clone(&garbage_sent))));

    let report = if config.drain {
        load::drain(&pool, &options, config, workers_per_process).await?
    } else {
        load::signups(&pool, &options, config, workers_per_process).await?
    };
    sampler.abort();
    if let Some(flood) = flood {
        flood.abort();
    }
    let connections = i64::try_from(peak_connections.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
    let (ok, verification) = verify(&pool, config.signups).await?;
    let (signup_commits, worker_commits) = count_commits(&pool).await?;
    pool.close().await;
    Ok(BenchReport {
        connections,
        signup_commits,
        worker_commits,
        rtt_ms: config.rtt.map_or(0.0, |rtt| rtt.as_secs_f64() * 1000.0),
        garbage_sent: garbage_sent.load(Ordering::Relaxed),
        ok: ok && report.timeouts == 0 && report.errors == 0,
        verification,
        ..report
    })
}

/// Refuses flags that do not go together, before any database is made.
pub fn check(config: &BenchConfig) -> Result<(), &'static str> {
    if config.handler == BenchHandler::Custom && config.worker_processes > 0 {
        return Err("--handler custom runs in this process's workers; drop --worker-processes");
    }
    if config.auth_processes > 0 && config.drain {
        return Err("--drain times the workers alone; drop --auth-processes");
    }
    if config.auth_processes > config.concurrency {
        return Err("every auth process needs a caller: --concurrency must be at least --auth-processes");
    }
    Ok(())
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

/// Inserts finished users, jobs and players, then analyses, so plans are those of a live system:
/// bench/prefill.sql, the same rows the ceiling runs start from ([`PREFILL_ROWS`] of each).
async fn prefill(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(include_str!("../../../../bench/prefill.sql"))
        .execute(pool)
        .await?;
    Ok(())
}

/// Users = players = jobs done (beyond the prefill), no user with two players, nothing pending.
async fn verify(pool: &PgPool, expected: usize) -> Result<(bool, String), sqlx::Error> {
    let (users, players, done, pending, doubled): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "select
             (select count(*) from ackloop.builtin_users) - $1,
             (select count(*) from ackloop.builtin_players) - $1,
             (select count(*) from ackloop.player_creation_jobs where status = 'done') - $1,
             (select count(*) from ackloop.player_creation_jobs where status <> 'done'),
             (select count(*) from (select user_id from ackloop.builtin_players group by user_id having count(*) > 1) as d)",
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

/// The transactions that wrote the run's users, and those that wrote its players: each row's
/// `xmin` is the transaction that inserted it, and the loop writes no row in a subtransaction
/// (except a handler's, whose savepoints count one each). Each of these transactions notified.
async fn count_commits(pool: &PgPool) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "select
             (select count(distinct xmin::text) from ackloop.builtin_users where email not like 'prefill-%'),
             (select count(distinct xmin::text) from ackloop.builtin_players where display_name not like 'Prefill %')",
    )
    .fetch_one(pool)
    .await
}

/// Samples the scratch database's client connections every 50ms and keeps the largest count
/// (an autovacuum worker visiting the database is not one of the loop's connections).
async fn sample_connections(options: PgConnectOptions, peak: Arc<AtomicU64>) {
    let Ok(mut conn) = PgConnection::connect_with(&options).await else {
        return;
    };
    loop {
        let count: Result<i64, _> = sqlx::query_scalar(
            "select count(*)
             from pg_stat_activity
             where datname = current_database()
                 and backend_type = 'client backend'
                 and pid <> pg_backend_pid()",
        )
        .fetch_one(&mut conn)
        .await;
        if let Ok(count) = count {
            peak.fetch_max(u64::try_from(count).unwrap_or(0), Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
