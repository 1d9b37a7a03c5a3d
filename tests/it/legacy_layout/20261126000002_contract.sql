-- The contract: every step a service takes in the loop, as functions in the `ackloop` schema, so a
-- service in any language (and ackloop itself) runs the same SQL with the same rules. The
-- functions are documented for callers in docs/protocol.md; the defaults here are the Rust
-- side's defaults, and a test holds them equal.
create schema ackloop;

-- The migrations applied, recorded by the migrations themselves, so a database migrated by psql,
-- Flyway or any other tool from these files is recognised like one migrated by sqlx. Every later
-- migration ends by inserting its own row.
create table ackloop.applied_migrations (
    version bigint primary key,
    description text not null,
    applied_at timestamptz not null default now()
);
-- The earlier migrations recorded nothing themselves: record them only if what they made is here,
-- so a database where one of them failed (a psql loop that went on) is not taken as complete.
do $$
declare
    missing text;
begin
    select string_agg(name, ', ') into missing
    from unnest(array[
        'public.users', 'public.users_email_key', 'public.player_creation_jobs',
        'public.player_creation_jobs_pending_idx', 'public.players',
        'public.player_creation_jobs_retry_idx', 'public.player_creation_jobs_finished_idx'
    ]) as name
    where to_regclass(name) is null;
    if missing is not null then
        raise exception 'earlier ackloop migrations are missing (no %): apply them first, in order', missing;
    end if;
end
$$;
insert into ackloop.applied_migrations (version, description) values
    (20261124000001, 'create users'),
    (20261124000002, 'create player creation jobs'),
    (20261124000003, 'create players'),
    (20261125000001, 'index pending retries'),
    (20261125000002, 'index finished jobs'),
    (20261126000002, 'contract');

-- A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits, so ids made at once sort
-- together and index well. PostgreSQL 15 has no generator of its own.
create function ackloop.uuid_v7() returns uuid
language sql volatile parallel safe
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

-- The input rules, exactly as the Rust side's `NewUser` applies them, in the same order: null when
-- the value is acceptable, else the rule it breaks (the text Rust's error shows). Whitespace is
-- Unicode's White_Space set and control characters are Unicode's Cc, spelled out so that no
-- locale changes them. PL/pgSQL, not SQL: a SQL function would be inlined, its text parsed
-- again, into every insert's check constraints, which cost a signup about 0.25 ms.
create function ackloop.email_problem(email text) returns text
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

create function ackloop.display_name_problem(display_name text) returns text
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

-- No client, in any language, stores what the rules refuse. Checking the existing rows holds up
-- writes to users while it runs: on a table of millions, apply this when signups are quiet.
-- The older length and blank checks are part of these rules: dropped, so a refusal always names
-- one of these two (PostgreSQL checks constraints in name order: the display name's first).
alter table users
    drop constraint users_email_length,
    drop constraint users_display_name_length,
    drop constraint users_display_name_not_blank,
    add constraint users_email_valid check (ackloop.email_problem(email) is null),
    add constraint users_display_name_valid check (ackloop.display_name_problem(display_name) is null);

-- Signs one user up: checks the input (SQLSTATE 23514, the constraint named after the field, the
-- rule in the message), inserts the user and the job, and notifies `jobs_channel` with the job
-- id (`new_job_id`, or a new UUIDv7), all committed with the caller's transaction. An email taken, ignoring case, raises 23505 on
-- users_email_key. `lock_wait_ms` bounds waits for row locks (another session's uncommitted
-- signup of the same email) for the rest of the transaction; null leaves the session's setting.
create function ackloop.sign_up(
    email text,
    display_name text,
    new_job_id uuid default null,
    jobs_channel text default 'player_jobs',
    lock_wait_ms integer default null
) returns table (job_id uuid, user_id bigint)
language plpgsql volatile
as $$
#variable_conflict use_column
declare
    problem text;
begin
    problem := ackloop.email_problem(sign_up.email);
    if problem is not null then
        raise exception 'invalid email: %', problem
            using errcode = 'check_violation', constraint = 'users_email_valid', column = 'email',
                  table = 'users', schema = current_schema();
    end if;
    problem := ackloop.display_name_problem(sign_up.display_name);
    if problem is not null then
        raise exception 'invalid display name: %', problem
            using errcode = 'check_violation', constraint = 'users_display_name_valid',
                  column = 'display_name', table = 'users', schema = current_schema();
    end if;
    -- One statement: each statement a function runs costs about as much as the rules above.
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
        insert into users (email, display_name)
        select sign_up.email, sign_up.display_name
        from limits
        returning users.id
    ),
    new_job as (
        -- Stamped now, not at the transaction's start (the column's default): in autocommit the
        -- commit follows at once, so the wait a worker measures starts near the commit.
        insert into player_creation_jobs (id, user_id, created_at)
        select coalesce(new_job_id, ackloop.uuid_v7()), new_user.id, clock_timestamp()
        from new_user
        returning player_creation_jobs.id, player_creation_jobs.user_id
    )
    select new_job.id, new_job.user_id
    from new_job
    cross join lateral pg_notify(jobs_channel, new_job.id::text) as notified;
