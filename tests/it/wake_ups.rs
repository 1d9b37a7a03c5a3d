//! Signups' wake-ups after the commit (migration 08): the contract's `*_then_notify` procedures
//! commit the signups, then notify ids written (one per 32); `sign_up` and `sign_up_many` given a
//! null channel notify nothing inside the write; a bad channel is refused before anything is
//! written; and a wake-up that never comes, because its sender died between its commit and its
//! notification, costs latency only: the worker's poll finds the job.

use std::collections::BTreeSet;
use std::time::Duration;

use ackloop::WorkerConfig;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::common::*;

/// The ids of the next `n` notifications on `listener`.
async fn next_payloads(listener: &mut sqlx::postgres::PgListener, n: usize) -> BTreeSet<String> {
    let mut payloads = BTreeSet::new();
    for _ in 0..n {
        payloads.insert(next_notification(listener).await.payload().to_owned());
    }
    payloads
}

#[sqlx::test]
async fn the_procedures_notify_committed_jobs_one_wake_up_per_32(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 4).await;
    let mut jobs = listen_on(&pool, "player_jobs").await;

    let (job, user): (Uuid, i64) = sqlx::query_as(
        "call ackloop.sign_up_then_notify('ada@example.com', 'Ada', null, 'player_jobs', null, null, null)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(next_notification(&mut jobs).await.payload(), job.to_string());
    assert_eq!(
        count_of(&pool, "select count(*) from ackloop.builtin_users").await,
        1,
        "user {user} written"
    );

    // Three entries, one of them Ada's taken email: two written, two wake-ups, nothing else.
    let (written, users): (Vec<Uuid>, Vec<i64>) = sqlx::query_as(
        "call ackloop.sign_up_many_then_notify(
             array['bo@example.com', 'ADA@example.com', 'cy@example.com'], array['Bo', 'Ada', 'Cy'],
             array[gen_random_uuid(), gen_random_uuid(), gen_random_uuid()], 'player_jobs', 1000, null, null)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((written.len(), users.len()), (2, 2), "the taken email is skipped");
    // One wake-up per 32 jobs written, naming the first of them.
    assert_eq!(
        next_notification(&mut jobs).await.payload(),
        written[0].to_string()
    );
    assert_nothing_sent_before_marker(&pool, &mut jobs, "player_jobs").await;

    // 70 signups in one call: three wake-ups, for the 1st, 33rd and 65th jobs written.
    let emails: Vec<String> = (0..70).map(|n| format!("many{n}@example.com")).collect();
    let names: Vec<String> = (0..70).map(|n| format!("Many {n}")).collect();
    let (written, _): (Vec<Uuid>, Vec<i64>) = sqlx::query_as(
        "call ackloop.sign_up_many_then_notify($1, $2, array_fill(null::uuid, array[70]), 'player_jobs', 1000, null, null)",
    )
    .bind(&emails)
    .bind(&names)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(written.len(), 70);
    let expected: BTreeSet<String> = [0, 32, 64].iter().map(|&i| written[i].to_string()).collect();
    assert_eq!(next_payloads(&mut jobs, 3).await, expected);
    assert_nothing_sent_before_marker(&pool, &mut jobs, "player_jobs").await;

    // Ada's signup sent again with its job id: written before, so nothing new, and notified
    // again (a wake-up for a committed job).
    let (again, same_user): (Uuid, i64) = sqlx::query_as(
        "call ackloop.sign_up_then_notify('ada@example.com', 'Ada', $1, 'player_jobs', null, null, null)",
    )
    .bind(job)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((again, same_user), (job, user));
    assert_eq!(next_notification(&mut jobs).await.payload(), job.to_string());
    assert_eq!(
        count_of(&pool, "select count(*) from ackloop.builtin_users").await,
        73
    );
}

#[sqlx::test]
async fn a_procedure_called_inside_a_transaction_is_refused_and_writes_nothing(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 2).await;
    let mut tx = pool.begin().await.unwrap();
    let err = sqlx::query(
        "call ackloop.sign_up_then_notify('ada@example.com', 'Ada', null, 'player_jobs', null, null, null)",
    )
    .execute(&mut *tx)
    .await
    .expect_err("a procedure that commits is refused in a transaction block");
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("2D000"),
        "{err}"
    );
    tx.rollback().await.unwrap();
    assert_eq!(counts(&pool).await, NOTHING);
}

#[sqlx::test]
async fn the_signup_functions_with_a_null_channel_notify_nothing(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 4).await;
    let mut jobs = listen_on(&pool, "player_jobs").await;

    execute(
        &pool,
        "select * from ackloop.sign_up('ada@example.com', 'Ada', null, null)",
    )
    .await;
    execute(
        &pool,
        "select * from ackloop.sign_up_many(array['bo@example.com'], array['Bo'], array[null::uuid], null)",
    )
    .await;
    execute(&pool, "select ackloop.add_job('svc-1', 'Svc')").await;
    let job: Uuid = sqlx::query_scalar("select id from ackloop.player_creation_jobs where user_id = 'svc-1'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        count_of(&pool, "select count(*) from ackloop.player_creation_jobs").await,
        3
    );

    // add_job's own wake-up (its channel given) came; nothing else.
    assert_eq!(next_notification(&mut jobs).await.payload(), job.to_string());
    assert_nothing_sent_before_marker(&pool, &mut jobs, "player_jobs").await;
}

