//! `make soak`: the fault-injection soak. Not part of `make test` (it restarts and crashes its
//! PostgreSQL); without `ACKLOOP_SOAK` set it only says so and exits 0. CI runs it.
//!
//! Several `ackloop worker` processes and several signup processes (this binary, re-run as
//! `soak signer …`) work against a private cluster of their own while, at seeded random moments:
//! workers are SIGKILLed and restarted, or sent SIGTERM while they start; all workers are frozen
//! (SIGSTOP) for longer than a signup's timeout; listener backends are terminated; PostgreSQL is
//! restarted, or its postmaster killed with SIGKILL; another session holds uncommitted inserts of
//! emails that signups are about to ask for; the connections of one worker and one signer go
//! silent without closing (they reach the server through a proxy); and garbage is notified on
//! both channels. A few signups are poison: creating their player kills the session. Then it
//! drains the queue, checks the invariants, prints each with its figure, and exits non-zero if
//! any broke.
//!
//! Settings (environment): SOAK_SEED (default: from the clock; printed, so a run can be
//! repeated), SOAK_SIGNUPS (6000), SOAK_SIGNERS (3), SOAK_WORKERS (3), SOAK_TIMEOUT_MS (3000),
//! SOAK_PAUSE_MS (60: each of a signer's 8 callers pauses this long between signups),
//! ACKLOOP_SOAK_URL (the soak cluster's TCP URL; `make soak` sets it), PG_DIR (its directory,
//! for restarts and crashes).

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

#[path = "support/silent_proxy.rs"]
mod silent_proxy;
use silent_proxy::SilentProxy;

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
    /// From the call to its answer.
    elapsed_ms: u64,
    /// The error, as the caller would print it.
    error: Option<String>,
    /// When the call started, in ms since the signer started.
    started_ms: u64,
    /// When the call started, in ms since the Unix epoch (to compare with fault times).
    started_at_ms: u64,
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A signer's last line: how its confirmed callers heard of their players.
#[derive(Debug, Serialize, Deserialize)]
struct Confirmations {
    by_notification: u64,
    by_table_check: u64,
}

/// Every kind of fault the soak injects; each happens at least once a run.
const FAULT_KINDS: [&str; 10] = [
    "worker killed",
    "worker stopped while starting",
    "listeners terminated",
    "postgres restarted",
    "postgres crashed",
    "workers frozen",
    "emails held",
    "connections silenced",
    "garbage notified",
    "garbage notified",
];

/// How late past its timeout a caller may be answered here: the documented 100 ms, and a
/// 2-core machine running the server, three workers and three signers at once.
const LATE_MARGIN_MS: u64 = 1000;

/// Workers' shutdown timeout in the soak, and so the bound on a SIGTERM while one starts.
const SHUTDOWN_TIMEOUT_MS: u64 = 5000;

/// The email and display name of signup `n`.
fn soak_user(n: u64) -> NewUser {
    NewUser::new(soak_email(n), format!("Soak {n}")).unwrap()
}

fn soak_email(n: u64) -> String {
    format!("soak-{n}@example.com")
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
    let metrics = ackloop::MetricsHandle::install().expect("install the metrics recorder");
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
    let signer_started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (signups, next) = (Arc::clone(&signups), Arc::clone(&next));
        callers.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= from + count {
                    return;
                }
                let started = Instant::now();
                let started_ms = u64::try_from(signer_started.elapsed().as_millis()).unwrap();
                let started_at_ms = now_ms();
                let result = signups
                    .create_user_and_await_player(&soak_user(n), Duration::from_millis(timeout))
                    .await;
                let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap();
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
                    elapsed_ms,
                    error: result.as_ref().err().map(|err| {
                        let mut text = err.to_string();
                        let mut source = std::error::Error::source(err);
                        while let Some(cause) = source {
                            text.push_str(&format!(": {cause}"));
                            source = cause.source();
                        }
                        text
                    }),
                    started_ms,
                    started_at_ms,
                };
                println!("{}", serde_json::to_string(&line).unwrap());
                // Pacing, so the run lasts long enough for faults to land in the middle of it.
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        });
    }
    callers.join_all().await;
    let rendered = metrics.render();
    let confirmations = |via: &str| {
        let prefix = format!("ackloop_confirmations_total{{via=\"{via}\"}} ");
        rendered
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0, |count| count.trim().parse().unwrap_or(0))
    };
    let summary = Confirmations {
        by_notification: confirmations("notification"),
        by_table_check: confirmations("table_check"),
    };
    println!("{}", serde_json::to_string(&summary).unwrap());
    ExitCode::SUCCESS
}

