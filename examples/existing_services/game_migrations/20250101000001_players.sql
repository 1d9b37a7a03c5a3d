-- The game (player) service's own players, keyed by the accounts service's user id. Its own
-- migrations, recorded in its own table (game_migrations). Nothing here is ackloop's.
create table players (
    id bigserial primary key,
    account_id uuid not null,
    nickname text not null,
    level integer not null default 1,
    created_at timestamptz not null default now(),
    -- One player per account: the handler's insert finds the player an earlier attempt made.
    constraint players_account_id_key unique (account_id)
);
