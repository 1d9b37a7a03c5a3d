-- The contract: every step a service takes in the loop, as functions in the `ackloop` schema, so a
-- service in any language (and ackloop itself) runs the same SQL with the same rules. Documented
-- for callers in docs/protocol.md; the defaults here are the Rust side's defaults, and a test
-- holds them equal. This file holds every function's current body (they are all made here).
--
-- How the functions are safe to call from any service's session:
-- - Each pins `search_path` (pg_catalog, ackloop, then pg_temp last) and names ackloop's tables
--   with their schema, so a caller's own `users`, `players` or functions of the same names, in
--   whatever schema comes first in its search_path, are never used in their place.
-- - The steps run with the privileges of ackloop's owner (`security definer`): a service's role
--   needs EXECUTE on its side's functions (sql/roles.sql) and no right on ackloop's tables, so it
--   can do exactly what the functions allow and nothing more. EXECUTE is revoked from PUBLIC.

-- Grants made on the functions this migration replaces, carried over to the new ones below by
-- name: a role that could call `claim_jobs` before can call it after.
create temporary table kept_function_grants on commit drop as
select procs.proname::text as function_name, grants.grantee::regrole::text as grantee
from pg_proc as procs
cross join lateral aclexplode(procs.proacl) as grants
where procs.pronamespace = 'ackloop'::regnamespace
  and grants.privilege_type = 'EXECUTE'
  and grants.grantee <> 0
  and grants.grantee <> procs.proowner;

-- A deployment that never ran sql/roles.sql called the functions through PUBLIC's EXECUTE, its
-- roles holding rights on the tables instead (the functions ran with the caller's privileges).
-- EXECUTE is no longer PUBLIC's: a role that could write the users table (the auth side) gets the
-- auth side's functions, one that could update the job table (the worker) the worker's.
insert into kept_function_grants (function_name, grantee)
select functions.name, writers.grantee
from (
    select grants.grantee::regrole::text as grantee, 'auth' as side
    from pg_class as tables
    cross join lateral aclexplode(tables.relacl) as grants
    where tables.oid = 'ackloop.builtin_users'::regclass and grants.privilege_type = 'INSERT'
      and grants.grantee not in (0, tables.relowner)
    union
    select grants.grantee::regrole::text, 'auth'
    from pg_attribute as columns
    cross join lateral aclexplode(columns.attacl) as grants
    where columns.attrelid = 'ackloop.builtin_users'::regclass and grants.privilege_type = 'INSERT'
      and grants.grantee <> 0
    union
    select grants.grantee::regrole::text, 'worker'
    from pg_class as tables
    cross join lateral aclexplode(tables.relacl) as grants
    where tables.oid = 'ackloop.player_creation_jobs'::regclass and grants.privilege_type = 'UPDATE'
      and grants.grantee not in (0, tables.relowner)
    union
    select grants.grantee::regrole::text, 'worker'
    from pg_attribute as columns
    cross join lateral aclexplode(columns.attacl) as grants
    where columns.attrelid = 'ackloop.player_creation_jobs'::regclass and grants.privilege_type = 'UPDATE'
      and grants.grantee <> 0
) as writers
join (values
    ('auth', 'sign_up'), ('auth', 'sign_up_many'), ('auth', 'job_outcomes'), ('auth', 'uuid_v7'),
    ('worker', 'complete_jobs'), ('worker', 'claim_jobs'), ('worker', 'mark_done'),
    ('worker', 'record_failure'), ('worker', 'start_attempt'), ('worker', 'lock_attempt'),
    ('worker', 'give_back_attempt'), ('worker', 'note_unfinished_attempt'), ('worker', 'backoff_ms'),
    ('worker', 'unfinished_attempt_error')
) as functions (side, name) on functions.side = writers.side
where exists (
    select from pg_proc as procs
    where procs.pronamespace = 'ackloop'::regnamespace
      and procs.proname = functions.name
      and (procs.proacl is null
           or exists (select from aclexplode(procs.proacl) as open where open.grantee = 0))
);

-- Everything but the input rules, which the tables' check constraints call (made earlier).
do $$
declare
    old regprocedure;
begin
    for old in
        select procs.oid::regprocedure
        from pg_proc as procs
        where procs.pronamespace = 'ackloop'::regnamespace
          and procs.proname not in ('email_problem', 'display_name_problem', 'user_id_problem', 'json_object_problem')
    loop
        execute format('drop function %s', old);
    end loop;
end
$$;

-- A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits, so ids made at once sort
-- together and index well. PostgreSQL 15 has no generator of its own.
create function ackloop.uuid_v7() returns uuid
language sql volatile parallel safe
set search_path = pg_catalog, ackloop, pg_temp
as $$
    select encode(
        set_bit(
            set_bit(
                overlay(
                    uuid_send(gen_random_uuid())
                    placing substring(int8send(floor(extract(epoch from clock_timestamp()) * 1000)::bigint) from 3)
                    from 1 for 6
                ),
                52, 1
            ),
            53, 1
        ),
        'hex'
    )::uuid
$$;

-- ───────────────────────────── the auth side ─────────────────────────────

-- Adds a player-creation job for a user of the caller's own service, inside the caller's
-- transaction: commit it with the user, and the job (with its wake-up on `jobs_channel`) exists
-- exactly when the user does. `user_id` is the service's own key (a bigint, uuid or text, as
-- text); `extra` is optional data for the player service (a JSON object up to 8 KiB). Returns the
-- job id: `new_job_id`, or a new UUIDv7.
-- Input a rule refuses raises 23514 naming the constraint (player_creation_jobs_user_id_valid,
-- …_display_name_valid, …_extra_valid) with the rule in the message. `new_job_id` is the
-- caller's idempotency key: given again with the same user, name and extra, it returns the same
-- job and writes nothing; with anything else, 23505 on player_creation_jobs_pkey. A user that
-- already has a job (another key, or none): 23505 on player_creation_jobs_user_id_key.
-- `lock_wait_ms` bounds waits for row locks (another session's uncommitted job for the same
-- user) for the rest of the transaction; null leaves the session's setting.
create function ackloop.add_job(
    user_id text,
    display_name text,
    extra jsonb default null,
    new_job_id uuid default null,
    jobs_channel text default 'player_jobs',
    lock_wait_ms integer default null
) returns uuid
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
#variable_conflict use_column
declare
    problem text;
    added uuid;
    earlier record;
