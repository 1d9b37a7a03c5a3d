//! Operator commands on done jobs whose player is gone (a hand-made fix, a partial restore):
//! shown as a problem, refused by a plain retry, put back by `jobs retry --repair`, flagged by
//! `doctor`.

use ackloop::JobId;
use ackloop::admin::{self, AdminError};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::common::*;

/// Signs up users `numbers` and lets a worker complete them; returns their job ids, in order.
async fn done_signups(pool: &PgPool, numbers: std::ops::RangeInclusive<usize>) -> Vec<JobId> {
    let mut jobs = Vec::new();
    for n in numbers {
        jobs.push(pending_signup(pool, n).await);
    }
    let worker = spawn_worker(pool, worker_config());
    let expected = i64::try_from(jobs.len()).unwrap();
    wait_until("the signups are done", || async {
        count_jobs_with_status(pool, "done").await == expected
    })
    .await;
    worker.stop().await;
    jobs
}

/// Deletes the player of `job_id`'s user, as a hand-made fix or a partial restore would.
async fn delete_player_of(pool: &PgPool, job_id: JobId) {
    let deleted = sqlx::query(
        "delete from ackloop.builtin_players as players where user_id = (select builtin_user_id from ackloop.player_creation_jobs where id = $1)",
    )
    .bind(job_id.as_uuid())
    .execute(pool)
    .await
    .expect("delete the player");
    assert_eq!(deleted.rows_affected(), 1, "job {job_id} had a player to delete");
}

/// A job's row and its user's player, everything an operator command could change.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct JobRow {
    status: String,
    attempts: i32,
    last_error: Option<String>,
    run_after: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
    player_id: Option<i64>,
    /// Whether `run_after` has passed, by the server's clock.
    due: bool,
}

async fn job_row(pool: &PgPool, job_id: JobId) -> JobRow {
    sqlx::query_as(
        "select jobs.status, jobs.attempts, jobs.last_error, jobs.run_after, jobs.updated_at,
                jobs.completed_at, players.id as player_id, jobs.run_after <= now() as due
         from ackloop.player_creation_jobs as jobs
         left join ackloop.builtin_players as players on players.user_id = jobs.builtin_user_id
         where jobs.id = $1",
    )
    .bind(job_id.as_uuid())
    .fetch_one(pool)
    .await
    .expect("read the job")
}

#[sqlx::test]
async fn a_done_job_without_its_player_is_shown_as_a_problem_and_not_retried(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 6).await;
    let [job_id] = done_signups(&pool, 1..=1).await[..] else {
        unreachable!()
    };
    delete_player_of(&pool, job_id).await;
    let id = job_id.to_string();

    // The caller's answer is the one recorded with the job when it was done (read from
    // ackloop's job table, never from a player service's): the operators' view shows the loss.
    let waited = signups(&pool)
        .await
        .await_player(job_id, DEADLINE)
        .await
        .expect("the answer recorded with the job");

    let json = run_ackloop(&url, &["jobs", "show", &id, "--json"]).await;
    assert_eq!(json.status.code(), Some(0), "{}", stderr(&json));
    let shown = stdout_json(&json);
    assert_eq!(shown["status"], "done");
    assert_eq!(shown["player_id"], waited.id.to_string(), "the answer recorded");
    assert_eq!(shown["player_missing"], true);

    let text = run_ackloop(&url, &["jobs", "show", &id]).await;
    assert_eq!(text.status.code(), Some(0), "{}", stderr(&text));
    let text = String::from_utf8_lossy(&text.stdout);
    let problem = text
        .lines()
        .find(|line| line.starts_with("problem "))
        .unwrap_or_else(|| panic!("no problem line in:\n{text}"));
    assert!(problem.contains("player is missing"), "{problem}");
    assert!(
        problem.ends_with(&format!("ackloop jobs retry --repair {id}")),
        "{problem}"
    );

    // A plain retry refuses, names the way out, and changes nothing: no row, no wake-up.
    let before = job_row(&pool, job_id).await;
    let mut listener = listen_on(&pool, ackloop::DEFAULT_JOBS_CHANNEL).await;
    let retry = run_ackloop(&url, &["jobs", "retry", &id]).await;
    assert_eq!(retry.status.code(), Some(10), "{}", stderr(&retry));
    let message = stderr(&retry);
    assert!(
        message.contains("player is missing") && message.contains("--repair"),
        "{message}"
    );
    assert!(!message.contains("its player exists"), "{message}");
    assert_eq!(job_row(&pool, job_id).await, before);
    assert_nothing_sent_before_marker(&pool, &mut listener, ackloop::DEFAULT_JOBS_CHANNEL).await;

    let library = admin::retry_failed_job(&pool, &ackloop::Channels::default(), job_id).await;
    assert!(
        matches!(library, Err(AdminError::DoneWithoutPlayer(id)) if id == job_id),
        "{library:?}"
    );
}

