//! Least privilege as sql/roles.sql grants it: each side may call its own functions and nothing
//! else; neither may read or write any of ackloop's tables directly.

use sqlx::PgPool;

use crate::common::*;

/// The auth side's steps and the worker's, as a role would call them (arguments that parse;
/// what they would do does not matter: the call is refused before it runs).
/// (The auth side's procedures, which commit, are called outside a transaction in
/// `wake_ups_after_commit`.)
const AUTH_CALLS: [&str; 6] = [
    "select ackloop.add_job('u-1', 'Ada')",
    "select * from ackloop.sign_up('ada@example.com', 'Ada')",
    "select * from ackloop.sign_up_many(array['b@example.com'], array['B'], array[null::uuid])",
    "select * from ackloop.job_outcomes(array[gen_random_uuid()])",
    "select ackloop.notify_jobs('player_jobs', array[gen_random_uuid()])",
    "select ackloop.check_wake_up_channel('player_jobs')",
];
const WORKER_CALLS: [&str; 12] = [
    "select * from ackloop.pending_jobs()",
    "select * from ackloop.complete_jobs()",
    "select * from ackloop.claim_jobs()",
    "select * from ackloop.insert_builtin_player(gen_random_uuid())",
    "select * from ackloop.insert_builtin_players(array[]::uuid[])",
    "select * from ackloop.mark_done(array[]::uuid[], array[]::int[], array[]::text[], array[]::jsonb[])",
    "select * from ackloop.record_failure(gen_random_uuid(), 1, 'x')",
    "select ackloop.next_retry_due_in_secs()",
    "select * from ackloop.start_attempt()",
    "select ackloop.lock_attempt(gen_random_uuid(), 1)",
    "select ackloop.give_back_attempt(gen_random_uuid(), 1, 'x')",
    "select ackloop.note_unfinished_attempt(gen_random_uuid(), 1, 'x')",
];
const TABLE_ACCESS: [&str; 8] = [
    "select count(*) from ackloop.player_creation_jobs",
    "update ackloop.player_creation_jobs set status = 'failed'",
    "insert into ackloop.player_creation_jobs (id, user_id, display_name) values (gen_random_uuid(), 'x', 'X')",
    "select count(*) from ackloop.builtin_users",
    "insert into ackloop.builtin_users (email, display_name) values ('c@example.com', 'C')",
    "select count(*) from ackloop.builtin_players",
    "insert into ackloop.builtin_players (user_id, display_name) values (1, 'x')",
    "delete from ackloop.player_creation_jobs",
];

/// Applies sql/roles.sql; the roles are the cluster's, shared by tests running at once, so a
/// creation that lost a race with another test's is simply done again.
pub(super) async fn apply_roles(pool: &PgPool) {
    for _ in 0..5 {
        match sqlx::raw_sql(include_str!("../../../sql/roles.sql"))
            .execute(pool)
            .await
        {
            Ok(_) => return,
            Err(err) if err.as_database_error().and_then(|e| e.code()).as_deref() == Some("23505") => {
                continue;
            }
            Err(err) => panic!("sql/roles.sql: {err}"),
        }
    }
    panic!("sql/roles.sql kept meeting concurrent role creation");
}

#[sqlx::test]
async fn each_side_calls_its_own_functions_and_nothing_else(pool: PgPool) {
    apply_roles(&pool).await;
    for call in AUTH_CALLS {
        assert_eq!(
            as_role(&pool, "ackloop_auth", call).await,
            None,
            "the auth role: {call}"
        );
        assert_eq!(
            as_role(&pool, "ackloop_worker", call).await.as_deref(),
            Some("42501"),
            "the worker role: {call}"
        );
    }
    for call in WORKER_CALLS {
        let as_worker = as_role(&pool, "ackloop_worker", call).await;
        // It runs; or it is refused for its arguments (no such job), never for want of a right.
        assert_ne!(as_worker.as_deref(), Some("42501"), "the worker role: {call}");
        assert_eq!(
            as_role(&pool, "ackloop_auth", call).await.as_deref(),
            Some("42501"),
            "the auth role: {call}"
        );
    }
    for statement in TABLE_ACCESS {
        for role in ["ackloop_auth", "ackloop_worker"] {
            assert_eq!(
                as_role(&pool, role, statement).await.as_deref(),
                Some("42501"),
                "{role}: {statement}"
            );
        }
    }
}
