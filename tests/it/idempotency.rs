//! A signup sent again with its idempotency key (the job id its caller chose) is the same signup:
//! it writes nothing and answers with the first call's outcome, whatever became of it.

use std::sync::Arc;
use std::time::Duration;

use ackloop::{JobId, NewUser, SignupError};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::*;

/// `ackloop_confirmations_total{via}` in Prometheus text, 0 when absent.
fn confirmations(text: &str, via: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("ackloop_confirmations_total{{via=\"{via}\"}} ")))
        .map_or(0.0, |count| count.trim().parse().unwrap())
}

async fn jobs_of(pool: &PgPool, email: &str) -> Vec<uuid::Uuid> {
    sqlx::query_scalar(
        "select jobs.id from ackloop.player_creation_jobs as jobs
         join ackloop.builtin_users as users on users.id = jobs.builtin_user_id
         where lower(users.email) = lower($1)",
    )
    .bind(email)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn a_signup_sent_again_with_its_key_gets_the_first_signups_outcome(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    // This test's runtime is one thread: a local recorder sees exactly this test's work.
    let (recorder, metrics) = ackloop::MetricsHandle::unregistered().unwrap();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let pool = pool(options, connect, 6).await;
    let signups = signups(&pool).await;
    let ada = NewUser::new("ada@example.com", "Ada").unwrap();
    let key = JobId::new();

    // No worker: the first call gives up; its signup is committed under the key.
    let first = signups
        .create_user_and_await_player_with_key(&ada, key, Duration::from_millis(200))
        .await;
    let Err(SignupError::TimedOut { job_id, user_id, .. }) = first else {
        panic!("expected a timeout, got {first:?}");
    };
    assert_eq!(job_id, key, "the key is the job id");
    // Sent again: the same pending job, not its own email reported as taken.
    let again = signups
        .create_user_and_await_player_with_key(&ada, key, Duration::from_millis(200))
        .await;
    let Err(SignupError::TimedOut {
        job_id: again_job,
        user_id: again_user,
        ..
    }) = again
    else {
        panic!("expected the pending job again, got {again:?}");
    };
    assert_eq!((again_job, again_user), (key, user_id));

    // A worker takes the job: the call sent again gets the player.
    let worker = spawn_worker(&pool, worker_config());
    let player = signups
        .create_user_and_await_player_with_key(&ada, key, DEADLINE)
        .await
        .expect("the player of the first signup");
    assert_eq!(Some(player.user_id), user_id);
    // Once the job is done no confirmation will come again: the answer is read from the tables,
    // before waiting.
    let before = confirmations(&metrics.render(), "already_finished");
    let later = signups
        .create_user_and_await_player_with_key(&ada, key, DEADLINE)
        .await
        .expect("the same player, later");
    assert_eq!(later, player);
    assert_eq!(
        confirmations(&metrics.render(), "already_finished"),
        before + 1.0,
        "the finished job was read before waiting"
    );

    // The same email under another key (or none) is someone else's signup.
    for other in [Some(JobId::new()), None] {
        let taken = match other {
            Some(other) => {
                signups
                    .create_user_and_await_player_with_key(&ada, other, DEADLINE)
                    .await
            }
            None => signups.create_user_and_await_player(&ada, DEADLINE).await,
        };
        assert!(matches!(taken, Err(SignupError::EmailTaken)), "{taken:?}");
    }
    // The key with another email or display name: refused, nothing written, whether that email
    // is free or taken.
    let grace = NewUser::new("grace@example.com", "Grace").unwrap();
    let renamed = NewUser::new("ada@example.com", "Ada L").unwrap();
    let recased = NewUser::new("ADA@example.com", "Ada").unwrap();
    for reused in [&grace, &renamed, &recased] {
        let refused = signups
            .create_user_and_await_player_with_key(reused, key, DEADLINE)
            .await;
        let Err(err @ SignupError::KeyReused(reused_key)) = refused else {
            panic!("expected KeyReused, got {refused:?}");
        };
        assert_eq!(reused_key, key);
        assert!(err.to_string().contains("send a new key"), "{err}");
        assert_eq!(err.job_id(), None, "the job is not this caller's to wait on");
    }
    let counts = counts(&pool).await;
    assert_eq!((counts.users, counts.players), (1, 1));
    assert_eq!(jobs_of(&pool, "ada@example.com").await, vec![key.as_uuid()]);
    worker.stop().await;
}

#[sqlx::test]
async fn a_failed_signup_sent_again_hears_its_failure(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 4).await;
    let signups = signups(&pool).await;
    let ada = NewUser::new("ada@example.com", "Ada").unwrap();
    let key = JobId::new();
    let first = signups
        .create_user_and_await_player_with_key(&ada, key, Duration::from_millis(100))
        .await;
    assert!(matches!(first, Err(SignupError::TimedOut { .. })), "{first:?}");
    // The state a worker leaves after the last attempt.
    sqlx::query(
        "update ackloop.player_creation_jobs
         set status = 'failed', attempts = 5, last_error = 'the last attempt failed', completed_at = now()
         where id = $1",
    )
    .bind(key.as_uuid())
    .execute(&pool)
    .await
    .unwrap();

    let again = signups
        .create_user_and_await_player_with_key(&ada, key, DEADLINE)
        .await;
    let Err(SignupError::JobFailed { job_id, reason }) = again else {
        panic!("expected the job's failure, got {again:?}");
    };
    assert_eq!((job_id, reason.as_str()), (key, "the last attempt failed"));
    assert_eq!(counts(&pool).await.users, 1);
}

