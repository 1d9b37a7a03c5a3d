//! Untrusted payloads, forged confirmations, custom channel names, and lost listener connections.

use std::time::Duration;

use ackloop::{Channels, DEFAULT_DONE_CHANNEL, DEFAULT_JOBS_CHANNEL, JobId, SignupError, WorkerConfig};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::*;

#[sqlx::test]
async fn garbage_on_both_channels_is_ignored_and_the_loop_keeps_working(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 6).await;
    let worker = spawn_worker(&pool, worker_config());
    let signups = signups(&pool).await;
    let unknown = JobId::new().to_string();
    let huge = "x".repeat(7999);
    let garbage = [
        "",
        "hello",
        "42",
        "'; drop table ackloop.builtin_users; --",
        unknown.as_str(),
        huge.as_str(),
    ];

    let mut finished_job = None;
    for round in 0..3 {
        for payload in garbage.iter().copied().chain(finished_job.as_deref()) {
            notify(&pool, DEFAULT_JOBS_CHANNEL, payload).await;
            notify(&pool, DEFAULT_DONE_CHANNEL, payload).await;
        }
        signups
            .create_user_and_await_player(&user(round), DEADLINE)
            .await
            .expect("signups still confirmed after garbage");
        // Next round, also the id of another user's finished job.
        let job_id: uuid::Uuid = sqlx::query_scalar!("select id from ackloop.player_creation_jobs limit 1")
            .fetch_one(&pool)
            .await
            .unwrap();
        finished_job = Some(job_id.to_string());
    }

    assert_eq!(counts(&pool).await.players, 3);
    worker.stop().await;
}

#[sqlx::test]
async fn a_forged_confirmation_does_not_make_a_signup_succeed(pool: PgPool) {
    // This test's runtime is one thread: a local recorder sees exactly this test's work.
    let (recorder, metrics) = ackloop::MetricsHandle::unregistered().unwrap();
    let _recording = metrics::set_default_local_recorder(&recorder);
    // No worker: the job stays pending whatever arrives on the done channel.
    let signups = signups(&pool).await;
    let waiting = async {
        signups
            .create_user_and_await_player(&user(1), Duration::from_secs(10))
            .await
    };
    let forge = async {
        wait_until("the job is committed", || async {
            count_jobs_with_status(&pool, "pending").await == 1
        })
        .await;
        let job_id: uuid::Uuid = sqlx::query_scalar!("select id from ackloop.player_creation_jobs")
            .fetch_one(&pool)
            .await
            .unwrap();
        notify(&pool, DEFAULT_DONE_CHANNEL, &job_id.to_string()).await;
        // The forged id was read, looked up and ignored, while the caller still waits.
        wait_until("the forged confirmation is ignored", || async {
            metrics.render().contains("ackloop_confirmations_ignored_total 1")
        })
        .await;
    };

    let (result, ()) = tokio::join!(waiting, forge);

    assert!(
        matches!(result, Err(SignupError::TimedOut { .. })),
        "got {result:?}"
    );
    assert_eq!(counts(&pool).await.players, 0);
}

#[sqlx::test]
async fn custom_channels_carry_the_loop(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 6).await;
    let channels = Channels::new("signup_jobs", "signup_jobs_done").unwrap();
    let config = WorkerConfig {
        channels: channels.clone(),
        ..worker_config()
    };
    let worker = spawn_worker(&pool, config);
    let signups = signups_on(&pool, channels).await;
    let mut default_jobs = listen_on(&pool, DEFAULT_JOBS_CHANNEL).await;

    signups
        .create_user_and_await_player(&user(1), DEADLINE)
        .await
        .expect("confirmed over the custom channels");

    assert_nothing_sent_before_marker(&pool, &mut default_jobs, DEFAULT_JOBS_CHANNEL).await;
    worker.stop().await;
}

/// Terminates every backend of this test's database that is listening (the worker's and the
/// signup handle's listeners), and returns how many it terminated.
async fn terminate_listeners(pool: &PgPool) -> i64 {
    sqlx::query_scalar!(
        r#"
        select count(pg_terminate_backend(pid)) as "terminated!"
        from pg_stat_activity
        where datname = current_database()
          and query ilike 'listen%'
          and pid <> pg_backend_pid()
        "#
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn terminated_listeners_reconnect_and_check_the_tables(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 6).await;
    let worker = spawn_worker(&pool, worker_config());
    let signups = signups(&pool).await;
    signups
        .create_user_and_await_player(&user(0), DEADLINE)
        .await
        .expect("first signup");

    for round in 1..=3 {
        assert_eq!(
            terminate_listeners(&pool).await,
            2,
            "both listeners were connected"
        );
        // The poll is an hour away and the caller waits 30s: a prompt confirmation proves both
        // listeners came back (or checked the tables) by themselves.
        let confirmed = tokio::time::timeout(
            Duration::from_secs(15),
            signups.create_user_and_await_player(&user(round), DEADLINE),
        )
        .await;
        confirmed
            .expect("confirmed promptly after the listeners were terminated")
            .expect("signup after reconnect");
        wait_until("both listeners are back", || async {
            listening_backends(&pool).await == 2
        })
        .await;
    }
    assert_eq!(counts(&pool).await.players, 4);
    worker.stop().await;
}

async fn listening_backends(pool: &PgPool) -> i64 {
    sqlx::query_scalar!(
        r#"
        select count(*) as "count!"
        from pg_stat_activity
        where datname = current_database()
          and query ilike 'listen%'
        "#
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn poll_only_mode_closes_the_loop_with_no_listen_anywhere(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    use sqlx::ConnectOptions;
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 6).await;
    let config = WorkerConfig {
        poll_only: true,
        poll_interval: Duration::from_millis(50),
        ..worker_config()
    };
    let worker = spawn_worker(&pool, config);
    let signups = ackloop::Signups::connect_with(
        pool.clone(),
        ackloop::SignupsConfig {
            poll_only: Some(Duration::from_millis(50)),
            ..ackloop::SignupsConfig::default()
        },
    )
    .await
    .unwrap();

    for n in 0..5 {
        signups
            .create_user_and_await_player(&user(n), DEADLINE)
            .await
            .expect("confirmed by polling");
    }
    assert_eq!(
        listening_backends(&pool).await,
        0,
        "nothing listens in poll-only mode"
    );
    worker.stop().await;

    // The same through the CLI: a poll-only worker process and a poll-only signup.
    let mut worker = ackloop_command(&url)
        .args(["--poll-only", "worker", "--poll-interval", "100ms"])
        .spawn()
        .unwrap();
    let output = within(
        "a poll-only signup",
        ackloop_command(&url)
            .args([
                "--poll-only",
                "signup",
                "--email",
                "poll@example.com",
                "--display-name",
                "Poll",
            ])
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(listening_backends(&pool).await, 0);
    worker.kill().await.unwrap();
    assert_eq!(counts(&pool).await.players, 6);
}
