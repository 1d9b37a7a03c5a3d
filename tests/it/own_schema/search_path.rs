//! The contract resolves ackloop's objects by itself: a caller's search_path, whatever it puts
//! first (a service's own `users` or `players`, tables and functions named like ackloop's,
//! temporary tables), never changes which table a step reads or writes.

use ackloop::NewUser;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

use crate::common::*;

/// What a hostile search_path finds first: tables named like ackloop's that refuse every row
/// (so a write that lands there fails the test loudly), and functions named like ackloop's that
/// raise.
const DECOYS: &str = r#"
    create table {schema}.users (id bigint, email text, display_name text, constraint decoy check (false));
    create table {schema}.players (id bigint, user_id bigint, display_name text, constraint decoy check (false));
    create table {schema}.builtin_users (id bigint, email text, display_name text, constraint decoy check (false));
    create table {schema}.builtin_players (id bigint, user_id bigint, display_name text, constraint decoy check (false));
    create table {schema}.player_creation_jobs (id uuid, user_id text, constraint decoy check (false));
    create function {schema}.uuid_v7() returns uuid language plpgsql as $$ begin raise exception 'decoy uuid_v7 called'; end $$;
    create function {schema}.email_problem(text) returns text language plpgsql as $$ begin raise exception 'decoy email_problem called'; end $$;
    create function {schema}.display_name_problem(text) returns text language plpgsql as $$ begin raise exception 'decoy display_name_problem called'; end $$;
    create function {schema}.backoff_ms(integer, bigint, bigint) returns bigint language plpgsql as $$ begin raise exception 'decoy backoff_ms called'; end $$;
    create function {schema}.generate_series(integer, integer, integer) returns setof integer language plpgsql as $$ begin raise exception 'decoy generate_series called'; end $$;
    create function {schema}.cardinality(anyarray) returns integer language plpgsql as $$ begin raise exception 'decoy cardinality called'; end $$;
    create function {schema}.notify_jobs(text, uuid[]) returns integer language plpgsql as $$ begin raise exception 'decoy notify_jobs called'; end $$;
"#;

fn decoys(schema: &str) -> String {
    DECOYS.replace("{schema}", schema)
}

/// A pool whose every session has decoy temporary tables and a search_path that puts them, then
/// the `hostile` schema's decoys, first.
async fn hostile_pool(options: PgPoolOptions, connect: PgConnectOptions, connections: u32) -> PgPool {
    options
        .max_connections(connections)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute(sqlx::AssertSqlSafe(decoys("pg_temp"))).await?;
                Ok(())
            })
        })
        .connect_with(connect.options([("search_path", "pg_temp, hostile, pg_catalog, public")]))
        .await
        .expect("connect with a hostile search_path")
}

#[sqlx::test]
async fn a_services_own_users_first_in_the_search_path_does_not_cross_wire_signups(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let admin = pool(options.clone(), connect.clone(), 3).await;
    let worker = spawn_worker(&admin, worker_config());
    let real = signups(&admin)
        .await
        .create_user_and_await_player(&NewUser::new("real@example.com", "Real").unwrap(), DEADLINE)
        .await
        .unwrap();
    // The issue's reproduction: the auth service's own users, with a unique index on lower(email),
    // first in its search_path.
    execute(
        &admin,
        "create schema auth;
         create table auth.users (id bigserial primary key, email text, display_name text);
         create unique index on auth.users (lower(email));",
    )
    .await;
    let auth = pool(options, connect.options([("search_path", "auth, public")]), 3).await;
    let (job_id, user_id): (uuid::Uuid, i64) =
        sqlx::query_as("select job_id, user_id from ackloop.sign_up('evil@example.com', 'Evil')")
            .fetch_one(&auth)
            .await
            .expect("sign_up from a session whose own users come first");
    assert_ne!(user_id, real.user_id.get(), "a new user, not the first one's id");
    let (email,): (String,) = sqlx::query_as("select email from ackloop.builtin_users where id = $1")
        .bind(user_id)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(email, "evil@example.com");
    let player = signups(&auth)
        .await
        .await_player(job_id.into(), DEADLINE)
        .await
        .expect("the player of the user signed up");
    assert_eq!(
        (player.user_id.get(), player.display_name.as_str()),
        (user_id, "Evil")
    );
    let theirs: i64 = sqlx::query_scalar("select count(*) from auth.users")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(theirs, 0, "the service's own users are untouched");
    worker.stop().await;
}