end
$$;

-- Signs many users up in one statement (one commit, one fsync, one hold of the notify lock), each
-- exactly as sign_up would. A signup whose email is taken (by an existing user, or earlier in the
-- same call, ignoring case) is skipped: the one missing from the result. A null job id gets a
-- new UUIDv7; each row gives its entry's email, as given, to match rows to entries. Input a rule refuses fails the whole call (23514, the check constraint named) and
-- writes nothing: check it first.
create function ackloop.sign_up_many(
    emails text[],
    display_names text[],
    job_ids uuid[],
    jobs_channel text default 'player_jobs',
    lock_wait_ms integer default null
) returns table (job_id uuid, user_id bigint, email text)
language plpgsql volatile
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
        insert into users (email, display_name)
        select input.email, input.display_name
        from input, limits
        order by input.position
        on conflict ((lower(email))) do nothing
        returning users.id, users.email
    ),
    new_jobs as (
        insert into player_creation_jobs (id, user_id, created_at)
        -- Identical emails in one call: the first was inserted, the rest skipped.
        select distinct on (new_users.id) coalesce(input.job_id, ackloop.uuid_v7()), new_users.id, clock_timestamp()
        from new_users
        join input on input.email = new_users.email
        order by new_users.id, input.position
        returning player_creation_jobs.id, player_creation_jobs.user_id
    )
    select new_jobs.id, new_jobs.user_id, new_users.email
    from new_jobs
    join new_users on new_users.id = new_jobs.user_id
    cross join lateral pg_notify(jobs_channel, new_jobs.id::text) as notified;
end
$$;

-- The built-in player side in one statement: claims up to `batch_size` due jobs never tried
-- before (skipping any another worker holds), creates their players, marks them done and
-- notifies each id on `done_channel`. Any failure fails the whole call and leaves every job as
-- it was, its attempt uncounted: then take the batch again with claim_jobs, one job at a time.
-- A lock wait over 2 s fails it (55P03). (A worker gone while it runs is noticed only if its
-- session has client_connection_check_interval set: set inside, it would apply too late.)
create function ackloop.complete_jobs(
    batch_size integer default 32,
    done_channel text default 'player_jobs_done'
) returns table (job_id uuid, waited_secs double precision)
language plpgsql volatile
as $$
begin
    perform set_config('lock_timeout', '2s', true);
    return query
    with claimed as (
        select jobs.id, jobs.user_id
        from player_creation_jobs as jobs
        where jobs.status = 'pending'
          and jobs.run_after <= now()
          and jobs.attempts = 0
        order by jobs.run_after, jobs.id
        limit batch_size
        for update skip locked
    ),
    new_players as (
        insert into players (user_id, display_name)
        select users.id, users.display_name
        from claimed
        join users on users.id = claimed.user_id
        on conflict (user_id) do nothing
        returning players.user_id
    ),
    completed as (
        update player_creation_jobs as jobs
        set status = 'done',
            attempts = jobs.attempts + 1,
            last_error = null,
            updated_at = now(),
            completed_at = now()
        from claimed
        where jobs.id = claimed.id
        returning jobs.id, extract(epoch from now() - jobs.created_at)::float8 as waited_secs
    )
    select completed.id, completed.waited_secs
    from completed
    cross join lateral pg_notify(done_channel, completed.id::text) as notified;
