-- The worker transaction, exactly as ackloop runs it: claim up to 32 due jobs, create their
-- players, mark them done, notify each, one commit. tests/it/protocol.rs checks it against the
-- code, with these binds:
-- store::complete_due_jobs
-- $1 = 32
-- $2 = 'player_jobs_done'
with claimed as (
    select id, user_id
    from player_creation_jobs
    where status = 'pending'
      and run_after <= now()
      and attempts = 0
    order by run_after, id
    limit 32
    for update skip locked
),
new_players as (
    insert into players (user_id, display_name)
    select users.id, users.display_name
    from claimed
    join users on users.id = claimed.user_id
    on conflict (user_id) do nothing
    returning user_id
),
completed as (
    update player_creation_jobs
    set status = 'done',
        attempts = player_creation_jobs.attempts + 1,
        last_error = null,
        updated_at = now(),
        completed_at = now()
    from claimed
    where player_creation_jobs.id = claimed.id
    returning
        player_creation_jobs.id,
        extract(epoch from now() - player_creation_jobs.created_at)::float8 as waited_secs
)
select completed.id as id, completed.waited_secs as waited_secs
from completed
cross join lateral pg_notify('player_jobs_done', completed.id::text) as notified;
