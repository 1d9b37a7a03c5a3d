//! Idempotency keys where they race: one key sent by several callers into one grouped batch, with
//! other emails or names, from two processes at once, inside other transactions, under the
//! least-privileged role. (Written by a reviewer trying to break "a signup sent again with its
//! key is the same signup; the key with another email or display name is KeyReused".)
//!
//! The grouped paths are forced as in `grouped_signups.rs`: the only writer is held, with one
//! signup in hand, waiting for a pool connection while the next signups queue up behind it.

use std::sync::Arc;
use std::time::Duration;

use ackloop::{JobId, NewUser, SignupError, Signups};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::task::JoinHandle;

use crate::common::*;
use crate::grouped_signups::{Held, held_writer, queued};

fn sign_up(
    signups: &Arc<Signups>,
    email: &str,
    name: &str,
    key: Option<JobId>,
) -> JoinHandle<Result<ackloop::Player, SignupError>> {
    let (signups, new_user) = (Arc::clone(signups), NewUser::new(email, name).unwrap());
    tokio::spawn(async move {
        match key {
            Some(key) => {
                signups
                    .create_user_and_await_player_with_key(&new_user, key, DEADLINE)
                    .await
            }
            None => signups.create_user_and_await_player(&new_user, DEADLINE).await,
        }
    })
}

/// One key sent by two callers with different emails, in one batch; the second email is taken by
/// someone else. The grouped statement answers by job id alone, so it would have told both
/// callers the one signup written was theirs: the second entry of a job id is written alone.
/// Whichever of the two writes first, Ada gets her own player and Grace's caller is refused.
#[sqlx::test]
async fn a_key_sent_in_one_batch_with_another_taken_email_is_not_answered_with_the_first_signup(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let (log, _guard) = capture_logs();
    let admin = pool(options.clone(), connect.clone(), 3).await;
    let worker = spawn_worker(&admin, worker_config());
    let mut conn = admin.acquire().await.unwrap();
    let grace = NewUser::new("grace@example.com", "Grace").unwrap();
    ackloop::create_user(&mut conn, &ackloop::Channels::default(), &grace)
        .await
        .unwrap();
    drop(conn);
    let Held { signups, held, .. } = held_writer(options, connect).await;
    let key = JobId::new();

    let first = sign_up(&signups, "first@example.com", "First", None);
    queued(&log, 1).await;
    let ada = sign_up(&signups, "ada@example.com", "Ada", Some(key));
    let reused = sign_up(&signups, "grace@example.com", "Grace", Some(key));
    queued(&log, 3).await;
    drop(held);

    first.await.unwrap().expect("the first signup");
    let ada = ada.await.unwrap().expect("Ada's signup");
    assert_eq!(ada.display_name, "Ada");
    let reused = reused.await.unwrap();
    assert_eq!(
        log.count("a job id twice in one batch"),
        1,
        "the two keyed signups met in one batch: {}",
        log.text()
    );
    assert!(
        matches!(
            reused,
            Err(SignupError::KeyReused(_)) | Err(SignupError::EmailTaken)
        ),
        "grace@example.com's caller must not get ada@example.com's player {ada:?}: got {reused:?}"
    );
    worker.stop().await;
}

