//! The auth side: the happy path, what the jobs channel carries, bad input, and atomicity.

use std::time::Duration;

use ackloop::{Channels, DEFAULT_JOBS_CHANNEL, NewUser, SignupError, create_user};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::*;

#[sqlx::test]
async fn signup_returns_player_and_writes_all_three_tables(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 6).await;
    let worker = spawn_worker(&pool, worker_config());
    let signups = signups(&pool).await;

    let new_user = NewUser::new("Ada.Lovelace@example.com", "Ada Lovelace").unwrap();
    let player = signups
        .create_user_and_await_player(&new_user, DEADLINE)
        .await
        .expect("signup confirmed");

    assert_eq!(player.display_name, "Ada Lovelace");
    let user = sqlx::query!("select id, email, display_name from ackloop.builtin_users as users")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(user.id, player.user_id.get());
    assert_eq!(user.email, "Ada.Lovelace@example.com", "email stored as given");
    assert_eq!(user.display_name, "Ada Lovelace");
    let job = sqlx::query!(
        "select builtin_user_id, status, attempts, last_error, completed_at from ackloop.player_creation_jobs"
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(job.builtin_user_id, Some(user.id));
    assert_eq!(job.status, "done");
    assert_eq!(job.attempts, 1);
    assert_eq!(job.last_error, None);
    assert!(job.completed_at.is_some());
    let stored = sqlx::query!("select id, user_id, display_name from ackloop.builtin_players as players")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored.id, player.id.get());
    assert_eq!(stored.user_id, user.id);
    assert_eq!(stored.display_name, "Ada Lovelace");

    worker.stop().await;
}

#[sqlx::test]
async fn jobs_channel_payload_is_exactly_the_job_id(pool: PgPool) {
    let mut listener = listen_on(&pool, DEFAULT_JOBS_CHANNEL).await;
    let mut conn = pool.acquire().await.unwrap();

    let signup = create_user(&mut conn, &Channels::default(), &user(1))
        .await
        .unwrap();

    let notification = next_notification(&mut listener).await;
    assert_eq!(notification.payload(), signup.job_id.to_string());
    let stored: uuid::Uuid = sqlx::query_scalar!("select id from ackloop.player_creation_jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, signup.job_id.as_uuid());
}

#[sqlx::test]
async fn taken_email_in_any_case_is_refused_with_nothing_written(pool: PgPool) {
    let signups = signups(&pool).await;
    let mut conn = pool.acquire().await.unwrap();
    let first = NewUser::new("ada@example.com", "Ada").unwrap();
    create_user(&mut conn, signups.channels(), &first).await.unwrap();
    let mut listener = listen_on(&pool, DEFAULT_JOBS_CHANNEL).await;

    let again = NewUser::new("ADA@Example.COM", "Another Ada").unwrap();
    let err = signups
        .create_user_and_await_player(&again, Duration::from_secs(5))
        .await
        .unwrap_err();

    assert!(matches!(err, SignupError::EmailTaken), "got {err:?}");
    assert_eq!(
        counts(&pool).await,
        Counts {
            users: 1,
            jobs: 1,
            players: 0
        }
    );
    assert_nothing_sent_before_marker(&pool, &mut listener, DEFAULT_JOBS_CHANNEL).await;
}

#[sqlx::test]
async fn failing_job_insert_leaves_no_user_and_sends_no_notification(pool: PgPool) {
    // Make the second step of the signup fail: the schema refuses every job.
    execute(
        &pool,
        "alter table ackloop.player_creation_jobs add constraint refuse_all check (false)",
    )
    .await;
    let signups = signups(&pool).await;
    let mut listener = listen_on(&pool, DEFAULT_JOBS_CHANNEL).await;

    let err = signups
        .create_user_and_await_player(&user(1), Duration::from_secs(5))
        .await
        .unwrap_err();

    assert!(matches!(err, SignupError::Database(_)), "got {err:?}");
    assert_eq!(counts(&pool).await, NOTHING);
    assert_nothing_sent_before_marker(&pool, &mut listener, DEFAULT_JOBS_CHANNEL).await;
}

#[sqlx::test]
async fn signup_in_a_rolled_back_transaction_leaves_nothing(pool: PgPool) {
    let mut listener = listen_on(&pool, DEFAULT_JOBS_CHANNEL).await;

    let mut tx = pool.begin().await.unwrap();
    create_user(&mut tx, &Channels::default(), &user(1))
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    assert_eq!(counts(&pool).await.users, 0);
    assert_eq!(counts(&pool).await.jobs, 0);
    assert_nothing_sent_before_marker(&pool, &mut listener, DEFAULT_JOBS_CHANNEL).await;
}

#[sqlx::test]
async fn signup_in_callers_transaction_is_confirmed_after_commit(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 6).await;
    let worker = spawn_worker(&pool, worker_config());
    let signups = signups(&pool).await;

    let mut tx = pool.begin().await.unwrap();
    let signup = create_user(&mut tx, signups.channels(), &user(1)).await.unwrap();
    tx.commit().await.unwrap();
    let player = signups
        .await_player(signup.job_id, DEADLINE)
        .await
        .expect("player");

    assert_eq!(player.user_id, signup.user_id);
    worker.stop().await;
}