begin
    problem := ackloop.user_id_problem(add_job.user_id);
    if problem is not null then
        raise exception 'invalid user id: %', problem
            using errcode = 'check_violation', constraint = 'player_creation_jobs_user_id_valid',
                  column = 'user_id', table = 'player_creation_jobs', schema = 'ackloop';
    end if;
    problem := ackloop.display_name_problem(add_job.display_name);
    if problem is not null then
        raise exception 'invalid display name: %', problem
            using errcode = 'check_violation', constraint = 'player_creation_jobs_display_name_valid',
                  column = 'display_name', table = 'player_creation_jobs', schema = 'ackloop';
    end if;
    problem := ackloop.json_object_problem(add_job.extra);
    if problem is not null then
        raise exception 'invalid extra data: %', problem
            using errcode = 'check_violation', constraint = 'player_creation_jobs_extra_valid',
                  column = 'extra', table = 'player_creation_jobs', schema = 'ackloop';
    end if;
    -- greatest() skips nulls: test for null first, or no limit would become 1 ms.
    if lock_wait_ms is not null then
        perform set_config('lock_timeout', greatest(lock_wait_ms, 1) || 'ms', true);
    end if;
    insert into ackloop.player_creation_jobs (id, user_id, display_name, extra, created_at)
    values (coalesce(new_job_id, ackloop.uuid_v7()), add_job.user_id, add_job.display_name,
            add_job.extra, clock_timestamp())
    on conflict do nothing
    returning player_creation_jobs.id into added;
    if added is not null then
        perform pg_notify(jobs_channel, added::text);
        return added;
    end if;
    -- The id or the user is taken. By this very job, if its id was given and is there (a new
    -- statement, so it sees a job that committed while the insert waited for it).
    if new_job_id is not null then
        select jobs.id, jobs.user_id, jobs.display_name, jobs.extra
        into earlier
        from ackloop.player_creation_jobs as jobs
        where jobs.id = new_job_id;
        if found then
            if earlier.user_id is distinct from add_job.user_id
                or earlier.display_name is distinct from add_job.display_name
                or earlier.extra is distinct from add_job.extra then
                raise exception 'job id % belongs to a job with another user, display name or extra data', new_job_id
                    using errcode = 'unique_violation', constraint = 'player_creation_jobs_pkey',
                          table = 'player_creation_jobs', schema = 'ackloop';
            end if;
            return earlier.id;
        end if;
    end if;
    -- The user's job, whose id the caller can wait on instead (the detail carries it).
    select jobs.id into added
    from ackloop.player_creation_jobs as jobs
    where jobs.user_id = add_job.user_id
      and jobs.builtin_user_id is null;
    raise exception 'user % already has a player-creation job', add_job.user_id
        using errcode = 'unique_violation', constraint = 'player_creation_jobs_user_id_key',
              table = 'player_creation_jobs', schema = 'ackloop', detail = coalesce(added::text, '');
end
$$;

