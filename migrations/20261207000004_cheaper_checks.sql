-- Taking the tables' locks waits behind a long transaction (a worker's claim, a prune) and
-- holds every signup up meanwhile: give up after 5 s instead; run `ackloop migrate` again.
set local lock_timeout = '5s';

-- The same rules, checked once and more cheaply. Measured as the backend's CPU time per committed
-- call (3,000 calls of `sign_up`, 300 of `sign_up_many` of 32 and `complete_jobs(32)`), against
-- the layout before the move into the schema `ackloop`: the contract's checks had made each
-- signup and each completing statement 10-20 % dearer.
--
-- The input rules run on every row the tables' check constraints see (two per built-in signup),
-- and a pinned search_path costs each call a save and restore of the setting: about 2 µs, a
-- quarter of a built-in user's insert (6,400 users in batches of 64: 80 ms unpinned, 108 ms
-- pinned). They need no pin of their own: they call only pg_catalog's built-ins, and a call that
-- decides anything runs under a pinned search_path already, inside the contract's functions
-- (the only writers of ackloop's tables). A service calling one
-- directly, to check input before it writes, resolves names through its own search_path: it can
-- only mislead itself, and the same rule is applied again, pinned, when it writes. (PL/pgSQL
-- plans again when it runs under another search_path, so no plan made under a service's
-- search_path is reused inside the contract.)
alter function ackloop.email_problem(text) reset search_path;
alter function ackloop.display_name_problem(text) reset search_path;
alter function ackloop.user_id_problem(text) reset search_path;
alter function ackloop.json_object_problem(jsonb) reset search_path;

-- The job table's backstop of field rules (`player_creation_jobs_fields_check`) is dropped: a
-- check constraint is read from the catalog and prepared again by every statement that writes
-- the table, and this one, the largest, cost each signup and each completing statement about
-- 20 µs of the server's time (backend CPU, 3,000 committed `sign_up` calls: 330 µs with it,
-- 296 µs without). The same rules are applied, with their messages, by the functions that write
-- (add_job: user_id_problem, display_name_problem, json_object_problem; mark_done: the player id
-- and result; sign_up: the built-in user's own checks), and only those functions can write:
-- no service role has a write privilege on the table. What stays is what the states rest on:
-- the status, the attempts, `completed_at` with the status, and a done job's answer.
alter table ackloop.player_creation_jobs
    drop constraint player_creation_jobs_fields_check,
    -- Not an input rule but the table's structure, which readers rely on: a built-in job's user
    -- is the built-in user of that id. Small, so cheap to prepare. (Checked on the rows there
    -- already: all passed it within the dropped constraint.)
    add constraint player_creation_jobs_builtin_user_matches
        check (builtin_user_id is null or user_id = builtin_user_id::text);

-- The built-in users' rules move out of the table into the two functions that write it. Each
-- signup ran them twice (sign_up checks first, for the message; the table's constraints again),
-- and each statement read and prepared both constraints anew. sign_up already checks;
-- sign_up_many now checks its whole input first and names the first entry's broken rule as sign_up
-- does (23514, the same constraint names, the rule in the message; the entry in the detail).
alter table ackloop.builtin_users
    drop constraint builtin_users_email_valid,
    drop constraint builtin_users_display_name_valid;

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

insert into ackloop.applied_migrations (version, description)
values (20261207000004, 'cheaper checks');