#[sqlx::test]
async fn the_contract_refuses_what_validation_refuses(pool: PgPool) {
    // The library validates first; the contract's functions, the only writers of the built-in
    // tables, are the last line for writers in other languages.
    for (email, name, constraint) in [
        ("ada@example.com", "", "builtin_users_display_name_valid"),
        ("ada@example.com", "   ", "builtin_users_display_name_valid"),
        (
            "ada@example.com",
            &*"x".repeat(65),
            "builtin_users_display_name_valid",
        ),
        ("", "Ada", "builtin_users_email_valid"),
    ] {
        let result = sqlx::query("select * from ackloop.sign_up_many($1, $2, array[null]::uuid[])")
            .bind(vec![email])
            .bind(vec![name])
            .execute(&pool)
            .await;
        let err = result.expect_err("the contract should refuse this signup");
        let err = err.as_database_error().expect("a database error");
        assert!(err.is_check_violation(), "{email:?}/{name:?}: {err}");
        assert_eq!(err.constraint(), Some(constraint), "{email:?}/{name:?}");
    }
    assert_eq!(counts(&pool).await.users, 0);
}

#[sqlx::test]
async fn await_player_for_an_unknown_job_says_so(pool: PgPool) {
    let signups = signups(&pool).await;
    let job_id = ackloop::JobId::new();

    let err = signups
        .await_player(job_id, Duration::from_secs(5))
        .await
        .unwrap_err();

    assert!(
        matches!(err, SignupError::UnknownJob(id) if id == job_id),
        "got {err:?}"
    );
}

/// Runs the signups at once from one handle (so they share transactions) and returns their
/// results in input order.
async fn sign_up_together(
    signups: ackloop::Signups,
    users: Vec<NewUser>,
) -> Vec<Result<ackloop::Player, SignupError>> {
    let signups = std::sync::Arc::new(signups);
    let mut calls = tokio::task::JoinSet::new();
    for (index, user) in users.into_iter().enumerate() {
        let signups = std::sync::Arc::clone(&signups);
        calls.spawn(async move { (index, signups.create_user_and_await_player(&user, DEADLINE).await) });
    }
    let mut results: Vec<_> = within("every concurrent signup", calls.join_all()).await;
    results.sort_by_key(|(index, _)| *index);
    results.into_iter().map(|(_, result)| result).collect()
}

#[sqlx::test]
async fn concurrent_signups_for_one_email_give_one_user(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 8).await;
    let worker = spawn_worker(&pool, worker_config());
    let signups = signups(&pool).await;
    let same_email = (0..24)
        .map(|n| {
            let email = if n % 2 == 0 {
                "ada@example.com"
            } else {
                "ADA@example.com"
            };
            NewUser::new(email, format!("Ada {n}")).unwrap()
        })
        .collect();

    let results = sign_up_together(signups, same_email).await;

    let players = results.iter().filter(|r| r.is_ok()).count();
    let taken = results
        .iter()
        .filter(|r| matches!(r, Err(SignupError::EmailTaken)))
        .count();
    assert_eq!((players, taken), (1, 23), "{results:?}");
    assert_eq!(
        counts(&pool).await,
        Counts {
            users: 1,
            jobs: 1,
            players: 1
        }
    );
    worker.stop().await;
}

#[sqlx::test]
async fn a_bad_signup_among_concurrent_ones_fails_alone(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 8).await;
    // The library's validation cannot know this rule; only the database refuses the row.
    execute(
        &pool,
        "alter table ackloop.builtin_users add constraint no_mallory check (display_name <> 'Mallory')",
    )
    .await;
    let worker = spawn_worker(&pool, worker_config());
    let signups = signups(&pool).await;
    let mut users: Vec<NewUser> = (0..20).map(user).collect();
    users.insert(7, NewUser::new("mallory@example.com", "Mallory").unwrap());

    let results = sign_up_together(signups, users).await;

    for (index, result) in results.iter().enumerate() {
        if index == 7 {
            assert!(
                matches!(result, Err(SignupError::Database(_))),
                "mallory: {result:?}"
            );
        } else {
            assert!(result.is_ok(), "signup {index}: {result:?}");
        }
    }
    assert_eq!(
        counts(&pool).await,
        Counts {
            users: 20,
            jobs: 20,
            players: 20
        }
    );
    let mallory = sqlx::query_scalar!(
        "select count(*) from ackloop.builtin_users as users where display_name = 'Mallory'"
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(mallory, Some(0));
    worker.stop().await;
}
