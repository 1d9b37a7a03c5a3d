//! Operator commands, run as the real binary: jobs show / retry / prune, await, doctor.
//!
//! Here: the commands on a healthy or failing queue. In `repair`: done jobs whose player is
//! gone, and `jobs retry --repair`.

mod repair;

use serde_json::Value;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::*;

#[sqlx::test]
async fn jobs_show_reports_the_job_its_user_and_whether_a_player_exists(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 4).await;
    let job_id = pending_signup(&pool, 1).await;

    let pending = run_ackloop(&url, &["jobs", "show", &job_id.to_string(), "--json"]).await;
    assert_eq!(pending.status.code(), Some(0), "{}", stderr(&pending));
    let shown = stdout_json(&pending);
    assert_eq!(shown["job_id"], job_id.to_string());
    assert_eq!(shown["status"], "pending");
    assert_eq!(shown["email"], "user1@example.com");
    assert_eq!(shown["player_id"], Value::Null);
    assert_eq!(
        shown["player_missing"], false,
        "a pending job's player is yet to come"
    );

    let worker = spawn_worker(&pool, worker_config());
    signups(&pool).await.await_player(job_id, DEADLINE).await.unwrap();
    let done = stdout_json(&run_ackloop(&url, &["jobs", "show", &job_id.to_string(), "--json"]).await);
    assert_eq!(done["status"], "done");
    assert_eq!(done["attempts"], 1);
    assert!(
        done["player_id"].is_string(),
        "a service's own id, as text: {done}"
    );
    assert_eq!(done["player_missing"], false);
    worker.stop().await;

    let unknown = run_ackloop(&url, &["jobs", "show", &ackloop::JobId::new().to_string()]).await;
    assert_eq!(unknown.status.code(), Some(12), "{}", stderr(&unknown));
}

#[sqlx::test]
async fn jobs_retry_revives_failed_jobs_and_refuses_done_ones(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 6).await;
    execute(
        &pool,
        "alter table ackloop.builtin_players add constraint broken check (false)",
    )
    .await;
    let first = pending_signup(&pool, 1).await;
    let second = pending_signup(&pool, 2).await;
    let worker = spawn_worker(&pool, worker_config());
    wait_until("both jobs have failed", || async {
        count_jobs_with_status(&pool, "failed").await == 2
    })
    .await;

    // The cause is fixed; the operator retries one job, then all the rest.
    execute(
        &pool,
        "alter table ackloop.builtin_players drop constraint broken",
    )
    .await;
    let one = run_ackloop(&url, &["jobs", "retry", &first.to_string(), "--json"]).await;
    assert_eq!(one.status.code(), Some(0), "{}", stderr(&one));
    assert_eq!(
        stdout_json(&one)["retried"],
        serde_json::json!([first.to_string()])
    );
    let signups = signups(&pool).await;
    signups
        .await_player(first, DEADLINE)
        .await
        .expect("the retried job completes");
    let rest = run_ackloop(&url, &["jobs", "retry", "--failed", "--json"]).await;
    assert_eq!(
        stdout_json(&rest)["retried"],
        serde_json::json!([second.to_string()])
    );
    signups
        .await_player(second, DEADLINE)
        .await
        .expect("the retried job completes");

    let done = run_ackloop(&url, &["jobs", "retry", &first.to_string()]).await;
    assert_eq!(done.status.code(), Some(10), "{}", stderr(&done));
    assert!(stderr(&done).contains("is done"), "{}", stderr(&done));
    assert_eq!(counts(&pool).await.players, 2);
    worker.stop().await;
}

