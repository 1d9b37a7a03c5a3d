-- The signup, exactly as ackloop writes one alone: user + job in one transaction, committed, then
-- its wake-up in a transaction of its own, in one CALL. tests/it/protocol.rs checks it against
-- the code, with these binds:
-- store::write_user_and_job
-- $1 = 'pgbench-' || gen_random_uuid() || '@example.com'
-- $2 = 'Bench ' || :n
-- $3 = gen_random_uuid()
-- $4 = 'player_jobs'
-- $5 = 5000
\set n random(1, 2000000000)
call ackloop.sign_up_then_notify('pgbench-' || gen_random_uuid() || '@example.com', 'Bench ' || :n, gen_random_uuid(), 'player_jobs', 5000, null, null);
