//! Migration `…07_builtin_batch_handler` on a database filled before it: every row, state and
//! grant kept, and the new batch form open to exactly the roles that could call the one-job form
//! (sql/roles.sql applied before the step, as an operator's database has it).

use sqlx::PgPool;

use super::cheaper_checks::{fill, grants, migrate_through, rows};
use super::privileges::apply_roles;
use crate::common::*;

const BATCH_FORM: &str = "select * from ackloop.insert_builtin_players(array[]::uuid[])";

#[sqlx::test(migrations = false)]
async fn a_database_filled_before_the_batch_form_keeps_every_row_and_grant(pool: PgPool) {
    migrate_through(&pool, 20261207000006).await;
    apply_roles(&pool).await;
    fill(&pool).await;
    let users = rows(&pool, "ackloop.builtin_users").await;
    let players = rows(&pool, "ackloop.builtin_players").await;
    let jobs = rows(&pool, "ackloop.player_creation_jobs").await;
    let grants_before = grants(&pool).await;

    migrate_through(&pool, 20261207000007).await;

    assert_eq!(rows(&pool, "ackloop.builtin_users").await, users);
    assert_eq!(rows(&pool, "ackloop.builtin_players").await, players);
    assert_eq!(rows(&pool, "ackloop.player_creation_jobs").await, jobs);
    let grants_after = grants(&pool).await;
    for grant in &grants_before {
        assert!(grants_after.contains(grant), "{grant:?} kept");
    }
    // Granted by the step to whoever could call insert_builtin_player: the worker, not the auth
    // side; closed to PUBLIC (the roles hold nothing of it from roles.sql, which skipped it).
    assert_eq!(as_role(&pool, "ackloop_worker", BATCH_FORM).await, None);
    assert_eq!(
        as_role(&pool, "ackloop_auth", BATCH_FORM).await.as_deref(),
        Some("42501")
    );
    let public: bool = sqlx::query_scalar(
        "select exists (select from aclexplode((select proacl from pg_proc
                 where oid = 'ackloop.insert_builtin_players(uuid[])'::regprocedure)) as grants
                 where grants.grantee = 0)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(!public, "the batch form is closed to PUBLIC");
}