-- The built-in auth service (its users in ackloop.builtin_users): signs one user up. Checks the
-- input (23514, the constraint named after the field, the rule in the message), inserts the user
-- and the job, and notifies `jobs_channel` with the job id (`new_job_id`, or a new UUIDv7), all
-- committed with the caller's transaction. An email taken, ignoring case, raises 23505 on
-- builtin_users_email_key, unless it was taken by this very signup: the same job id, email and
-- display name return that signup and write nothing (the job id is the idempotency key; with
-- another email or name, 23505 on player_creation_jobs_pkey). `lock_wait_ms` as in add_job.
create function ackloop.sign_up(
    email text,
    display_name text,
    new_job_id uuid default null,
    jobs_channel text default 'player_jobs',
    lock_wait_ms integer default null
) returns table (job_id uuid, user_id bigint)
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
#variable_conflict use_column
declare
    problem text;
    earlier record;
begin
    problem := ackloop.email_problem(sign_up.email);
    if problem is not null then
        raise exception 'invalid email: %', problem
            using errcode = 'check_violation', constraint = 'builtin_users_email_valid', column = 'email',
                  table = 'builtin_users', schema = 'ackloop';
    end if;
    problem := ackloop.display_name_problem(sign_up.display_name);
    if problem is not null then
        raise exception 'invalid display name: %', problem
            using errcode = 'check_violation', constraint = 'builtin_users_display_name_valid',
                  column = 'display_name', table = 'builtin_users', schema = 'ackloop';
    end if;
    -- One statement on the way that writes: each statement a function runs costs about as much
    -- as the rules above.
    return query
    with limits as (
        select set_config(
            'lock_timeout',
            -- greatest() skips nulls: test for null first, or no limit would become 1 ms.
            case when lock_wait_ms is null then current_setting('lock_timeout') else greatest(lock_wait_ms, 1) || 'ms' end,
            true
        )
    ),
    new_user as (
        -- A taken email inserts nothing (after waiting, within the lock limit, for a signup of
        -- the same email still in flight): then the job id tells whose it is, below.
        insert into ackloop.builtin_users (email, display_name)
        select sign_up.email, sign_up.display_name
        from limits
        on conflict ((lower(email))) do nothing
        returning builtin_users.id
    ),
    new_job as (
        -- Stamped now, not at the transaction's start (the column's default): in autocommit the
        -- commit follows at once, so the wait a worker measures starts near the commit.
        insert into ackloop.player_creation_jobs (id, builtin_user_id, user_id, display_name, created_at)
        select coalesce(new_job_id, ackloop.uuid_v7()), new_user.id, new_user.id::text,
               sign_up.display_name, clock_timestamp()
        from new_user
        returning player_creation_jobs.id, player_creation_jobs.builtin_user_id
    )
    select new_job.id, new_job.builtin_user_id
    from new_job
    cross join lateral pg_notify(jobs_channel, new_job.id::text) as notified;
    if found then
        return;
    end if;
    -- The email is taken. By this very signup, if its job id was given and is there: a new
    -- statement, so it sees a signup that committed while the insert waited for it.
    if new_job_id is not null then
        select jobs.id, jobs.builtin_user_id, users.email, users.display_name
        into earlier
        from ackloop.player_creation_jobs as jobs
        join ackloop.builtin_users as users on users.id = jobs.builtin_user_id
        where jobs.id = new_job_id;
    end if;
    if earlier is null then
        raise exception 'duplicate key value violates unique constraint "builtin_users_email_key"'
            using errcode = 'unique_violation', constraint = 'builtin_users_email_key',
                  table = 'builtin_users', schema = 'ackloop';
    end if;
    if earlier.email is distinct from sign_up.email
        or earlier.display_name is distinct from sign_up.display_name then
        raise exception 'job id % belongs to a signup with another email or display name', new_job_id
            using errcode = 'unique_violation', constraint = 'player_creation_jobs_pkey',
                  table = 'player_creation_jobs', schema = 'ackloop';
    end if;
    -- This very signup, written before: its job, as it was returned then (nothing is notified
    -- again; a worker has it or will find it).
    return query select earlier.id, earlier.builtin_user_id;
end
$$;

