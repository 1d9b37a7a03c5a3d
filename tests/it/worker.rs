//! The player side: jobs that wait for a worker, timeouts, retries and failures.

use std::time::Duration;

use ackloop::admin::StatusReport;
use ackloop::{Channels, SignupError, WorkerConfig, create_user};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::*;

#[sqlx::test]
async fn jobs_committed_while_no_worker_runs_are_processed_when_one_starts(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 6).await;
    for n in 0..3 {
        pending_signup(&pool, n).await;
    }

    // Their notifications went to nobody; the poll is an hour away: only the sweep on start
    // can find these jobs.
    let worker = spawn_worker(&pool, worker_config());

    wait_until("all three jobs are done", || async {
        count_jobs_with_status(&pool, "done").await == 3
    })
    .await;
    assert_eq!(counts(&pool).await.players, 3);
    worker.stop().await;
}

#[sqlx::test]
async fn timeout_returns_job_id_and_job_still_completes(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 6).await;
    let signups = signups(&pool).await;

    let err = signups
        .create_user_and_await_player(&user(1), Duration::from_millis(200))
        .await
        .unwrap_err();

    let SignupError::TimedOut { job_id, user_id, .. } = err else {
        panic!("expected a timeout, got {err:?}");
    };
    let message = err.to_string();
    assert!(
        message.contains(&job_id.to_string()) && message.contains("will complete"),
        "{message}"
    );
    assert_eq!(
        count_jobs_with_status(&pool, "pending").await,
        1,
        "the job survives the timeout"
    );

    let worker = spawn_worker(&pool, worker_config());
    let player = signups
        .await_player(job_id, DEADLINE)
        .await
        .expect("player after all");
    assert_eq!(Some(player.user_id), user_id);
    worker.stop().await;
}

