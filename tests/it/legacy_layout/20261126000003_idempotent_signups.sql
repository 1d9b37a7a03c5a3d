-- A signup made again with the job id of one already written, the same email and the same
-- display name, is that signup: sign_up returns it and writes nothing, where it raised a taken
-- email before. So a caller that gave up (an HTTP client's timeout, a cancelled request) can send
-- the same request again, the job id being its idempotency key, and learn how its own signup
-- went. The signature is unchanged, so grants made on the function are kept.
create or replace function ackloop.sign_up(
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
    earlier record;
    written_before boolean := false;
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
        insert into users (email, display_name)
        select sign_up.email, sign_up.display_name
        from limits
        on conflict ((lower(email))) do nothing
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
    if found then
        return;
    end if;
    -- The email is taken. By this very signup, if its job id was given and is there: a new
    -- statement, so it sees a signup that committed while the insert waited for it. (Reading
    -- the name needs `select (display_name)` on users.)
    if new_job_id is not null then
        select jobs.id, jobs.user_id, users.email, users.display_name
        into earlier
        from player_creation_jobs as jobs
        join users on users.id = jobs.user_id
        where jobs.id = new_job_id;
        written_before := found;
    end if;
    if not written_before then
        raise exception 'duplicate key value violates unique constraint "users_email_key"'
            using errcode = 'unique_violation', constraint = 'users_email_key', table = 'users',
                  schema = current_schema();
    end if;
    if earlier.email is distinct from sign_up.email
        or earlier.display_name is distinct from sign_up.display_name then
        raise exception 'job id % belongs to a signup with another email or display name', new_job_id
            using errcode = 'unique_violation', constraint = 'player_creation_jobs_pkey',
                  table = 'player_creation_jobs', schema = current_schema();
    end if;
    -- This very signup, written before: its job, as it was returned then (nothing is notified
    -- again; a worker has it or will find it).
    return query select earlier.id, earlier.user_id;
end
$$;

-- sign_up now reads a taken email's display name. The auth role of sql/roles.sql gets that
-- here, so a taken email does not fail with "permission denied" between this migration and the
-- next run of roles.sql.
do $$
begin
    if exists (select from pg_roles where rolname = 'ackloop_auth') then
        grant select (display_name) on users to ackloop_auth;
    end if;
end
$$;

insert into ackloop.applied_migrations (version, description)
values (20261126000003, 'idempotent signups');
