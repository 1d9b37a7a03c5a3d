//! A burst of signups larger than the writers can take within the callers' timeout, on a healthy
//! server: every caller is told what happened to its signup (written, or not written because its
//! turn did not come), never that the database is unavailable, and within its timeout plus the
//! margin.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ackloop::{SignupError, Signups, SignupsConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::task::JoinSet;

use super::MARGIN;
use crate::common::*;

/// One writer writing one signup per commit, and 2,000 callers with 500 ms each: the writer takes
/// a few hundred of them in time (the database answering all along), the rest are never sent.
/// Each written signup, with no worker, times out with its job id and its rows; each unsent one
/// is `NotWritten` and left nothing. Before, the unsent ones were `Unavailable` (exit 7), and a
/// caller whose signup a writer had taken but not yet sent was told its signup "may have been
/// committed".
#[sqlx::test]
async fn a_burst_past_the_writers_is_told_not_written_never_unavailable(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    const CALLERS: usize = 2000;
    const TIMEOUT: Duration = Duration::from_millis(500);
    let pool = pool(options, connect, 4).await;
    let config = SignupsConfig {
        writers: 1,
        max_batch: 1,
        ..SignupsConfig::default()
    };
    let signups = Arc::new(Signups::connect_with(pool.clone(), config).await.unwrap());
    let mut calls = JoinSet::new();
    for n in 0..CALLERS {
        let signups = Arc::clone(&signups);
        calls.spawn(async move {
            let started = Instant::now();
            let result = signups.create_user_and_await_player(&user(n), TIMEOUT).await;
            (n, result, started.elapsed())
        });
    }
    let (mut timed_out, mut not_written, mut latest) = (Vec::new(), Vec::new(), Duration::ZERO);
    for (n, result, took) in within("the burst", calls.join_all()).await {
        latest = latest.max(took);
        match result {
            Err(SignupError::TimedOut { job_id, .. }) => timed_out.push((n, job_id)),
            Err(SignupError::NotWritten { waited }) => {
                assert!(
                    waited <= took,
                    "signup {n} waited {waited:?} in a call of {took:?}"
                );
                not_written.push(n);
            }
            other => panic!("signup {n}: expected TimedOut or NotWritten, got {other:?}"),
        }
    }
    assert!(
        !timed_out.is_empty() && !not_written.is_empty(),
        "the burst should have been partly written: {} written, {} not",
        timed_out.len(),
        not_written.len()
    );
    assert!(
        latest <= TIMEOUT + MARGIN,
        "a caller was answered after {latest:?} (timeout {TIMEOUT:?})"
    );
    // Written means its rows and its job id; not written means nothing of it.
    let counts = counts(&pool).await;
    assert_eq!(
        (counts.users, counts.jobs, counts.players),
        (timed_out.len() as i64, timed_out.len() as i64, 0)
    );
    let not_written_emails: Vec<String> = not_written.iter().map(|n| user(*n).email().to_owned()).collect();
    let found: i64 = sqlx::query_scalar("select count(*) from ackloop.builtin_users where email = any($1)")
        .bind(&not_written_emails)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(found, 0, "a signup told NotWritten has a user");
    let job_ids: Vec<uuid::Uuid> = timed_out.iter().map(|(_, id)| id.as_uuid()).collect();
    let jobs: i64 =
        sqlx::query_scalar("select count(*) from ackloop.player_creation_jobs where id = any($1)")
            .bind(&job_ids)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        jobs,
        timed_out.len() as i64,
        "a timed-out signup's job id names no job"
    );
}

/// A zero timeout leaves no time to write: the signup is not written, and the answer says so
/// (before: "database unavailable: timed out waiting for a database connection").
#[sqlx::test]
async fn a_zero_timeout_is_not_written_and_not_unavailable(pool: sqlx::PgPool) {
    let signups = signups(&pool).await;
    let result = signups
        .create_user_and_await_player(&user(1), Duration::ZERO)
        .await;
    assert!(
        matches!(result, Err(SignupError::NotWritten { .. })),
        "{result:?}"
    );
    assert_eq!(counts(&pool).await, NOTHING);
}