-- The built-in auth service: signs many users up in one statement (one commit, one fsync, one
-- hold of the notify lock), each exactly as sign_up would. A signup whose email is taken (by an
-- existing user, or earlier in the same call, ignoring case) is skipped: the one missing from
-- the result. A null job id gets a new UUIDv7; each row gives its entry's email, as given, to
-- match rows to entries. Input a rule refuses fails the whole call (23514, the check constraint
-- named) and writes nothing: check it first.
create function ackloop.sign_up_many(
    emails text[],
    display_names text[],
    job_ids uuid[],
    jobs_channel text default 'player_jobs',
    lock_wait_ms integer default null
) returns table (job_id uuid, user_id bigint, email text)
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
#variable_conflict use_column
begin
    if cardinality(emails) is distinct from cardinality(display_names)
        or cardinality(emails) is distinct from cardinality(job_ids) then
        raise exception 'sign_up_many needs as many display names and job ids as emails'
            using errcode = 'invalid_parameter_value';
    end if;
    return query
    with limits as (
        select set_config(
            'lock_timeout',
            -- greatest() skips nulls: test for null first, or no limit would become 1 ms.
            case when lock_wait_ms is null then current_setting('lock_timeout') else greatest(lock_wait_ms, 1) || 'ms' end,
            true
        )
    ),
    input as (
        select *
        from unnest(emails, display_names, job_ids)
            with ordinality as input (email, display_name, job_id, position)
    ),
    new_users as (
        insert into ackloop.builtin_users (email, display_name)
        select input.email, input.display_name
        from input, limits
        order by input.position
        on conflict ((lower(email))) do nothing
        returning builtin_users.id, builtin_users.email, builtin_users.display_name
    ),
    new_jobs as (
        insert into ackloop.player_creation_jobs (id, builtin_user_id, user_id, display_name, created_at)
        -- Identical emails in one call: the first was inserted, the rest skipped.
        select distinct on (new_users.id)
            coalesce(input.job_id, ackloop.uuid_v7()), new_users.id, new_users.id::text,
            new_users.display_name, clock_timestamp()
        from new_users
        join input on input.email = new_users.email
        order by new_users.id, input.position
        returning player_creation_jobs.id, player_creation_jobs.builtin_user_id
    )
    select new_jobs.id, new_jobs.builtin_user_id, new_users.email
    from new_jobs
    join new_users on new_users.id = new_jobs.builtin_user_id
    cross join lateral pg_notify(jobs_channel, new_jobs.id::text) as notified;
end
$$;

-- Each of `job_ids` that exists, as ackloop's job table tells it, with the player service's
-- answer when it is done (ids of no job are absent: not committed, or pruned). `player_id` and
-- `result` are what the player service's handler returned (for the built-in tables: the
-- built-in player's id, display name and creation time). `since_done_secs`: seconds since the
-- job finished, by the server's clock.
create function ackloop.job_outcomes(job_ids uuid[])
returns table (
    job_id uuid,
    user_id text,
    status text,
    last_error text,
    player_id text,
    result jsonb,
    since_done_secs double precision
)
language plpgsql stable security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    return query
    select
        jobs.id,
        jobs.user_id,
        jobs.status,
        jobs.last_error,
        jobs.player_id,
        jobs.result,
        extract(epoch from clock_timestamp() - jobs.completed_at)::float8
    from ackloop.player_creation_jobs as jobs
    where jobs.id = any(job_ids);
end
$$;

-- ──────────────────────────── the player side ────────────────────────────

-- Sets, for the rest of the caller's transaction, the limits that let the server release the
-- jobs of a worker that hangs or dies: idle in the transaction for over 10 s loses the session
-- (and its locks), a client gone while a statement runs is noticed within 1 s, and a lock wait
-- over 2 s fails a statement (55P03).
create function ackloop.limit_claim_session() returns void
language sql volatile
set search_path = pg_catalog, ackloop, pg_temp
as $$
    select set_config('idle_in_transaction_session_timeout', '10s', true),
           set_config('client_connection_check_interval', '1s', true),
           set_config('lock_timeout', '2s', true)
$$;