struct Cluster {
    /// The server, directly.
    url: String,
    /// The server through the proxy that can go silent.
    proxied_url: String,
}

impl Cluster {
    /// `scripts/pg restart` (a fast shutdown) or `scripts/pg crash` (kill -9 of the postmaster).
    async fn pg(&self, command: &str) {
        let status = Command::new("scripts/pg")
            .arg(command)
            .status()
            .await
            .expect("run scripts/pg");
        assert!(status.success(), "scripts/pg {command} failed");
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
            "--shutdown-timeout",
            "5s",
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
    // Worker 0 and signer 0 reach the server through a proxy that can go silent.
    let proxy = SilentProxy::start(options.get_port()).await;
    let cluster = Cluster {
        url: options.to_url_lossy().to_string(),
        proxied_url: options.clone().port(proxy.port).to_url_lossy().to_string(),
    };
    let worker_url = |index: usize| {
        if index == 0 {
            cluster.proxied_url.clone()
        } else {
            cluster.url.clone()
        }
    };
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.clone())
        .await
        .unwrap();
    ackloop::run_migrations(&pool).await.unwrap();

    // Poison: creating these players kills the session, every time.
    let poisoned: Vec<u64> = (0..2).map(|_| rng.below(signups)).collect();
    let poison_names: Vec<String> = poisoned.iter().map(|n| format!("'Soak {n}'")).collect();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create sequence poison_kills;
         create function kill_own_session() returns trigger language plpgsql as $$
         begin
             if new.display_name in ({}) then
                 perform nextval('poison_kills');
                 perform pg_terminate_backend(pg_backend_pid());
                 perform pg_sleep(1);
             end if;
             return new;
         end $$;
         create trigger kill_own_session before insert on players
             for each row execute function kill_own_session();",
        poison_names.join(", ")
    )))
    .execute(&pool)
    .await
    .unwrap();

    let mut worker_processes: Vec<Child> = (0..workers as usize)
        .map(|index| spawn_worker(&worker_url(index)))
        .collect();
    let reported = Arc::new(Mutex::new(Vec::<Reported>::new()));
    let confirmations = Arc::new(Mutex::new(Vec::<Confirmations>::new()));
    let mut signer_tasks = Vec::new();
    let per_signer = signups.div_ceil(signers);
    for index in 0..signers {
        let from = index * per_signer;
        let count = per_signer.min(signups.saturating_sub(from));
        let url = if index == 0 {
            &cluster.proxied_url
        } else {
            &cluster.url
        };
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "signer",
                url,
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
        let (reported, confirmations) = (Arc::clone(&reported), Arc::clone(&confirmations));
        signer_tasks.push(tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(entry) = serde_json::from_str::<Reported>(&line) {
                    reported.lock().await.push(entry);
                } else if let Ok(summary) = serde_json::from_str::<Confirmations>(&line) {
                    confirmations.lock().await.push(summary);
                } else {
                    eprintln!("soak: unreadable signer line {line:?}");
                }
            }
            child.wait().await.expect("signer exit")
        }));
    }

    // Faults, at seeded random moments, until every signer has finished.
    let started = Instant::now();
    let mut faults: HashMap<&str, u32> = HashMap::new();
    let mut held_emails = 0;
    let mut every_kind = FAULT_KINDS.to_vec();
    for index in (1..every_kind.len()).rev() {
        every_kind.swap(index, usize::try_from(rng.below(index as u64 + 1)).unwrap());
    }
    // When the server was away (restart, crash), and when signer 0's connections went silent,
    // in ms since the epoch: a signup that met one may have run out of time before it could
    // write, and been told so (unavailable, no job id).
    let mut outages: Vec<(u64, u64)> = Vec::new();
    let mut silences: Vec<u64> = Vec::new();
    let mut slowest_startup_exit = Duration::ZERO;
    let mut startup_exits_ok = true;
    while signer_tasks.iter().any(|task| !task.is_finished()) {
        tokio::time::sleep(Duration::from_millis(150 + rng.below(600))).await;
        let count_of = |faults: &HashMap<&str, u32>, name: &str| faults.get(name).copied().unwrap_or(0);
        // Every kind once, in a seeded order, then at random.
        let fault = if let Some(fault) = every_kind.pop() {
            fault
        } else {
            match rng.below(14) {
                0..=2 => "worker killed",
                3..=4 => "listeners terminated",
                5 if count_of(&faults, "postgres restarted") < 4 => "postgres restarted",
                6 if count_of(&faults, "postgres crashed") < 2 => "postgres crashed",
                7 if count_of(&faults, "workers frozen") < 2 => "workers frozen",
                8 | 9 => "emails held",
                10 if count_of(&faults, "connections silenced") < 2 => "connections silenced",
                11 => "worker stopped while starting",
                _ => "garbage notified",
            }
        };
        println!("soak: {:>6.1}s {fault}", started.elapsed().as_secs_f64());
        *faults.entry(fault).or_default() += 1;
        match fault {
            "worker killed" => {
                let index = usize::try_from(rng.below(workers)).unwrap();
                signal(&worker_processes[index], "-KILL").await;
                let _ = worker_processes[index].wait().await;
                worker_processes[index] = spawn_worker(&worker_url(index));
            }
            "worker stopped while starting" => {
                // A fresh worker gets SIGTERM at a random moment of its start-up; it must be gone
                // within its shutdown timeout (plus 1 s), having drained or not started at all.
                let index = usize::try_from(rng.below(workers)).unwrap();
                signal(&worker_processes[index], "-KILL").await;
                let _ = worker_processes[index].wait().await;
                let mut starting = spawn_worker(&worker_url(index));
                tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
                let signalled = Instant::now();
                signal(&starting, "-TERM").await;
                let bound = Duration::from_millis(SHUTDOWN_TIMEOUT_MS + 1000 + LATE_MARGIN_MS);
                let exited = tokio::time::timeout(bound, starting.wait()).await;
                slowest_startup_exit = slowest_startup_exit.max(signalled.elapsed());
                // Exit 0, or killed by the signal itself if it came before the handler existed
                // (the first instants of the process).
                startup_exits_ok &= match exited {
                    Ok(Ok(status)) => {
                        use std::os::unix::process::ExitStatusExt;
                        status.success() || status.signal() == Some(15)
                    }
                    _ => false,
                };
                let _ = starting.kill().await;
                worker_processes[index] = spawn_worker(&worker_url(index));
            }
            "listeners terminated" => {
                let _ = sqlx::query(
                    "select pg_terminate_backend(pid) from pg_stat_activity
                     where datname = current_database() and query ilike 'listen%'",
                )
                .execute(&pool)
                .await;
            }
            "postgres restarted" | "postgres crashed" => {
                let from = now_ms();
                cluster
                    .pg(if fault == "postgres crashed" {
                        "crash"
                    } else {
                        "restart"
                    })
                    .await;
                outages.push((from, now_ms()));
            }
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
            // Uncommitted inserts of emails a signer is about to ask for, held for less than a
            // signup's timeout: those signups wait for the lock, then get their players.
            "emails held" => {
                let signer = rng.below(signers);
                let next = {
                    let reported = reported.lock().await;
                    let range = signer * per_signer..(signer + 1) * per_signer;
                    reported
                        .iter()
                        .filter(|r| range.contains(&r.n))
                        .map(|r| r.n + 1)
                        .max()
                        .unwrap_or(range.start)
                };
                let hold = Duration::from_millis(timeout_ms / 3 + rng.below(timeout_ms / 3));
                held_emails += hold_emails(&pool, (next + 4..next + 10).filter(|n| *n < signups), hold).await;
            }
            "connections silenced" => {
                silences.push(now_ms());
                proxy.silence();
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

    // The poison jobs' callers (long timed out) ask again, and hear of the failure.
    let poison_heard = {
        let signups = Signups::connect(pool.clone())
            .await
            .expect("listen for the poison jobs");
        let mut heard = 0;
        for n in &poisoned {
            let job: Option<uuid::Uuid> = patiently(|| {
                sqlx::query_scalar(
                    "select jobs.id from player_creation_jobs as jobs join users on users.id = jobs.user_id
                     where users.email = $1",
                )
                .bind(soak_email(*n))
                .fetch_optional(&pool)
            })
            .await;
            let Some(job) = job else { continue };
            match signups.await_player(job.into(), Duration::from_secs(5)).await {
                Err(SignupError::JobFailed { reason, .. }) if reason.contains("session ended") => heard += 1,
                other => println!("soak: poison signup {n} heard {other:?}"),
            }
        }
        heard
    };
    let poison_kills: i64 =
        patiently(|| sqlx::query_scalar("select last_value from poison_kills").fetch_one(&pool)).await;
    // Each counted attempt ends one session (5 by default); before the first is counted, each
    // processing loop (2 a worker process, restarted ones included) may meet it in a batch once.
    let worker_processes_run = workers
        + u64::from(faults.get("worker killed").copied().unwrap_or(0))
        + 2 * u64::from(faults.get("worker stopped while starting").copied().unwrap_or(0));
    let most_kills = i64::try_from(poisoned.len() as u64 * (5 + 2 * worker_processes_run)).unwrap();

    // The invariants, as figures.
    let reported = reported.lock().await;
    let confirmations = confirmations.lock().await;
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
    let is_poison = |n: u64| poisoned.contains(&n);

    // Every failed job is a poison one, failed for killing its session.
    let failed_jobs: Vec<(String, String)> = patiently(|| {
        sqlx::query_as(
            "select users.email, coalesce(jobs.last_error, '')
             from player_creation_jobs as jobs
             join users on users.id = jobs.user_id
             where jobs.status = 'failed'",
        )
        .fetch_all(&pool)
    })
    .await;
    let poison_emails: Vec<String> = poisoned.iter().map(|n| soak_email(*n)).collect();
    let failed_only_poison = failed_jobs
        .iter()
        .all(|(email, error)| poison_emails.contains(email) && error.contains("session ended"));
    let failed_outcomes_only_poison = reported
        .iter()
        .filter(|r| r.outcome == "failed")
        .all(|r| is_poison(r.n));

    // Each confirmed player is its own signup's.
    let confirmed: Vec<(u64, i64)> = reported
        .iter()
        .filter_map(|r| r.player_id.map(|player| (r.n, player)))
        .collect();
    let player_ids: Vec<i64> = confirmed.iter().map(|(_, player)| *player).collect();
    let owners: HashMap<i64, String> = patiently(|| {
        sqlx::query_as::<_, (i64, String)>(
            "select players.id, users.email from players join users on users.id = players.user_id
             where players.id = any($1)",
        )
        .bind(&player_ids)
        .fetch_all(&pool)
    })
    .await
    .into_iter()
    .collect();
    let misowned = confirmed
        .iter()
        .filter(|(n, player)| owners.get(player) != Some(&soak_email(*n)))
        .count();

    // Errors that carry a job id: the job completed (or, for poison, failed).
    let with_job: Vec<uuid::Uuid> = reported
        .iter()
        .filter(|r| r.outcome != "confirmed" && !is_poison(r.n))
        .filter_map(|r| r.job_id.map(|id| id.as_uuid()))
        .collect();
    let with_job_not_done: i64 = patiently(|| {
        sqlx::query_scalar(
            "select count(*) from player_creation_jobs where id = any($1) and status <> 'done'",
        )
        .bind(&with_job)
        .fetch_one(&pool)
    })
    .await;
    // Errors without a job id: certainly not committed, so no such user.
    let without_job: Vec<String> = reported
        .iter()
        .filter(|r| r.outcome != "confirmed" && r.job_id.is_none())
        .map(|r| soak_email(r.n))
        .collect();
    let without_job_committed: i64 = patiently(|| {
        sqlx::query_scalar("select count(*) from users where email = any($1)")
            .bind(&without_job)
            .fetch_one(&pool)
    })
    .await;
    let unavailable_without_job = reported
        .iter()
        .filter(|r| r.outcome == "unavailable" && r.job_id.is_none())
        .count();
    // A caller met a fault if the server was away during its call (plus a second for pools to
    // reconnect), or its connections were silent (signer 0, until the listener and statement
    // checks have replaced them: 10 s).
    let met_fault = |r: &Reported| {
        let (from, to) = (r.started_at_ms, r.started_at_ms + r.elapsed_ms);
        let outage = outages.iter().any(|(down, up)| from <= up + 1000 && to >= *down);
        let silenced = r.n < per_signer && silences.iter().any(|at| from <= at + 10_000 && to >= *at);
        outage || silenced
    };
    let unavailable_without_fault = reported
        .iter()
        .filter(|r| r.outcome == "unavailable" && r.job_id.is_none() && !met_fault(r))
        .count();
    let timed_out_ids: Vec<uuid::Uuid> = reported
        .iter()
        .filter(|r| r.outcome == "timed_out" && !is_poison(r.n))
        .filter_map(|r| r.job_id.map(|id| id.as_uuid()))
        .collect();
    let timed_out_done: i64 = patiently(|| {
        sqlx::query_scalar("select count(*) from player_creation_jobs where id = any($1) and status = 'done'")
            .bind(&timed_out_ids)
            .fetch_one(&pool)
    })
    .await;
    let latest_ms = reported.iter().map(|r| r.elapsed_ms).max().unwrap_or(0);
    let late = reported
        .iter()
        .filter(|r| r.elapsed_ms > timeout_ms + LATE_MARGIN_MS)
        .count();
    let by_notification: u64 = confirmations.iter().map(|c| c.by_notification).sum();
    let by_table_check: u64 = confirmations.iter().map(|c| c.by_table_check).sum();
    let notified_share = by_notification as f64 / (by_notification + by_table_check).max(1) as f64;
    let poison_failed = i64::try_from(failed_jobs.len()).unwrap();

    let attempted = reported.len();
    let checks = [
        ("every signup reported an outcome", attempted as u64 == signups),
        ("signer processes exited 0", signers_ok),
        ("queue drained", drained),
        ("workers exited 0 on SIGTERM", workers_exited_cleanly),
        (
            "a worker sent SIGTERM while starting exits within its shutdown timeout + 1 s",
            startup_exits_ok,
        ),
        (
            "users = players + failed poison jobs",
            users == players + poison_failed,
        ),
        ("players = jobs done", players == done),
        ("players created twice: 0", doubled == 0),
        ("jobs left pending after drain: 0", pending == 0),
        (
            "jobs failed: only poison ones, each for ending its session",
            failed_only_poison && failed_outcomes_only_poison,
        ),
        (
            "every poison job's caller, asking again, hears JobFailed for its ended sessions",
            poison_heard == poisoned.len(),
        ),
        (
            "a poison job ends at most max_attempts + one per loop sessions",
            poison_kills <= most_kills,
        ),
        (
            "every kind of fault happened",
            FAULT_KINDS.iter().all(|kind| faults.contains_key(kind)),
        ),
        ("emails were held by another session", held_emails > 0),
        ("every user has its job", users_without_job == 0),
        ("each confirmed player is its own signup's", misowned == 0),
        (
            "every error with a job id: that job completed",
            with_job_not_done == 0,
        ),
        (
            "every error without a job id: nothing committed",
            without_job_committed == 0,
        ),
        (
            "no signup unavailable without a job id unless the server was away or its connection silent during the call",
            unavailable_without_fault == 0,
        ),
        (
            "every timed-out signup's job completed afterwards",
            usize::try_from(timed_out_done).unwrap() == timed_out_ids.len(),
        ),
        ("no caller answered later than its timeout + 1 s", late == 0),
        (
            "at least 90% of confirmations by notification",
            notified_share >= 0.9,
        ),
        (
            "no email reported taken (all are distinct)",
            outcome_count("email_taken") == 0,
        ),
    ];

    println!("soak: seed {seed}; load {load_secs:.1}s; faults {faults:?}");
    println!(
        "signups attempted {attempted}, confirmed {}, timed out {}, unavailable {} ({unavailable_without_job} without a job id, {unavailable_without_fault} of them outside faults), failed {}, other errors {}",
        outcome_count("confirmed"),
        outcome_count("timed_out"),
        outcome_count("unavailable"),
        outcome_count("failed"),
        outcome_count("error"),
    );
    println!(
        "users {users}, players {players}, jobs done {done}, failed {failed} (poison signups {poisoned:?}, sessions they ended {poison_kills}, at most {most_kills}), pending {pending}, doubled {doubled}"
    );
    println!(
        "confirmations by notification {by_notification}, by table check {by_table_check} ({:.1}% by notification)",
        notified_share * 100.0
    );
    println!(
        "slowest answer {latest_ms} ms (timeout {timeout_ms} ms); answered later than timeout + 1 s: {late}"
    );
    let outage_ms: Vec<u64> = outages.iter().map(|(down, up)| up - down).collect();
    println!(
        "server away (restart, crash) for {outage_ms:?} ms; emails held by another session: {held_emails}; slowest exit after SIGTERM while starting: {} ms",
        slowest_startup_exit.as_millis()
    );
    println!(
        "timed-out signups whose job completed afterwards: {timed_out_done} of {}; errors with a job id whose job is not done: {with_job_not_done}; errors without a job id that committed: {without_job_committed}",
        timed_out_ids.len()
    );
    for summary in confirmations.iter() {
        println!(
            "  a signer: {} confirmations by notification, {} by table check",
            summary.by_notification, summary.by_table_check
        );
    }
    let mut per_ten_seconds: std::collections::BTreeMap<u64, (usize, usize)> = Default::default();
    for r in reported.iter() {
        let slot = per_ten_seconds.entry(r.started_ms / 10_000 * 10).or_default();
        slot.0 += 1;
        if r.outcome != "confirmed" {
            slot.1 += 1;
        }
    }
    println!("  signups started per 10 s (not confirmed): {per_ten_seconds:?}");
    let unavailable = reported.iter().filter(|r| r.outcome == "unavailable").take(8);
    let unusual = unavailable.chain(reported.iter().filter(|r| r.outcome == "error").take(4));
    let timed_out = reported.iter().filter(|r| r.outcome == "timed_out").take(3);
    for r in unusual.chain(timed_out) {
        println!(
            "  signup {} at {} ms: {} after {} ms: {}",
            r.n,
            r.started_ms,
            r.outcome,
            r.elapsed_ms,
            r.error.as_deref().unwrap_or("")
        );
    }
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

/// Inserts users with the emails of signups `ns` in a transaction held open for `hold`, then
/// rolls it back. Returns how many emails were held (none if one was signed up already).
async fn hold_emails(pool: &sqlx::PgPool, ns: impl Iterator<Item = u64>, hold: Duration) -> usize {
    let Ok(mut tx) = pool.begin().await else {
        return 0;
    };
    let mut held = 0;
    for n in ns {
        let insert = sqlx::query("insert into users (email, display_name) values ($1, 'Holder')")
            .bind(soak_email(n))
            .execute(&mut *tx)
            .await;
        if insert.is_err() {
            return 0;
        }
        held += 1;
    }
    tokio::time::sleep(hold).await;
    let _ = tx.rollback().await;
    held
}
