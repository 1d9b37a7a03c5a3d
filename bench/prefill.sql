-- A populated, analysed database for the ceiling runs, like the one `ackloop bench` measures on:
-- on empty tables each backend caches a sequential-scan plan for the foreign-key check.
insert into ackloop.builtin_users (email, display_name)
select 'prefill-' || n || '@example.com', 'Prefill ' || n
from generate_series(1, 20000) as n;
insert into ackloop.builtin_players (user_id, display_name)
select id, display_name
from ackloop.builtin_users;
insert into ackloop.player_creation_jobs
    (id, builtin_user_id, user_id, display_name, status, attempts, completed_at, player_id, result)
select gen_random_uuid(), users.id, users.id::text, users.display_name, 'done', 1, now(),
       players.id::text,
       jsonb_build_object('display_name', players.display_name, 'created_at', players.created_at)
from ackloop.builtin_users as users
join ackloop.builtin_players as players on players.user_id = users.id;
analyze ackloop.builtin_users;
analyze ackloop.player_creation_jobs;
analyze ackloop.builtin_players;
