//! Migration `…05_locale_and_claims`: emails compared ignoring case whatever the database's
//! locale, completion functions that refuse a job their transaction did not claim, and the step
//! on a database filled before it.

use ackloop::{SignupError, Signups};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use super::cheaper_checks::{fill, grants, migrate_through, rows};
use super::privileges::apply_roles;
use crate::common::*;

/// A database of its own created with the `C` locale (ASCII-only case folding), beside the test's.
async fn c_locale_database(pool: &PgPool, connect: &PgConnectOptions, tag: &str) -> (String, PgPool) {
    let name = format!("ackloop_c_locale_{tag}_{}", std::process::id());
    execute_owned(pool, format!("drop database if exists {name} with (force)")).await;
    execute_owned(
        pool,
        format!("create database {name} template template0 lc_ctype 'C' lc_collate 'C' encoding 'UTF8'"),
    )
    .await;
    let c_pool = PgPoolOptions::new()
        .max_connections(3)
        .connect_with(connect.clone().database(&name))
        .await
        .unwrap();
    (name, c_pool)
}

/// On a `C`-locale database, where `lower('É')` is `'É'`, two emails differing only in the case
/// of non-ASCII letters are one user: the second signup is refused as a taken email, and
/// `ackloop await --email` finds the user whatever the case. Before, both signed up.
#[sqlx::test]
async fn emails_differing_in_non_ascii_case_are_one_user_on_a_c_locale_database(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect.clone(), 2).await;
    let (name, c_pool) = c_locale_database(&pool, &connect, "signup").await;
    ackloop::run_migrations(&c_pool).await.unwrap();
    let folded_by_locale: String = sqlx::query_scalar("select lower('ÉMILE')")
        .fetch_one(&c_pool)
        .await
        .unwrap();
    assert_eq!(folded_by_locale, "Émile", "the database folds only ASCII");
    let signups = Signups::connect(c_pool.clone()).await.unwrap();
    let first = ackloop::NewUser::new("émile@exämple.com", "Émile").unwrap();
    let second = ackloop::NewUser::new("ÉMILE@EXÄMPLE.COM", "Émile again").unwrap();
    let written = signups
        .create_user_and_await_player(&first, std::time::Duration::from_millis(200))
        .await;
    assert!(
        matches!(written, Err(SignupError::TimedOut { .. })),
        "{written:?}"
    );
    let refused = signups
        .create_user_and_await_player(&second, std::time::Duration::from_secs(5))
        .await;
    assert!(matches!(refused, Err(SignupError::EmailTaken)), "{refused:?}");
    // Grouped signups too.
    let many: Result<Vec<(uuid::Uuid, i64, String)>, _> = sqlx::query_as(
        "select * from ackloop.sign_up_many(array['ÉMILE@exämple.com', 'zoë@example.com', 'ZOË@EXAMPLE.COM'], array['A', 'B', 'C'], array[null, null, null]::uuid[])",
    )
    .fetch_all(&c_pool)
    .await;
    let many = many.unwrap();
    assert_eq!(many.len(), 1, "only zoë is new: {many:?}");
    let users: i64 = sqlx::query_scalar("select count(*) from ackloop.builtin_users")
        .fetch_one(&c_pool)
        .await
        .unwrap();
    assert_eq!(users, 2);
    let url = connect.clone().database(&name).to_url_lossy().to_string();
    let found = run_ackloop(
        &url,
        &[
            "await",
            "--email",
            "ÉMILE@EXÄMPLE.COM",
            "--timeout",
            "0s",
            "--json",
        ],
    )
    .await;
    assert_eq!(
        found.status.code(),
        Some(5),
        "the user's job is pending: {}",
        stderr(&found)
    );
    drop(signups);
    c_pool.close().await;
    execute_owned(&pool, format!("drop database {name} with (force)")).await;
}

/// A `C`-locale database that already holds two such users cannot keep both as they are: the
/// step refuses, names them and says what to do, and leaves the schema as it was.
#[sqlx::test]
async fn the_step_refuses_users_the_new_fold_would_merge_and_changes_nothing(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect.clone(), 2).await;
    let (name, c_pool) = c_locale_database(&pool, &connect, "clash").await;
    migrate_through(&c_pool, 20261207000004).await;
    execute(&c_pool, "select * from ackloop.sign_up('émile@exämple.com', 'A')").await;
    execute(&c_pool, "select * from ackloop.sign_up('ÉMILE@EXÄMPLE.COM', 'B')").await;
    let err = ackloop::run_migrations(&c_pool)
        .await
        .expect_err("the step must refuse");
    let message = format!("{err:?}");
    assert!(
        message.contains("émile@exämple.com and ÉMILE@EXÄMPLE.COM") && message.contains("change or delete"),
        "{message}"
    );
    let version: i64 = sqlx::query_scalar("select max(version) from ackloop.applied_migrations")
        .fetch_one(&c_pool)
        .await
        .unwrap();
    assert_eq!(version, 20261207000004, "nothing of the step is applied");
    // Once one is changed, the step goes through.
    execute(
        &c_pool,
        "update ackloop.builtin_users set email = 'emile2@example.com' where display_name = 'B'",
    )
    .await;
    ackloop::run_migrations(&c_pool)
        .await
        .expect("the step, after the fix");
    c_pool.close().await;
    execute_owned(&pool, format!("drop database {name} with (force)")).await;
}

