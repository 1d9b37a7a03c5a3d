//! `make failover`: the loop across two failovers, on real servers. Not part of `make test` (it
//! needs a second cluster); without `ACKLOOP_FAILOVER` set it only says so and exits 0. CI runs
//! it.
//!
//! `scripts/pg-pair` runs a primary (a) and a synchronous streaming standby (b). Two `ackloop
//! worker` processes and this process's signups (16 callers, each waiting up to 30 s for its
//! player) all use one multi-host URL (`a,b`, `target_session_attrs=read-write`). Each phase
//! waits for 200 confirmed signups, takes the primary away, promotes the standby, and goes on
//! until 200 signups started after the promotion are confirmed; then its invariants are printed
//! with their figures and asserted on the new primary.
//!
//! 1. a crashes (`-m immediate`: no shutdown checkpoint, sessions cut); after an outage of
//!    `FAILOVER_OUTAGE_MS` (1,000 by default: an HA manager's detection time) b is promoted.
//! 2. a is rebuilt as b's synchronous standby; then b is fenced (read-only, still up and
//!    answering, as an HA manager fences a primary), and once it can commit nothing more a is
//!    promoted beside it: ackloop must leave a server that still answers.
//!
//! At the end the queue is drained on a and the whole run checked there.

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ackloop::{ConnectConfig, NewUser, SignupError, Signups};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

const ACKLOOP: &str = env!("CARGO_BIN_EXE_ackloop");
const PAIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-pair");
const CALLERS: usize = 16;
/// Each caller's timeout: longer than the failover, so every caller should get its player.
const CALLER_TIMEOUT: Duration = Duration::from_secs(30);
/// Confirmed signups before the crash, and confirmed signups started after the promotion.
const BEFORE: usize = 200;
const AFTER: usize = 200;
/// The longest any phase may take before the run is declared stuck.
const PHASE_DEADLINE: Duration = Duration::from_secs(120);

/// One signup: when it started and ended, and how.
struct Outcome {
    started: Instant,
    ended: Instant,
    result: Result<ackloop::Player, SignupError>,
}

fn main() -> ExitCode {
    if std::env::var_os("ACKLOOP_FAILOVER").is_none() {
        println!("failover: skipped (run `make failover`)");
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(failover())
}

/// `scripts/pg-pair ARG`; its stdout, trimmed. Fails the run if the script does.
async fn pair(arg: &str) -> String {
    let output = Command::new(PAIR)
        .arg(arg)
        .stderr(Stdio::inherit())
        .output()
        .await
        .expect("run scripts/pg-pair");
    assert!(output.status.success(), "scripts/pg-pair {arg} failed");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn spawn_worker(url: &str, n: usize) -> Child {
    let log =
        std::fs::File::create(std::env::temp_dir().join(format!("ackloop-failover-worker-{n}.log"))).unwrap();
    Command::new(ACKLOOP)
        .args(["worker", "--concurrency", "2"])
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "ackloop=info")
        .env("NO_COLOR", "1")
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start a worker")
}

/// Waits for `what` until [`PHASE_DEADLINE`].
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PHASE_DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "stuck: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a phase takes the primary away.
#[derive(Clone, Copy)]
enum Fault {
    /// `pg_ctl stop -m immediate`: a crash, every session cut.
    Crash,
    /// Made read-only while it stays up and reachable (an HA manager's fence), then the standby
    /// promoted beside it: ackloop must leave a server that still answers.
    Fence,
}

/// The signup side's callers, running until told to stop.
struct Load {
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    confirmed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    callers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(signups: &Arc<Signups>, next: &Arc<AtomicUsize>) -> Self {
        let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
        let confirmed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let callers = (0..CALLERS)
            .map(|_| {
                let (signups, outcomes, confirmed, stop, next) = (
                    Arc::clone(signups),
                    Arc::clone(&outcomes),
                    Arc::clone(&confirmed),
                    Arc::clone(&stop),
                    Arc::clone(next),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let user = NewUser::new(format!("user{n}@example.com"), format!("User {n}")).unwrap();
                        let started = Instant::now();
                        let result = signups.create_user_and_await_player(&user, CALLER_TIMEOUT).await;
                        if result.is_ok() {
                            confirmed.fetch_add(1, Ordering::Relaxed);
                        }
                        let ended = Instant::now();
                        outcomes.lock().await.push(Outcome {
                            started,
                            ended,
                            result,
                        });
                    }
                })
            })
            .collect();
        Self {
            outcomes,
            confirmed,
            stop,
            callers,
        }
    }

    async fn confirmed_after(&self, moment: Instant) -> usize {
        self.outcomes
            .lock()
            .await
            .iter()
            .filter(|o| o.started > moment && o.result.is_ok())
            .count()
    }

    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for caller in self.callers {
            caller.await.expect("a caller panicked");
        }
        std::mem::take(&mut *self.outcomes.lock().await)
    }
}