end
$$;

-- Locks up to `batch_size` due jobs never tried before for the caller's transaction (skipping
-- any another worker holds), with what a handler needs; `attempt` is the number of the attempt
-- now being made. Call it first in a transaction; finish each job with mark_done or
-- record_failure before committing. Sets, for the rest of the transaction, the settings that
-- let the server release the jobs of a worker that hangs or dies: a worker idle in the
-- transaction for over 10 s loses its session (and its locks), a worker gone while a later
-- statement runs is noticed within 1 s, and a lock wait over 2 s fails a statement (55P03).
create function ackloop.claim_jobs(batch_size integer default 32)
returns table (job_id uuid, user_id bigint, display_name text, attempt integer, waited_secs double precision)
language plpgsql volatile
as $$
begin
    perform set_config('idle_in_transaction_session_timeout', '10s', true),
            set_config('client_connection_check_interval', '1s', true),
            set_config('lock_timeout', '2s', true);
    return query
    with claimed as (
        select jobs.id, jobs.user_id, jobs.attempts, jobs.created_at
        from player_creation_jobs as jobs
        where jobs.status = 'pending'
          and jobs.run_after <= now()
          and jobs.attempts = 0
        order by jobs.run_after, jobs.id
        limit batch_size
        for update skip locked
    )
    select
        claimed.id,
        claimed.user_id,
        users.display_name,
        claimed.attempts + 1,
        extract(epoch from now() - claimed.created_at)::float8
    from claimed
    join users on users.id = claimed.user_id
    order by claimed.id;
end
$$;

