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

-- Both sides check the schema version before they start.
grant select on _sqlx_migrations to ackloop_auth, ackloop_worker;

-- The auth side writes users and their jobs (returning the new ids) and reads outcomes.
grant select (id, email), insert (email, display_name) on users to ackloop_auth;
grant select, insert (id, user_id) on player_creation_jobs to ackloop_auth;
grant select on players to ackloop_auth;

-- The worker claims and completes jobs, reads users' display names, creates players.
grant select, update (status, attempts, last_error, run_after, updated_at, completed_at)
    on player_creation_jobs to ackloop_worker;
grant select (id, display_name) on users to ackloop_worker;
grant select, insert (user_id, display_name) on players to ackloop_worker;