/// One key, one email, two display names, in one batch: two different signups under one key.
/// Whichever is written first gets its own player; the other is `KeyReused`.
#[sqlx::test]
async fn a_key_sent_in_one_batch_with_another_display_name_is_refused(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let (log, _guard) = capture_logs();
    let admin = pool(options.clone(), connect.clone(), 3).await;
    let worker = spawn_worker(&admin, worker_config());
    let Held { signups, held, .. } = held_writer(options, connect).await;
    let key = JobId::new();

    let first = sign_up(&signups, "first@example.com", "First", None);
    queued(&log, 1).await;
    let ada = sign_up(&signups, "ada@example.com", "Ada", Some(key));
    let renamed = sign_up(&signups, "ada@example.com", "Ada Lovelace", Some(key));
    queued(&log, 3).await;
    drop(held);

    first.await.unwrap().expect("the first signup");
    let answers = [
        ("Ada", ada.await.unwrap()),
        ("Ada Lovelace", renamed.await.unwrap()),
    ];
    assert_eq!(log.count("a job id twice in one batch"), 1, "{}", log.text());
    let written: Vec<_> = answers.iter().filter(|(_, answer)| answer.is_ok()).collect();
    assert_eq!(written.len(), 1, "exactly one of the two is written: {answers:?}");
    let (name, player) = written[0];
    assert_eq!(&player.as_ref().unwrap().display_name, name, "its own player");
    assert!(
        answers
            .iter()
            .any(|(_, answer)| matches!(answer, Err(SignupError::KeyReused(_)))),
        "the other is refused: {answers:?}"
    );
    worker.stop().await;
}

/// One email under two keys in one batch: one is written, the other is EmailTaken (it is
/// someone else's signup), and a keyed replay queued in the same batch agrees with its first
/// call. Repeated, since which path a batch takes depends on timing.
#[sqlx::test]
async fn one_email_under_two_keys_in_one_batch_is_one_signup_and_one_taken_email(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let (log, _guard) = capture_logs();
    let admin = pool(options.clone(), connect.clone(), 3).await;
    let worker = spawn_worker(&admin, worker_config());
    for round in 0..12 {
        let Held { signups, held, .. } = held_writer(options.clone(), connect.clone()).await;
        let (k1, k2) = (JobId::new(), JobId::new());
        let email = format!("ada{round}@example.com");
        let before = log.count("signup queued");
        let first = sign_up(&signups, &format!("first{round}@example.com"), "First", None);
        queued(&log, before + 1).await;
        let one = sign_up(&signups, &email, "Ada", Some(k1));
        let two = sign_up(&signups, &email, "Ada", Some(k2));
        let again = sign_up(&signups, &email, "Ada", Some(k1));
        let unkeyed = sign_up(&signups, &email.to_uppercase(), "Ada", None);
        queued(&log, before + 5).await;
        drop(held);

        first.await.unwrap().expect("the first signup");
        // Which key wins the email is the writer's order (a batch that fails, say on a lock
        // timeout at commit, is written alone, in a race): either, but only one, and a replay of
        // a key agrees with its first call.
        let (one, two, again) = (one.await.unwrap(), two.await.unwrap(), again.await.unwrap());
        let winner = match (&one, &two) {
            (Ok(_), Err(SignupError::EmailTaken)) => k1,
            (Err(SignupError::EmailTaken), Ok(_)) => k2,
            _ => panic!("round {round}: one key wins: {one:?} {two:?}"),
        };
        match (&one, &again) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(SignupError::EmailTaken), Err(SignupError::EmailTaken)) => {}
            _ => panic!("round {round}: a replay agrees with its first call: {one:?} {again:?}"),
        }
        let unkeyed = unkeyed.await.unwrap();
        assert!(matches!(unkeyed, Err(SignupError::EmailTaken)), "{unkeyed:?}");
        let jobs: Vec<uuid::Uuid> = sqlx::query_scalar(
            "select jobs.id from ackloop.player_creation_jobs jobs join ackloop.builtin_users as users on users.id = jobs.builtin_user_id
             where lower(users.email) = lower($1)",
        )
        .bind(&email)
        .fetch_all(&admin)
        .await
        .unwrap();
        assert_eq!(jobs, vec![winner.as_uuid()]);
    }
    worker.stop().await;
}

/// the same key from two `Signups` (two processes) at once, each with several callers.
#[sqlx::test]
async fn the_same_key_from_two_processes_at_once_makes_one_signup(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 10).await;
    let worker = spawn_worker(&pool, worker_config());
    let a = Arc::new(signups(&pool).await);
    let b = Arc::new(signups(&pool).await);
    let key = JobId::new();
    let calls: Vec<_> = (0..12)
        .map(|n| {
            sign_up(
                if n % 2 == 0 { &a } else { &b },
                "ada@example.com",
                "Ada",
                Some(key),
            )
        })
        .collect();
    let mut players = Vec::new();
    for call in calls {
        players.push(call.await.unwrap().expect("every call gets the player"));
    }
    assert!(players.iter().all(|p| *p == players[0]), "{players:?}");
    let c = counts(&pool).await;
    assert_eq!((c.users, c.jobs, c.players), (1, 1, 1));
    worker.stop().await;
}