#[sqlx::test]
async fn jobs_prune_deletes_only_finished_jobs_past_retention(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 6).await;
    for n in 0..5 {
        pending_signup(&pool, n).await;
    }
    let worker = spawn_worker(&pool, worker_config());
    wait_until("all five are done", || async {
        count_jobs_with_status(&pool, "done").await == 5
    })
    .await;
    worker.stop().await;
    execute(
        &pool,
        "update ackloop.player_creation_jobs set completed_at = now() - interval '8 days'
         where builtin_user_id in (select id from ackloop.builtin_users order by id limit 3)",
    )
    .await;
    pending_signup(&pool, 9).await;

    let dry = run_ackloop(
        &url,
        &["jobs", "prune", "--older-than", "7d", "--dry-run", "--json"],
    )
    .await;
    assert_eq!(
        stdout_json(&dry),
        serde_json::json!({ "dry_run": true, "jobs": 3 })
    );
    assert_eq!(counts(&pool).await.jobs, 6, "a dry run deletes nothing");

    let pruned = run_ackloop(&url, &["jobs", "prune", "--older-than", "7d", "--json"]).await;
    assert_eq!(
        stdout_json(&pruned),
        serde_json::json!({ "dry_run": false, "jobs": 3 })
    );
    let counts = counts(&pool).await;
    assert_eq!(
        (counts.users, counts.jobs, counts.players),
        (6, 3, 5),
        "users and players stay"
    );
    assert_eq!(
        count_jobs_with_status(&pool, "pending").await,
        1,
        "pending jobs are never pruned"
    );
}

#[sqlx::test]
async fn await_by_email_resumes_a_timed_out_signup(options: PgPoolOptions, connect: PgConnectOptions) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 6).await;
    let timed_out = run_ackloop(
        &url,
        &[
            "signup",
            "--email",
            "Ada@Example.com",
            "--display-name",
            "Ada",
            "--timeout",
            "100ms",
        ],
    )
    .await;
    assert_eq!(timed_out.status.code(), Some(5), "{}", stderr(&timed_out));

    let worker = spawn_worker(&pool, worker_config());
    let resumed = run_ackloop(
        &url,
        &[
            "await",
            "--email",
            "ada@example.com",
            "--timeout",
            "30s",
            "--json",
        ],
    )
    .await;
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert_eq!(stdout_json(&resumed)["player"]["display_name"], "Ada");
    worker.stop().await;

    let nobody = run_ackloop(
        &url,
        &["await", "--email", "nobody@example.com", "--timeout", "1s"],
    )
    .await;
    assert_eq!(nobody.status.code(), Some(12), "{}", stderr(&nobody));
}

#[sqlx::test]
async fn doctor_says_what_is_wrong_and_how_to_fix_it(options: PgPoolOptions, connect: PgConnectOptions) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 4).await;

    let healthy = run_ackloop(&url, &["doctor", "--json"]).await;
    assert_eq!(
        healthy.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&healthy.stdout)
    );
    let report = stdout_json(&healthy);
    assert_eq!(report["ok"], true);
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|check| check["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "database",
            "schema",
            "listen",
            "notification queue",
            "pending jobs",
            "failed jobs",
            "done jobs without a player"
        ]
    );

    // A failed job (player creation breaks), then a job nobody works on.
    execute(
        &pool,
        "alter table ackloop.builtin_players add constraint broken check (false)",
    )
    .await;
    pending_signup(&pool, 1).await;
    let worker = spawn_worker(&pool, worker_config());
    wait_until("the job has failed", || async {
        count_jobs_with_status(&pool, "failed").await == 1
    })
    .await;
    worker.stop().await;
    pending_signup(&pool, 2).await;
    let unhealthy = run_ackloop(&url, &["doctor", "--stale-after", "0s"]).await;
    assert_eq!(unhealthy.status.code(), Some(10), "{}", stderr(&unhealthy));
    let text = String::from_utf8_lossy(&unhealthy.stdout);
    assert!(text.contains("FAIL pending jobs"), "{text}");
    assert!(text.contains("FAIL failed jobs"), "{text}");
    assert!(text.contains("fix: start a worker"), "{text}");
    assert!(text.contains("ackloop jobs retry --failed"), "{text}");
}
