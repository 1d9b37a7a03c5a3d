-- The signup transaction with its wake-up sent after the commit instead of inside it: the same
-- user and job rows, then `pg_notify` in a transaction of its own, which writes no WAL and so
-- holds the server's notify lock for microseconds, not through a commit's flush. What a signup
-- could reach if the contract notified after its commit (issue 24): `make bench` prints it
-- beside the ceiling of the transaction as ackloop runs it (bench/signup.sql).
\set n random(1, 2000000000)
begin;
with users as (
    insert into ackloop.builtin_users (email, display_name)
    values ('pgbench-' || gen_random_uuid() || '@example.com', 'Bench ' || :n)
    returning id, display_name
)
insert into ackloop.player_creation_jobs (id, builtin_user_id, user_id, display_name)
select gen_random_uuid(), users.id, users.id::text, users.display_name
from users
returning id as job_id \gset
commit;
select pg_notify('player_jobs', ':job_id');
