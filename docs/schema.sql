-- The `ackloop` schema as migrations/ leaves it: GENERATED, DO NOT EDIT.
--
-- migrations/ is the source of truth (forward-only, applied by `ackloop migrate`). This file is
-- for reading the contract as it is now, each function with its current body, rather than as a
-- history of migrations; it is not meant to be run.
--
-- Regenerate it after adding a migration:   make schema
--   (that is: ACKLOOP_BLESS_SCHEMA=1 cargo test --features cli --test it -- schema_dump)
-- The test in tests/it/schema_dump/ fails while this file differs from what the migrations make.
--
-- Left out, as they differ from one machine or run to another: OIDs, owners, rows (the rows of
-- ackloop.applied_migrations too), sqlx's own record ackloop._sqlx_migrations (made by sqlx, not
-- by the migrations), and grants to named roles: ackloop_auth and ackloop_worker are made by
-- sql/roles.sql, not by the migrations, and exist on one server and not on another (the
-- migrations grant them `select` on ackloop.applied_migrations only where they exist). PUBLIC's
-- privileges are listed at the end.
--
-- Function bodies are verbatim from the migrations (`prosrc`), except a body written the
-- SQL-standard way (`return …`, `begin atomic`), which the server keeps parsed: that one is the
-- server's rendering of it.


-- Schema

create schema ackloop;


-- Tables (columns in the order the migrations added them)

create table ackloop.applied_migrations (
    version bigint not null,
    description text not null,
    applied_at timestamp with time zone default now() not null,
    constraint applied_migrations_pkey PRIMARY KEY (version)
);

create table ackloop.builtin_players (
    id bigint generated always as identity not null,
    user_id bigint not null,
    display_name text not null,
    created_at timestamp with time zone default now() not null,
    constraint builtin_players_pkey PRIMARY KEY (id),
    constraint builtin_players_user_id_key UNIQUE (user_id),
    constraint builtin_players_user_id_fkey FOREIGN KEY (user_id) REFERENCES ackloop.builtin_users(id) ON DELETE CASCADE,
    constraint builtin_players_display_name_length CHECK (((char_length(display_name) >= 1) AND (char_length(display_name) <= 64)))
);

create table ackloop.builtin_users (
    id bigint generated always as identity not null,
    email text not null,
    display_name text not null,
    created_at timestamp with time zone default now() not null,
    constraint builtin_users_pkey PRIMARY KEY (id)
);

CREATE UNIQUE INDEX builtin_users_email_key ON ackloop.builtin_users USING btree (ackloop.fold_email(email));

create table ackloop.player_creation_jobs (
    id uuid not null,
    builtin_user_id bigint,
    status text default 'pending'::text not null,
    attempts integer default 0 not null,
    last_error text,
    run_after timestamp with time zone default now() not null,
    created_at timestamp with time zone default now() not null,
    updated_at timestamp with time zone default now() not null,
    completed_at timestamp with time zone,
    user_id text not null,
    display_name text not null,
    extra jsonb,
    player_id text,
    result jsonb,
    attempt_started_at timestamp with time zone,
    constraint player_creation_jobs_pkey PRIMARY KEY (id),
    constraint player_creation_jobs_builtin_user_id_key UNIQUE (builtin_user_id),
    constraint player_creation_jobs_builtin_user_id_fkey FOREIGN KEY (builtin_user_id) REFERENCES ackloop.builtin_users(id) ON DELETE CASCADE,
    constraint player_creation_jobs_attempts_check CHECK ((attempts >= 0)),
    constraint player_creation_jobs_builtin_user_matches CHECK (((builtin_user_id IS NULL) OR (user_id = (builtin_user_id)::text))),
    constraint player_creation_jobs_done_has_player CHECK (((status = 'done'::text) = ((player_id IS NOT NULL) AND (result IS NOT NULL)))),
    constraint player_creation_jobs_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'running'::text, 'done'::text, 'failed'::text]))),
    constraint player_creation_jobs_times_check CHECK ((((status = ANY (ARRAY['done'::text, 'failed'::text])) = (completed_at IS NOT NULL)) AND ((status = 'running'::text) = (attempt_started_at IS NOT NULL))))
);

CREATE INDEX player_creation_jobs_failed_idx ON ackloop.player_creation_jobs USING btree (completed_at) WHERE (status = 'failed'::text);