-- The built-in player service in one statement: claims up to `batch_size` due signups of the
-- built-in tables never tried before (skipping any another worker holds; a service's jobs are
-- its own worker's), creates their players in ackloop.builtin_players,
-- marks them done with the player as their answer and notifies each id on `done_channel`. Any
-- failure fails the whole call and leaves every job as it was, its attempt uncounted: then take
-- the jobs one by one with claim_jobs(builtin_signups => true). A lock wait over 2 s fails it
-- (55P03).
create function ackloop.complete_jobs(
    batch_size integer default 32,
    done_channel text default 'player_jobs_done'
) returns table (job_id uuid, waited_secs double precision)
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform set_config('lock_timeout', '2s', true);
    return query
    with claimed as (
        select jobs.id, jobs.builtin_user_id, jobs.display_name
        from ackloop.player_creation_jobs as jobs
        where jobs.status = 'pending'
          and jobs.run_after <= now()
          and jobs.attempts = 0
          and jobs.builtin_user_id is not null
        order by jobs.run_after, jobs.id
        limit batch_size
        for update skip locked
    ),
    new_players as (
        insert into ackloop.builtin_players (user_id, display_name)
        select claimed.builtin_user_id, claimed.display_name
        from claimed
        on conflict (user_id) do nothing
        returning builtin_players.id, builtin_players.user_id, builtin_players.display_name,
                  builtin_players.created_at
    ),
    completed as (
        update ackloop.player_creation_jobs as jobs
        set status = 'done',
            attempts = jobs.attempts + 1,
            last_error = null,
            updated_at = now(),
            completed_at = now(),
            -- A job whose user has a player already (made by hand) gets none here: null, which
            -- the table's check refuses, failing the batch; one at a time,
            -- insert_builtin_player answers with the player that exists.
            player_id = new_players.id::text,
            result = jsonb_build_object('display_name', new_players.display_name, 'created_at', new_players.created_at)
        from claimed
        left join new_players on new_players.user_id = claimed.builtin_user_id
        where jobs.id = claimed.id
        returning jobs.id, extract(epoch from now() - jobs.created_at)::float8 as waited_secs
    )
    select completed.id, completed.waited_secs
    from completed
    cross join lateral pg_notify(done_channel, completed.id::text) as notified;
end
$$;

-- Locks up to `batch_size` due jobs never tried before for the caller's transaction (skipping
-- any another worker holds), with what a handler needs: jobs services added (add_job), or with
-- `builtin_signups` the built-in tables' signups (sign_up), so that each kind goes to the worker
-- whose handler serves it; `attempt` is the number of the attempt
-- now being made. Call it first in a transaction; finish each job with mark_done or
-- record_failure before committing. Sets limit_claim_session's limits: a worker that hangs or
-- dies in the transaction gives its jobs back within about 10 s (a statement that keeps running
-- keeps them until it ends or the server notices the client is gone).
create function ackloop.claim_jobs(batch_size integer default 32, builtin_signups boolean default false)
returns table (
    job_id uuid,
    user_id text,
    display_name text,
    extra jsonb,
    attempt integer,
    waited_secs double precision
)
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    return query
    with claimed as (
        select jobs.id, jobs.user_id, jobs.display_name, jobs.extra, jobs.attempts, jobs.created_at
        from ackloop.player_creation_jobs as jobs
        where jobs.status = 'pending'
          and jobs.run_after <= now()
          and jobs.attempts = 0
          and (jobs.builtin_user_id is not null) = builtin_signups
        order by jobs.run_after, jobs.id
        limit batch_size
        for update skip locked
    )
    select
        claimed.id,
        claimed.user_id,
        claimed.display_name,
        claimed.extra,
        claimed.attempts + 1,
        extract(epoch from now() - claimed.created_at)::float8
    from claimed
    order by claimed.id;
end
$$;

-- The built-in player service's handler: creates the player of a claimed job's built-in user in
-- ackloop.builtin_players (one that exists is kept) and returns it, for mark_done. A job added by
-- a service (add_job) has no built-in user: 22023, and the job fails (run that service's
-- handler instead).
create function ackloop.insert_builtin_player(job_id uuid)
returns table (player_id bigint, display_name text, created_at timestamptz)
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
#variable_conflict use_column
declare
    job record;
begin
    select jobs.builtin_user_id, jobs.display_name
    into job
    from ackloop.player_creation_jobs as jobs
    where jobs.id = insert_builtin_player.job_id;
    if not found then
        raise exception 'no job %', insert_builtin_player.job_id using errcode = 'invalid_parameter_value';
    end if;
    if job.builtin_user_id is null then
        raise exception 'job % was added by a service (add_job), not signed up on the built-in tables',
                insert_builtin_player.job_id
            using errcode = 'invalid_parameter_value',
                  hint = 'run a worker with that service''s own handler';
    end if;
    insert into ackloop.builtin_players (user_id, display_name)
    values (job.builtin_user_id, job.display_name)
    on conflict (user_id) do nothing;
    return query
    select players.id, players.display_name, players.created_at
    from ackloop.builtin_players as players
    where players.user_id = job.builtin_user_id;
end
$$;

-- Marks claimed jobs done, each with the attempt that did it (claim_jobs' `attempt`) and the
-- player service's answer: its player id (never null: a handler that created no player has not
-- done its job) and a result (a JSON object up to 8 KiB; null stores {}); and notifies each id
-- on `done_channel` (delivered at commit). Returns the ids marked: a job no longer pending
-- (finished by an operator) is left as it is and not returned.
create function ackloop.mark_done(
    job_ids uuid[],
    attempts integer[],
    player_ids text[],
    results jsonb[],
    done_channel text default 'player_jobs_done'
) returns setof uuid
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
declare
    missing uuid;
    problem text;