#[sqlx::test]
async fn jobs_retry_repair_puts_the_job_back_and_a_worker_makes_its_player_again(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 8).await;
    let [job_id] = done_signups(&pool, 1..=1).await[..] else {
        unreachable!()
    };
    let old_player = job_row(&pool, job_id).await.player_id.expect("a player");
    delete_player_of(&pool, job_id).await;

    let mut listener = listen_on(&pool, ackloop::DEFAULT_JOBS_CHANNEL).await;
    let repair = run_ackloop(
        &url,
        &["jobs", "retry", "--repair", &job_id.to_string(), "--json"],
    )
    .await;
    assert_eq!(repair.status.code(), Some(0), "{}", stderr(&repair));
    assert_eq!(
        stdout_json(&repair),
        serde_json::json!({ "repaired": [job_id.to_string()] })
    );
    let repaired = job_row(&pool, job_id).await;
    assert_eq!(
        (
            repaired.status.as_str(),
            repaired.attempts,
            repaired.last_error.as_deref(),
            repaired.completed_at,
            repaired.player_id,
            repaired.due,
        ),
        ("pending", 0, None, None, None, true),
        "fresh and due now: {repaired:?}"
    );
    assert_eq!(
        next_notification(&mut listener).await.payload(),
        job_id.to_string(),
        "the workers are woken with the job id"
    );

    let worker = spawn_worker(&pool, worker_config());
    wait_until("the repaired job is done with a player", || async {
        let row = job_row(&pool, job_id).await;
        row.status == "done" && row.player_id.is_some()
    })
    .await;
    let player = signups(&pool)
        .await
        .await_player(job_id, DEADLINE)
        .await
        .expect("the caller's view: the player exists again");
    assert_ne!(player.id.get(), old_player, "a new player, made by the worker");
    assert_eq!(player.display_name, "Player 1");
    assert_eq!(job_row(&pool, job_id).await.attempts, 1);
    let shown = stdout_json(&run_ackloop(&url, &["jobs", "show", &job_id.to_string(), "--json"]).await);
    assert_eq!(shown["player_missing"], false);
    worker.stop().await;
    assert_eq!(counts(&pool).await.players, 1);
}

#[sqlx::test]
async fn jobs_retry_repair_touches_only_done_jobs_without_a_player(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 6).await;
    // A done job with its player, a failed job, and a pending one.
    let [healthy] = done_signups(&pool, 1..=1).await[..] else {
        unreachable!()
    };
    // `not valid`: the existing player stays; every new one is refused.
    execute(
        &pool,
        "alter table ackloop.builtin_players add constraint broken check (false) not valid",
    )
    .await;
    let failed = pending_signup(&pool, 2).await;
    let worker = spawn_worker(&pool, worker_config());
    wait_until("the job has failed", || async {
        count_jobs_with_status(&pool, "failed").await == 1
    })
    .await;
    worker.stop().await;
    execute(
        &pool,
        "alter table ackloop.builtin_players drop constraint broken",
    )
    .await;
    let pending = pending_signup(&pool, 3).await;

    let mut listener = listen_on(&pool, ackloop::DEFAULT_JOBS_CHANNEL).await;
    let jobs = [healthy, failed, pending];
    let mut before = Vec::new();
    for job_id in jobs {
        before.push(job_row(&pool, job_id).await);
    }
    for (job_id, says) in [
        (healthy, "is done and its player exists"),
        (failed, "without --repair"),
        (pending, "not finished yet"),
    ] {
        let refused = run_ackloop(&url, &["jobs", "retry", "--repair", &job_id.to_string()]).await;
        assert_eq!(refused.status.code(), Some(10), "{}", stderr(&refused));
        assert!(stderr(&refused).contains(says), "{}", stderr(&refused));
    }
    let channels = ackloop::Channels::default();
    let library = admin::repair_job(&pool, &channels, healthy).await;
    assert!(matches!(library, Err(AdminError::AlreadyDone(_))), "{library:?}");
    let library = admin::repair_job(&pool, &channels, failed).await;
    assert!(matches!(library, Err(AdminError::StillFailed(_))), "{library:?}");
    let library = admin::repair_job(&pool, &channels, pending).await;
    assert!(matches!(library, Err(AdminError::StillPending(_))), "{library:?}");
    let library = admin::repair_job(&pool, &channels, JobId::new()).await;
    assert!(matches!(library, Err(AdminError::UnknownJob(_))), "{library:?}");
    let all = run_ackloop(&url, &["jobs", "retry", "--repair", "--all-missing", "--json"]).await;
    assert_eq!(all.status.code(), Some(0), "{}", stderr(&all));
    assert_eq!(stdout_json(&all), serde_json::json!({ "repaired": [] }));

    let mut after = Vec::new();
    for job_id in jobs {
        after.push(job_row(&pool, job_id).await);
    }
    assert_eq!(after, before, "no job changed");
    assert_nothing_sent_before_marker(&pool, &mut listener, ackloop::DEFAULT_JOBS_CHANNEL).await;
}