CREATE INDEX player_creation_jobs_finished_idx ON ackloop.player_creation_jobs USING btree (completed_at) WHERE (status <> 'pending'::text);

CREATE INDEX player_creation_jobs_pending_idx ON ackloop.player_creation_jobs USING btree (run_after, id) WHERE (status = ANY (ARRAY['pending'::text, 'running'::text]));

CREATE INDEX player_creation_jobs_retry_idx ON ackloop.player_creation_jobs USING btree (run_after, id) WHERE ((status = ANY (ARRAY['pending'::text, 'running'::text])) AND (attempts > 0));

CREATE UNIQUE INDEX player_creation_jobs_user_id_key ON ackloop.player_creation_jobs USING btree (user_id) WHERE (builtin_user_id IS NULL);


-- Views

create view ackloop.due_jobs as
 SELECT jobs.id,
    jobs.builtin_user_id,
    jobs.status,
    jobs.attempts,
    jobs.last_error,
    jobs.run_after,
    jobs.created_at,
    jobs.updated_at,
    jobs.completed_at,
    jobs.user_id,
    jobs.display_name,
    jobs.extra,
    jobs.player_id,
    jobs.result,
    jobs.attempt_started_at
   FROM ackloop.player_creation_jobs jobs
  WHERE (jobs.status = ANY (ARRAY['pending'::text, 'running'::text])) AND jobs.run_after <= now();


-- Functions (by name)

create function ackloop.add_job(
    user_id text,
    display_name text,
    extra jsonb DEFAULT NULL::jsonb,
    new_job_id uuid DEFAULT NULL::uuid,
    jobs_channel text DEFAULT 'player_jobs'::text,
    lock_wait_ms integer DEFAULT NULL::integer
)
returns uuid
language plpgsql volatile security definer parallel unsafe
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

create function ackloop.backoff_ms(failed_attempts integer, backoff_base_ms bigint DEFAULT 1000, backoff_max_ms bigint DEFAULT 300000)
returns bigint
language sql immutable parallel safe
set search_path = pg_catalog, ackloop, pg_temp
as $$
    select least(
        backoff_max_ms::numeric,
        backoff_base_ms::numeric * power(2::numeric, least(greatest(failed_attempts - 1, 0), 31))
    )::bigint
$$;

create function ackloop.check_wake_up_channel(channel text)
returns void
language plpgsql stable parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    if channel = '' or octet_length(channel) > 63 then
        raise exception 'invalid wake-up channel "%": 1 to 63 bytes, or null for no wake-up', channel
            using errcode = 'invalid_parameter_value';
    end if;
    -- The wake-up runs as the caller, after the commit: a role that could not send it would be
    -- refused with its signups already written.
    if not has_function_privilege('ackloop.notify_jobs(text, uuid[])', 'execute') then
        raise exception 'permission denied for function notify_jobs'
            using errcode = 'insufficient_privilege',
                  hint = 'grant execute on function ackloop.notify_jobs(text, uuid[]) to the role that signs users up (sql/roles.sql does)';
    end if;
end
$$;