begin
    if cardinality(job_ids) is distinct from cardinality(mark_done.attempts)
        or cardinality(job_ids) is distinct from cardinality(player_ids)
        or cardinality(job_ids) is distinct from cardinality(results) then
        raise exception 'mark_done needs one attempt, player id and result per job id'
            using errcode = 'invalid_parameter_value';
    end if;
    select done.id, coalesce(ackloop.user_id_problem(done.player_id), ackloop.json_object_problem(done.result))
    into missing, problem
    from unnest(job_ids, player_ids, results) as done (id, player_id, result)
    where ackloop.user_id_problem(done.player_id) is not null
       or ackloop.json_object_problem(done.result) is not null
    limit 1;
    if found then
        raise exception 'the answer for job % is not valid: player id or result %', missing, problem
            using errcode = 'check_violation', constraint = 'player_creation_jobs_done_has_player',
                  table = 'player_creation_jobs', schema = 'ackloop';
    end if;
    return query
    with completed as (
        update ackloop.player_creation_jobs as jobs
        set status = 'done',
            attempts = done.attempt,
            last_error = null,
            updated_at = now(),
            completed_at = now(),
            player_id = done.player_id,
            result = coalesce(done.result, '{}'::jsonb)
        from unnest(job_ids, mark_done.attempts, player_ids, results) as done (id, attempt, player_id, result)
        where jobs.id = done.id
          and jobs.status = 'pending'
        returning jobs.id
    )
    select completed.id
    from completed
    cross join lateral pg_notify(done_channel, completed.id::text) as notified;
end
$$;

-- The wait before the next attempt after `failed_attempts` failed: base, doubling, at most max.
create function ackloop.backoff_ms(
    failed_attempts integer,
    backoff_base_ms bigint default 1000,
    backoff_max_ms bigint default 300000
) returns bigint
language sql immutable parallel safe
set search_path = pg_catalog, ackloop, pg_temp
as $$
    select least(
        backoff_max_ms::numeric,
        backoff_base_ms::numeric * power(2::numeric, least(greatest(failed_attempts - 1, 0), 31))
    )::bigint
$$;

-- Records that attempt `attempt` of a claimed job failed with `error` (kept to 2,000
-- characters). Not `retryable`, or the last of `max_attempts`: the job is failed and its id
-- notified on `done_channel`, so a waiting caller hears at once. Otherwise it is pending again,
-- not due before the backoff. `counted` false gives the attempt back (it never ran: it waited for
-- a lock another session holds), so it does not bring the job closer to failing. Returns the
-- job's status after the call and, when pending, the milliseconds until it is due; no row when
-- the job is not pending (finished by an operator meanwhile), which is left as it is.
create function ackloop.record_failure(
    job_id uuid,
    attempt integer,
    error text,
    retryable boolean default true,
    done_channel text default 'player_jobs_done',
    max_attempts integer default 5,
    backoff_base_ms bigint default 1000,
    backoff_max_ms bigint default 300000,
    counted boolean default true
) returns table (status text, retry_in_ms bigint)
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
#variable_conflict use_column
declare
    made integer := case when counted then attempt else attempt - 1 end;
    reason text := left(error, 2000);
    delay bigint := ackloop.backoff_ms(attempt, backoff_base_ms, backoff_max_ms);
begin
    if counted and (not retryable or attempt >= max_attempts) then
        update ackloop.player_creation_jobs
        set status = 'failed', attempts = made, last_error = reason,
            updated_at = now(), completed_at = now()
        where id = record_failure.job_id and status = 'pending';
        if found then
            perform pg_notify(done_channel, record_failure.job_id::text);
            return query select 'failed'::text, null::bigint;
        end if;
    else
        update ackloop.player_creation_jobs
        set attempts = made, last_error = reason,
            run_after = now() + make_interval(secs => delay / 1000.0),
            updated_at = now()
        where id = record_failure.job_id and status = 'pending';
        if found then
            return query select 'pending'::text, delay;
        end if;
    end if;
end
$$;

-- The text a started attempt leaves as the job's error until it records its outcome: what the
-- job shows if its session ends before it does.
create function ackloop.unfinished_attempt_error(attempt integer) returns text
language sql immutable parallel safe
set search_path = pg_catalog, ackloop, pg_temp
as $$
    select 'attempt ' || attempt || ' did not finish: its database session ended (a crash or '
        || 'terminated backend, an out-of-memory kill, or the worker stopped), unless it is running now'
$$;

