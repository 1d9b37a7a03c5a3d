//! Migration `…06_running_attempts` on a database filled before it: every row and grant kept, the
//! attempt that was under way (pending, with the provisional error the earlier `start_attempt`
//! wrote) now `running` since it started, and a worker finishing it after its lease.

use serde_json::Value;
use sqlx::PgPool;

use super::cheaper_checks::{fill, grants, migrate_through, rows};
use super::privileges::apply_roles;
use crate::common::*;

#[sqlx::test(migrations = false)]
async fn a_database_filled_before_running_keeps_every_row_state_and_grant(pool: PgPool) {
    migrate_through(&pool, 20261207000005).await;
    apply_roles(&pool).await;
    fill(&pool).await;
    let users = rows(&pool, "ackloop.builtin_users").await;
    let players = rows(&pool, "ackloop.builtin_players").await;
    let jobs = rows(&pool, "ackloop.player_creation_jobs").await;
    let mut grants_before = grants(&pool).await;

    migrate_through(&pool, 20261207000006).await;

    assert_eq!(rows(&pool, "ackloop.builtin_users").await, users);
    assert_eq!(rows(&pool, "ackloop.builtin_players").await, players);
    let after = rows(&pool, "ackloop.player_creation_jobs").await;
    let (jobs, after) = (jobs.as_array().unwrap(), after.as_array().unwrap());
    assert_eq!(jobs.len(), after.len());
    let mut under_way = 0;
    for (before, after) in jobs.iter().zip(after) {
        let mut expected = before.clone();
        let provisional = before["last_error"]
            .as_str()
            .is_some_and(|error| error.ends_with("unless it is running now"));
        if provisional {
            under_way += 1;
            expected["status"] = "running".into();
            expected["last_error"] = Value::Null;
            expected["attempt_started_at"] = before["updated_at"].clone();
        } else {
            expected["attempt_started_at"] = Value::Null;
        }
        assert_eq!(after, &expected, "the job that was {before}");
    }
    assert_eq!(under_way, 1, "fill started one attempt");
    // The states a filled database has, all there: done, failed, pending (new, and a retry).
    for status in ["done", "failed", "pending", "running"] {
        assert!(
            after.iter().any(|job| job["status"] == status),
            "a {status} job in {after:?}"
        );
    }

    // start_attempt was made again: its grants, and every other, as they were.
    let mut grants_after = grants(&pool).await;
    grants_before.sort();
    grants_after.sort();
    assert_eq!(grants_after, grants_before);
    assert_eq!(
        as_role(&pool, "ackloop_worker", "select * from ackloop.start_attempt()").await,
        None
    );
    assert_eq!(
        as_role(&pool, "ackloop_auth", "select * from ackloop.start_attempt()").await,
        Some("42501".to_owned()),
        "the auth side still cannot start attempts"
    );

    // The running job's lease ends and a worker takes it: its attempt ended with its session.
    let restarted = std::sync::Mutex::new(None);
    wait_until(
        "the upgraded running job's lease ends and a worker restarts it",
        || async {
            let started: Option<(String, Option<i32>)> = sqlx::query_as(
                "select status, abandoned_attempt from ackloop.start_attempt(any_job => true)",
            )
            .fetch_optional(&pool)
            .await
            .unwrap();
            let taken = started.is_some();
            *restarted.lock().unwrap() = started;
            taken
        },
    )
    .await;
    assert_eq!(
        restarted.into_inner().unwrap(),
        Some(("started".to_owned(), Some(1))),
        "the attempt under way at the upgrade is known to have ended"
    );
}
