-- The signup transaction, exactly as ackloop runs it: user + job + wake-up in one statement, one
-- commit. tests/it/protocol.rs checks it against the code, with these binds:
-- store::insert_user_and_job
-- $1 = 'pgbench-' || gen_random_uuid() || '@example.com'
-- $2 = 'Bench ' || :n
-- $3 = gen_random_uuid()
-- $4 = 'player_jobs'
-- $5 = null
\set n random(1, 2000000000)
select user_id as user_id
from ackloop.sign_up('pgbench-' || gen_random_uuid() || '@example.com', 'Bench ' || :n, gen_random_uuid(), 'player_jobs', null);