-- Seconds until the next job tried before (of the kind claim_jobs' `builtin_signups` names) is
-- due (negative if one is due now but held by another worker), or null when none is pending: how long a worker that takes retries one at
-- a time may sleep.
create function ackloop.next_retry_due_in_secs(builtin_signups boolean default false)
returns double precision
language sql stable security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
    select extract(epoch from min(jobs.run_after) - now())::float8
    from ackloop.player_creation_jobs as jobs
    where jobs.status = 'pending'
      and jobs.attempts > 0
      and (jobs.builtin_user_id is not null) = builtin_signups
$$;

-- How many jobs are pending and how long the oldest has waited, for the queue gauges a worker
-- samples every few seconds (`ackloop_jobs_pending`, `ackloop_oldest_pending_seconds`). Reads
-- only pending rows, through the pending index: it must not grow with the finished jobs kept.
create function ackloop.pending_jobs()
returns table (pending bigint, oldest_pending_secs double precision)
language sql stable security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
    select count(*), extract(epoch from now() - min(jobs.created_at))::float8
    from ackloop.player_creation_jobs as jobs
    where jobs.status = 'pending'
$$;

-- Starts an attempt of the next due job tried before (`any_job`: of any due job) of the kind
-- `builtin_signups` names (as in claim_jobs), for a worker
-- that takes such jobs one at a time, as a job that killed its session must be: locks it
-- (skipping any another worker holds), counts the attempt, and leaves the job as it should be
-- found if the attempt never finishes (`unfinished_attempt_error` as its error, not due again
-- before the backoff after this attempt, and at least 1 s: `lease_ms`). Call it alone in its
-- transaction and commit before making the attempt, so the count survives a job that kills its
-- session; then make the attempt in a new transaction that begins with lock_attempt. A job
-- whose `max_attempts` are used up is failed instead (its id notified on `done_channel`):
-- status 'gave_up'. Otherwise status 'started', with `attempt` the attempt now counted and
-- `last_error` what the job showed before. No row: nothing is due.
create function ackloop.start_attempt(
    max_attempts integer default 5,
    backoff_base_ms bigint default 1000,
    backoff_max_ms bigint default 300000,
    done_channel text default 'player_jobs_done',
    any_job boolean default false,
    builtin_signups boolean default false
) returns table (
    status text,
    job_id uuid,
    user_id text,
    display_name text,
    extra jsonb,
    attempt integer,
    waited_secs double precision,
    last_error text,
    lease_ms bigint
)
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
#variable_conflict use_column
declare
    job record;
    reason text;
    lease bigint;
begin
    perform set_config('lock_timeout', '2s', true);
    -- Two statements, so that looking for retries stays on their own small index.
    if any_job then
        select jobs.id, jobs.user_id, jobs.display_name, jobs.extra, jobs.attempts, jobs.last_error,
               extract(epoch from now() - jobs.created_at)::float8 as waited
        into job
        from ackloop.player_creation_jobs as jobs
        where jobs.status = 'pending' and jobs.run_after <= now()
          and (jobs.builtin_user_id is not null) = builtin_signups
        order by jobs.run_after, jobs.id
        limit 1
        for update skip locked;
    else
        select jobs.id, jobs.user_id, jobs.display_name, jobs.extra, jobs.attempts, jobs.last_error,
               extract(epoch from now() - jobs.created_at)::float8 as waited
        into job
        from ackloop.player_creation_jobs as jobs
        where jobs.status = 'pending' and jobs.attempts > 0 and jobs.run_after <= now()
          and (jobs.builtin_user_id is not null) = builtin_signups
        order by jobs.run_after, jobs.id
        limit 1
        for update skip locked;
    end if;
    if not found then
        return;
    end if;
    if job.attempts >= max_attempts then
        -- Its last attempt never recorded an outcome: it ended with its session.
        reason := left(
            'gave up after ' || job.attempts || ' attempts' || coalesce('; ' || job.last_error, ''),
            2000
        );
        update ackloop.player_creation_jobs
        set status = 'failed', last_error = reason, updated_at = now(), completed_at = now()
        where id = job.id;
        perform pg_notify(done_channel, job.id::text);
        return query select 'gave_up'::text, job.id, job.user_id, job.display_name, job.extra,
            job.attempts, job.waited, reason, null::bigint;
        return;
    end if;
    lease := greatest(ackloop.backoff_ms(job.attempts + 1, backoff_base_ms, backoff_max_ms), 1000);
    update ackloop.player_creation_jobs
    set attempts = job.attempts + 1,
        last_error = ackloop.unfinished_attempt_error(job.attempts + 1),
        run_after = now() + make_interval(secs => lease / 1000.0),
        updated_at = now()
    where id = job.id;
    return query select 'started'::text, job.id, job.user_id, job.display_name, job.extra,
        job.attempts + 1, job.waited, job.last_error, lease;
end
$$;

-- Locks, for the caller's transaction, the job whose attempt `attempt` start_attempt counted:
-- false when the job has changed since (an operator finished or retried it, or its lease ran out
-- and another worker took it), and the attempt must not be made. Sets limit_claim_session's
-- limits for the rest of the transaction. Then: the effect, and mark_done or record_failure.
create function ackloop.lock_attempt(job_id uuid, attempt integer) returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    perform
    from ackloop.player_creation_jobs as jobs
    where jobs.id = lock_attempt.job_id
      and jobs.status = 'pending'
      and jobs.attempts = lock_attempt.attempt
    for update;
    return found;
end
$$;

-- Gives back attempt `attempt` that start_attempt counted but that never ran: it waited too long
-- for a lock another session holds (55P03), which is not the job's fault. Only if the job is as
-- that attempt left it (another worker may have taken it since its lease ran out): returns
-- whether it was given back. The job shows `error` and is due again after the backoff for
-- `attempt`. Call it in its own transaction, after the attempt's rolled back.
create function ackloop.give_back_attempt(
    job_id uuid,
    attempt integer,
    error text,
    backoff_base_ms bigint default 1000,
    backoff_max_ms bigint default 300000
) returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    update ackloop.player_creation_jobs as jobs
    set attempts = jobs.attempts - 1,
        last_error = left(error, 2000),
        run_after = now() + make_interval(
            secs => ackloop.backoff_ms(give_back_attempt.attempt, backoff_base_ms, backoff_max_ms) / 1000.0
        ),
        updated_at = now()
    where jobs.id = give_back_attempt.job_id
      and jobs.status = 'pending'
      and jobs.attempts = give_back_attempt.attempt;
    return found;
end
$$;

-- Replaces the error start_attempt left on attempt `attempt` with what ended it, when it ended
-- with an error its session survived and could not record with record_failure (its transaction
-- was lost, say); only if the job is as that attempt left it. The attempt stays counted.
create function ackloop.note_unfinished_attempt(job_id uuid, attempt integer, error text)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    update ackloop.player_creation_jobs as jobs
    set last_error = left(error, 2000),
        updated_at = now()
    where jobs.id = note_unfinished_attempt.job_id
      and jobs.status = 'pending'
      and jobs.attempts = note_unfinished_attempt.attempt;
    return found;
end
$$;

-- Only the roles granted a side's functions may call them (they run as ackloop's owner); and a
-- function a later migration makes starts closed too.
revoke execute on all functions in schema ackloop from public;
alter default privileges in schema ackloop revoke execute on functions from public;

