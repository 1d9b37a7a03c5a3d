-- A job carries everything its player service needs, so that services with their own tables
-- can use the loop: the service's own user id (bigint, uuid or text, kept as text), the display
-- name, and optional extra data. Done, it carries what the player service answered: its own
-- player id and a small result (JSON), which the waiting caller reads from here, never from the
-- service's tables. The built-in tables' jobs also keep their link to `builtin_users`.
--
-- Every job row is rewritten (the built-in user's display name, the built-in player's id and
-- result copied in): on a table of millions, apply this when signups are quiet.

-- The input rules of a job, as the Rust side applies them: null when acceptable, else the rule
-- broken. A user id is the service's own key as text: a number, a UUID or a string, without
-- control characters or surrounding whitespace (it is printed in logs and on the dashboard).
create function ackloop.user_id_problem(user_id text) returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, ackloop, pg_temp
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

-- Extra data for the player service, or a player service's result: a JSON object of at most
-- 8 KiB as text. A job is a hand-off, not a document store; larger data belongs in the service's
-- own tables, referenced from here.
create function ackloop.json_object_problem(data jsonb) returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    return case
        when data is null then null
        when jsonb_typeof(data) <> 'object' then 'must be a JSON object'
        when octet_length(data::text) > 8192 then 'must be at most 8192 bytes as JSON text'
    end;
end
$$;

alter table ackloop.player_creation_jobs rename column user_id to builtin_user_id;
alter table ackloop.player_creation_jobs
    rename constraint player_creation_jobs_user_id_fkey to player_creation_jobs_builtin_user_id_fkey;
alter table ackloop.player_creation_jobs drop constraint player_creation_jobs_user_id_key;
alter table ackloop.player_creation_jobs
    alter column builtin_user_id drop not null,
    add column user_id text,
    add column display_name text,
    add column extra jsonb,
    add column player_id text,
    add column result jsonb;

-- Jobs of the built-in tables: their user as text, the display name from the user, and for the
-- done ones the built-in player and what the caller was told of it.
update ackloop.player_creation_jobs as jobs
set user_id = users.id::text,
    display_name = users.display_name
from ackloop.builtin_users as users
where users.id = jobs.builtin_user_id;
update ackloop.player_creation_jobs as jobs
set player_id = players.id::text,
    result = jsonb_build_object('display_name', players.display_name, 'created_at', players.created_at)
from ackloop.builtin_players as players
where players.user_id = jobs.builtin_user_id
  and jobs.status = 'done';
-- (A done job without its player was refused by the migration before this one.)

-- The contract's functions apply the full rules (user_id_problem, display_name_problem,
-- json_object_problem) before they write, and only they write (they run as ackloop's owner; no
-- service role may write the table). The checks here are the schema's backstop: built-in
-- expressions, folded into one constraint, since every check a row passes costs each insert
-- (a PL/pgSQL call each would cost a signup about 0.05 ms).
alter table ackloop.player_creation_jobs
    alter column user_id set not null,
    alter column display_name set not null,
    -- One signup, one player: a built-in user has one job.
    add constraint player_creation_jobs_builtin_user_id_key unique (builtin_user_id),
    add constraint player_creation_jobs_fields_check check (
        char_length(user_id) between 1 and 128
        and char_length(display_name) between 1 and 64
        and (extra is null or (jsonb_typeof(extra) = 'object' and octet_length(extra::text) <= 8192))
        and (result is null or (jsonb_typeof(result) = 'object' and octet_length(result::text) <= 8192))
        and (player_id is null or char_length(player_id) between 1 and 128)
        -- A built-in job's user is the built-in user of that id.
        and (builtin_user_id is null or user_id = builtin_user_id::text)
    ),
    -- A done job always has its answer; no other has one.
    add constraint player_creation_jobs_done_has_player
        check ((status = 'done') = (player_id is not null and result is not null));

-- One job per user of a service (add_job): a service's user ids are its own, so they are unique
-- among the services' jobs only; a built-in user's id (kept as text too) never collides with one.
create unique index player_creation_jobs_user_id_key
    on ackloop.player_creation_jobs (user_id)
    where builtin_user_id is null;

-- Exactly the claim's predicate and order, so claiming stays an index scan over pending rows
-- however many finished rows accumulate.
create index player_creation_jobs_pending_idx
    on ackloop.player_creation_jobs (run_after, id)
    where status = 'pending';
-- Jobs tried before are retried alone, never in a batch. Workers look for the next one due, and
-- ask when it will be, often; this index holds only pending retries (a few rows), so those looks
-- cost nothing however long the queue of new jobs, and new jobs never enter it.
create index player_creation_jobs_retry_idx
    on ackloop.player_creation_jobs (run_after, id)
    where status = 'pending' and attempts > 0;
-- `jobs prune` deletes finished jobs oldest first, a batch at a time: without this index every
-- batch sorts every finished job, and a busy service keeps millions of them.
create index player_creation_jobs_finished_idx
    on ackloop.player_creation_jobs (completed_at)
    where status <> 'pending';
-- The dashboard and `ackloop status` list the latest failed jobs, newest first: without this
-- index that list walks every finished job to find the few failed ones.
create index player_creation_jobs_failed_idx
    on ackloop.player_creation_jobs (completed_at)
    where status = 'failed';

insert into ackloop.applied_migrations (version, description)
values (20261207000002, 'jobs for any service');