/// One failover under load: signups confirmed, the primary taken away by `fault`, the standby
/// promoted, then signups confirmed on the new primary; then this phase's invariants, read on
/// the new primary at `new_primary_url`. Returns how many signups were confirmed.
async fn phase(
    checks: &mut Checks,
    fault: Fault,
    signups: &Arc<Signups>,
    next: &Arc<AtomicUsize>,
    new_primary_url: &str,
) -> usize {
    let load = Load::start(signups, next);
    until("signups confirmed before the fault", || {
        load.confirmed.load(Ordering::Relaxed) >= BEFORE
    })
    .await;
    let faulted = Instant::now();
    match fault {
        Fault::Crash => {
            pair("kill-primary").await;
            println!("failover: primary stopped with -m immediate");
            // The outage is the scenario (an HA manager's detection time), not a wait.
            tokio::time::sleep(outage()).await;
        }
        Fault::Fence => {
            pair("fence").await;
            println!("failover: primary fenced (read-only, still up)");
            // An HA manager promotes only once the old primary can commit nothing more: wait
            // until no transaction there holds a transaction id (one committing after the
            // promotion would wait for a standby that is gone).
            let old = pair("url-b").await;
            let mut conn = PgConnection::connect(&old)
                .await
                .expect("connect to the fenced primary");
            let deadline = Instant::now() + PHASE_DEADLINE;
            loop {
                let writing: i64 = sqlx::query_scalar(
                    "select count(*) from pg_stat_activity where backend_xid is not null and pid <> pg_backend_pid()",
                )
                .fetch_one(&mut conn)
                .await
                .unwrap();
                if writing == 0 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "stuck: writes still open on the fenced primary"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = conn.close().await;
        }
    }
    pair("promote").await;
    let promoted = Instant::now();
    println!(
        "failover: standby promoted {:.1} s after the fault",
        (promoted - faulted).as_secs_f64()
    );
    let deadline = Instant::now() + PHASE_DEADLINE;
    while load.confirmed_after(promoted).await < AFTER {
        assert!(
            Instant::now() < deadline,
            "stuck: signups confirmed after the promotion"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outcomes = load.finish().await;
    let mut new_primary = PgConnection::connect(new_primary_url)
        .await
        .expect("connect to the new primary");
    verify_phase(checks, &outcomes, &mut new_primary, faulted, promoted).await;
    let _ = new_primary.close().await;
    outcomes.iter().filter(|o| o.result.is_ok()).count()
}

fn outage() -> Duration {
    Duration::from_millis(
        std::env::var("FAILOVER_OUTAGE_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(1000),
    )
}

async fn failover() -> ExitCode {
    pair("start").await;
    let url = pair("url").await;
    println!("failover: {url}");
    let migrated = Command::new(ACKLOOP)
        .arg("migrate")
        .env("DATABASE_URL", &url)
        .status()
        .await
        .unwrap();
    assert!(migrated.success(), "ackloop migrate");
    let mut workers = [spawn_worker(&url, 1), spawn_worker(&url, 2)];

    let pool = ConnectConfig::parse(&url)
        .unwrap()
        .connect_pool(PgPoolOptions::new().max_connections(8).test_before_acquire(false))
        .await
        .expect("a pool on the primary");
    let signups = Arc::new(Signups::connect(pool.clone()).await.expect("the signup side"));
    let next = Arc::new(AtomicUsize::new(0));
    let mut checks = Checks::default();

    println!("failover: phase 1, a crashes, b is promoted");
    let mut confirmed = phase(&mut checks, Fault::Crash, &signups, &next, &pair("url-b").await).await;
    pair("rejoin").await;
    println!("failover: a rebuilt as b's synchronous standby");
    println!("failover: phase 2, b is fenced and stays up, a is promoted");
    confirmed += phase(&mut checks, Fault::Fence, &signups, &next, &pair("url-a").await).await;

    // Drain on the last primary, then check the whole run there.
    let mut last = PgConnection::connect(&pair("url-a").await)
        .await
        .expect("connect to a");
    let drain_deadline = Instant::now() + PHASE_DEADLINE;
    loop {
        let pending: i64 = sqlx::query_scalar(
            "select count(*) from ackloop.player_creation_jobs where status in ('pending', 'running')",
        )
        .fetch_one(&mut last)
        .await
        .unwrap();
        if pending == 0 {
            break;
        }
        assert!(
            Instant::now() < drain_deadline,
            "stuck: {pending} jobs still pending"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    verify_run(&mut checks, confirmed, &mut last).await;

    // The workers rode both failovers: still running, and they stop cleanly.
    for (n, worker) in workers.iter_mut().enumerate() {
        let running = worker.try_wait().unwrap().is_none();
        checks.check(
            &format!("worker {} still running after both failovers", n + 1),
            running,
            "",
        );
        if let Some(pid) = worker.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        let status = tokio::time::timeout(Duration::from_secs(40), worker.wait()).await;
        let clean = matches!(status, Ok(Ok(status)) if status.success());
        checks.check(&format!("worker {} exits 0 on SIGTERM", n + 1), clean, "");
    }
    drop(signups);
    pool.close().await;
    pair("clean").await;
    checks.exit_code()
}

#[derive(Default)]
struct Checks {
    failed: usize,
}

impl Checks {
    fn check(&mut self, what: &str, held: bool, figure: &str) {
        println!(
            "  [{}] {what}{}",
            if held { "ok" } else { "FAILED" },
            if figure.is_empty() {
                String::new()
            } else {
                format!(": {figure}")
            }
        );
        if !held {
            self.failed += 1;
        }
    }

    fn exit_code(&self) -> ExitCode {
        if self.failed == 0 {
            println!("failover: every invariant held");
            ExitCode::SUCCESS
        } else {
            println!("failover: {} invariant(s) broken", self.failed);
            ExitCode::FAILURE
        }
    }
}

async fn verify_phase(
    checks: &mut Checks,
    outcomes: &[Outcome],
    db: &mut PgConnection,
    faulted: Instant,
    promoted: Instant,
) {
    let confirmed: Vec<&ackloop::Player> = outcomes.iter().filter_map(|o| o.result.as_ref().ok()).collect();
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err().map(|err| err.to_string()))
        .collect();
    println!(
        "failover: {} signups, {} confirmed",
        outcomes.len(),
        confirmed.len()
    );
    checks.check(
        "every caller got its player (each waited up to 30 s, longer than the failover)",
        failures.is_empty(),
        &format!(
            "{} of {}; not: {:?}",
            confirmed.len(),
            outcomes.len(),
            failures.iter().take(5).collect::<Vec<_>>()
        ),
    );
    let across: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.started < faulted && o.ended > faulted)
        .collect();
    let across_ok = across.iter().filter(|o| o.result.is_ok()).count();
    checks.check(
        "callers in flight at the fault were confirmed",
        across_ok == across.len() && !across.is_empty(),
        &format!("{across_ok} of {}", across.len()),
    );
    let first_after = outcomes
        .iter()
        .filter(|o| o.result.is_ok() && o.ended > promoted)
        .map(|o| o.ended - promoted)
        .min();
    checks.check(
        "a signup was confirmed after the promotion, within a caller's timeout",
        first_after.is_some_and(|after| after < CALLER_TIMEOUT),
        &format!(
            "{:.0} ms after the promotion",
            first_after.unwrap_or(CALLER_TIMEOUT).as_secs_f64() * 1000.0
        ),
    );
    // Every player a caller was given is on the new primary, as given.
    let mut missing = 0;
    for player in &confirmed {
        let found: Option<i64> =
            sqlx::query_scalar("select user_id from ackloop.builtin_players as players where id = $1")
                .bind(player.id.get())
                .fetch_optional(&mut *db)
                .await
                .unwrap();
        if found != Some(player.user_id.get()) {
            missing += 1;
        }
    }
    checks.check(
        "every player a caller was given is on the new primary",
        missing == 0,
        &format!("{missing} missing of {}", confirmed.len()),
    );
}

/// The whole run, on the last primary once the queue is drained.
async fn verify_run(checks: &mut Checks, confirmed: usize, db: &mut PgConnection) {
    let (users, jobs, done, failed, players): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from ackloop.builtin_users as users),
                (select count(*) from ackloop.player_creation_jobs),
                (select count(*) from ackloop.player_creation_jobs where status = 'done'),
                (select count(*) from ackloop.player_creation_jobs where status = 'failed'),
                (select count(*) from ackloop.builtin_players as players)",
    )
    .fetch_one(&mut *db)
    .await
    .unwrap();
    checks.check(
        "every committed job completed, none failed",
        done == jobs && failed == 0,
        &format!("{done} done, {failed} failed, of {jobs}"),
    );
    checks.check(
        "nothing doubled: one user, one job, one player per confirmed signup",
        users == jobs && jobs == players && players == confirmed as i64,
        &format!("{users} users, {jobs} jobs, {players} players, {confirmed} confirmed"),
    );
}
