-- The signup transaction, exactly as ackloop runs it (src/store.rs insert_user_and_job):
-- user + job + wake-up in one statement, one commit.
\set n random(1, 2000000000)
with new_user as (
    insert into users (email, display_name)
    values ('pgbench-' || gen_random_uuid() || '@example.com', 'Bench ' || :n)
    returning id
),
new_job as (
    insert into player_creation_jobs (id, user_id)
    select gen_random_uuid(), id
    from new_user
    returning id, user_id
)
select new_job.user_id
from new_job
cross join lateral pg_notify('player_jobs', new_job.id::text) as notified;
