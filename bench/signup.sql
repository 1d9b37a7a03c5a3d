-- The signup transaction, exactly as ackloop runs it: user + job + wake-up in one statement, one
-- commit. tests/it/protocol.rs checks it against the code, with these binds:
-- store::insert_user_and_job
-- $1 = 'pgbench-' || gen_random_uuid() || '@example.com'
-- $2 = 'Bench ' || :n
-- $3 = gen_random_uuid()
-- $4 = 'player_jobs'
-- $5 = null
\set n random(1, 2000000000)
with limits as (
    select set_config('lock_timeout', coalesce(null, current_setting('lock_timeout')), true)
),
new_user as (
    insert into users (email, display_name)
    select 'pgbench-' || gen_random_uuid() || '@example.com', 'Bench ' || :n
    from limits
    returning id
),
new_job as (
    insert into player_creation_jobs (id, user_id)
    select gen_random_uuid(), id
    from new_user
    returning id, user_id
)
select new_job.user_id as user_id
from new_job
cross join lateral pg_notify('player_jobs', new_job.id::text) as notified;
