//! After the run: the poison jobs' callers ask again, the invariants are computed as figures
//! from the signers' reports and the tables, and each is printed with its figure.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ackloop::{SignupError, Signups};
use sqlx::PgPool;
use tokio::sync::Mutex;

use crate::Settings;
use crate::cluster::patiently;
use crate::faults::{FAULT_KINDS, FaultLog};
use crate::signer::{Confirmations, Reported, soak_email};

/// How late past its timeout a caller may be answered here: the documented 100 ms, and a
/// 2-core machine running the server, three workers and three signers at once.
pub const LATE_MARGIN_MS: u64 = 1000;

/// How the run went, for the checks.
pub struct Run {
    pub settings: Settings,
    pub pool: PgPool,
    /// The poison signups.
    pub poisoned: Vec<u64>,
    pub faults: FaultLog,
    pub reported: Arc<Mutex<Vec<Reported>>>,
    pub confirmations: Arc<Mutex<Vec<Confirmations>>>,
    pub signers_ok: bool,
    pub drained: bool,
    pub workers_exited_cleanly: bool,
    /// How long the signers ran.
    pub load_secs: f64,
    /// The burst after the faults.
    pub burst: crate::burst::Burst,
}

/// Checks the invariants, prints each with its figure, closes the pool, and says whether all
/// held.
pub async fn check(run: Run) -> ExitCode {
    let Run {
        settings:
            Settings {
                seed,
                signups,
                workers,
                timeout_ms,
                per_signer,
                ..
            },
        pool,
        poisoned,
        faults:
            FaultLog {
                faults,
                held_emails,
                outages,
                silences,
                slowest_startup_exit,
                startup_exits_ok,
                started_while_down,
            },
        reported,
        confirmations,
        signers_ok,
        drained,
        workers_exited_cleanly,
        load_secs,
        burst,
    } = run;
    // The poison jobs' callers (long timed out) ask again, and hear of the failure.
    let poison_heard = {
        let signups = Signups::connect(pool.clone())
            .await
            .expect("listen for the poison jobs");
        let mut heard = 0;
        for n in &poisoned {
            let job: Option<uuid::Uuid> = patiently(|| {
                sqlx::query_scalar(
                    "select jobs.id from ackloop.player_creation_jobs as jobs join ackloop.builtin_users as users on users.id = jobs.builtin_user_id
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
                     (select count(*) from ackloop.builtin_users as users),
                     (select count(*) from ackloop.builtin_players as players),
                     (select count(*) from ackloop.player_creation_jobs where status = 'done'),
                     (select count(*) from ackloop.player_creation_jobs where status = 'failed'),
                     (select count(*) from ackloop.player_creation_jobs where status in ('pending', 'running')),
                     (select count(*) - count(distinct user_id) from ackloop.builtin_players as players),
                     (select count(*) from ackloop.builtin_users as users where not exists
                         (select 1 from ackloop.player_creation_jobs j where j.builtin_user_id = users.id))",
        )
        .fetch_one(&pool)
    })
    .await;
    let is_poison = |n: u64| poisoned.contains(&n);

    // Every failed job is a poison one, failed for killing its session.
    let failed_jobs: Vec<(String, String)> = patiently(|| {
        sqlx::query_as(
            "select users.email, coalesce(jobs.last_error, '')
             from ackloop.player_creation_jobs as jobs
             join ackloop.builtin_users as users on users.id = jobs.builtin_user_id
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
            "select players.id, users.email from ackloop.builtin_players as players join ackloop.builtin_users as users on users.id = players.user_id
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
            "select count(*) from ackloop.player_creation_jobs where id = any($1) and status <> 'done'",
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
        sqlx::query_scalar("select count(*) from ackloop.builtin_users as users where email = any($1)")
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
        sqlx::query_scalar(
            "select count(*) from ackloop.player_creation_jobs where id = any($1) and status = 'done'",
        )
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
    let checks = vec![
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
        (
            "jobs left unfinished (pending or running) after drain: 0",
            pending == 0,
        ),
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
        (
            "every ackloop signup started while the server was stopped got its player (exit 0)",
            !started_while_down.is_empty() && started_while_down.iter().all(|code| *code == Some(0)),
        ),
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
        "ackloop signup processes started while the server was stopped: {}, exit codes {:?}",
        started_while_down.len(),
        started_while_down
            .iter()
            .fold(std::collections::BTreeMap::new(), |mut codes, code| {
                *codes.entry(*code).or_insert(0) += 1;
                codes
            })
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
    burst.print();
    let checks = checks
        .into_iter()
        .map(|(check, held)| (check.to_owned(), held))
        .chain(burst.checks());
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