#[sqlx::test]
async fn jobs_retry_repair_all_missing_wakes_a_running_worker_for_exactly_those_jobs(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 8).await;
    let jobs = done_signups(&pool, 1..=3).await;
    delete_player_of(&pool, jobs[0]).await;
    delete_player_of(&pool, jobs[2]).await;
    let untouched = job_row(&pool, jobs[1]).await;
    // The worker sweeps on start, then polls once an hour: only the repair's notifications can
    // bring it to the repaired jobs within the deadline.
    let worker = spawn_worker(&pool, worker_config());

    let repair = run_ackloop(&url, &["jobs", "retry", "--repair", "--all-missing", "--json"]).await;
    assert_eq!(repair.status.code(), Some(0), "{}", stderr(&repair));
    let mut repaired: Vec<String> = stdout_json(&repair)["repaired"]
        .as_array()
        .expect("a list of job ids")
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    repaired.sort();
    let mut expected = vec![jobs[0].to_string(), jobs[2].to_string()];
    expected.sort();
    assert_eq!(repaired, expected);

    wait_until("every user has a player again", || async {
        counts(&pool).await.players == 3 && count_jobs_with_status(&pool, "done").await == 3
    })
    .await;
    assert_eq!(
        job_row(&pool, jobs[1]).await,
        untouched,
        "the job whose player existed"
    );
    worker.stop().await;

    let again = run_ackloop(&url, &["jobs", "retry", "--repair", "--all-missing"]).await;
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).starts_with("0 done job(s) without a player"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
}

#[sqlx::test]
async fn doctor_flags_done_jobs_without_a_player_until_they_are_repaired(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 8).await;
    let jobs = done_signups(&pool, 1..=2).await;
    delete_player_of(&pool, jobs[1]).await;

    let flagged = run_ackloop(&url, &["doctor"]).await;
    assert_eq!(flagged.status.code(), Some(10), "{}", stderr(&flagged));
    let text = String::from_utf8_lossy(&flagged.stdout);
    assert!(
        text.contains("FAIL done jobs without a player 1 done job(s) have no player"),
        "{text}"
    );
    assert!(
        text.contains("fix: run `ackloop jobs retry --repair --all-missing`"),
        "{text}"
    );
    let report = stdout_json(&run_ackloop(&url, &["doctor", "--json"]).await);
    let failing: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|check| check["ok"] == false)
        .map(|check| check["name"].as_str().unwrap())
        .collect();
    assert_eq!(failing, ["done jobs without a player"], "{report}");

    let repaired = admin::repair_all_missing_players(&pool, &ackloop::Channels::default())
        .await
        .expect("repair");
    assert_eq!(repaired, [jobs[1]]);
    let worker = spawn_worker(&pool, worker_config());
    wait_until("the repaired job is done with its player", || async {
        let row = job_row(&pool, jobs[1]).await;
        row.status == "done" && row.player_id.is_some()
    })
    .await;
    worker.stop().await;
    let healthy = run_ackloop(&url, &["doctor", "--json"]).await;
    assert_eq!(
        healthy.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&healthy.stdout)
    );
    assert_eq!(stdout_json(&healthy)["ok"], true);
}
