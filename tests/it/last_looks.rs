//! The last look of callers whose timeout came without a confirmation: answered together by one
//! marker through the listener, or from the tables when notifications may have been lost.

use std::sync::Arc;
use std::time::Duration;

use ackloop::SignupError;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::task::JoinSet;

use crate::common::*;

fn counter(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// 50 callers time out together with no worker running: markers answer them (no job is read,
/// unless a marker is late), each caller's look is counted once, and neither this handle nor
/// another one on the same database counts a marker as garbage or as a forged confirmation.
#[sqlx::test]
async fn callers_timing_out_together_are_answered_by_a_marker(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    // One thread: a local recorder sees this test's work, its spawned tasks included.
    let (recorder, metrics) = ackloop::MetricsHandle::unregistered().unwrap();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let pool = pool(options, connect, 6).await;
    let signups = Arc::new(signups(&pool).await);
    // Another process's handle, hearing this one's markers.
    let _other = signups_on(&pool, ackloop::Channels::default()).await;
    let mut calls = JoinSet::new();
    for n in 0..50 {
        let signups = Arc::clone(&signups);
        calls.spawn(async move {
            signups
                .create_user_and_await_player(&user(n), Duration::from_millis(500))
                .await
        });
    }
    for result in within("the callers", calls.join_all()).await {
        assert!(matches!(result, Err(SignupError::TimedOut { .. })), "{result:?}");
    }
    let text = metrics.render();
    let marker = counter(&text, r#"ackloop_last_looks_total{by="marker"}"#);
    let tables = counter(&text, r#"ackloop_last_looks_total{by="tables"}"#);
    // By markers (one per round of callers due together); a marker late on a loaded machine
    // sends its round to the tables, so only "some, and every look once" is certain.
    assert!(marker >= 1.0 && marker + tables == 50.0, "{text}");
    assert_eq!(
        counter(&text, "ackloop_confirmations_ignored_total"),
        0.0,
        "{text}"
    );
    assert_eq!(
        counter(
            &text,
            r#"ackloop_payloads_ignored_total{channel="player_jobs_done"}"#
        ),
        0.0,
        "{text}"
    );
}

/// Callers registered before the listener reconnected may have lost their confirmation: a
/// marker cannot answer for them, their jobs are read.
#[sqlx::test]
async fn callers_who_lived_through_a_reconnect_are_answered_from_the_tables(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let (recorder, metrics) = ackloop::MetricsHandle::unregistered().unwrap();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let pool = pool(options, connect, 6).await;
    let signups = Arc::new(signups(&pool).await);
    let mut calls = JoinSet::new();
    for n in 0..3 {
        let signups = Arc::clone(&signups);
        calls.spawn(async move {
            signups
                .create_user_and_await_player(&user(n), Duration::from_secs(5))
                .await
        });
    }
    wait_until("the signups are written", || async {
        counts(&pool).await.jobs == 3
    })
    .await;
    let terminated: i64 = sqlx::query_scalar(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity
         where datname = current_database() and query ilike 'listen%' and pid <> pg_backend_pid()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(terminated, 1, "the signup handle's listener");
    for result in within("the callers", calls.join_all()).await {
        assert!(matches!(result, Err(SignupError::TimedOut { .. })), "{result:?}");
    }
    let text = metrics.render();
    let marker = counter(&text, r#"ackloop_last_looks_total{by="marker"}"#);
    let tables = counter(&text, r#"ackloop_last_looks_total{by="tables"}"#);
    assert_eq!((marker, tables), (0.0, 3.0), "{text}");
}
