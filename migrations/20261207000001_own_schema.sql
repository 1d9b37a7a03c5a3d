-- Everything ackloop owns lives in the schema `ackloop`, so that it joins a database whose
-- services already have tables named users, players or player_creation_jobs of their own, and
-- leaves them as they are. This step brings ackloop's three tables there:
-- - on a new database, it creates them;
-- - on a database migrated by an earlier ackloop (its tables in `public`), it moves them, rows,
--   identity counters, indexes and grants included (`alter table … set schema` moves a table
--   without copying it);
-- then it names the quick start's tables for what they are: the built-in auth and player
-- services' `builtin_users` and `builtin_players`, apart from any service's own.
-- The next migration reshapes the job table; both paths meet here, so a moved database and a
-- new one end up identical (a test compares their schema dumps).
create schema if not exists ackloop;

-- The migrations applied, recorded by the migrations themselves, so a database migrated by psql,
-- Flyway or any other tool from these files is recognised like one migrated by sqlx. Every
-- migration ends by inserting its own row.
create table if not exists ackloop.applied_migrations (
    version bigint primary key,
    description text not null,
    applied_at timestamptz not null default now()
);

-- The input rules the built-in users table checks (its constraints call them): null when the value
-- is acceptable, else the rule it breaks (the text Rust's error shows). Whitespace is Unicode's
-- White_Space set and control characters are Unicode's Cc, spelled out so that no locale changes
-- them. PL/pgSQL, not SQL: a SQL function would be inlined, its text parsed again, into every
-- insert's check constraints. The search_path is pinned, as on every ackloop function, so that
-- no caller's schema can shadow what these call.
create or replace function ackloop.email_problem(email text) returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    return case
        when email is null or email = '' then 'must not be empty'
        when char_length(email) > 254 then 'must be at most 254 characters'
        when email ~ '[\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]'
            then 'must not contain spaces or control characters'
        when strpos(email, '@') = 0 then 'must contain one ''@'''
        when email ~ '@.*@' then 'must contain only one ''@'''
        when char_length(split_part(email, '@', 1)) not between 1 and 64
            then 'needs 1 to 64 characters before the ''@'''
        when split_part(email, '@', 1) ~ '[<>()\[\]\\,;:"]'
            then 'has a character not allowed before the ''@'''
        when strpos(split_part(email, '@', 2), '.') = 0
            then 'needs a domain with a dot, like example.com'
        -- Labels of ASCII letters, digits and hyphens (not first or last), or any other
        -- character beyond ASCII (internationalised names), separated by single dots.
        when split_part(email, '@', 2) !~ '^([a-zA-Z0-9\u0080-\U0010ffff]([a-zA-Z0-9\u0080-\U0010ffff-]*[a-zA-Z0-9\u0080-\U0010ffff])?\.)+[a-zA-Z0-9\u0080-\U0010ffff]([a-zA-Z0-9\u0080-\U0010ffff-]*[a-zA-Z0-9\u0080-\U0010ffff])?$'
            then 'has an invalid domain'
    end;
end
$$;

create or replace function ackloop.display_name_problem(display_name text) returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    return case
        when display_name is null or display_name = '' then 'must not be empty'
        when char_length(display_name) > 64 then 'must be at most 64 characters'
        when display_name ~ '^[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$'
            then 'must not be only whitespace'
        when display_name ~ '[\u0001-\u001f\u007f-\u009f]' then 'must not contain control characters'
        when display_name ~ '^[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]|[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]$'
            then 'must not start or end with whitespace'
    end;
end
$$;

do $$
declare
    -- What the earlier layout recorded when fully applied.
    earlier_versions constant bigint[] := array[
        20261124000001, 20261124000002, 20261124000003, 20261125000001, 20261125000002,
        20261126000002, 20261126000003, 20261126000004
    ];
    recorded bigint[];
    grantee text;
begin
    select coalesce(array_agg(version order by version), '{}')
    into recorded
    from ackloop.applied_migrations
    where version < 20261207000000;

    -- A database from before the migrations recorded themselves (only sqlx's record in public
    -- tells): it must be brought to the earlier layout's last version first.
    if recorded = '{}' and to_regclass('public._sqlx_migrations') is not null then
        select coalesce(array_agg(version order by version), '{}')
        into recorded
        from public._sqlx_migrations
        where version = any (earlier_versions);
        if recorded <> '{}' then
            raise exception 'this database holds an early ackloop schema (migrations % applied, of %)',
                    recorded, earlier_versions
                using hint = 'finish it with the ackloop release that made it (its `ackloop migrate`), then migrate with this one';
        end if;
    end if;

    if recorded = '{}' then
        -- A new database: the tables as the earlier layout made them, in ackloop's schema.
        create table ackloop.users (
            id bigint generated always as identity primary key,
            email text not null,
            display_name text not null,
            created_at timestamptz not null default now(),
            constraint users_email_valid check (ackloop.email_problem(email) is null),
            constraint users_display_name_valid check (ackloop.display_name_problem(display_name) is null)
        );
        create unique index users_email_key on ackloop.users (lower(email));
        create table ackloop.player_creation_jobs (
            id uuid primary key,
            user_id bigint not null references ackloop.users (id) on delete cascade,
            status text not null default 'pending',
            attempts integer not null default 0,
            last_error text,
            run_after timestamptz not null default now(),
            created_at timestamptz not null default now(),
            updated_at timestamptz not null default now(),
            completed_at timestamptz,
            constraint player_creation_jobs_status_check check (status in ('pending', 'done', 'failed')),
            constraint player_creation_jobs_attempts_check check (attempts >= 0),
            constraint player_creation_jobs_completed_at_check
                check ((status = 'pending') = (completed_at is null)),
            constraint player_creation_jobs_user_id_key unique (user_id)
        );
        create table ackloop.players (
            id bigint generated always as identity primary key,
            user_id bigint not null references ackloop.users (id) on delete cascade,
            display_name text not null,
            created_at timestamptz not null default now(),
            constraint players_display_name_length check (char_length(display_name) between 1 and 64),
            constraint players_user_id_key unique (user_id)
        );
    elsif recorded = earlier_versions then
        -- A done job keeps the player's id and answer from now on: one whose player is gone
        -- (deleted, or left out of a restore) has none to keep. Refused before anything moves,
        -- while the earlier release's `ackloop jobs retry --repair --all-missing` can fix it.
        if exists (
            select from public.player_creation_jobs as jobs
            where jobs.status = 'done'
              and not exists (select from public.players where players.user_id = jobs.user_id)
        ) then
            raise exception 'some done jobs have no player (their players were deleted or not restored)'
                using hint = 'with the ackloop release that made this database, run `ackloop jobs retry --repair --all-missing` and let a worker finish them, then migrate with this one';
        end if;
        -- An earlier ackloop's database: its tables move, everything in them kept. A role granted
        -- anything on them (an operator's read-only role, say) keeps it, and gets the usage on
        -- the schema that reaching them there takes.
        for grantee in
            select distinct grants.grantee::regrole::text
            from pg_class as tables
            cross join lateral aclexplode(tables.relacl) as grants
            where tables.oid in ('public.users'::regclass, 'public.player_creation_jobs'::regclass,
                                 'public.players'::regclass)
              and grants.grantee not in (0, tables.relowner)
            union
            select distinct grants.grantee::regrole::text
            from pg_attribute as columns
            cross join lateral aclexplode(columns.attacl) as grants
            where columns.attrelid in ('public.users'::regclass, 'public.player_creation_jobs'::regclass,
                                       'public.players'::regclass)
              and grants.grantee <> 0
        loop
            execute format('grant usage on schema ackloop to %s', grantee);
        end loop;
        alter table public.users set schema ackloop;
        alter table public.player_creation_jobs set schema ackloop;
        alter table public.players set schema ackloop;
        -- Its indexes are rebuilt by the next migration under the names they have now.
        drop index ackloop.player_creation_jobs_pending_idx;
        drop index ackloop.player_creation_jobs_retry_idx;
        drop index ackloop.player_creation_jobs_finished_idx;
        drop index ackloop.player_creation_jobs_failed_idx;
        -- Its functions are replaced by the contract's migration (their grants carried over).
        delete from ackloop.applied_migrations where version = any (earlier_versions);
        -- sqlx recorded them in public; ackloop's record is now ackloop._sqlx_migrations. Only
        -- ackloop's rows go, and the table only if nothing else was recorded there.
        if to_regclass('public._sqlx_migrations') is not null then
            delete from public._sqlx_migrations where version = any (earlier_versions);
            if not exists (select from public._sqlx_migrations) then
                drop table public._sqlx_migrations;
            end if;
        end if;
    else
        raise exception 'this database holds part of an earlier ackloop schema (migrations % applied, of %)',
                recorded, earlier_versions
            using hint = 'finish it with the ackloop release that made it (its `ackloop migrate`), then migrate with this one';
    end if;

    -- The quick start's tables, named as the built-in services' own.
    alter table ackloop.users rename to builtin_users;
    alter table ackloop.builtin_users rename constraint users_pkey to builtin_users_pkey;
    alter table ackloop.builtin_users rename constraint users_email_valid to builtin_users_email_valid;
    alter table ackloop.builtin_users rename constraint users_display_name_valid to builtin_users_display_name_valid;
    alter index ackloop.users_email_key rename to builtin_users_email_key;
    alter sequence ackloop.users_id_seq rename to builtin_users_id_seq;
    alter table ackloop.players rename to builtin_players;
    alter table ackloop.builtin_players rename constraint players_pkey to builtin_players_pkey;
    alter table ackloop.builtin_players rename constraint players_user_id_fkey to builtin_players_user_id_fkey;
    alter table ackloop.builtin_players rename constraint players_user_id_key to builtin_players_user_id_key;
    alter table ackloop.builtin_players
        rename constraint players_display_name_length to builtin_players_display_name_length;
    alter sequence ackloop.players_id_seq rename to builtin_players_id_seq;
end
$$;

insert into ackloop.applied_migrations (version, description)
values (20261207000001, 'own schema');