#[sqlx::test]
async fn a_job_that_cannot_succeed_fails_at_once_and_the_caller_hears_of_it(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let (log, _guard) = capture_logs();
    let pool = pool(options, connect, 6).await;
    execute(
        &pool,
        "alter table ackloop.builtin_players add constraint no_doomed_players check (display_name <> 'Doomed')",
    )
    .await;
    let worker = spawn_worker(&pool, worker_config());
    let signups = signups(&pool).await;

    let doomed = ackloop::NewUser::new("doomed@example.com", "Doomed").unwrap();
    let err = signups
        .create_user_and_await_player(&doomed, DEADLINE)
        .await
        .unwrap_err();

    let SignupError::JobFailed { reason, .. } = err else {
        panic!("expected the job to fail, got {err:?}");
    };
    assert!(reason.contains("no_doomed_players"), "reason: {reason}");
    // PostgreSQL's detail repeats the row ("Failing row contains (…, Doomed, …)"): no name or
    // email reaches the job's error or the log.
    assert!(
        !reason.contains("Doomed") && !reason.contains("doomed@"),
        "reason: {reason}"
    );
    assert!(!log.text().contains("Doomed"), "{}", log.text());
    let job = sqlx::query!("select status, attempts, last_error from ackloop.player_creation_jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(job.status, "failed");
    assert_eq!(job.attempts, 1, "a constraint violation is not retried");
    assert_eq!(job.last_error.as_deref(), Some(&*reason));
    assert_eq!(counts(&pool).await.players, 0);
    let report = StatusReport::read(&pool).await.unwrap();
    assert_eq!((report.pending, report.done, report.failed), (0, 0, 1));
    assert_eq!(report.recent_failures.len(), 1);

    // A failing job does not stop the worker: the next signup goes through.
    signups
        .create_user_and_await_player(&user(2), DEADLINE)
        .await
        .expect("the worker keeps working");
    worker.stop().await;
}

/// Makes creating a player fail with a serialization failure (retryable) until the job has been
/// attempted `attempts` times.
async fn fail_transiently_until_attempt(pool: &sqlx::PgPool, attempts: i32) {
    let sql = format!(
        "create function flaky_players() returns trigger language plpgsql as $$
         begin
             if (select attempts from ackloop.player_creation_jobs where builtin_user_id = new.user_id) < {attempts} then
                 raise exception 'flaky' using errcode = '40001';
             end if;
             return new;
         end $$;
         create trigger flaky before insert on ackloop.builtin_players for each row execute function flaky_players();"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test]
async fn transient_failures_are_retried_then_succeed(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 6).await;
    fail_transiently_until_attempt(&pool, 3).await;
    let worker = spawn_worker(&pool, worker_config());
    let signups = signups(&pool).await;

    let player = signups
        .create_user_and_await_player(&user(1), DEADLINE)
        .await
        .expect("the third attempt succeeds");

    let job = sqlx::query!("select status, attempts from ackloop.player_creation_jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(job.status, "done");
    assert_eq!(job.attempts, 3);
    assert_eq!(counts(&pool).await.players, 1);
    assert_eq!(player.display_name, "Player 1");
    worker.stop().await;
}

#[sqlx::test]
async fn a_job_out_of_attempts_is_failed_with_its_last_error(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 6).await;
    fail_transiently_until_attempt(&pool, i32::MAX).await;
    let config = WorkerConfig {
        max_attempts: 3,
        ..worker_config()
    };
    let worker = spawn_worker(&pool, config);
    let signups = signups(&pool).await;

    let err = signups
        .create_user_and_await_player(&user(1), DEADLINE)
        .await
        .unwrap_err();

    assert!(
        matches!(&err, SignupError::JobFailed { reason, .. } if reason.contains("flaky")),
        "got {err:?}"
    );
    let attempts = sqlx::query_scalar!("select attempts from ackloop.player_creation_jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(attempts, 3);
    worker.stop().await;
}

#[sqlx::test]
async fn one_bad_job_does_not_hold_up_its_batch(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 6).await;
    execute(
        &pool,
        "alter table ackloop.builtin_players add constraint no_doomed_players check (display_name <> 'Doomed')",
    )
    .await;
    for n in 0..5 {
        pending_signup(&pool, n).await;
    }
    let mut conn = pool.acquire().await.unwrap();
    let doomed = ackloop::NewUser::new("doomed@example.com", "Doomed").unwrap();
    create_user(&mut conn, &Channels::default(), &doomed)
        .await
        .unwrap();
    drop(conn);

    let worker = spawn_worker(&pool, worker_config());

    wait_until("the good jobs are done and the bad one failed", || async {
        count_jobs_with_status(&pool, "done").await == 5 && count_jobs_with_status(&pool, "failed").await == 1
    })
    .await;
    assert_eq!(counts(&pool).await.players, 5);
    worker.stop().await;
}

#[sqlx::test]
async fn worker_refuses_a_zero_setting(pool: sqlx::PgPool) {
    let config = WorkerConfig {
        concurrency: 0,
        ..worker_config()
    };
    let err = ackloop::Worker::new(pool, config)
        .run(tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("concurrency"), "{err}");
}

/// A job that failed once comes due while wake-ups keep the worker busy with batches of new
/// jobs: it is retried within about a poll interval, not only when the load stops.
#[sqlx::test]
async fn a_due_retry_is_not_starved_by_a_busy_queue(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 8).await;
    fail_transiently_until_attempt(&pool, 2).await;
    let config = WorkerConfig {
        concurrency: 1,
        poll_interval: Duration::from_millis(300),
        ..worker_config()
    };
    let worker = spawn_worker(&pool, config);
    let mut conn = pool.acquire().await.unwrap();
    ackloop::create_user(&mut conn, &ackloop::Channels::default(), &user(0))
        .await
        .unwrap();
    drop(conn);
    // Steady load until the first job is done (or the test's deadline).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut producers = tokio::task::JoinSet::new();
    for producer in 0..4usize {
        let (pool, done) = (pool.clone(), std::sync::Arc::clone(&done));
        producers.spawn(async move {
            let mut n = 1 + producer;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let mut conn = pool.acquire().await.unwrap();
                ackloop::create_user(&mut conn, &ackloop::Channels::default(), &user(n))
                    .await
                    .unwrap();
                n += 4;
            }
        });
    }
    wait_until("the retried job is done while the load goes on", || async {
        sqlx::query_scalar::<_, String>(
            "select jobs.status from ackloop.player_creation_jobs as jobs \
             join ackloop.builtin_users as users on users.id = jobs.builtin_user_id where users.email = 'user0@example.com'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
            == "done"
    })
    .await;
    let still_loaded = !producers.is_empty() && producers.try_join_next().is_none();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    producers.join_all().await;
    assert!(
        still_loaded,
        "the producers were still running when the retry was done"
    );
    worker.stop().await;
}
