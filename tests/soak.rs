//! `make soak`: the fault-injection soak. Not part of `make test` (it runs for minutes and
//! restarts its PostgreSQL); without `ACKLOOP_SOAK` set it only says so and exits 0.
//!
//! Several `ackloop worker` processes and several signup processes (this binary, re-run as
//! `soak signer …`) work against a private cluster of their own while, at seeded random moments,
//! workers are SIGKILLed and restarted, all workers are frozen (SIGSTOP) for longer than a
//! signup's timeout, listener backends are terminated, PostgreSQL is restarted, and garbage is
//! notified on both channels. Then it drains the queue, checks the
//! invariants, prints them as figures, and exits non-zero if any broke.
//!
//! Settings (environment): SOAK_SEED (default: from the clock; printed, so a run can be
//! repeated), SOAK_SIGNUPS (6000), SOAK_SIGNERS (3), SOAK_WORKERS (3), SOAK_TIMEOUT_MS (3000),
//! SOAK_PAUSE_MS (60: each of a signer's 8 callers pauses this long between signups),
//! ACKLOOP_SOAK_URL (the soak cluster's URL; `make soak` sets it), PG_DIR (its directory, for
//! restarts).

use std::collections::HashMap;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ackloop::{JobId, NewUser, SignupError, Signups};
use serde::{Deserialize, Serialize};
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

const ACKLOOP: &str = env!("CARGO_BIN_EXE_ackloop");

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if args.get(1).map(String::as_str) == Some("signer") {
        return runtime.block_on(signer(&args[2..]));
    }
    if std::env::var_os("ACKLOOP_SOAK").is_none() {
        println!("soak: skipped (run `make soak`)");
        return ExitCode::SUCCESS;
    }
    runtime.block_on(soak())
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// A small, seeded generator (xorshift64*): the fault schedule is repeatable from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What one signup ended as, reported by a signer process, one JSON line each.
#[derive(Debug, Serialize, Deserialize)]
struct Reported {
    n: u64,
    outcome: String,
    job_id: Option<JobId>,
    player_id: Option<i64>,
}

/// A signer process: signs up users `from..from+count`, 8 at a time, and reports each outcome.
async fn signer(args: &[String]) -> ExitCode {
    let [url, from, count, timeout_ms, pause_ms] = args else {
        eprintln!("usage: soak signer URL FROM COUNT TIMEOUT_MS PAUSE_MS");
        return ExitCode::from(2);
    };
    let (from, count, timeout, pause): (u64, u64, u64, u64) = (
        from.parse().expect("FROM"),
        count.parse().expect("COUNT"),
        timeout_ms.parse().expect("TIMEOUT_MS"),
        pause_ms.parse().expect("PAUSE_MS"),
    );
    let options: PgConnectOptions = url.parse().expect("URL");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options);
    // The server may be restarting right now: keep trying to start listening.
    let signups = loop {
        match Signups::connect(pool.clone()).await {
            Ok(signups) => break Arc::new(signups),
            Err(err) => {
                eprintln!("signer: cannot listen yet: {err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let next = Arc::new(std::sync::atomic::AtomicU64::new(from));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (signups, next) = (Arc::clone(&signups), Arc::clone(&next));
        callers.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= from + count {
                    return;
                }
                let user = NewUser::new(format!("soak-{n}@example.com"), format!("Soak {n}")).unwrap();
                let result = signups
                    .create_user_and_await_player(&user, Duration::from_millis(timeout))
                    .await;
                let (outcome, job_id, player_id) = match &result {
                    Ok(player) => ("confirmed", None, Some(player.id.get())),
                    Err(err @ SignupError::TimedOut { .. }) => ("timed_out", err.job_id(), None),
                    Err(err @ SignupError::JobFailed { .. }) => ("failed", err.job_id(), None),
                    Err(err @ SignupError::Unavailable { .. }) => ("unavailable", err.job_id(), None),
                    Err(SignupError::EmailTaken) => ("email_taken", None, None),
                    Err(err) => ("error", err.job_id(), None),
                };
                let line = Reported {
                    n,
                    outcome: outcome.to_owned(),
                    job_id,
                    player_id,
                };
                println!("{}", serde_json::to_string(&line).unwrap());
                // Pacing, so the run lasts long enough for faults to land in the middle of it.
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        });
    }
    callers.join_all().await;
    ExitCode::SUCCESS
}