#[sqlx::test]
async fn a_channel_pg_notify_would_refuse_is_refused_before_anything_is_written(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 2).await;
    let too_long = "c".repeat(64);
    for channel in ["", too_long.as_str()] {
        for call in [
            "call ackloop.sign_up_then_notify('ada@example.com', 'Ada', null, $1, null, null, null)",
            "call ackloop.sign_up_many_then_notify(array['ada@example.com'], array['Ada'], array[null::uuid], $1, null, null, null)",
        ] {
            let err = sqlx::query(call)
                .bind(channel)
                .execute(&pool)
                .await
                .expect_err("a bad channel is refused");
            assert_eq!(
                err.as_database_error().and_then(|e| e.code()).as_deref(),
                Some("22023"),
                "{call} with {channel:?}: {err}"
            );
        }
    }
    assert_eq!(counts(&pool).await, NOTHING);
}

#[sqlx::test]
async fn notify_jobs_sends_each_id_and_nothing_for_a_null_channel(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 3).await;
    let mut done = listen_on(&pool, "player_jobs_done").await;
    let ids = [Uuid::now_v7(), Uuid::now_v7()];
    let sent: i32 = sqlx::query_scalar("select ackloop.notify_jobs(null, $1)")
        .bind(&ids[..])
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(sent, 0);
    let sent: i32 = sqlx::query_scalar("select ackloop.notify_jobs('player_jobs_done', $1)")
        .bind(&ids[..])
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(sent, 2);
    let expected: BTreeSet<String> = ids.iter().map(Uuid::to_string).collect();
    assert_eq!(next_payloads(&mut done, 2).await, expected);
    assert_nothing_sent_before_marker(&pool, &mut done, "player_jobs_done").await;
}

/// A worker that is up and past its start-up look (which finds every job due without a wake-up):
/// it has done a signup's job it was woken for.
async fn worker_past_its_start(pool: &sqlx::PgPool, config: WorkerConfig) -> RunningWorker {
    let worker = spawn_worker(pool, config);
    within(
        "a first signup confirmed",
        signups(pool)
            .await
            .create_user_and_await_player(&user(1), DEADLINE),
    )
    .await
    .expect("first signup");
    worker
}

/// 70 signups in one call send three wake-ups; workers whose batch is 4 jobs, with no poll to
/// fall back on, still do all 70: a loop that claims a full batch brings in another and goes on
/// while its batches come back full.
#[sqlx::test]
async fn three_wake_ups_for_seventy_jobs_are_enough_for_small_batches(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 8).await;
    let config = WorkerConfig {
        batch_size: 4,
        concurrency: 2,
        ..worker_config()
    };
    let worker = worker_past_its_start(&pool, config).await;
    let emails: Vec<String> = (0..70).map(|n| format!("small{n}@example.com")).collect();
    let names: Vec<String> = (0..70).map(|n| format!("Small {n}")).collect();
    sqlx::query(
        "call ackloop.sign_up_many_then_notify($1, $2, array_fill(null::uuid, array[70]), 'player_jobs', 1000, null, null)",
    )
    .bind(&emails)
    .bind(&names)
    .execute(&pool)
    .await
    .unwrap();
    wait_until("all 71 jobs are done without a poll", || async {
        count_jobs_with_status(&pool, "done").await == 71
    })
    .await;
    worker.stop().await;
}

/// A sender killed between its commit and its wake-up: the state it leaves is a committed job
/// and no notification, made here by the procedure's first half (`sign_up` with no channel, in
/// autocommit) on a connection that is then terminated. A listening worker that has already
/// made its start-up sweep finds the job by its poll.
#[sqlx::test]
async fn a_job_whose_sender_died_before_its_wake_up_is_found_by_the_workers_poll(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect.clone(), 8).await;
    let config = WorkerConfig {
        poll_interval: Duration::from_secs(1),
        ..worker_config()
    };
    let worker = worker_past_its_start(&pool, config).await;

    let mut jobs = listen_on(&pool, "player_jobs").await;
    let mut sender = PgConnection::connect_with(&connect).await.unwrap();
    let sender_pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&mut sender)
        .await
        .unwrap();
    let job: Uuid =
        sqlx::query_scalar("select job_id from ackloop.sign_up('late@example.com', 'Late', null, null)")
            .fetch_one(&mut sender)
            .await
            .unwrap();
    let killed: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
        .bind(sender_pid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(killed);
    assert_nothing_sent_before_marker(&pool, &mut jobs, "player_jobs").await;

    wait_until("the job without a wake-up is done", || async {
        sqlx::query_scalar::<_, String>("select status from ackloop.player_creation_jobs where id = $1")
            .bind(job)
            .fetch_one(&pool)
            .await
            .unwrap()
            == "done"
    })
    .await;
    worker.stop().await;
}
