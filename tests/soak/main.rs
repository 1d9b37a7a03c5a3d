//! `make soak`: the fault-injection soak. Not part of `make test` (it restarts and crashes its
//! PostgreSQL); without `ACKLOOP_SOAK` set it only says so and exits 0. CI runs it.
//!
//! Several `ackloop worker` processes and several signup processes (this binary, re-run as
//! `soak signer …`) work against a private cluster of their own while, at seeded random moments:
//! workers are SIGKILLed and restarted, or sent SIGTERM while they start; all workers are frozen
//! (SIGSTOP) for longer than a signup's timeout; listener backends are terminated; PostgreSQL is
//! restarted, or its postmaster killed with SIGKILL, or stopped while 20 `ackloop signup`
//! processes start (each must get its player); another session holds uncommitted inserts of
//! emails that signups are about to ask for; the connections of one worker and one signer go
//! silent without closing (they reach the server through a proxy); and garbage is notified on
//! both channels. A few signups are poison: creating their player kills the session. Then it
//! drains the queue, stops the workers, runs a burst of 50,000 callers at once on a database of
//! its own (`burst`), checks the invariants, prints each with its figure, and exits non-zero if
//! any broke.
//!
//! Settings (environment): SOAK_SEED (default: from the clock; printed, so a run can be
//! repeated), SOAK_SIGNUPS (6000), SOAK_SIGNERS (3), SOAK_WORKERS (3), SOAK_TIMEOUT_MS (3000),
//! SOAK_PAUSE_MS (60: each of a signer's 8 callers pauses this long between signups),
//! ACKLOOP_SOAK_URL (the soak cluster's TCP URL; `make soak` sets it), PG_DIR (its directory,
//! for restarts and crashes), SOAK_BURST (50000) and SOAK_BURST_TIMEOUT_MS (2000). `soak burst`
//! runs the burst alone.
//!
//! Here: the settings and the run's order. In `cluster`: the database, the worker processes and
//! signals; `signer`: the signer processes; `faults`: the faults; `invariants`: the checks.

mod burst;
mod cluster;
mod faults;
mod invariants;
mod signer;
#[path = "../support/silent_proxy.rs"]
mod silent_proxy;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::Child;
use tokio::sync::Mutex;

use cluster::{Cluster, catches_sigterm, patiently, signal, spawn_worker};
use signer::{Confirmations, Reported};

const ACKLOOP: &str = env!("CARGO_BIN_EXE_ackloop");

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if args.get(1).map(String::as_str) == Some("signer") {
        return runtime.block_on(signer::signer(&args[2..]));
    }
    if std::env::var_os("ACKLOOP_SOAK").is_none() {
        println!("soak: skipped (run `make soak`)");
        return ExitCode::SUCCESS;
    }
    // `soak burst`: the burst alone (what `make soak` runs after the faults).
    if args.get(1).map(String::as_str) == Some("burst") {
        return runtime.block_on(async {
            let url = std::env::var("ACKLOOP_SOAK_URL").expect("ACKLOOP_SOAK_URL");
            let burst = burst::burst(&url).await;
            burst.print();
            let mut held = true;
            for (check, ok) in burst.checks() {
                println!("  [{}] {check}", if ok { "ok" } else { "BROKEN" });
                held &= ok;
            }
            if held {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        });
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

/// The run's settings, from the environment.
#[derive(Debug, Clone, Copy)]
struct Settings {
    seed: u64,
    signups: u64,
    signers: u64,
    workers: u64,
    timeout_ms: u64,
    pause_ms: u64,
    /// Signups per signer process (the last may have fewer).
    per_signer: u64,
}

impl Settings {
    fn from_env() -> Self {
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
        Self {
            seed,
            signups,
            signers,
            workers,
            timeout_ms,
            pause_ms,
            per_signer: signups.div_ceil(signers),
        }
    }
}

async fn soak() -> ExitCode {
    let settings = Settings::from_env();
    let Settings {
        seed,
        signups,
        signers,
        workers,
        ..
    } = settings;
    let admin_url = std::env::var("ACKLOOP_SOAK_URL").expect("ACKLOOP_SOAK_URL (make soak sets it)");
    println!("soak: seed {seed}, {signups} signups from {signers} signers, {workers} worker processes");
    let mut rng = Rng(seed.max(1));

    let (cluster, proxy, pool) = Cluster::create(&admin_url, seed).await;
    let poisoned = cluster::poison(&pool, &mut rng, signups).await;

    let mut worker_processes: Vec<Child> = (0..workers as usize)
        .map(|index| spawn_worker(&cluster.worker_url(index)))
        .collect();
    let reported = Arc::new(Mutex::new(Vec::<Reported>::new()));
    let confirmations = Arc::new(Mutex::new(Vec::<Confirmations>::new()));
    let signer_tasks = signer::spawn_signers(&settings, &cluster, &reported, &confirmations);

    // Faults, at seeded random moments, until every signer has finished.
    let started = Instant::now();
    let faults = faults::inject(
        &settings,
        &mut rng,
        &cluster,
        &proxy,
        &pool,
        &mut worker_processes,
        &signer_tasks,
        &reported,
        started,
    )
    .await;
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
            sqlx::query_scalar(
                "select count(*) from ackloop.player_creation_jobs where status in ('pending', 'running')",
            )
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

    // With every worker stopped: the burst, on a database of its own.
    let burst = burst::burst(&admin_url).await;

    invariants::check(invariants::Run {
        settings,
        pool,
        poisoned,
        faults,
        reported,
        confirmations,
        signers_ok,
        drained,
        workers_exited_cleanly,
        load_secs,
        burst,
    })
    .await
}
