-- The example player service's own schema, beside ackloop's (which lives in the `ackloop`
-- schema and is never touched here): applied by the service's own migrator and recorded in its
-- own table (player_service_migrations), so ackloop's schema check and `ackloop migrate` never
-- see these versions.

-- This service's players: one per user of the auth service, keyed by that service's user id
-- (text: ackloop hands it over as text, whatever its type there).
create table players (
    id bigint generated always as identity primary key,
    user_id text not null,
    display_name text not null,
    level integer not null default 1,
    coins bigint not null default 0,
    created_at timestamptz not null default now(),
    constraint players_user_id_key unique (user_id)
);

-- What every new player starts with; operators edit it while the service runs.
create table starter_items (
    item text primary key,
    quantity integer not null,
    constraint starter_items_quantity_check check (quantity > 0)
);

insert into starter_items (item, quantity)
values ('wooden sword', 1), ('health potion', 3);

create table player_inventory (
    user_id text not null references players (user_id),
    item text not null,
    quantity integer not null,
    primary key (user_id, item),
    constraint player_inventory_quantity_check check (quantity > 0)
);