-- The grants kept from the functions replaced, and for the new functions the grants of their
-- side: add_job goes with sign_up; insert_builtin_player, next_retry_due_in_secs and
-- pending_jobs with claim_jobs; limit_claim_session is called from inside the others only.
do $$
declare
    kept record;
begin
    for kept in
        select distinct grants.grantee, names.function_name
        from kept_function_grants as grants
        join (values
            ('uuid_v7', 'uuid_v7'), ('backoff_ms', 'backoff_ms'),
            ('unfinished_attempt_error', 'unfinished_attempt_error'),
            ('sign_up', 'sign_up'), ('sign_up_many', 'sign_up_many'),
            ('job_outcomes', 'job_outcomes'), ('sign_up', 'add_job'),
            ('complete_jobs', 'complete_jobs'), ('claim_jobs', 'claim_jobs'),
            ('mark_done', 'mark_done'), ('record_failure', 'record_failure'),
            ('start_attempt', 'start_attempt'), ('lock_attempt', 'lock_attempt'),
            ('give_back_attempt', 'give_back_attempt'),
            ('note_unfinished_attempt', 'note_unfinished_attempt'),
            ('claim_jobs', 'insert_builtin_player'), ('claim_jobs', 'next_retry_due_in_secs'),
            ('claim_jobs', 'pending_jobs')
        ) as names (kept_from, function_name) on names.kept_from = grants.function_name
    loop
        execute format('grant execute on function ackloop.%I to %s', kept.function_name, kept.grantee);
    end loop;
end
$$;

-- The roles sql/roles.sql made held rights on ackloop's tables, which the steps needed when they
-- ran with the caller's privileges. They run as ackloop's owner now: those rights go, so either
-- side can do through the tables no more than its functions allow. Every other role loses its
-- rights to write the tables too (only the functions write them, under their rules); what it may
-- read (an operator's read-only role, say) it keeps.
do $$
declare
    side text;
    writer text;
begin
    for side in select rolname from pg_roles where rolname in ('ackloop_auth', 'ackloop_worker') loop
        execute format('revoke all on all tables in schema ackloop from %I', side);
        execute format('revoke all on all sequences in schema ackloop from %I', side);
        -- Each side checks the schema's version before it starts.
        execute format('grant select on ackloop.applied_migrations to %I', side);
    end loop;
    for writer in
        select distinct grants.grantee::regrole::text
        from pg_class as tables
        cross join lateral aclexplode(tables.relacl) as grants
        where tables.relnamespace = 'ackloop'::regnamespace and tables.relkind = 'r'
          and grants.privilege_type in ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
          and grants.grantee not in (0, tables.relowner)
        union
        select distinct grants.grantee::regrole::text
        from pg_attribute as columns
        join pg_class as tables on tables.oid = columns.attrelid
        cross join lateral aclexplode(columns.attacl) as grants
        where tables.relnamespace = 'ackloop'::regnamespace
          and grants.privilege_type in ('INSERT', 'UPDATE')
          and grants.grantee <> 0
    loop
        execute format('revoke insert, update, delete, truncate on all tables in schema ackloop from %s', writer);
    end loop;
    revoke insert, update, delete, truncate on all tables in schema ackloop from public;
end
$$;

insert into ackloop.applied_migrations (version, description)
values (20261207000003, 'contract');
