//! The faults the soak injects, at seeded random moments while the signers run, and what it
//! noted of them for the checks.

use std::collections::HashMap;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use ackloop::JobId;
use sqlx::PgPool;
use tokio::process::Child;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::cluster::{Cluster, signal, spawn_worker};
use crate::invariants::LATE_MARGIN_MS;
use crate::signer::{Reported, now_ms, soak_email};
use crate::silent_proxy::SilentProxy;
use crate::{Rng, Settings};

/// Every kind of fault the soak injects; each happens at least once a run.
pub const FAULT_KINDS: [&str; 11] = [
    "worker killed",
    "worker stopped while starting",
    "listeners terminated",
    "postgres restarted",
    "postgres crashed",
    "signups started while down",
    "workers frozen",
    "emails held",
    "connections silenced",
    "garbage notified",
    "garbage notified",
];

/// `ackloop signup` processes started each time the server is stopped for them.
const STARTS_WHILE_DOWN: usize = 20;

/// Workers' shutdown timeout in the soak, and so the bound on a SIGTERM while one starts.
const SHUTDOWN_TIMEOUT_MS: u64 = 5000;

/// What the faults left for the checks.
pub struct FaultLog {
    /// How many times each kind happened.
    pub faults: HashMap<&'static str, u32>,
    /// Emails held by another session, in all.
    pub held_emails: usize,
    /// When the server was away (restart, crash), in ms since the epoch.
    pub outages: Vec<(u64, u64)>,
    /// When signer 0's connections went silent, in ms since the epoch.
    pub silences: Vec<u64>,
    /// The slowest exit of a worker sent SIGTERM while it started.
    pub slowest_startup_exit: Duration,
    /// Whether every worker sent SIGTERM while it started exited in time, as it should.
    pub startup_exits_ok: bool,
    /// The exit codes of the `ackloop signup` processes started while the server was stopped.
    pub started_while_down: Vec<Option<i32>>,
}

/// Injects faults at seeded random moments (`started`: when the signers started) until every
/// signer task has finished; restarts the workers it kills in `worker_processes`.
#[allow(clippy::too_many_arguments)]
pub async fn inject(
    settings: &Settings,
    rng: &mut Rng,
    cluster: &Cluster,
    proxy: &SilentProxy,
    pool: &PgPool,
    worker_processes: &mut [Child],
    signer_tasks: &[JoinHandle<ExitStatus>],
    reported: &Mutex<Vec<Reported>>,
    started: Instant,
) -> FaultLog {
    let Settings {
        signups,
        signers,
        workers,
        timeout_ms,
        per_signer,
        ..
    } = *settings;
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
    let mut started_while_down: Vec<Option<i32>> = Vec::new();
    while signer_tasks.iter().any(|task| !task.is_finished()) {
        tokio::time::sleep(Duration::from_millis(150 + rng.below(600))).await;
        let count_of = |faults: &HashMap<&str, u32>, name: &str| faults.get(name).copied().unwrap_or(0);
        // Every kind once, in a seeded order, then at random.
        let fault = if let Some(fault) = every_kind.pop() {
            fault
        } else {
            match rng.below(15) {
                0..=2 => "worker killed",
                3..=4 => "listeners terminated",
                5 if count_of(&faults, "postgres restarted") < 4 => "postgres restarted",
                6 if count_of(&faults, "postgres crashed") < 2 => "postgres crashed",
                12 if count_of(&faults, "signups started while down") < 2 => "signups started while down",
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
                worker_processes[index] = spawn_worker(&cluster.worker_url(index));
            }
            "worker stopped while starting" => {
                // A fresh worker gets SIGTERM at a random moment of its start-up; it must be gone
                // within its shutdown timeout (plus 1 s), having drained or not started at all.
                let index = usize::try_from(rng.below(workers)).unwrap();
                signal(&worker_processes[index], "-KILL").await;
                let _ = worker_processes[index].wait().await;
                let mut starting = spawn_worker(&cluster.worker_url(index));
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
                worker_processes[index] = spawn_worker(&cluster.worker_url(index));
            }
            "listeners terminated" => {
                let _ = sqlx::query(
                    "select pg_terminate_backend(pid) from pg_stat_activity
                     where datname = current_database() and query ilike 'listen%'",
                )
                .execute(pool)
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
                for worker in worker_processes.iter() {
                    signal(worker, "-STOP").await;
                }
                tokio::time::sleep(Duration::from_millis(timeout_ms + 1000)).await;
                for worker in worker_processes.iter() {
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
                held_emails += hold_emails(pool, (next + 4..next + 10).filter(|n| *n < signups), hold).await;
            }
            // Processes started while the server is stopped (a deploy during a restart or a
            // failover): each keeps trying within its timeout and gets its player.
            "signups started while down" => {
                let from = now_ms();
                cluster.pg("stop").await;
                let first = started_while_down.len();
                let processes: Vec<tokio::process::Child> = (first..first + STARTS_WHILE_DOWN)
                    .map(|n| {
                        tokio::process::Command::new(crate::ACKLOOP)
                            .args([
                                "signup",
                                "--email",
                                &format!("started-down-{n}@example.com"),
                                "--display-name",
                                &format!("Started down {n}"),
                                "--timeout",
                                "30s",
                                "--json",
                            ])
                            .env("DATABASE_URL", &cluster.url)
                            .env("RUST_LOG", "ackloop=error")
                            .stdout(std::process::Stdio::null())
                            .stderr(std::process::Stdio::null())
                            .kill_on_drop(true)
                            .spawn()
                            .expect("start ackloop signup")
                    })
                    .collect();
                cluster.pg("start").await;
                outages.push((from, now_ms()));
                for mut process in processes {
                    let status = tokio::time::timeout(Duration::from_secs(40), process.wait()).await;
                    started_while_down.push(match status {
                        Ok(Ok(status)) => status.code(),
                        _ => None,
                    });
                }
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
                    "'; drop table ackloop.builtin_users; --",
                ];
                for payload in garbage {
                    for channel in [ackloop::DEFAULT_JOBS_CHANNEL, ackloop::DEFAULT_DONE_CHANNEL] {
                        let _ = sqlx::query("select pg_notify($1, $2)")
                            .bind(channel)
                            .bind(payload)
                            .execute(pool)
                            .await;
                    }
                }
            }
        }
    }
    FaultLog {
        faults,
        held_emails,
        outages,
        silences,
        slowest_startup_exit,
        startup_exits_ok,
        started_while_down,
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
        let insert =
            sqlx::query("insert into ackloop.builtin_users (email, display_name) values ($1, 'Holder')")
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