/// `create_user` inside a caller's REPEATABLE READ transaction, the email taken by a signup that
/// committed after the transaction's snapshot: a serialization failure (40001), as documented
/// (before 20261126000003 the plain insert raised 23505); the transaction tried again sees the
/// email taken.
#[sqlx::test]
async fn create_user_in_a_repeatable_read_transaction_meets_a_concurrently_taken_email(pool: PgPool) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("set transaction isolation level repeatable read")
        .execute(&mut *tx)
        .await
        .unwrap();
    // Takes the snapshot.
    sqlx::query("select count(*) from ackloop.builtin_users as users")
        .execute(&mut *tx)
        .await
        .unwrap();
    let ada = NewUser::new("ada@example.com", "Ada").unwrap();
    let mut other = pool.acquire().await.unwrap();
    ackloop::create_user(&mut other, &ackloop::Channels::default(), &ada)
        .await
        .unwrap();
    let conflict = ackloop::create_user(&mut tx, &ackloop::Channels::default(), &ada).await;
    let Err(SignupError::Database(err)) = &conflict else {
        panic!("a serialization failure: got {conflict:?}");
    };
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("40001")
    );
    drop(tx);
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("set transaction isolation level repeatable read")
        .execute(&mut *tx)
        .await
        .unwrap();
    let taken = ackloop::create_user(&mut tx, &ackloop::Channels::default(), &ada).await;
    assert!(matches!(taken, Err(SignupError::EmailTaken)), "{taken:?}");
}

/// A keyed replay connected as `ackloop_auth` from `sql/roles.sql`.
#[sqlx::test]
async fn a_keyed_replay_runs_as_the_least_privileged_auth_role(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let admin = pool(options.clone(), connect.clone(), 2).await;
    sqlx::raw_sql(include_str!("../../sql/roles.sql"))
        .execute(&admin)
        .await
        .unwrap();
    let oid: i64 = sqlx::query_scalar("select oid::int8 from pg_database where datname = current_database()")
        .fetch_one(&admin)
        .await
        .unwrap();
    let role = format!("idem_auth_{oid}");
    let sql = format!("drop role if exists {role}; create role {role} login in role ackloop_auth");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&admin)
        .await
        .unwrap();
    let auth_pool = pool(options, connect.username(&role), 3).await;
    let worker = spawn_worker(&admin, worker_config());
    let signups = Signups::connect(auth_pool.clone()).await.unwrap();
    let ada = NewUser::new("ada@example.com", "Ada").unwrap();
    let key = JobId::new();
    let first = signups
        .create_user_and_await_player_with_key(&ada, key, DEADLINE)
        .await
        .expect("first");
    let again = signups
        .create_user_and_await_player_with_key(&ada, key, DEADLINE)
        .await
        .expect("again");
    assert_eq!(first, again);
    let renamed = NewUser::new("ada@example.com", "Ada L").unwrap();
    let reused = signups
        .create_user_and_await_player_with_key(&renamed, key, Duration::from_secs(2))
        .await;
    assert!(matches!(reused, Err(SignupError::KeyReused(_))), "{reused:?}");
    worker.stop().await;
    drop(signups);
    auth_pool.close().await;
    let sql = format!("drop owned by {role}; drop role {role}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&admin)
        .await
        .unwrap();
}

