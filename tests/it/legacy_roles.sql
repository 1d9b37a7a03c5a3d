-- sql/roles.sql as the earlier layout shipped it (before ackloop kept its tables in its own
-- schema): the upgrade test applies it to an earlier database to check the grants survive.
-- Optional: two group roles holding exactly the privileges each side of the loop needs.
-- Apply after the migrations (psql -f sql/roles.sql), then grant them to your login roles:
--   create role auth_service login password '…' in role ackloop_auth;
--   create role player_worker login password '…' in role ackloop_worker;
-- Safe to run again: roles are created only when missing, grants are idempotent.

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

-- Both sides check the schema version before they start, and call the contract's functions
-- (they run with the caller's privileges, granted below).
grant usage on schema ackloop to ackloop_auth, ackloop_worker;
grant select on ackloop.applied_migrations to ackloop_auth, ackloop_worker;
revoke execute on all functions in schema ackloop from public;
grant execute on function
    ackloop.uuid_v7(), ackloop.email_problem(text), ackloop.display_name_problem(text)
    to ackloop_auth, ackloop_worker;
grant execute on function
    ackloop.sign_up(text, text, uuid, text, integer),
    ackloop.sign_up_many(text[], text[], uuid[], text, integer),
    ackloop.job_outcomes(uuid[])
    to ackloop_auth;
grant execute on function
    ackloop.complete_jobs(integer, text),
    ackloop.claim_jobs(integer),
    ackloop.mark_done(uuid[], integer[], text),
    ackloop.backoff_ms(integer, bigint, bigint),
    ackloop.record_failure(uuid, integer, text, boolean, text, integer, bigint, bigint, boolean),
    ackloop.start_attempt(integer, bigint, bigint, text, boolean),
    ackloop.lock_attempt(uuid, integer),
    ackloop.give_back_attempt(uuid, integer, text, bigint, bigint),
    ackloop.note_unfinished_attempt(uuid, integer, text),
    ackloop.unfinished_attempt_error(integer)
    to ackloop_worker;

-- The auth side writes users and their jobs (returning the new ids) and reads outcomes.
-- (The display name too: a signup sent again with its key is recognised by email and name.)
grant select (id, email, display_name), insert (email, display_name) on users to ackloop_auth;
grant select, insert (id, user_id, created_at) on player_creation_jobs to ackloop_auth;
grant select on players to ackloop_auth;

-- The worker claims and completes jobs, reads users' display names, creates players.
grant select, update (status, attempts, last_error, run_after, updated_at, completed_at)
    on player_creation_jobs to ackloop_worker;
grant select (id, display_name) on users to ackloop_worker;
grant select, insert (user_id, display_name) on players to ackloop_worker;
