//! Statements that run every few seconds, or over the finished jobs a service keeps, must not
//! read every row: on a table of finished jobs, their plans use the partial indexes.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::*;

/// `explain (format json)` of store function `name`'s statement.
fn explain(name: &str) -> String {
    let statements = crate::protocol::code_statements();
    let sql = statements
        .get(name)
        .unwrap_or_else(|| panic!("no statement for store::{name}"));
    format!("explain (format json) {sql}")
}

#[sqlx::test]
async fn the_gauges_and_prune_do_not_scan_the_finished_jobs(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 2).await;
    // A service's retention: many finished jobs, a few pending.
    execute(
        &pool,
        "insert into ackloop.builtin_users (email, display_name)
         select 'kept' || n || '@example.com', 'Kept ' || n from generate_series(1, 50000) as n",
    )
    .await;
    execute(
        &pool,
        "insert into ackloop.player_creation_jobs
             (id, builtin_user_id, user_id, display_name, status, attempts, completed_at, player_id, result)
         select gen_random_uuid(), id, id::text, display_name, 'done', 1, now() - interval '1 day' * random(),
                id::text, '{}'
         from ackloop.builtin_users as users",
    )
    .await;
    for n in 0..5 {
        pending_signup(&pool, n).await;
    }
    execute(&pool, "analyze ackloop.player_creation_jobs").await;

    // store::pending_jobs calls ackloop.pending_jobs(): the query its body returns is what runs.
    let body: String =
        sqlx::query_scalar("select prosrc from pg_proc where oid = 'ackloop.pending_jobs()'::regprocedure")
            .fetch_one(&pool)
            .await
            .unwrap();
    let query = body
        .split("return query")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("pending_jobs returns one query: {body}"));
    let sql = format!("explain (format json) {query}");
    let gauges: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.as_str()))
        .fetch_one(&pool)
        .await
        .unwrap();
    let gauges = gauges.to_string();
    assert!(gauges.contains("player_creation_jobs_pending_idx"), "{gauges}");
    assert!(
        !gauges.contains("Seq Scan"),
        "the gauges read every job: {gauges}"
    );

    let sql = explain("delete_finished_jobs");
    let prune: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(3600.0_f64)
        .bind(1000_i64)
        .fetch_one(&pool)
        .await
        .unwrap();
    let prune = prune.to_string();
    assert!(prune.contains("player_creation_jobs_finished_idx"), "{prune}");
    assert!(
        !prune.contains("Seq Scan"),
        "a prune batch reads every job: {prune}"
    );
}
