-- Two holes in the contract, closed (issue 22): email uniqueness that depended on the
-- database's locale, and completion functions that accepted a job nobody had claimed.
--
-- Taking the tables' locks waits behind a long transaction (a worker's claim, a prune) and
-- holds every signup up meanwhile: give up after 5 s instead; run `ackloop migrate` again.
set local lock_timeout = '5s';

-- Emails are compared ignoring case, by a unique index on their lower case. `lower()` follows
-- the database's LC_CTYPE: under `C` it folds only ASCII letters, so `émile@exämple.com` and
-- `ÉMILE@EXÄMPLE.COM` were two users. fold_email lowers with ICU's root locale, the same on any
-- database, when the server has ICU (Debian's, the official images and the managed services do);
-- without ICU, with the database's own `lower()` if that folds beyond ASCII; otherwise the
-- migration refuses, saying why. Immutable and a single `select`, so PostgreSQL inlines it: the
-- index, `on conflict` and lookups all read `lower(email collate "und-x-icu")`. Every name is
-- qualified: the function runs under the caller's search_path.
do $$
begin
    if exists (select from pg_catalog.pg_collation where collname = 'und-x-icu' and collprovider = 'i') then
        create function ackloop.fold_email(email text) returns text
        language sql immutable strict parallel safe
        return pg_catalog.lower(email collate pg_catalog."und-x-icu");
    elsif pg_catalog.lower('ÉÄ') = 'éä' then
        create function ackloop.fold_email(email text) returns text
        language sql immutable strict parallel safe
        return pg_catalog.lower(email);
    else
        raise exception 'this database folds only ASCII letters to lower case (LC_CTYPE %), and the server has no ICU: two emails differing only in the case of a non-ASCII letter would be two users',
                pg_catalog.current_setting('lc_ctype')
            using hint = 'create the database with a UTF-8 locale (createdb --locale=C.UTF-8 --template=template0), or use a PostgreSQL built with ICU, then run ackloop migrate',
                  errcode = 'feature_not_supported';
    end if;
end
$$;
grant execute on function ackloop.fold_email(text) to public;

-- Users whose emails the old fold told apart and the new one does not (possible only where the
-- locale folded ASCII alone) cannot both keep their email: say which, and change nothing.
do $$
declare
    clash text;
begin
    select pg_catalog.string_agg(pair.emails, '; ')
    into clash
    from (
        select pg_catalog.string_agg(users.email, ' and ' order by users.id) as emails
        from ackloop.builtin_users as users
        group by ackloop.fold_email(users.email)
        having pg_catalog.count(*) > 1
        limit 5
    ) as pair;
    if clash is not null then
        raise exception 'these built-in users'' emails differ only in the case of non-ASCII letters, so they cannot stay distinct users: %', clash
            using hint = 'change or delete all but one of each (ackloop.builtin_users), then run ackloop migrate again',
                  errcode = 'unique_violation';
    end if;
end
$$;

drop index ackloop.builtin_users_email_key;
-- The one email per user, ignoring case whatever the locale (matched by this name in code).
create unique index builtin_users_email_key on ackloop.builtin_users (ackloop.fold_email(email));

-- The built-in auth service (its users in ackloop.builtin_users): signs one user up. Checks the
-- input (23514, the constraint named after the field, the rule in the message), inserts the user
-- and the job, and notifies `jobs_channel` with the job id (`new_job_id`, or a new UUIDv7), all
-- committed with the caller's transaction. An email taken, ignoring case, raises 23505 on
-- builtin_users_email_key, unless it was taken by this very signup: the same job id, email and
-- display name return that signup and write nothing (the job id is the idempotency key; with
-- another email or name, 23505 on player_creation_jobs_pkey). `lock_wait_ms` as in add_job.
create or replace function ackloop.sign_up(
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

-- The same signature as before, so its grants stay.
create or replace function ackloop.sign_up_many(
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
    cross join lateral pg_notify(jobs_channel, new_jobs.id::text) as notified;
end
$$;

-- Which jobs this transaction has claimed, for mark_done and record_failure: claim_jobs and
-- lock_attempt append the ids they lock to the transaction-local setting `ackloop.claimed_jobs`,
-- so a claim rolled back (with its savepoint, or its transaction) is forgotten with it. Written
-- and read inline in each function (a call of a helper with a pinned search_path, per claim and
-- per completion, cost the one-job-per-transaction path of a service's handler about a third of
-- its throughput). A safeguard against completing the wrong job by mistake, not a permission:
-- the roles that may call these functions are trusted with the queue.
-- Locks up to `batch_size` due jobs never tried before for the caller's transaction (skipping
-- any another worker holds), with what a handler needs: jobs services added (add_job), or with
-- `builtin_signups` the built-in tables' signups (sign_up), so that each kind goes to the worker
-- whose handler serves it; `attempt` is the number of the attempt
-- now being made. Call it first in a transaction; finish each job with mark_done or
-- record_failure before committing. Sets limit_claim_session's limits: a worker that hangs or
-- dies in the transaction gives its jobs back within about 10 s (a statement that keeps running
-- keeps them until it ends or the server notices the client is gone).
create or replace function ackloop.claim_jobs(batch_size integer default 32, builtin_signups boolean default false)
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

-- Locks, for the caller's transaction, the job whose attempt `attempt` start_attempt counted:
-- false when the job has changed since (an operator finished or retried it, or its lease ran out
-- and another worker took it), and the attempt must not be made. Sets limit_claim_session's
-- limits for the rest of the transaction. Then: the effect, and mark_done or record_failure.
create or replace function ackloop.lock_attempt(job_id uuid, attempt integer) returns boolean
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

-- Marks jobs this transaction claimed (claim_jobs, lock_attempt) done, each with the attempt that
-- did it (claim_jobs' `attempt`) and the player service's answer: its player id (never null: a
-- handler that created no player has not done its job) and a result (a JSON object up to 8 KiB; null stores {}); and notifies each id
-- on `done_channel` (delivered at commit). Returns the ids marked: a job no longer pending
-- (finished by an operator) is left as it is and not returned. A job this transaction did not
-- claim: 55000, and nothing is marked.
create or replace function ackloop.mark_done(
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

-- Records that attempt `attempt` of a job this transaction claimed failed with `error` (kept to
-- 2,000 characters; a job it did not claim: 55000). Not `retryable`, or the last of `max_attempts`: the job is failed and its id
-- notified on `done_channel`, so a waiting caller hears at once. Otherwise it is pending again,
-- not due before the backoff. `counted` false gives the attempt back (it never ran: it waited for
-- a lock another session holds), so it does not bring the job closer to failing. Returns the
-- job's status after the call and, when pending, the milliseconds until it is due; no row when
-- the job is not pending (finished by an operator meanwhile), which is left as it is.
create or replace function ackloop.record_failure(
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
    if record_failure.job_id <> all (
        coalesce(string_to_array(nullif(current_setting('ackloop.claimed_jobs', true), ''), ',')::uuid[], '{}')
    ) then
        raise exception 'job % was not claimed in this transaction', record_failure.job_id
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'claim jobs in the transaction that records their failures: ackloop.claim_jobs, or ackloop.lock_attempt after ackloop.start_attempt';
    end if;
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

insert into ackloop.applied_migrations (version, description)
values (20261207000005, 'locale-proof emails and claimed completions');