#[sqlx::test]
async fn the_same_key_sent_many_times_at_once_makes_one_signup(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 8).await;
    let worker = spawn_worker(&pool, worker_config());
    let signups = Arc::new(signups(&pool).await);
    let key = JobId::new();
    // Some of these share a grouped statement (the batch keeps one), the others meet the
    // committed signup and are answered by `sign_up` alone.
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let signups = Arc::clone(&signups);
            tokio::spawn(async move {
                let ada = NewUser::new("ada@example.com", "Ada").unwrap();
                signups
                    .create_user_and_await_player_with_key(&ada, key, DEADLINE)
                    .await
            })
        })
        .collect();
    let mut players = Vec::new();
    for call in calls {
        players.push(call.await.unwrap().expect("every call gets the player"));
    }
    assert!(players.iter().all(|player| *player == players[0]), "{players:?}");
    let counts = counts(&pool).await;
    assert_eq!((counts.users, counts.players), (1, 1));
    assert_eq!(jobs_of(&pool, "ada@example.com").await, vec![key.as_uuid()]);
    worker.stop().await;
}

#[sqlx::test]
async fn the_contract_answers_a_key_sent_again_for_any_language(pool: PgPool) {
    let key = uuid::Uuid::now_v7();
    let sign_up = |email: &'static str, name: &'static str| {
        sqlx::query_as::<_, (uuid::Uuid, i64)>("select job_id, user_id from ackloop.sign_up($1, $2, $3)")
            .bind(email)
            .bind(name)
            .bind(key)
            .fetch_one(&pool)
    };
    let mut wake_ups = listen_on(&pool, "player_jobs").await;
    let first = sign_up("ada@example.com", "Ada").await.unwrap();
    assert_eq!(next_notification(&mut wake_ups).await.payload(), key.to_string());
    let again = sign_up("ada@example.com", "Ada").await.unwrap();
    assert_eq!(again, first);
    // The answer to a repeat writes and notifies nothing.
    assert_nothing_sent_before_marker(&pool, &mut wake_ups, "player_jobs").await;
    let refused = sign_up("grace@example.com", "Grace").await.unwrap_err();
    let db_err = refused.as_database_error().expect("a server error");
    assert_eq!(db_err.code().as_deref(), Some("23505"));
    assert_eq!(db_err.constraint(), Some("player_creation_jobs_pkey"));
    let refused = sign_up("ada@example.com", "Ada L").await.unwrap_err();
    assert_eq!(
        refused.as_database_error().unwrap().constraint(),
        Some("player_creation_jobs_pkey")
    );
    let taken = sqlx::query("select * from ackloop.sign_up('ADA@example.com', 'Ada')")
        .execute(&pool)
        .await
        .unwrap_err();
    assert_eq!(
        taken.as_database_error().unwrap().constraint(),
        Some("builtin_users_email_key")
    );
    assert_eq!(counts(&pool).await.users, 1);
}