#[sqlx::test]
async fn a_player_services_own_players_first_in_the_search_path_are_left_alone(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let admin = pool(options.clone(), connect.clone(), 3).await;
    execute(
        &admin,
        "create schema game;
         create table game.players (id bigserial primary key, user_id bigint unique, display_name text);
         create table game.player_creation_jobs (id uuid primary key, user_id bigint, status text);",
    )
    .await;
    let worker_pool = pool(
        options,
        ackloop::worker_session_options(connect.options([("search_path", "game, public")])),
        4,
    )
    .await;
    let worker = spawn_worker(&worker_pool, worker_config());
    let signups = signups(&admin).await;
    for n in 0..5 {
        signups
            .create_user_and_await_player(&user(n), DEADLINE)
            .await
            .expect("completed by a worker whose own players come first");
    }
    let (ours, theirs, their_jobs): (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from ackloop.builtin_players),
                (select count(*) from game.players),
                (select count(*) from game.player_creation_jobs)",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!((ours, theirs, their_jobs), (5, 0, 0));
    worker.stop().await;
}

#[sqlx::test]
async fn the_whole_loop_ignores_a_hostile_search_path_on_every_session(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let admin = pool(options.clone(), connect.clone(), 2).await;
    execute(&admin, "create schema hostile").await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(decoys("hostile")))
        .execute(&admin)
        .await
        .unwrap();
    let auth = hostile_pool(options.clone(), connect.clone(), 3).await;
    let workers = hostile_pool(options, ackloop::worker_session_options(connect), 4).await;
    ackloop::check_schema(&auth).await.expect("the schema check");
    let worker = spawn_worker(&workers, worker_config());
    let signups = signups(&auth).await;
    for n in 0..5 {
        let player = signups
            .create_user_and_await_player(&user(n), DEADLINE)
            .await
            .expect("a signup and its player, every name resolved to ackloop's");
        assert_eq!(player.display_name, user(n).display_name());
    }
    // The one-at-a-time path too: a job that failed once is retried alone (start_attempt).
    execute(
        &admin,
        "create function public.fail_once() returns trigger language plpgsql as $$
         begin
             -- A sequence, not a table: it does not roll back with the failed attempt.
             if new.display_name = 'Once' and nextval('public.once') = 1 then
                 raise exception 'fails once' using errcode = '40001';
             end if;
             return new;
         end $$;
         create sequence public.once;
         create trigger fail_once before insert on ackloop.builtin_players
             for each row execute function public.fail_once();",
    )
    .await;
    signups
        .create_user_and_await_player(&NewUser::new("once@example.com", "Once").unwrap(), DEADLINE)
        .await
        .expect("retried alone after its first attempt failed");
    let (players, jobs_done, decoy_rows): (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from ackloop.builtin_players),
                (select count(*) from ackloop.player_creation_jobs where status = 'done'),
                (select count(*) from hostile.users) + (select count(*) from hostile.players)
                  + (select count(*) from hostile.builtin_users) + (select count(*) from hostile.builtin_players)
                  + (select count(*) from hostile.player_creation_jobs)",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!((players, jobs_done, decoy_rows), (6, 6, 0));
    worker.stop().await;
}

/// The input rules, which the writing functions call on every row: unpinned for speed
/// (migration `…04_cheaper_checks`), and safe because whatever decides runs pinned.
const INPUT_RULES: [&str; 4] = [
    "display_name_problem",
    "email_problem",
    "json_object_problem",
    "user_id_problem",
];