/// A database filled before the step (every job state, a key, the roles' grants) keeps every
/// row and every grant; the step adds its functions, closed to the roles except the email fold.
#[sqlx::test(migrations = false)]
async fn a_database_filled_before_the_step_keeps_every_row_and_grant(pool: PgPool) {
    migrate_through(&pool, 20261207000004).await;
    apply_roles(&pool).await;
    fill(&pool).await;
    let tables = [
        "ackloop.builtin_users",
        "ackloop.builtin_players",
        "ackloop.player_creation_jobs",
    ];
    let mut before = Vec::new();
    for table in tables {
        before.push(rows(&pool, table).await);
    }
    let grants_before = grants(&pool).await;
    migrate_through(&pool, 20261207000005).await;
    for (table, rows_before) in tables.iter().zip(&before) {
        assert_eq!(&rows(&pool, table).await, rows_before, "{table}");
    }
    let mut added: Vec<(String, Option<String>)> = grants(&pool)
        .await
        .into_iter()
        .filter(|grant| !grants_before.contains(grant))
        .collect();
    added.sort();
    assert_eq!(
        added,
        vec![(
            "ackloop.fold_email(text)".to_owned(),
            Some("{=X/postgres,postgres=X/postgres}".to_owned())
        )],
        "only the new function"
    );
    // Each side still does its part.
    assert_eq!(
        as_role(
            &pool,
            "ackloop_auth",
            "select * from ackloop.sign_up('after@example.com', 'After')"
        )
        .await,
        None
    );
    assert_eq!(
        as_role(&pool, "ackloop_worker", "select * from ackloop.complete_jobs(10)").await,
        None
    );
}

/// `mark_done` and `record_failure` refuse (55000) a job their transaction has not claimed,
/// including one claimed in a savepoint rolled back since, and accept what it claimed, whether
/// with `claim_jobs` or with `lock_attempt`. Before, `mark_done` of a pending job nobody claimed
/// marked it done.
#[sqlx::test]
async fn completing_a_job_this_transaction_did_not_claim_is_refused(pool: PgPool) {
    for n in 1..=3 {
        execute_owned(&pool, format!("select ackloop.add_job('svc-{n}', 'Svc {n}')")).await;
    }
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("select id from ackloop.player_creation_jobs order by id")
        .fetch_all(&pool)
        .await
        .unwrap();
    let mark = "select * from ackloop.mark_done(array[$1], array[1], array['p'], array['{}'::jsonb])";
    let fail = "select * from ackloop.record_failure($1, 1, 'x')";
    let code = |result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>| {
        result.err().and_then(|err| {
            err.as_database_error()
                .and_then(|e| e.code())
                .map(|c| c.into_owned())
        })
    };
    let mut conn = pool.acquire().await.unwrap();
    // Nothing claimed.
    for statement in [mark, fail] {
        let mut tx = conn.begin().await.unwrap();
        assert_eq!(
            code(sqlx::query(statement).bind(ids[0]).execute(&mut *tx).await).as_deref(),
            Some("55000"),
            "{statement}"
        );
    }
    // Claimed in a savepoint rolled back since.
    let mut tx = conn.begin().await.unwrap();
    {
        let mut savepoint = (*tx).begin().await.unwrap();
        let claimed: Vec<uuid::Uuid> = sqlx::query_scalar("select job_id from ackloop.claim_jobs(1)")
            .fetch_all(&mut *savepoint)
            .await
            .unwrap();
        assert_eq!(claimed, vec![ids[0]]);
        savepoint.rollback().await.unwrap();
    }
    assert_eq!(
        code(sqlx::query(mark).bind(ids[0]).execute(&mut *tx).await).as_deref(),
        Some("55000")
    );
    tx.rollback().await.unwrap();
    // Claimed with claim_jobs: marked done; another job in the same call is refused with it.
    let mut tx = conn.begin().await.unwrap();
    let claimed: Vec<uuid::Uuid> = sqlx::query_scalar("select job_id from ackloop.claim_jobs(1)")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(claimed, vec![ids[0]]);
    let both = sqlx::query("select * from ackloop.mark_done(array[$1, $2], array[1, 1], array['p', 'q'], array['{}'::jsonb, '{}'::jsonb])")
        .bind(ids[0])
        .bind(ids[1])
        .execute(&mut *tx)
        .await;
    assert_eq!(
        code(both).as_deref(),
        Some("55000"),
        "one unclaimed job refuses the call"
    );
    tx.rollback().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("select job_id from ackloop.claim_jobs(1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let marked: Vec<uuid::Uuid> = sqlx::query_scalar(mark)
        .bind(ids[0])
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(marked, vec![ids[0]]);
    tx.commit().await.unwrap();
    // Started alone, then locked with lock_attempt in the next transaction: its failure recorded.
    let (job, attempt): (uuid::Uuid, i32) =
        sqlx::query_as("select job_id, attempt from ackloop.start_attempt(any_job => true)")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let mut tx = conn.begin().await.unwrap();
    let locked: bool = sqlx::query_scalar("select ackloop.lock_attempt($1, $2)")
        .bind(job)
        .bind(attempt)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert!(locked);
    let status: String = sqlx::query_scalar("select status from ackloop.record_failure($1, $2, 'x')")
        .bind(job)
        .bind(attempt)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(status, "pending");
    tx.commit().await.unwrap();
    assert_eq!(count_jobs_with_status(&pool, "done").await, 1);
}
