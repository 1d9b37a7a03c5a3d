-- The accounts (auth) service's own users, as it had them before it used ackloop: its own id
-- type, its own columns, its own migrations (recorded in its own table, accounts_migrations).
-- Nothing here is ackloop's, and ackloop never touches it.
create table users (
    id uuid primary key,
    email text not null,
    password_hash text not null,
    created_at timestamptz not null default now(),
    constraint users_email_key unique (email)
);