#[sqlx::test]
async fn every_function_of_the_contract_pins_its_search_path(pool: PgPool) {
    let unpinned: Vec<(String, bool)> = sqlx::query_as(
        "select proname::text, prosecdef
         from pg_proc
         where pronamespace = 'ackloop'::regnamespace
           and not coalesce('search_path=pg_catalog, ackloop, pg_temp' = any(proconfig), false)
         order by proname",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    // The input rules, and the email fold: one inlined expression, every name in it qualified;
    // the writing steps' per-row wake-up (qualified, called by pinned definers); and the
    // procedures that commit, which PostgreSQL refuses to pin or run as a definer: they run as
    // their caller, every name in them qualified (the signups above go through them).
    let mut expected: Vec<(String, bool)> =
        INPUT_RULES.iter().map(|name| (name.to_string(), false)).collect();
    for name in [
        "fold_email",
        "notify_job",
        "sign_up_then_notify",
        "sign_up_many_then_notify",
    ] {
        expected.push((name.to_owned(), false));
    }
    expected.sort();
    assert_eq!(
        unpinned, expected,
        "functions without a pinned search_path (name, security definer)"
    );
    // Only the functions the roles are granted may be called: none is open to PUBLIC but the
    // email fold (a pure function over its argument, used in lookups by any role).
    let open: Vec<String> = sqlx::query_scalar(
        "select proname::text
         from pg_proc
         where pronamespace = 'ackloop'::regnamespace
           and (proacl is null or exists (select from aclexplode(proacl) as grants where grants.grantee = 0))
         order by proname",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(open, ["fold_email"], "functions anyone may call");
}

/// Every table name in the Rust side's SQL and in the contract's function bodies carries its
/// schema: nothing is left for a search_path to decide.
#[test]
fn no_statement_names_an_ackloop_table_without_its_schema() {
    let unqualified = regex_lite_unqualified();
    let mut sources: Vec<(String, String)> = Vec::new();
    for dir in ["src/store", "migrations"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            sources.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            ));
        }
    }
    let mut found = Vec::new();
    for (path, text) in &sources {
        for (number, line) in text.lines().enumerate() {
            let code = line.split("--").next().unwrap_or_default();
            let code = code.split("//").next().unwrap_or_default();
            if unqualified(code) {
                found.push(format!("{path}:{}: {}", number + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "table names without their schema:\n{}",
        found.join("\n")
    );
}

/// Whether `code` names one of ackloop's tables after `from`, `join`, `into`, `update` or `on`
/// without `ackloop.` in front.
fn regex_lite_unqualified() -> impl Fn(&str) -> bool {
    const TABLES: [&str; 7] = [
        "player_creation_jobs",
        "builtin_users",
        "builtin_players",
        "users",
        "players",
        "applied_migrations",
        "_sqlx_migrations",
    ];
    const KEYWORDS: [&str; 6] = ["from", "join", "into", "update", "table", "exists"];
    move |code: &str| {
        let words: Vec<&str> = code
            .split(|c: char| c.is_whitespace() || c == '(' || c == ',' || c == '"')
            .filter(|word| !word.is_empty())
            .collect();
        words.windows(2).any(|pair| {
            KEYWORDS.contains(&pair[0].to_ascii_lowercase().as_str()) && TABLES.contains(&pair[1])
        })
    }
}

/// A service that calls an input rule directly under a search_path of its own making misleads
/// only itself: the same rule inside the contract is planned again under the pinned path, in the
/// same session, and still refuses.
#[sqlx::test]
async fn an_input_rule_fooled_by_a_callers_search_path_still_holds_inside_the_contract(pool: PgPool) {
    let mut conn = pool.acquire().await.unwrap();
    for statement in [
        "create schema hostile",
        "create function hostile.char_length(text) returns integer language sql as 'select 1'",
        "set search_path = hostile, pg_catalog",
    ] {
        sqlx::query(statement).execute(&mut *conn).await.unwrap();
    }
    let too_long = format!("{}@example.com", "a".repeat(300));
    let fooled: Option<String> = sqlx::query_scalar("select ackloop.email_problem($1)")
        .bind(&too_long)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(fooled, None, "the hostile char_length was not used");
    let refused = sqlx::query("select * from ackloop.sign_up($1, 'Evil')")
        .bind(&too_long)
        .execute(&mut *conn)
        .await
        .expect_err("an email over 254 characters signed up");
    assert!(
        refused.to_string().contains("must be at most 254 characters"),
        "{refused}"
    );
    let users: i64 = sqlx::query_scalar("select count(*) from ackloop.builtin_users")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(users, 0);
}
