-- The player side's records, created by the worker from a player_creation_jobs row.
create table players (
    id bigint generated always as identity primary key,
    user_id bigint not null references users (id) on delete cascade,
    display_name text not null,
    created_at timestamptz not null default now(),
    constraint players_display_name_length check (char_length(display_name) between 1 and 64),
    -- The second line of defence for exactly-once: whatever a worker does, one player per user.
    constraint players_user_id_key unique (user_id)
);