create function ackloop.claim_jobs(batch_size integer DEFAULT 32, builtin_signups boolean DEFAULT false)
returns table (
    job_id uuid,
    user_id text,
    display_name text,
    extra jsonb,
    attempt integer,
    waited_secs double precision
)
language plpgsql volatile security definer parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    return query
    with claimed as (
        select jobs.id, jobs.user_id, jobs.display_name, jobs.extra, jobs.attempts, jobs.created_at
        from ackloop.due_jobs as jobs
        where jobs.attempts = 0
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
    -- One row: the claimed ids noted for mark_done and record_failure.
    cross join (
        select set_config(
            'ackloop.claimed_jobs',
            concat_ws(',', nullif(current_setting('ackloop.claimed_jobs', true), ''), array_to_string(array_agg(claimed.id), ',')),
            true
        )
        from claimed
    ) as noted
    order by claimed.id;
end
$$;

create function ackloop.complete_jobs(batch_size integer DEFAULT 32, done_channel text DEFAULT 'player_jobs_done'::text)
returns table (job_id uuid, waited_secs double precision)
language plpgsql volatile security definer parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    return query
    with claimed as (
        select jobs.id, jobs.builtin_user_id, jobs.display_name
        from ackloop.due_jobs as jobs
        where jobs.attempts = 0
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

create function ackloop.display_name_problem(display_name text)
returns text
language plpgsql immutable parallel safe
as $$
begin
    return case
        when display_name is null or display_name = '' then 'must not be empty'
        when char_length(display_name) > 64 then 'must be at most 64 characters'
        when display_name ~ '^[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$'
            then 'must not be only whitespace'
        when display_name ~ '[\u0001-\u001f\u007f-\u009f]' then 'must not contain control characters'
        when display_name ~ '^[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]|[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]$'
            then 'must not start or end with whitespace'
    end;
end
$$;

create function ackloop.email_problem(email text)
returns text
language plpgsql immutable parallel safe
as $$
begin
    return case
        when email is null or email = '' then 'must not be empty'
        when char_length(email) > 254 then 'must be at most 254 characters'
        when email ~ '[\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]'
            then 'must not contain spaces or control characters'
        when strpos(email, '@') = 0 then 'must contain one ''@'''
        when email ~ '@.*@' then 'must contain only one ''@'''
        when char_length(split_part(email, '@', 1)) not between 1 and 64
            then 'needs 1 to 64 characters before the ''@'''
        when split_part(email, '@', 1) ~ '[<>()\[\]\\,;:"]'
            then 'has a character not allowed before the ''@'''
        when strpos(split_part(email, '@', 2), '.') = 0
            then 'needs a domain with a dot, like example.com'
        -- Labels of ASCII letters, digits and hyphens (not first or last), or any other
        -- character beyond ASCII (internationalised names), separated by single dots.
        when split_part(email, '@', 2) !~ '^([a-zA-Z0-9\u0080-\U0010ffff]([a-zA-Z0-9\u0080-\U0010ffff-]*[a-zA-Z0-9\u0080-\U0010ffff])?\.)+[a-zA-Z0-9\u0080-\U0010ffff]([a-zA-Z0-9\u0080-\U0010ffff-]*[a-zA-Z0-9\u0080-\U0010ffff])?$'
            then 'has an invalid domain'
    end;
end
$$;

create function ackloop.fold_email(email text)
returns text
language sql immutable strict parallel safe
RETURN lower((email COLLATE "und-x-icu"));

create function ackloop.give_back_attempt(
    job_id uuid,
    attempt integer,
    error text,
    backoff_base_ms bigint DEFAULT 1000,
    backoff_max_ms bigint DEFAULT 300000
)
returns boolean
language plpgsql volatile security definer parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    update ackloop.player_creation_jobs as jobs
    set status = 'pending',
        attempts = jobs.attempts - 1,
        attempt_started_at = null,
        last_error = left(error, 2000),
        run_after = now() + make_interval(
            secs => ackloop.backoff_ms(give_back_attempt.attempt, backoff_base_ms, backoff_max_ms) / 1000.0
        ),
        updated_at = now()
    where jobs.id = give_back_attempt.job_id
      and jobs.status = 'running'
      and jobs.attempts = give_back_attempt.attempt;
    return found;
end
$$;

create function ackloop.insert_builtin_player(job_id uuid)
returns table (player_id bigint, display_name text, created_at timestamp with time zone)
language plpgsql volatile security definer parallel unsafe
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

create function ackloop.insert_builtin_players(job_ids uuid[])
returns table (job_id uuid, player_id bigint, display_name text, created_at timestamp with time zone)
language plpgsql volatile security definer parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
#variable_conflict use_column
declare
    stranger uuid;
begin
    select given.id
    into stranger
    from unnest(job_ids) as given (id)
    left join ackloop.player_creation_jobs as jobs on jobs.id = given.id
    where jobs.builtin_user_id is null
    limit 1;
    if found then
        raise exception 'job % is not a signup on the built-in tables (added by a service, or unknown)', stranger
            using errcode = 'invalid_parameter_value',
                  hint = 'run a worker with that service''s own handler';
    end if;
    insert into ackloop.builtin_players (user_id, display_name)
    select jobs.builtin_user_id, jobs.display_name
    from ackloop.player_creation_jobs as jobs
    where jobs.id = any(job_ids)
    -- In the users' order, as complete_jobs' claim order would give them; two batches never
    -- share a user (one job each, and the jobs are locked), so no order can deadlock them.
    order by jobs.builtin_user_id
    on conflict (user_id) do nothing;
    return query
    select jobs.id, players.id, players.display_name, players.created_at
    from unnest(job_ids) with ordinality as given (id, position)
    join ackloop.player_creation_jobs as jobs on jobs.id = given.id
    join ackloop.builtin_players as players on players.user_id = jobs.builtin_user_id
    order by given.position;
end
$$;

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
language plpgsql stable security definer parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    return query
    select
        jobs.id,
        jobs.user_id,
        case jobs.status when 'running' then 'pending' else jobs.status end,
        jobs.last_error,
        jobs.player_id,
        jobs.result,
        extract(epoch from clock_timestamp() - jobs.completed_at)::float8
    from ackloop.player_creation_jobs as jobs
    where jobs.id = any(job_ids);
end
$$;

create function ackloop.json_object_problem(data jsonb)
returns text
language plpgsql immutable parallel safe
as $$
begin
    return case
        when data is null then null
        when jsonb_typeof(data) <> 'object' then 'must be a JSON object'
        when octet_length(data::text) > 8192 then 'must be at most 8192 bytes as JSON text'
    end;
end
$$;

create function ackloop.limit_claim_session()
returns void
language sql volatile parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
    select set_config('idle_in_transaction_session_timeout', '10s', true),
           set_config('client_connection_check_interval', '1s', true),
           set_config('lock_timeout', '2s', true)
$$;

create function ackloop.lock_attempt(job_id uuid, attempt integer)
returns boolean
language plpgsql volatile security definer parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    perform
    from ackloop.player_creation_jobs as jobs
    where jobs.id = lock_attempt.job_id
      and jobs.status = 'running'
      and jobs.attempts = lock_attempt.attempt
    for update;
    if found then
        perform set_config(
            'ackloop.claimed_jobs',
            concat_ws(',', nullif(current_setting('ackloop.claimed_jobs', true), ''), lock_attempt.job_id::text),
            true
        );
    end if;
    return found;
end
$$;

create function ackloop.mark_done(
    job_ids uuid[],
    attempts integer[],
    player_ids text[],
    results jsonb[],
    done_channel text DEFAULT 'player_jobs_done'::text
)
returns SETOF uuid
language plpgsql volatile security definer parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
declare
    missing uuid;
    problem text;
    -- The jobs this transaction claimed (claim_jobs, lock_attempt: `ackloop.claimed_jobs`).
    claimed uuid[] := coalesce(
        string_to_array(nullif(current_setting('ackloop.claimed_jobs', true), ''), ',')::uuid[], '{}'
    );
begin
    if cardinality(job_ids) is distinct from cardinality(mark_done.attempts)
        or cardinality(job_ids) is distinct from cardinality(player_ids)
        or cardinality(job_ids) is distinct from cardinality(results) then
        raise exception 'mark_done needs one attempt, player id and result per job id'
            using errcode = 'invalid_parameter_value';
    end if;
    select given.id
    into missing
    from unnest(job_ids) as given (id)
    where given.id <> all (claimed)
    limit 1;
    if found then
        raise exception 'job % was not claimed in this transaction', missing
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'claim jobs in the transaction that completes them: ackloop.claim_jobs, or ackloop.lock_attempt after ackloop.start_attempt';
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
            attempt_started_at = null,
            updated_at = now(),
            completed_at = now(),
            player_id = done.player_id,
            result = coalesce(done.result, '{}'::jsonb)
        from unnest(job_ids, mark_done.attempts, player_ids, results) as done (id, attempt, player_id, result)
        where jobs.id = done.id
          and jobs.status in ('pending', 'running')
        returning jobs.id
    )
    select completed.id
    from completed
    cross join lateral pg_notify(done_channel, completed.id::text) as notified;
end
$$;

create function ackloop.next_retry_due_in_secs(builtin_signups boolean DEFAULT false)
returns double precision
language plpgsql volatile security definer parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    return (
        select extract(epoch from min(jobs.run_after) - now())::float8
        from ackloop.player_creation_jobs as jobs
        where jobs.status in ('pending', 'running')
          and jobs.attempts > 0
          and (jobs.builtin_user_id is not null) = builtin_signups
    );
end
$$;

create function ackloop.note_unfinished_attempt(job_id uuid, attempt integer, error text)
returns boolean
language plpgsql volatile security definer parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    update ackloop.player_creation_jobs as jobs
    set status = 'pending',
        attempt_started_at = null,
        last_error = left(error, 2000),
        updated_at = now()
    where jobs.id = note_unfinished_attempt.job_id
      and jobs.status = 'running'
      and jobs.attempts = note_unfinished_attempt.attempt;
    return found;
end
$$;

create function ackloop.notify_job(channel text, job_id uuid)
returns void
language plpgsql volatile strict parallel unsafe
as $$
begin
    perform pg_catalog.pg_notify(channel, job_id::pg_catalog.text);
end
$$;

create function ackloop.notify_jobs(channel text, job_ids uuid[])
returns integer
language plpgsql volatile parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    if channel is null or coalesce(cardinality(job_ids), 0) = 0 then
        return 0;
    end if;
    if pg_notification_queue_usage() > 0.5 then
        raise warning 'notification queue % full: % wake-ups on "%" skipped (the jobs are committed; they are found by polling)',
            to_char(pg_notification_queue_usage() * 100, 'FM990') || '%', cardinality(job_ids), channel
            using hint = 'a session LISTENs without reading its notifications: find it in pg_stat_activity and end it';
        return 0;
    end if;
    perform set_config('lock_timeout', '0', true);
    perform pg_notify(channel, job_id::text) from unnest(job_ids) as job_id where job_id is not null;
    return cardinality(array_remove(job_ids, null));
end
$$;

create function ackloop.pending_jobs()
returns table (pending bigint, oldest_pending_secs double precision)
language plpgsql volatile security definer parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    return query
    select count(*), extract(epoch from now() - min(jobs.created_at))::float8
    from ackloop.player_creation_jobs as jobs
    where jobs.status in ('pending', 'running');
end
$$;

create function ackloop.record_failure(
    job_id uuid,
    attempt integer,
    error text,
    retryable boolean DEFAULT true,
    done_channel text DEFAULT 'player_jobs_done'::text,
    max_attempts integer DEFAULT 5,
    backoff_base_ms bigint DEFAULT 1000,
    backoff_max_ms bigint DEFAULT 300000,
    counted boolean DEFAULT true
)
returns table (status text, retry_in_ms bigint)
language plpgsql volatile security definer parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
#variable_conflict use_column
declare
    made integer := case when counted then attempt else attempt - 1 end;
    reason text := left(error, 2000);
    delay bigint := ackloop.backoff_ms(attempt, backoff_base_ms, backoff_max_ms);
begin
    if record_failure.job_id <> all (
        coalesce(string_to_array(nullif(current_setting('ackloop.claimed_jobs', true), ''), ',')::uuid[], '{}')
    ) then
        raise exception 'job % was not claimed in this transaction', record_failure.job_id
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'claim jobs in the transaction that records their failures: ackloop.claim_jobs, or ackloop.lock_attempt after ackloop.start_attempt';
    end if;
    if counted and (not retryable or attempt >= max_attempts) then
        update ackloop.player_creation_jobs
        set status = 'failed', attempts = made, last_error = reason, attempt_started_at = null,
            updated_at = now(), completed_at = now()
        where id = record_failure.job_id and status in ('pending', 'running');
        if found then
            perform pg_notify(done_channel, record_failure.job_id::text);
            return query select 'failed'::text, null::bigint;
        end if;
    else
        update ackloop.player_creation_jobs
        set status = 'pending', attempts = made, last_error = reason, attempt_started_at = null,
            run_after = now() + make_interval(secs => delay / 1000.0),
            updated_at = now()
        where id = record_failure.job_id and status in ('pending', 'running');
        if found then
            return query select 'pending'::text, delay;
        end if;
    end if;
end
$$;

create function ackloop.sign_up(
    email text,
    display_name text,
    new_job_id uuid DEFAULT NULL::uuid,
    jobs_channel text DEFAULT 'player_jobs'::text,
    lock_wait_ms integer DEFAULT NULL::integer
)
returns table (job_id uuid, user_id bigint)
language plpgsql volatile security definer parallel unsafe
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
        on conflict ((ackloop.fold_email(email))) do nothing
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
    -- No wake-up with a null channel: the caller sends it after the commit (sign_up_then_notify).
    cross join lateral ackloop.notify_job(jobs_channel, new_job.id) as notified;
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

create function ackloop.sign_up_many(
    emails text[],
    display_names text[],
    job_ids uuid[],
    jobs_channel text DEFAULT 'player_jobs'::text,
    lock_wait_ms integer DEFAULT NULL::integer
)
returns table (job_id uuid, user_id bigint, email text)
language plpgsql volatile security definer parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
#variable_conflict use_column
declare
    refused record;
begin
    if cardinality(emails) is distinct from cardinality(display_names)
        or cardinality(emails) is distinct from cardinality(job_ids) then
        raise exception 'sign_up_many needs as many display names and job ids as emails'
            using errcode = 'invalid_parameter_value';
    end if;
    -- The first entry that breaks a rule refuses the whole call, as sign_up would refuse it.
    select input.position, input.email_problem, input.display_name_problem
    into refused
    from (
        select given.position,
               ackloop.email_problem(given.email) as email_problem,
               ackloop.display_name_problem(given.display_name) as display_name_problem
        from unnest(emails, display_names) with ordinality as given (email, display_name, position)
    ) as input
    where input.email_problem is not null or input.display_name_problem is not null
    order by input.position
    limit 1;
    if refused.email_problem is not null then
        raise exception 'invalid email: %', refused.email_problem
            using detail = format('entry %s of the call', refused.position), errcode = 'check_violation', constraint = 'builtin_users_email_valid', column = 'email',
                  table = 'builtin_users', schema = 'ackloop';
    elsif refused.display_name_problem is not null then
        raise exception 'invalid display name: %', refused.display_name_problem
            using detail = format('entry %s of the call', refused.position), errcode = 'check_violation', constraint = 'builtin_users_display_name_valid',
                  column = 'display_name', table = 'builtin_users', schema = 'ackloop';
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
        on conflict ((ackloop.fold_email(email))) do nothing
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
    -- No wake-ups with a null channel: the caller sends them after the commit
    -- (sign_up_many_then_notify).
    cross join lateral ackloop.notify_job(jobs_channel, new_jobs.id) as notified;
end
$$;

create procedure ackloop.sign_up_many_then_notify(
    IN emails text[],
    IN display_names text[],
    IN new_job_ids uuid[],
    IN jobs_channel text,
    IN lock_wait_ms integer,
    OUT job_ids uuid[],
    OUT user_ids bigint[]
)
language plpgsql
as $$
begin
    perform ackloop.check_wake_up_channel(jobs_channel);
    -- Two aggregates over the same rows keep them in the same order.
    select coalesce(pg_catalog.array_agg(written.job_id), '{}'), coalesce(pg_catalog.array_agg(written.user_id), '{}')
    into sign_up_many_then_notify.job_ids, sign_up_many_then_notify.user_ids
    from ackloop.sign_up_many(emails, display_names, new_job_ids, null, lock_wait_ms) as written;
    commit;
    -- One wake-up per batch's worth of jobs (a worker's default batch is 32), naming the first
    -- job of each: every listening worker process is woken by each, and one claim takes them.
    begin
        perform ackloop.notify_jobs(
            jobs_channel,
            array(
                select sign_up_many_then_notify.job_ids[position]
                from pg_catalog.generate_series(1, pg_catalog.cardinality(sign_up_many_then_notify.job_ids), 32) as position
            )
        );
    exception when others then
        -- The signups stand; a worker's poll finds their jobs.
        raise warning 'the wake-ups for % signups were not sent: %', pg_catalog.cardinality(sign_up_many_then_notify.job_ids), sqlerrm;
    end;