-- Marks claimed jobs done, each with the attempt that did it (claim_jobs' `attempt`), and
-- notifies each id on `done_channel` (delivered at commit). Returns the ids marked: a job no
-- longer pending (finished by an operator) is left as it is and not returned.
create function ackloop.mark_done(
    job_ids uuid[],
    attempts integer[],
    done_channel text default 'player_jobs_done'
) returns setof uuid
language plpgsql volatile
as $$
begin
    if cardinality(job_ids) is distinct from cardinality(mark_done.attempts) then
        raise exception 'mark_done needs one attempt per job id'
            using errcode = 'invalid_parameter_value';
    end if;
    return query
    with completed as (
        update player_creation_jobs as jobs
        set status = 'done',
            attempts = done.attempt,
            last_error = null,
            updated_at = now(),
            completed_at = now()
        from unnest(job_ids, mark_done.attempts) as done (id, attempt)
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
language plpgsql volatile
as $$
#variable_conflict use_column
declare
    made integer := case when counted then attempt else attempt - 1 end;
    reason text := left(error, 2000);
    delay bigint := ackloop.backoff_ms(attempt, backoff_base_ms, backoff_max_ms);
begin
    if counted and (not retryable or attempt >= max_attempts) then
        update player_creation_jobs
        set status = 'failed', attempts = made, last_error = reason,
            updated_at = now(), completed_at = now()
        where id = record_failure.job_id and status = 'pending';
        if found then
            perform pg_notify(done_channel, record_failure.job_id::text);
            return query select 'failed'::text, null::bigint;
        end if;
    else
        update player_creation_jobs
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
as $$
    select 'attempt ' || attempt || ' did not finish: its database session ended (a crash or '
        || 'terminated backend, an out-of-memory kill, or the worker stopped), unless it is running now'
$$;

-- Starts an attempt of the next due job tried before (`any_job`: of any due job), for a worker
-- that takes such jobs one at a time, as a job that killed its session must be: locks it
-- (skipping any another worker holds), counts the attempt, and leaves the job as it should be
-- found if the attempt never finishes (`unfinished_attempt_error` as its error, not due again
-- before the backoff after this attempt, and at least 1 s: `lease_ms`). Call it alone in its
-- transaction and commit before making the attempt, so the count survives a job that kills its session; then make the attempt in a new transaction that
-- begins with lock_attempt. A job whose `max_attempts` are used up is failed instead (its id
-- notified on `done_channel`): status 'gave_up'. Otherwise status 'started', with `attempt` the
-- attempt now counted and `last_error` what the job showed before. No row: nothing is due.
create function ackloop.start_attempt(
    max_attempts integer default 5,
    backoff_base_ms bigint default 1000,
    backoff_max_ms bigint default 300000,
    done_channel text default 'player_jobs_done',
    any_job boolean default false
) returns table (
    status text,
    job_id uuid,
    user_id bigint,
    display_name text,
    attempt integer,
    waited_secs double precision,
    last_error text,
    lease_ms bigint
)
language plpgsql volatile
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
        select jobs.id, jobs.user_id, users.display_name, jobs.attempts, jobs.last_error,
               extract(epoch from now() - jobs.created_at)::float8 as waited
        into job
        from player_creation_jobs as jobs
        join users on users.id = jobs.user_id
        where jobs.status = 'pending' and jobs.run_after <= now()
        order by jobs.run_after, jobs.id
        limit 1
        for update of jobs skip locked;
    else
        select jobs.id, jobs.user_id, users.display_name, jobs.attempts, jobs.last_error,
               extract(epoch from now() - jobs.created_at)::float8 as waited
        into job
        from player_creation_jobs as jobs
        join users on users.id = jobs.user_id
        where jobs.status = 'pending' and jobs.attempts > 0 and jobs.run_after <= now()
        order by jobs.run_after, jobs.id
        limit 1
        for update of jobs skip locked;
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
        update player_creation_jobs
        set status = 'failed', last_error = reason, updated_at = now(), completed_at = now()
        where id = job.id;
        perform pg_notify(done_channel, job.id::text);
        return query select 'gave_up'::text, job.id, job.user_id, job.display_name, job.attempts,
            job.waited, reason, null::bigint;
        return;
    end if;
    lease := greatest(ackloop.backoff_ms(job.attempts + 1, backoff_base_ms, backoff_max_ms), 1000);
    update player_creation_jobs
    set attempts = job.attempts + 1,
        last_error = ackloop.unfinished_attempt_error(job.attempts + 1),
        run_after = now() + make_interval(secs => lease / 1000.0),
        updated_at = now()
    where id = job.id;
    return query select 'started'::text, job.id, job.user_id, job.display_name, job.attempts + 1,
        job.waited, job.last_error, lease;
end
$$;

-- Locks, for the caller's transaction, the job whose attempt `attempt` start_attempt counted:
-- false when the job has changed since (an operator finished or retried it, or its lease ran out
-- and another worker took it), and the attempt must not be made. Sets the same limits as
-- claim_jobs for the rest of the transaction. Then: the effect, and mark_done or record_failure.
create function ackloop.lock_attempt(job_id uuid, attempt integer) returns boolean
language plpgsql volatile
as $$
begin
    perform set_config('idle_in_transaction_session_timeout', '10s', true),
            set_config('client_connection_check_interval', '1s', true),
            set_config('lock_timeout', '2s', true);
    perform
    from player_creation_jobs as jobs
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
language plpgsql volatile
as $$
begin
    update player_creation_jobs as jobs
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
language plpgsql volatile
as $$
begin
    update player_creation_jobs as jobs
    set last_error = left(error, 2000),
        updated_at = now()
    where jobs.id = note_unfinished_attempt.job_id
      and jobs.status = 'pending'
      and jobs.attempts = note_unfinished_attempt.attempt;
    return found;
end
$$;

-- Each of `job_ids` that exists, as the tables tell it, with its player when there is one (ids
-- of no job are absent). `since_done_secs`: seconds since the job finished, by the server's clock.
-- PL/pgSQL so that its plan is kept, not its text parsed again into every caller's plan.
create function ackloop.job_outcomes(job_ids uuid[])
returns table (
    job_id uuid,
    user_id bigint,
    status text,
    last_error text,
    player_id bigint,
    player_display_name text,
    player_created_at timestamptz,
    since_done_secs double precision
)
language plpgsql stable
as $$
begin
    return query
    select
        jobs.id,
        jobs.user_id,
        jobs.status,
        jobs.last_error,
        players.id,
        players.display_name,
        players.created_at,
        extract(epoch from clock_timestamp() - jobs.completed_at)::float8
    from player_creation_jobs as jobs
    left join players on players.user_id = jobs.user_id
    where jobs.id = any(job_ids);
end
$$;
