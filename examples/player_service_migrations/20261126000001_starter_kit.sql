-- The example player service's own schema, beside ackloop's: applied by the service's own
-- migrator and recorded in its own table (player_service_migrations), so ackloop's schema check
-- and `ackloop migrate` never see these versions.

-- What this service adds to a player.
alter table players
    add column level integer not null default 1,
    add column coins bigint not null default 0;

-- What every new player starts with; operators edit it while the service runs.
create table starter_items (
    item text primary key,
    quantity integer not null,
    constraint starter_items_quantity_check check (quantity > 0)
);

insert into starter_items (item, quantity)
values ('wooden sword', 1), ('health potion', 3);

create table player_inventory (
    user_id bigint not null references players (user_id),
    item text not null,
    quantity integer not null,
    primary key (user_id, item),
    constraint player_inventory_quantity_check check (quantity > 0)
);