end
$$;

create procedure ackloop.sign_up_then_notify(
    IN email text,
    IN display_name text,
    IN new_job_id uuid,
    IN jobs_channel text,
    IN lock_wait_ms integer,
    OUT job_id uuid,
    OUT user_id bigint
)
language plpgsql
as $$
begin
    perform ackloop.check_wake_up_channel(jobs_channel);
    select signed.job_id, signed.user_id
    into sign_up_then_notify.job_id, sign_up_then_notify.user_id
    from ackloop.sign_up(email, display_name, new_job_id, null, lock_wait_ms) as signed;
    commit;
    begin
        perform ackloop.notify_jobs(jobs_channel, array[sign_up_then_notify.job_id]);
    exception when others then
        -- The signup stands; a worker's poll finds its job.
        raise warning 'the wake-up for job % was not sent: %', sign_up_then_notify.job_id, sqlerrm;
    end;
end
$$;

create function ackloop.start_attempt(
    max_attempts integer DEFAULT 5,
    backoff_base_ms bigint DEFAULT 1000,
    backoff_max_ms bigint DEFAULT 300000,
    done_channel text DEFAULT 'player_jobs_done'::text,
    any_job boolean DEFAULT false,
    builtin_signups boolean DEFAULT false
)
returns table (
    status text,
    job_id uuid,
    user_id text,
    display_name text,
    extra jsonb,
    attempt integer,
    waited_secs double precision,
    last_error text,
    lease_ms bigint,
    abandoned_attempt integer
)
language plpgsql volatile security definer parallel unsafe
set search_path = pg_catalog, ackloop, pg_temp
as $$
#variable_conflict use_column
declare
    job record;
    shown text;
    lease bigint;
