-- The built-in player service as a handler like any other (issue 24): its batch form, one
-- statement for a whole claimed batch, beside `insert_builtin_player` for one job.
set local lock_timeout = '5s';

-- Creates the players of claimed jobs' built-in users in ackloop.builtin_players (one that
-- exists is kept) and returns them in the order of `job_ids`, for mark_done. A job that is not
-- a built-in signup (added by a service, or no job at all): 22023, and nothing is written.
create function ackloop.insert_builtin_players(job_ids uuid[])
returns table (job_id uuid, player_id bigint, display_name text, created_at timestamptz)
language plpgsql volatile security definer
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

-- Closed to PUBLIC (a function a migration makes is executable by PUBLIC unless revoked), and
-- open to whoever may call the one-job form.
revoke execute on function ackloop.insert_builtin_players(uuid[]) from public;
do $$
declare
    kept record;
begin
    for kept in
        select distinct grants.grantee::regrole::text as grantee
        from pg_proc as procs
        cross join lateral aclexplode(procs.proacl) as grants
        where procs.oid = 'ackloop.insert_builtin_player(uuid)'::regprocedure
          and grants.privilege_type = 'EXECUTE'
          and grants.grantee <> 0
          and grants.grantee <> procs.proowner
    loop
        execute format('grant execute on function ackloop.insert_builtin_players(uuid[]) to %s', kept.grantee);
    end loop;
end
$$;

insert into ackloop.applied_migrations (version, description)
values (20261207000007, 'built-in batch handler');
