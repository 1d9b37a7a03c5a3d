-- The signup with its wake-up sent inside its transaction, as ackloop sent it before migration 08
-- (and as `sign_up` with a channel still does inside a caller's transaction): the transaction
-- holds the server's notify lock from just before its commit until the commit is flushed, so
-- these commits never share a flush. `make bench` prints it beside the ceiling of the signup as
-- ackloop runs it now (bench/signup.sql, the wake-up after the commit).
\set n random(1, 2000000000)
select user_id
from ackloop.sign_up('pgbench-' || gen_random_uuid() || '@example.com', 'Bench ' || :n, gen_random_uuid(), 'player_jobs', 5000);
