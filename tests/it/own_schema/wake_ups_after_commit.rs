//! Migration `…08_wake_ups_after_commit` on a database filled before it: every row and grant
//! kept, and the new procedures and `notify_jobs` open to exactly the roles that could call the
//! functions they go with (sql/roles.sql applied before the step, as an operator's database has
//! it), and to nobody else.

use sqlx::PgPool;

use super::cheaper_checks::{fill, grants, migrate_through, rows};
use super::privileges::apply_roles;
use crate::common::*;

/// Runs `statement` as `role` on a connection of its own, outside any transaction (a procedure
/// that commits is refused inside one): the SQLSTATE it failed with, or `None` when it ran.
async fn call_as(pool: &PgPool, role: &str, statement: &str) -> Option<String> {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("set role {role}")))
        .execute(&mut *conn)
        .await
        .unwrap();
    let result = sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(&mut *conn)
        .await;
    // Never back into the pool as another role.
    conn.close_on_drop();
    result.err().map(|err| {
        err.as_database_error()
            .and_then(|db_err| db_err.code())
            .map_or_else(|| err.to_string(), |code| code.into_owned())
    })
}

const SIGN_UP: &str =
    "call ackloop.sign_up_then_notify('after@example.com', 'After', null, 'player_jobs', 1000, null, null)";
const SIGN_UP_MANY: &str = "call ackloop.sign_up_many_then_notify(array['many@example.com'], array['Many'], array[null::uuid], 'player_jobs', 1000, null, null)";
const NOTIFY: &str = "select ackloop.notify_jobs('player_jobs', array[gen_random_uuid()])";

#[sqlx::test(migrations = false)]
async fn a_database_filled_before_the_step_keeps_every_row_and_grant(pool: PgPool) {
    migrate_through(&pool, 20261207000007).await;
    apply_roles(&pool).await;
    fill(&pool).await;
    let users = rows(&pool, "ackloop.builtin_users").await;
    let players = rows(&pool, "ackloop.builtin_players").await;
    let jobs = rows(&pool, "ackloop.player_creation_jobs").await;
    let grants_before = grants(&pool).await;

    migrate_through(&pool, 20261207000008).await;

    assert_eq!(rows(&pool, "ackloop.builtin_users").await, users);
    assert_eq!(rows(&pool, "ackloop.builtin_players").await, players);
    assert_eq!(rows(&pool, "ackloop.player_creation_jobs").await, jobs);
    // Every routine and table that was there keeps its grants (sign_up and sign_up_many were
    // replaced in place).
    let grants_after = grants(&pool).await;
    for grant in &grants_before {
        assert!(grants_after.contains(grant), "{grant:?} kept");
    }

    // The auth side calls its new routines; the worker and PUBLIC cannot.
    assert_eq!(call_as(&pool, "ackloop_auth", SIGN_UP).await, None);
    assert_eq!(call_as(&pool, "ackloop_auth", SIGN_UP_MANY).await, None);
    assert_eq!(call_as(&pool, "ackloop_auth", NOTIFY).await, None);
    for statement in [SIGN_UP, SIGN_UP_MANY, NOTIFY] {
        assert_eq!(
            call_as(&pool, "ackloop_worker", statement).await.as_deref(),
            Some("42501"),
            "{statement} is the auth side's"
        );
    }
    // A role with the schema's usage and nothing else: what PUBLIC may do.
    execute(
        &pool,
        "drop role if exists wake_ups_nobody; create role wake_ups_nobody;
         grant usage on schema ackloop to wake_ups_nobody",
    )
    .await;
    for statement in [SIGN_UP, SIGN_UP_MANY, NOTIFY] {
        assert_eq!(
            call_as(&pool, "wake_ups_nobody", statement).await.as_deref(),
            Some("42501"),
            "{statement} is closed to PUBLIC"
        );
    }
    execute(&pool, "drop owned by wake_ups_nobody; drop role wake_ups_nobody").await;
    // A role granted the procedure and what it calls before its commit, but not the wake-up it
    // sends after: refused before anything is written, rather than after.
    execute(
        &pool,
        "drop role if exists wake_ups_half; create role wake_ups_half;
         grant usage on schema ackloop to wake_ups_half;
         grant execute on function ackloop.sign_up(text, text, uuid, text, integer),
             ackloop.check_wake_up_channel(text) to wake_ups_half;
         grant execute on procedure ackloop.sign_up_then_notify(text, text, uuid, text, integer) to wake_ups_half",
    )
    .await;
    assert_eq!(
        call_as(
            &pool,
            "wake_ups_half",
            "call ackloop.sign_up_then_notify('half@example.com', 'Half', null, 'player_jobs', 1000, null, null)"
        )
        .await
        .as_deref(),
        Some("42501")
    );
    assert_eq!(
        count_of(
            &pool,
            "select count(*) from ackloop.builtin_users where email = 'half@example.com'"
        )
        .await,
        0
    );
    execute(&pool, "drop owned by wake_ups_half; drop role wake_ups_half").await;
    // The two signups were written through the new path.
    assert_eq!(
        count_of(
            &pool,
            "select count(*) from ackloop.builtin_users where email in ('after@example.com', 'many@example.com')"
        )
        .await,
        2
    );
}