/// A role granted EXECUTE on `sign_up` alone, and no right on any of ackloop's tables (the
/// contract runs as ackloop's owner): a taken email is 23505 on builtin_users_email_key, a key
/// sent again is its signup, and the tables stay out of its reach.
#[sqlx::test]
async fn a_role_with_execute_alone_signs_up_and_cannot_touch_the_tables(pool: PgPool) {
    let oid: i64 = sqlx::query_scalar("select oid::int8 from pg_database where datname = current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let role = format!("idem_exec_{oid}");
    let sql = format!(
        "drop role if exists {role}; create role {role};
         grant usage on schema ackloop to {role};
         revoke execute on all functions in schema ackloop from public;
         grant execute on function ackloop.sign_up(text, text, uuid, text, integer) to {role};"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&pool)
        .await
        .unwrap();
    let key = uuid::Uuid::now_v7();
    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("set local role {role}")))
        .execute(&mut *tx)
        .await
        .unwrap();
    let first: i64 = sqlx::query_scalar("select user_id from ackloop.sign_up('ada@example.com', 'Ada', $1)")
        .bind(key)
        .fetch_one(&mut *tx)
        .await
        .expect("EXECUTE alone signs up");
    let again: i64 = sqlx::query_scalar("select user_id from ackloop.sign_up('ada@example.com', 'Ada', $1)")
        .bind(key)
        .fetch_one(&mut *tx)
        .await
        .expect("the same key again is the same signup");
    assert_eq!(first, again);
    sqlx::query("savepoint before_taken")
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = sqlx::query("select * from ackloop.sign_up('ADA@example.com', 'Ada')")
        .execute(&mut *tx)
        .await
        .unwrap_err();
    let db_err = err.as_database_error().expect("a database error");
    assert_eq!(
        (db_err.code().as_deref(), db_err.constraint()),
        (Some("23505"), Some("builtin_users_email_key")),
        "{err}"
    );
    sqlx::query("rollback to savepoint before_taken")
        .execute(&mut *tx)
        .await
        .unwrap();
    for statement in [
        "select count(*) from ackloop.builtin_users",
        "select count(*) from ackloop.player_creation_jobs",
        "update ackloop.player_creation_jobs set status = 'failed'",
        "select * from ackloop.complete_jobs()",
        "select ackloop.add_job('u1', 'Ada')",
    ] {
        sqlx::query("savepoint probe").execute(&mut *tx).await.unwrap();
        let refused = sqlx::query(statement).execute(&mut *tx).await.unwrap_err();
        assert_eq!(
            refused.as_database_error().and_then(|e| e.code()).as_deref(),
            Some("42501"),
            "{statement}: {refused}"
        );
        sqlx::query("rollback to savepoint probe")
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.rollback().await.unwrap();
    let sql = format!("drop owned by {role}; drop role {role}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&pool)
        .await
        .unwrap();
}

/// `on conflict do nothing` still waits for another session's uncommitted signup of the
/// same email, bounded by `lock_wait_ms` (55P03), and, once that one commits, finds the email
/// taken (or its own signup, by the job id).
#[sqlx::test]
async fn sign_up_waits_for_an_uncommitted_same_email_within_its_lock_wait(pool: PgPool) {
    let key = uuid::Uuid::now_v7();
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("select * from ackloop.sign_up('ada@example.com', 'Ada', $1)")
        .bind(key)
        .execute(&mut *blocker)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err =
        sqlx::query("select * from ackloop.sign_up('ADA@example.com', 'Ada', null, 'player_jobs', 200)")
            .execute(&pool)
            .await
            .unwrap_err();
    assert_eq!(
        err.as_database_error().unwrap().code().as_deref(),
        Some("55P03"),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    // Waiting without a limit while the blocker commits: the same key is its signup.
    let replay = tokio::spawn({
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (uuid::Uuid, i64)>(
                "select job_id, user_id from ackloop.sign_up('ada@example.com', 'Ada', $1)",
            )
            .bind(key)
            .fetch_one(&pool)
            .await
        }
    });
    wait_until("the replay waits for the blocker's lock", || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and datname = current_database()",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
            == 1
    })
    .await;
    blocker.commit().await.unwrap();
    let (job, _) = within("the replay", replay).await.unwrap().unwrap();
    assert_eq!(job, key);
}