begin
    perform ackloop.limit_claim_session();
    -- Two statements, so that looking for retries stays on their own small index.
    if any_job then
        select jobs.id, jobs.status, jobs.user_id, jobs.display_name, jobs.extra, jobs.attempts,
               jobs.last_error, extract(epoch from now() - jobs.created_at)::float8 as waited
        into job
        from ackloop.due_jobs as jobs
        where (jobs.builtin_user_id is not null) = builtin_signups
        order by jobs.run_after, jobs.id
        limit 1
        for update skip locked;
    else
        select jobs.id, jobs.status, jobs.user_id, jobs.display_name, jobs.extra, jobs.attempts,
               jobs.last_error, extract(epoch from now() - jobs.created_at)::float8 as waited
        into job
        from ackloop.due_jobs as jobs
        where jobs.attempts > 0
          and (jobs.builtin_user_id is not null) = builtin_signups
        order by jobs.run_after, jobs.id
        limit 1
        for update skip locked;
    end if;
    if not found then
        return;
    end if;
    -- A running job past its lease: its attempt ended with its session.
    shown := case when job.status = 'running' then ackloop.unfinished_attempt_error(job.attempts)
                  else job.last_error end;
    if job.attempts >= max_attempts then
        shown := left('gave up after ' || job.attempts || ' attempts' || coalesce('; ' || shown, ''), 2000);
        update ackloop.player_creation_jobs
        set status = 'failed', last_error = shown, attempt_started_at = null,
            updated_at = now(), completed_at = now()
        where id = job.id;
        perform pg_notify(done_channel, job.id::text);
        return query select 'gave_up'::text, job.id, job.user_id, job.display_name, job.extra,
            job.attempts, job.waited, shown, null::bigint, null::integer;
        return;
    end if;
    lease := greatest(ackloop.backoff_ms(job.attempts + 1, backoff_base_ms, backoff_max_ms), 1000);
    update ackloop.player_creation_jobs
    set status = 'running',
        attempts = job.attempts + 1,
        attempt_started_at = now(),
        last_error = shown,
        run_after = now() + make_interval(secs => lease / 1000.0),
        updated_at = now()
    where id = job.id;
    return query select 'started'::text, job.id, job.user_id, job.display_name, job.extra,
        job.attempts + 1, job.waited, shown, lease,
        case when job.status = 'running' then job.attempts end;
end
$$;

create function ackloop.unfinished_attempt_error(attempt integer)
returns text
language sql immutable parallel safe
set search_path = pg_catalog, ackloop, pg_temp
as $$
    select 'attempt ' || attempt || ' did not finish: its database session ended (a crash or '
        || 'terminated backend, an out-of-memory kill, or the worker stopped)'
$$;

create function ackloop.user_id_problem(user_id text)
returns text
language plpgsql immutable parallel safe
as $$
begin
    return case
        when user_id is null or user_id = '' then 'must not be empty'
        when char_length(user_id) > 128 then 'must be at most 128 characters'
        when user_id ~ '[\u0001-\u001f\u007f-\u009f]' then 'must not contain control characters'
        when user_id ~ '^[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]|[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]$'
            then 'must not start or end with whitespace'
    end;
end
$$;

create function ackloop.uuid_v7()
returns uuid
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


-- Privileges of PUBLIC (what is not listed here, PUBLIC may not do; the roles that may
-- call each side's functions are granted them by sql/roles.sql or by an operator)

grant execute on function ackloop.fold_email(email text) to public;
