//! The writer's grouped paths, forced rather than left to timing: the only writer is held, with
//! one signup in hand, waiting for a pool connection while the next signups queue up behind it;
//! released, it writes them as one batch. The writer's own events say which path ran, and the
//! rows' transaction ids (`xmin`) say which signups committed together.

use std::sync::Arc;

use ackloop::{NewUser, SignupError, Signups, SignupsConfig};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::task::JoinHandle;

use crate::common::*;

/// A `Signups` with one writer on a pool of two connections, both taken by the test: the writer
/// takes the first signup and waits for a connection; the rest queue up behind it.
pub(crate) struct Held {
    pub(crate) pool: PgPool,
    pub(crate) signups: Arc<Signups>,
    pub(crate) held: Vec<sqlx::pool::PoolConnection<sqlx::Postgres>>,
}

pub(crate) async fn held_writer(options: PgPoolOptions, connect: PgConnectOptions) -> Held {
    let pool = options.max_connections(2).connect_with(connect).await.unwrap();
    let config = SignupsConfig {
        writers: 1,
        ..SignupsConfig::default()
    };
    let signups = Arc::new(Signups::connect_with(pool.clone(), config).await.unwrap());
    let held = vec![pool.acquire().await.unwrap(), pool.acquire().await.unwrap()];
    Held { pool, signups, held }
}

fn sign_up(
    signups: &Arc<Signups>,
    email: &str,
    name: &str,
) -> JoinHandle<Result<ackloop::Player, SignupError>> {
    let (signups, new_user) = (Arc::clone(signups), NewUser::new(email, name).unwrap());
    tokio::spawn(async move { signups.create_user_and_await_player(&new_user, DEADLINE).await })
}

/// Waits until `n` signups are queued for the writer.
pub(crate) async fn queued(log: &Log, n: usize) {
    wait_until("the signups are queued", || async {
        log.count("signup queued") >= n
    })
    .await;
}

/// How many transactions wrote the users with these emails.
async fn transactions(pool: &PgPool, emails: &[&str]) -> i64 {
    sqlx::query_scalar(
        "select count(distinct xmin::text) from ackloop.builtin_users as users where email = any($1)",
    )
    .bind(emails)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn queued_signups_commit_together_and_duplicates_are_refused_alone(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let (log, _guard) = capture_logs();
    let admin = pool(options.clone(), connect.clone(), 2).await;
    let worker = spawn_worker(&admin, worker_config());
    let mut conn = admin.acquire().await.unwrap();
    let existing = NewUser::new("existing@example.com", "Existing").unwrap();
    ackloop::create_user(&mut conn, &ackloop::Channels::default(), &existing)
        .await
        .unwrap();
    drop(conn);
    let Held { pool, signups, held } = held_writer(options, connect).await;

    let first = sign_up(&signups, "first@example.com", "First");
    queued(&log, 1).await;
    let together = [
        sign_up(&signups, "dup@example.com", "Dup"),
        sign_up(&signups, "DUP@example.com", "Dup Again"),
        sign_up(&signups, "Existing@example.com", "Existing Again"),
        sign_up(&signups, "other@example.com", "Other"),
    ];
    queued(&log, 5).await;
    drop(held);

    first.await.unwrap().expect("the first signup, written alone");
    let mut results = Vec::new();
    for signup in together {
        results.push(signup.await.unwrap());
    }
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(results[1], Err(SignupError::EmailTaken)),
        "{:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Err(SignupError::EmailTaken)),
        "{:?}",
        results[2]
    );
    assert!(results[3].is_ok(), "{:?}", results[3]);
    // The grouped statement ran once for the four, skipping the two taken emails...
    let text = log.text();
    assert_eq!(log.count("signups written"), 1, "{text}");
    assert!(text.contains("batch.size=4 written=2"), "{text}");
    assert_eq!(log.count("batch failed"), 0, "{text}");
    // ...and its two signups committed in one transaction.
    assert_eq!(
        transactions(&pool, &["dup@example.com", "other@example.com"]).await,
        1
    );
    assert_eq!(counts(&pool).await.users, 4);
    worker.stop().await;
}

#[sqlx::test]
async fn a_batch_that_meets_a_lock_is_written_one_by_one_and_only_the_blocked_signup_waits(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let (log, _guard) = capture_logs();
    let admin = pool(options.clone(), connect.clone(), 3).await;
    let worker = spawn_worker(&admin, worker_config());
    let Held { pool, signups, held } = held_writer(options, connect).await;
    // Someone's signup of the same email, not yet committed: the batch meets its lock.
    let mut blocker = admin.begin().await.unwrap();
    sqlx::query(
        "insert into ackloop.builtin_users (email, display_name) values ('held@example.com', 'Blocker')",
    )
    .execute(&mut *blocker)
    .await
    .unwrap();

    let first = sign_up(&signups, "first@example.com", "First");
    queued(&log, 1).await;
    let before = sign_up(&signups, "before@example.com", "Before");
    let blocked = sign_up(&signups, "held@example.com", "Held");
    let after = sign_up(&signups, "after@example.com", "After");
    queued(&log, 4).await;
    drop(held);

    first.await.unwrap().expect("the first signup, written alone");
    before
        .await
        .unwrap()
        .expect("written alone after the batch failed");
    after
        .await
        .unwrap()
        .expect("written alone after the batch failed");
    let text = log.text();
    assert_eq!(
        log.count("batch failed; each signup is written alone"),
        1,
        "{text}"
    );
    assert_eq!(log.count("signups written"), 0, "{text}");
    assert!(
        !blocked.is_finished(),
        "the blocked signup waits for the lock, on its own time"
    );
    assert_eq!(
        transactions(&pool, &["before@example.com", "after@example.com"]).await,
        2
    );

    blocker.rollback().await.unwrap();
    blocked.await.unwrap().expect("written once the lock is gone");
    assert_eq!(counts(&pool).await.users, 4);
    worker.stop().await;
}
