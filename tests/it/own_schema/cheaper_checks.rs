//! The step after the contract (migration `…04_cheaper_checks`) on a database filled on the
//! schema before it: built-in signups and services' jobs in every state, an idempotency key,
//! the roles' grants, all kept; and each side still does its part.

use std::borrow::Cow;

use serde_json::Value;
use sqlx::{Connection, PgPool};

use super::privileges::apply_roles;
use crate::common::*;

/// The migrations up to `version`, as a database that ran the release with it has them.
pub(super) async fn migrate_through(pool: &PgPool, version: i64) {
    let mut before = sqlx::migrate!();
    let last = before
        .migrations
        .iter()
        .position(|migration| migration.version == version)
        .expect("a migration of that version");
    before.migrations = Cow::Owned(before.migrations[..=last].to_vec());
    before.run(pool).await.expect("the migrations up to that version");
}

/// The migrations up to the contract (`…03`), as a database that ran the release before this
/// step has them.
async fn migrate_to_the_contract(pool: &PgPool) {
    migrate_through(pool, 20261207000003).await;
}

/// Every row of `table`, in id order, as JSON.
pub(super) async fn rows(pool: &PgPool, table: &str) -> Value {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select coalesce(jsonb_agg(to_jsonb(t) order by t.id), '[]') from {table} as t"
    )))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Every grant on ackloop's functions and tables, by name.
pub(super) async fn grants(pool: &PgPool) -> Vec<(String, Option<String>)> {
    sqlx::query_as(
        "select oid::regprocedure::text, proacl::text from pg_proc
         where pronamespace = 'ackloop'::regnamespace
         union all
         select oid::regclass::text, relacl::text from pg_class
         where relnamespace = 'ackloop'::regnamespace and relkind = 'r'
         order by 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Jobs in every state: built-in signups (one done, one keyed, pending), and a service's jobs
/// done with an answer, failed, waiting for a retry, and with an attempt started.
pub(super) async fn fill(pool: &PgPool) -> uuid::Uuid {
    let key = uuid::Uuid::now_v7();
    for n in 1..=3 {
        execute_owned(
            pool,
            format!("select * from ackloop.sign_up('u{n}@example.com', 'User {n}')"),
        )
        .await;
    }
    sqlx::query("select * from ackloop.sign_up('keyed@example.com', 'Keyed', $1)")
        .bind(key)
        .execute(pool)
        .await
        .unwrap();
    execute(pool, "select * from ackloop.complete_jobs(1)").await;
    for n in 1..=4 {
        execute_owned(
            pool,
            format!("select ackloop.add_job('acct-{n}', 'Service {n}', jsonb_build_object('n', {n}))"),
        )
        .await;
    }
    let mut conn = pool.acquire().await.unwrap();
    // One done with its answer, one failed for good, one to be retried in a minute.
    let mut tx = conn.begin().await.unwrap();
    let claimed: Vec<(uuid::Uuid, i32)> = sqlx::query_as("select job_id, attempt from ackloop.claim_jobs(3)")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    sqlx::query(
        "select ackloop.mark_done(array[$1], array[$2], array['player-1'], array['{\"level\": 1}'::jsonb])",
    )
    .bind(claimed[0].0)
    .bind(claimed[0].1)
    .execute(&mut *tx)
    .await
    .unwrap();
    for ((job, attempt), retryable) in claimed[1..].iter().zip([false, true]) {
        sqlx::query(
            "select * from ackloop.record_failure(job_id => $1, attempt => $2, error => 'a failure',
                                                  retryable => $3, backoff_base_ms => 60000)",
        )
        .bind(job)
        .bind(attempt)
        .bind(retryable)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let started: String = sqlx::query_scalar("select status from ackloop.start_attempt(any_job => true)")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(started, "started");
    key
}

#[sqlx::test(migrations = false)]
async fn a_database_filled_before_the_cheaper_checks_keeps_every_row_state_and_grant(pool: PgPool) {
    migrate_to_the_contract(&pool).await;
    apply_roles(&pool).await;
    let key = fill(&pool).await;
    let tables = [
        "ackloop.builtin_users",
        "ackloop.builtin_players",
        "ackloop.player_creation_jobs",
    ];
    let mut before = Vec::new();
    for table in tables {
        before.push(rows(&pool, table).await);
    }
    let jobs = before[2].as_array().unwrap();
    let states: Vec<(&str, i64)> = jobs
        .iter()
        .map(|job| (job["status"].as_str().unwrap(), job["attempts"].as_i64().unwrap()))
        .collect();
    for expected in [("done", 1), ("failed", 1), ("pending", 1), ("pending", 0)] {
        assert!(states.contains(&expected), "{expected:?} in {states:?}");
    }
    assert!(
        jobs.iter().any(|job| job["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("did not finish"))),
        "an attempt in progress: {jobs:?}"
    );
    let grants_before = grants(&pool).await;

    migrate_through(&pool, 20261207000004).await;

    for (table, rows_before) in tables.iter().zip(&before) {
        assert_eq!(&rows(&pool, table).await, rows_before, "{table}");
    }
    assert_eq!(
        grants(&pool).await,
        grants_before,
        "the grants, function by function"
    );
    // Each side still does its part through the functions it was granted.
    assert_eq!(
        as_role(
            &pool,
            "ackloop_auth",
            &format!("select * from ackloop.sign_up_many(array['keyed@example.com', 'n@example.com'], array['Keyed', 'N'], array['{key}', null]::uuid[])"),
        )
        .await,
        None
    );
    assert_eq!(
        as_role(&pool, "ackloop_worker", "select * from ackloop.complete_jobs(10)").await,
        None
    );
}
