-- Signups' wake-ups after the commit (issue 24). A transaction that calls pg_notify holds
-- PostgreSQL's cluster-wide notify lock from just before its commit until the commit is flushed,
-- so notifying writes never share a flush (no group commit): across processes they commit one at
-- a time. Here sign_up and sign_up_many take a null channel to send nothing, and two procedures
-- commit the write first and then send its wake-ups in a transaction of their own, which writes
-- no WAL of its own and so holds the lock for microseconds: one CALL, one round trip, as before.
-- Called with a channel, the functions notify inside the transaction as they always did (a
-- service adding a job inside its own transaction needs that: its commit is the service's).
--
-- The worker's done wake-ups stay inside its commits: delivered in commit order, they let a
-- waiting process answer every caller due at one moment with one marker notified behind them
-- (docs/protocol.md, "Your deadline"), which a wake-up sent after its commit could overtake.
set local lock_timeout = '5s';

-- Sends one job's wake-up on `channel`, or nothing for a null channel (strict: not called at
-- all). For the writing steps' own statements, inside their transaction; qualified, as it runs
-- unpinned (a pinned helper pays for its search_path on every call).
create function ackloop.notify_job(channel text, job_id uuid)
returns void
language plpgsql volatile strict
as $$
begin
    perform pg_catalog.pg_notify(channel, job_id::pg_catalog.text);
end
$$;

-- Refuses a channel pg_notify would refuse (empty, or over 63 bytes) with 22023 (null, no
-- wake-up, passes), and a caller who may not run notify_jobs with 42501. The procedures check
-- before they write: those refusals would otherwise come after their commit, with the write
-- standing.
create function ackloop.check_wake_up_channel(channel text)
returns void
language plpgsql stable
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

-- Sends each job's wake-up on `channel` (null ids skipped), in the current transaction: for a
-- transaction of its own after the write committed (the procedures below; in autocommit, as it
-- lifts lock_timeout for the rest of its transaction). Returns how many were sent. A
-- notification queue more than half full means a listener stopped reading it; PostgreSQL
-- refuses a notifying commit once it is full, which here would fail a call whose write already
-- committed, so past half the wake-ups are skipped with a warning: the work is committed, and
-- workers' polls find it. The commit's wait for the notify lock gets no lock_timeout (a role's
-- or session's would fail the call after its write) and is short: the lock's holders flush
-- nothing while they hold it, or flush their own commit.
create function ackloop.notify_jobs(channel text, job_ids uuid[])
returns integer
language plpgsql volatile
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

-- The writing steps: a null channel sends no wake-up (each body as before otherwise).

create or replace function ackloop.sign_up(
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

create or replace function ackloop.sign_up_many(
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

-- The procedures: the write, its commit, then its wake-ups in a transaction of their own (which
-- takes the notify lock without a flush). Call them outside a transaction block (autocommit):
-- transaction control is refused inside one (SQLSTATE 2D000), where the functions above with a
-- channel are the way. They run as the caller (a procedure that commits cannot be a security
-- definer), calling the contract's functions, so a role needs EXECUTE on both (sql/roles.sql).
-- Everything is qualified: they have no pinned search_path either.
--
-- An error from the CALL before its commit wrote nothing. After it (the channel, the caller's
-- right to notify and the queue checked, the lock wait unbounded, any error of the wake-up turned
-- into a warning), only the session's end, a cancel or the server running out of resources at
-- the final commit can fail the call, and the write stands: a caller told so, or given no
-- answer, looks its job up by id (or calls again with the same job id), as after any lost answer.
-- A signup sent again with its job id is notified again: a wake-up for a committed job, harmless.

-- sign_up, then its wake-up.
create procedure ackloop.sign_up_then_notify(
    email text,
    display_name text,
    new_job_id uuid,
    jobs_channel text,
    lock_wait_ms integer,
    out job_id uuid,
    out user_id bigint
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

-- sign_up_many, then the wake-ups of the signups it wrote, one per 32; job_ids[i] and
-- user_ids[i] are one written signup (a taken email's is absent, as in sign_up_many's rows).
create procedure ackloop.sign_up_many_then_notify(
    emails text[],
    display_names text[],
    new_job_ids uuid[],
    jobs_channel text,
    lock_wait_ms integer,
    out job_ids uuid[],
    out user_ids bigint[]
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

-- Closed to PUBLIC (a routine a migration makes is executable by PUBLIC unless revoked), and
-- open to whoever may call the function each one goes with (a procedure runs as its caller, so
-- its caller needs the functions it calls too).
revoke execute on function
    ackloop.notify_job(text, uuid),
    ackloop.notify_jobs(text, uuid[]),
    ackloop.check_wake_up_channel(text)
    from public;
revoke execute on procedure
    ackloop.sign_up_then_notify(text, text, uuid, text, integer),
    ackloop.sign_up_many_then_notify(text[], text[], uuid[], text, integer)
    from public;
do $$
declare
    pair record;
    kept record;
begin
    for pair in
        select *
        from (values
            ('ackloop.sign_up(text, text, uuid, text, integer)', 'procedure ackloop.sign_up_then_notify(text, text, uuid, text, integer)'),
            ('ackloop.sign_up_many(text[], text[], uuid[], text, integer)', 'procedure ackloop.sign_up_many_then_notify(text[], text[], uuid[], text, integer)'),
            ('ackloop.sign_up(text, text, uuid, text, integer)', 'function ackloop.notify_jobs(text, uuid[])'),
            ('ackloop.sign_up_many(text[], text[], uuid[], text, integer)', 'function ackloop.notify_jobs(text, uuid[])'),
            ('ackloop.sign_up(text, text, uuid, text, integer)', 'function ackloop.check_wake_up_channel(text)'),
            ('ackloop.sign_up_many(text[], text[], uuid[], text, integer)', 'function ackloop.check_wake_up_channel(text)')
        ) as pairs (existing, added)
    loop
        for kept in
            select distinct grants.grantee::regrole::text as grantee
            from pg_proc as procs
            cross join lateral aclexplode(procs.proacl) as grants
            where procs.oid = pair.existing::regprocedure
              and grants.privilege_type = 'EXECUTE'
              and grants.grantee <> 0
              and grants.grantee <> procs.proowner
        loop
            execute format('grant execute on %s to %s', pair.added, kept.grantee);
        end loop;
    end loop;
end
$$;

insert into ackloop.applied_migrations (version, description)
values (20261207000008, 'wake-ups after the commit');
