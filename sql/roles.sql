-- Optional: two group roles holding exactly what each side of the loop needs. Apply after the
-- migrations (psql -f sql/roles.sql), then grant them to your login roles:
--   create role auth_service login password '…' in role ackloop_auth;
--   create role player_worker login password '…' in role ackloop_worker;
-- Safe to run again: roles are created only when missing, grants are idempotent.
--
-- Neither side gets any right on ackloop's tables: the contract's functions run as ackloop's
-- owner (security definer, search_path pinned), so each side can do exactly what its functions
-- do. Rights on a service's OWN tables (its users, its players) are the service's business:
-- the player service's handler writes its players with the worker's login role, so grant that
-- role what the handler needs (docs/protocol.md, "Roles and grants").

do $$
begin
    if not exists (select from pg_roles where rolname = 'ackloop_auth') then
        create role ackloop_auth nologin;
    end if;
    if not exists (select from pg_roles where rolname = 'ackloop_worker') then
        create role ackloop_worker nologin;
    end if;
end
$$;

-- Both sides check the schema version before they start.
grant usage on schema ackloop to ackloop_auth, ackloop_worker;
grant select on ackloop.applied_migrations to ackloop_auth, ackloop_worker;
revoke execute on all routines in schema ackloop from public;
grant execute on function
    ackloop.uuid_v7(), ackloop.email_problem(text), ackloop.display_name_problem(text),
    ackloop.user_id_problem(text), ackloop.json_object_problem(jsonb)
    to ackloop_auth, ackloop_worker;

-- The auth side adds jobs (for its own users, or signs users up on the built-in tables) and
-- reads their outcomes.
grant execute on function
    ackloop.add_job(text, text, jsonb, uuid, text, integer),
    ackloop.sign_up(text, text, uuid, text, integer),
    ackloop.sign_up_many(text[], text[], uuid[], text, integer),
    ackloop.job_outcomes(uuid[])
    to ackloop_auth;

-- The worker claims jobs, completes them and records failures.
grant execute on function
    ackloop.complete_jobs(integer, text),
    ackloop.claim_jobs(integer, boolean),
    ackloop.insert_builtin_player(uuid),
    ackloop.mark_done(uuid[], integer[], text[], jsonb[], text),
    ackloop.backoff_ms(integer, bigint, bigint),
    ackloop.record_failure(uuid, integer, text, boolean, text, integer, bigint, bigint, boolean),
    ackloop.next_retry_due_in_secs(boolean),
    ackloop.pending_jobs(),
    ackloop.start_attempt(integer, bigint, bigint, text, boolean, boolean),
    ackloop.lock_attempt(uuid, integer),
    ackloop.give_back_attempt(uuid, integer, text, bigint, bigint),
    ackloop.note_unfinished_attempt(uuid, integer, text),
    ackloop.unfinished_attempt_error(integer)
    to ackloop_worker;

-- The built-in player service's batch form (migration 07; skipped on a schema from before it,
-- which a test of the earlier steps applies this file to).
do $$
begin
    if to_regprocedure('ackloop.insert_builtin_players(uuid[])') is not null then
        grant execute on function ackloop.insert_builtin_players(uuid[]) to ackloop_worker;
    end if;
end
$$;

-- Signups' wake-ups after the commit (migration 08; skipped on a schema from before it). The
-- procedures run as their caller and call the functions named here, so the auth side needs both.
do $$
begin
    if to_regprocedure('ackloop.notify_jobs(text, uuid[])') is not null then
        grant execute on function
            ackloop.notify_jobs(text, uuid[]),
            ackloop.check_wake_up_channel(text)
            to ackloop_auth;
        grant execute on procedure
            ackloop.sign_up_then_notify(text, text, uuid, text, integer),
            ackloop.sign_up_many_then_notify(text[], text[], uuid[], text, integer)
            to ackloop_auth;
    end if;
end
$$;
