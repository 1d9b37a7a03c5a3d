-- A populated, analysed database for the ceiling runs, like the one `ackloop bench` measures on:
-- on empty tables each backend caches a sequential-scan plan for the foreign-key check.
insert into users (email, display_name)
select 'prefill-' || n || '@example.com', 'Prefill ' || n
from generate_series(1, 20000) as n;
insert into player_creation_jobs (id, user_id, status, attempts, completed_at)
select gen_random_uuid(), id, 'done', 1, now()
from users;
insert into players (user_id, display_name)
select id, display_name
from users;
analyze users;
analyze player_creation_jobs;
analyze players;