struct Cluster {
    url: String,
}

impl Cluster {
    async fn restart(&self) {
        let status = Command::new("scripts/pg")
            .arg("restart")
            .status()
            .await
            .expect("run scripts/pg restart");
        assert!(status.success(), "scripts/pg restart failed");
    }
}

fn spawn_worker(url: &str) -> Child {
    Command::new(ACKLOOP)
        .args([
            "worker",
            "--concurrency",
            "2",
            "--poll-interval",
            "1s",
            "--retry-backoff",
            "100ms",
        ])
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "ackloop=error")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start ackloop worker")
}

async fn signal(child: &Child, name: &str) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill").args([name, &pid.to_string()]).status().await;
    }
}

/// Waits until `child` has installed its SIGTERM handler (bit 15 of SigCgt in /proc): a worker
/// restarted a moment ago may not have yet, and would die of the signal instead of draining.
async fn catches_sigterm(child: &Child) {
    const SIGTERM_BIT: u64 = 1 << (15 - 1);
    let Some(pid) = child.id() else { return };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let caught = status
            .lines()
            .find_map(|line| line.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .unwrap_or(0);
        if caught & SIGTERM_BIT != 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Retries `query` through a server that may be restarting.
async fn patiently<T, F, Fut>(mut query: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match query().await {
            Ok(value) => return value,
            Err(err) if Instant::now() < deadline => {
                eprintln!("soak: retrying a query: {err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("soak: the database did not come back: {err}"),
        }
    }
}

async fn soak() -> ExitCode {
    let seed = setting(
        "SOAK_SEED",
        u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
                % 1_000_000_007,
        )
        .unwrap(),
    );
    let signups = setting("SOAK_SIGNUPS", 6000);
    let signers = setting("SOAK_SIGNERS", 3).max(1);
    let workers = setting("SOAK_WORKERS", 3).max(1);
    let timeout_ms = setting("SOAK_TIMEOUT_MS", 3000);
    let pause_ms = setting("SOAK_PAUSE_MS", 60);
    let admin_url = std::env::var("ACKLOOP_SOAK_URL").expect("ACKLOOP_SOAK_URL (make soak sets it)");
    println!("soak: seed {seed}, {signups} signups from {signers} signers, {workers} worker processes");
    let mut rng = Rng(seed.max(1));

    // A fresh database for this run.
    let admin_options: PgConnectOptions = admin_url.parse().expect("ACKLOOP_SOAK_URL");
    let database = format!("soak_{seed}");
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(admin_options.clone())
        .await
        .unwrap();
    for statement in [
        format!("drop database if exists {database} with (force)"),
        format!("create database {database}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
    let options = admin_options.database(&database);
    let url = options.to_url_lossy().to_string();
    let cluster = Cluster { url: url.clone() };
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.clone())
        .await
        .unwrap();
    ackloop::run_migrations(&pool).await.unwrap();

    let mut worker_processes: Vec<Child> = (0..workers).map(|_| spawn_worker(&cluster.url)).collect();
    let reported = Arc::new(Mutex::new(Vec::<Reported>::new()));
    let mut signer_tasks = Vec::new();
    let per_signer = signups.div_ceil(signers);
    for index in 0..signers {
        let from = index * per_signer;
        let count = per_signer.min(signups.saturating_sub(from));
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "signer",
                &url,
                &from.to_string(),
                &count.to_string(),
                &timeout_ms.to_string(),
                &pause_ms.to_string(),
            ])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start a signer");
        let stdout = child.stdout.take().unwrap();
        let reported = Arc::clone(&reported);
        signer_tasks.push(tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Reported>(&line) {
                    Ok(entry) => reported.lock().await.push(entry),
                    Err(err) => eprintln!("soak: unreadable signer line {line:?}: {err}"),
                }
            }
            child.wait().await.expect("signer exit")
        }));
    }

    // Faults, at seeded random moments, until every signer has finished.
    let started = Instant::now();
    let mut faults: HashMap<&str, u32> = HashMap::new();
    while signer_tasks.iter().any(|task| !task.is_finished()) {
        tokio::time::sleep(Duration::from_millis(150 + rng.below(600))).await;
        let fault = match rng.below(10) {
            0..=2 => "worker killed",
            3..=5 => "listeners terminated",
            6 if faults.get("postgres restarted").copied().unwrap_or(0) < 6 => "postgres restarted",
            7 if faults.get("workers frozen").copied().unwrap_or(0) < 2 => "workers frozen",
            _ => "garbage notified",
        };
        println!("soak: {:>6.1}s {fault}", started.elapsed().as_secs_f64());
        *faults.entry(fault).or_default() += 1;
        match fault {
            "worker killed" => {
                let index = usize::try_from(rng.below(workers)).unwrap();
                signal(&worker_processes[index], "-KILL").await;
                let _ = worker_processes[index].wait().await;
                worker_processes[index] = spawn_worker(&cluster.url);
            }
            "listeners terminated" => {
                let _ = sqlx::query(
                    "select pg_terminate_backend(pid) from pg_stat_activity
                     where datname = current_database() and query ilike 'listen%'",
                )
                .execute(&pool)
                .await;
            }
            "postgres restarted" => cluster.restart().await,
            // Longer than a signup's timeout: callers time out, and their jobs must still
            // complete once the workers thaw.
            "workers frozen" => {
                for worker in &worker_processes {
                    signal(worker, "-STOP").await;
                }
                tokio::time::sleep(Duration::from_millis(timeout_ms + 1000)).await;
                for worker in &worker_processes {
                    signal(worker, "-CONT").await;
                }
            }
            _ => {
                let garbage = [
                    "",
                    "garbage",
                    &JobId::new().to_string(),
                    &"x".repeat(7999),
                    "'; drop table users; --",
                ];
                for payload in garbage {
                    for channel in [ackloop::DEFAULT_JOBS_CHANNEL, ackloop::DEFAULT_DONE_CHANNEL] {
                        let _ = sqlx::query("select pg_notify($1, $2)")
                            .bind(channel)
                            .bind(payload)
                            .execute(&pool)
                            .await;
                    }
                }
            }
        }
    }
    let mut signers_ok = true;
    for task in signer_tasks {
        signers_ok &= task.await.expect("signer task").success();
    }
    let load_secs = started.elapsed().as_secs_f64();

    // Drain: the workers (restarted where killed) finish everything committed.
    let drain_started = Instant::now();
    let mut drained = false;
    while drain_started.elapsed() < Duration::from_secs(120) {
        let pending: i64 = patiently(|| {
            sqlx::query_scalar("select count(*) from player_creation_jobs where status = 'pending'")
                .fetch_one(&pool)
        })
        .await;
        if pending == 0 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut workers_exited_cleanly = true;
    for mut worker in worker_processes {
        catches_sigterm(&worker).await;
        signal(&worker, "-TERM").await;
        let status = tokio::time::timeout(Duration::from_secs(60), worker.wait()).await;
        workers_exited_cleanly &= matches!(status, Ok(Ok(status)) if status.success());
    }

    // The invariants, as figures.
    let reported = reported.lock().await;
    let outcome_count = |name: &str| reported.iter().filter(|r| r.outcome == name).count();
    let (users, players, done, failed, pending, doubled, users_without_job): (
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
    ) = patiently(|| {
        sqlx::query_as(
            "select
                     (select count(*) from users),
                     (select count(*) from players),
                     (select count(*) from player_creation_jobs where status = 'done'),
                     (select count(*) from player_creation_jobs where status = 'failed'),
                     (select count(*) from player_creation_jobs where status = 'pending'),
                     (select count(*) - count(distinct user_id) from players),
                     (select count(*) from users where not exists
                         (select 1 from player_creation_jobs j where j.user_id = users.id))",
        )
        .fetch_one(&pool)
    })
    .await;
    let late_jobs: Vec<uuid::Uuid> = reported
        .iter()
        .filter(|r| r.outcome != "confirmed")
        .filter_map(|r| r.job_id.map(|id| id.as_uuid()))
        .collect();
    let late_not_done: i64 = patiently(|| {
        sqlx::query_scalar(
            "select count(*) from player_creation_jobs where id = any($1) and status <> 'done'",
        )
        .bind(&late_jobs)
        .fetch_one(&pool)
    })
    .await;
    let timed_out_ids: Vec<uuid::Uuid> = reported
        .iter()
        .filter(|r| r.outcome == "timed_out")
        .filter_map(|r| r.job_id.map(|id| id.as_uuid()))
        .collect();
    let timed_out_done: i64 = patiently(|| {
        sqlx::query_scalar("select count(*) from player_creation_jobs where id = any($1) and status = 'done'")
            .bind(&timed_out_ids)
            .fetch_one(&pool)
    })
    .await;
    let confirmed_ids: Vec<i64> = reported.iter().filter_map(|r| r.player_id).collect();
    let confirmed_exist: i64 = patiently(|| {
        sqlx::query_scalar("select count(*) from players where id = any($1)")
            .bind(&confirmed_ids)
            .fetch_one(&pool)
    })
    .await;

    let attempted = reported.len();
    let checks = [
        ("every signup reported an outcome", attempted as u64 == signups),
        ("signer processes exited 0", signers_ok),
        ("queue drained", drained),
        ("workers exited 0 on SIGTERM", workers_exited_cleanly),
        ("users = players = jobs done", users == players && players == done),
        ("players created twice: 0", doubled == 0),
        ("jobs left pending after drain: 0", pending == 0),
        ("jobs failed: 0", failed == 0),
        ("every user has its job", users_without_job == 0),
        (
            "every confirmed player exists",
            usize::try_from(confirmed_exist).unwrap() == confirmed_ids.len(),
        ),
        (
            "every timed-out signup's job completed afterwards",
            usize::try_from(timed_out_done).unwrap() == timed_out_ids.len(),
        ),
        (
            "no committed job of an unconfirmed signup left undone",
            late_not_done == 0,
        ),
        (
            "no email reported taken (all are distinct)",
            outcome_count("email_taken") == 0,
        ),
    ];

    println!("soak: seed {seed}; load {load_secs:.1}s; faults {faults:?}");
    println!(
        "signups attempted {attempted}, confirmed {}, timed out {}, unavailable {}, failed {}, other errors {}",
        outcome_count("confirmed"),
        outcome_count("timed_out"),
        outcome_count("unavailable"),
        outcome_count("failed"),
        outcome_count("error"),
    );
    println!(
        "users {users}, players {players}, jobs done {done}, failed {failed}, pending {pending}, doubled {doubled}"
    );
    println!(
        "timed-out signups whose job completed afterwards: {timed_out_done} of {}",
        timed_out_ids.len()
    );
    let mut all_held = true;
    for (check, held) in checks {
        println!("  [{}] {check}", if held { "ok" } else { "BROKEN" });
        all_held &= held;
    }
    pool.close().await;
    if all_held {
        println!("soak: every invariant held (seed {seed})");
        ExitCode::SUCCESS
    } else {
        println!("soak: INVARIANT BROKEN (repeat with SOAK_SEED={seed})");
        ExitCode::FAILURE
    }
}
