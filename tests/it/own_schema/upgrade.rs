//! A database on the earlier layout (ackloop's tables in `public`, sqlx's record in
//! `public._sqlx_migrations`) upgrades forward with every row, state and grant kept, and ends
//! with exactly the schema a new database gets.

use std::borrow::Cow;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

use crate::common::*;

/// The earlier layout's migrations, applied as sqlx applied them then: recorded in
/// `public._sqlx_migrations`, the `ackloop` schema made by the contract's migration itself.
async fn migrate_to_the_earlier_layout(pool: &PgPool) {
    let mut earlier = sqlx::migrate!("tests/it/legacy_layout");
    earlier.dangerous_set_table_name("_sqlx_migrations");
    earlier.create_schemas = Cow::Borrowed(&[]);
    earlier.run(pool).await.expect("the earlier layout's migrations");
}

/// Every row of `table`, as JSON, in id order.
async fn rows(pool: &PgPool, table: &str, order: &str) -> Vec<Value> {
    let all: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select coalesce(jsonb_agg(to_jsonb(t) order by {order}), '[]') from {table} as t"
    )))
    .fetch_one(pool)
    .await
    .unwrap_or_else(|err| panic!("read {table}: {err}"));
    all.as_array().cloned().unwrap_or_default()
}

/// A schema as the catalog describes it: columns in order with types, nullability and defaults,
/// constraints, indexes, sequences and function definitions.
pub async fn describe_schema(pool: &PgPool, schema: &str) -> Vec<String> {
    sqlx::query_scalar(
        r#"
        select line from (
            select format('column %s.%s %s%s%s #%s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                          case when a.attnotnull then ' not null' else '' end,
                          coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), ''),
                          a.attnum) as line
            from pg_attribute as a
            join pg_class as c on c.oid = a.attrelid
            left join pg_attrdef as d on d.adrelid = a.attrelid and d.adnum = a.attnum
            where c.relnamespace = $1::regnamespace and c.relkind = 'r'
              and a.attnum > 0 and not a.attisdropped
            union all
            select format('constraint %s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
            from pg_constraint
            where connamespace = $1::regnamespace
            union all
            select 'index ' || pg_get_indexdef(i.indexrelid)
            from pg_index as i
            join pg_class as c on c.oid = i.indexrelid
            where c.relnamespace = $1::regnamespace
            union all
            select 'sequence ' || relname
            from pg_class
            where relnamespace = $1::regnamespace and relkind = 'S'
            union all
            select 'function ' || pg_get_functiondef(oid)
            from pg_proc
            where pronamespace = $1::regnamespace
        ) as lines
        order by line
        "#,
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .expect("describe the schema")
}

/// Jobs in every state the earlier layout had, made through its own functions: done, failed,
/// waiting for a retry, an attempt counted but unfinished, pending, and one keyed by its caller.
async fn populate_the_earlier_layout(pool: &PgPool) -> uuid::Uuid {
    let key = uuid::Uuid::now_v7();
    for n in 1..=5 {
        sqlx::query("select * from ackloop.sign_up($1, $2)")
            .bind(format!("u{n}@example.com"))
            .bind(format!("User {n}"))
            .execute(pool)
            .await
            .unwrap();
    }
    sqlx::query("select * from ackloop.sign_up('keyed@example.com', 'Keyed', $1)")
        .bind(key)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("select * from ackloop.complete_jobs(2)")
        .execute(pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    for (reason, retryable) in [("a bad player", false), ("a flaky handler", true)] {
        let mut tx = conn.begin().await.unwrap();
        let (job, attempt): (uuid::Uuid, i32) =
            sqlx::query_as("select job_id, attempt from ackloop.claim_jobs(1)")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        sqlx::query(
            "select * from ackloop.record_failure(job_id => $1, attempt => $2, error => $3, retryable => $4,
                                                  backoff_base_ms => 60000)",
        )
        .bind(job)
        .bind(attempt)
        .bind(reason)
        .bind(retryable)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    let started: String = sqlx::query_scalar("select status from ackloop.start_attempt(any_job => true)")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(started, "started");
    key
}

#[sqlx::test(migrations = false)]
async fn an_earlier_layout_upgrades_with_every_row_state_and_grant(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect.clone(), 4).await;
    migrate_to_the_earlier_layout(&pool).await;
    let key = populate_the_earlier_layout(&pool).await;
    sqlx::raw_sql(include_str!("../legacy_roles.sql"))
        .execute(&pool)
        .await
        .unwrap();
    let oid: i64 = sqlx::query_scalar("select oid::int8 from pg_database where datname = current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let reporting = format!("upgrade_reporting_{oid}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop role if exists {reporting}; create role {reporting};
         grant select on public.player_creation_jobs to {reporting}"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let users = rows(&pool, "public.users", "id").await;
    let players = rows(&pool, "public.players", "id").await;
    let jobs = rows(&pool, "public.player_creation_jobs", "id").await;
    assert_eq!((users.len(), players.len(), jobs.len()), (6, 2, 6));
    let states: Vec<(&str, i64)> = jobs
        .iter()
        .map(|job| (job["status"].as_str().unwrap(), job["attempts"].as_i64().unwrap()))
        .collect();
    for expected in [("done", 1), ("failed", 1), ("pending", 1), ("pending", 0)] {
        assert!(states.contains(&expected), "{expected:?} in {states:?}");
    }

    ackloop::run_migrations(&pool).await.expect("the upgrade");
    ackloop::check_schema(&pool)
        .await
        .expect("the upgraded schema is current");

    // Nothing of ackloop's is left in public; sqlx's record there went with it.
    let left: Vec<String> = sqlx::query_scalar(
        "select relname::text from pg_class where relnamespace = 'public'::regnamespace
         union all select proname::text from pg_proc where pronamespace = 'public'::regnamespace",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(left.is_empty(), "left in public: {left:?}");

    // Every row, as it was.
    assert_eq!(rows(&pool, "ackloop.builtin_users", "id").await, users);
    assert_eq!(rows(&pool, "ackloop.builtin_players", "id").await, players);
    let moved = rows(&pool, "ackloop.player_creation_jobs", "id").await;
    assert_eq!(moved.len(), jobs.len());
    let mut attempts_under_way = 0;
    for (before, after) in jobs.iter().zip(&moved) {
        // An attempt under way (a job taken alone: its attempt counted before it was made, the
        // error the provisional text for it) is `running` since then, with no error yet.
        let under_way = before["last_error"].as_str().is_some_and(|error| {
            error.starts_with("attempt 1 did not finish") && error.ends_with("unless it is running now")
        });
        if under_way {
            attempts_under_way += 1;
            assert_eq!(
                (
                    &after["status"],
                    &after["last_error"],
                    &after["attempt_started_at"]
                ),
                (&Value::from("running"), &Value::Null, &before["updated_at"]),
                "the attempt under way of {before}"
            );
        } else {
            for column in ["status", "last_error"] {
                assert_eq!(before[column], after[column], "{column} of {before}");
            }
            assert_eq!(after["attempt_started_at"], Value::Null, "{after}");
        }
        for column in [
            "id",
            "attempts",
            "run_after",
            "created_at",
            "updated_at",
            "completed_at",
        ] {
            assert_eq!(before[column], after[column], "{column} of {before}");
        }
        let user_id = before["user_id"].as_i64().unwrap();
        assert_eq!(after["builtin_user_id"], user_id);
        assert_eq!(after["user_id"], user_id.to_string());
        let user = users.iter().find(|user| user["id"] == user_id).unwrap();
        assert_eq!(after["display_name"], user["display_name"]);
        match players.iter().find(|player| player["user_id"] == user_id) {
            Some(player) if before["status"] == "done" => {
                assert_eq!(after["player_id"], player["id"].as_i64().unwrap().to_string());
                assert_eq!(after["result"]["display_name"], player["display_name"]);
            }
            _ => assert_eq!(
                (&after["player_id"], &after["result"]),
                (&Value::Null, &Value::Null)
            ),
        }
    }
    assert_eq!(
        attempts_under_way, 1,
        "the filled database had one attempt under way"
    );

    // The grants: each side can still take its steps, the reporting role still reads the jobs,
    // and neither side can reach the tables past the functions.
    let mut conn = pool.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("set local role ackloop_auth")
        .execute(&mut *tx)
        .await
        .unwrap();
    let again: uuid::Uuid =
        sqlx::query_scalar("select job_id from ackloop.sign_up('keyed@example.com', 'Keyed', $1)")
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .expect("the auth role signs up; its key still names its signup");
    assert_eq!(again, key);
    sqlx::query("select * from ackloop.sign_up('new@example.com', 'New')")
        .execute(&mut *tx)
        .await
        .expect("a new signup as the auth role");
    let refused = sqlx::query("select count(*) from ackloop.builtin_users")
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("permission denied"), "{refused}");
    tx.rollback().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("set local role ackloop_worker")
        .execute(&mut *tx)
        .await
        .unwrap();
    let completed: i64 = sqlx::query_scalar("select count(*) from ackloop.complete_jobs(10)")
        .fetch_one(&mut *tx)
        .await
        .expect("the worker role completes jobs");
    assert_eq!(
        completed, 1,
        "the one new job never tried; the rest are retries or finished"
    );
    tx.rollback().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("set local role {reporting}")))
        .execute(&mut *tx)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar("select count(*) from ackloop.player_creation_jobs")
        .fetch_one(&mut *tx)
        .await
        .expect("the reporting role's grant moved with its table");
    assert_eq!(seen, 6);
    tx.rollback().await.unwrap();
    drop(conn);

    // The counters go on where they were.
    let signups = signups(&pool).await;
    let worker = spawn_worker(&pool, worker_config());
    let player = signups
        .create_user_and_await_player(&user(7), DEADLINE)
        .await
        .expect("a signup after the upgrade");
    let highest_before = users
        .iter()
        .map(|user| user["id"].as_i64().unwrap())
        .max()
        .unwrap();
    assert!(player.user_id.get() > highest_before);
    worker.stop().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop owned by {reporting}; drop role {reporting}"
    )))
    .execute(&pool)
    .await
    .unwrap();

    // And the schema is the one a new database gets.
    let upgraded = describe_schema(&pool, "ackloop").await;
    let fresh_name = format!("upgrade_fresh_{oid}");
    for statement in [
        format!("drop database if exists {fresh_name}"),
        format!("create database {fresh_name}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&pool)
            .await
            .unwrap();
    }
    let fresh = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(connect.database(&fresh_name))
        .await
        .unwrap();
    ackloop::run_migrations(&fresh).await.unwrap();
    let new = describe_schema(&fresh, "ackloop").await;
    fresh.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("drop database {fresh_name}")))
        .execute(&pool)
        .await
        .unwrap();
    let only_upgraded: Vec<&String> = upgraded.iter().filter(|line| !new.contains(line)).collect();
    let only_new: Vec<&String> = new.iter().filter(|line| !upgraded.contains(line)).collect();
    assert!(
        only_upgraded.is_empty() && only_new.is_empty(),
        "only in the upgraded schema: {only_upgraded:#?}\nonly in a new one: {only_new:#?}"
    );
}

#[sqlx::test(migrations = false)]
async fn a_part_of_the_earlier_layout_is_refused_with_what_to_do(pool: PgPool) {
    migrate_to_the_earlier_layout(&pool).await;
    execute(
        &pool,
        "delete from ackloop.applied_migrations where version = 20261126000004",
    )
    .await;
    let err = ackloop::run_migrations(&pool)
        .await
        .expect_err("a partial earlier schema");
    let text = format!("{err:?}");
    assert!(text.contains("part of an earlier ackloop schema"), "{text}");
    let kept: i64 = sqlx::query_scalar("select count(*) from public.users")
        .fetch_one(&pool)
        .await
        .expect("the earlier tables are where they were");
    assert_eq!(kept, 0);
}

#[sqlx::test(migrations = false)]
async fn a_done_job_whose_player_is_gone_stops_the_upgrade_before_anything_moves(pool: PgPool) {
    migrate_to_the_earlier_layout(&pool).await;
    populate_the_earlier_layout(&pool).await;
    execute(
        &pool,
        "delete from public.players where id = (select min(id) from public.players)",
    )
    .await;
    let err = ackloop::run_migrations(&pool)
        .await
        .expect_err("a done job without its player");
    let text = format!("{err:?}");
    assert!(
        text.contains("done jobs have no player") && text.contains("--repair"),
        "{text}"
    );
    let (in_public, recorded): (i64, i64) = sqlx::query_as(
        "select (select count(*) from public.player_creation_jobs),
                (select count(*) from ackloop.applied_migrations where version = 20261126000004)",
    )
    .fetch_one(&pool)
    .await
    .expect("the earlier layout, as it was");
    assert_eq!((in_public, recorded), (6, 1));
}

#[sqlx::test(migrations = false)]
async fn an_early_layout_from_before_the_contract_is_refused(pool: PgPool) {
    // The first five migrations only, as an ackloop from before the contract left it: recorded
    // by sqlx alone, nothing in ackloop's own record yet.
    let mut early = sqlx::migrate!("tests/it/legacy_layout");
    early.dangerous_set_table_name("_sqlx_migrations");
    early.create_schemas = Cow::Borrowed(&[]);
    early.migrations = Cow::Owned(early.migrations[..5].to_vec());
    early.run(&pool).await.expect("the early layout");
    let err = ackloop::run_migrations(&pool).await.expect_err("an early layout");
    assert!(format!("{err:?}").contains("early ackloop schema"), "{err:?}");
    // (sqlx makes its own record table before it runs any migration.)
    let ours: i64 = sqlx::query_scalar(
        "select count(*) from pg_tables where schemaname = 'ackloop' and tablename <> '_sqlx_migrations'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(ours, 0, "nothing made beside the early tables");
}

/// A deployment that never ran sql/roles.sql: its roles called the functions through PUBLIC's
/// EXECUTE and held rights on the tables. After the upgrade each keeps its side's steps (granted
/// now that EXECUTE is no longer PUBLIC's) and loses its writes to the tables.
#[sqlx::test(migrations = false)]
async fn roles_that_relied_on_public_execute_keep_their_side_and_lose_direct_writes(pool: PgPool) {
    migrate_to_the_earlier_layout(&pool).await;
    let oid: i64 = sqlx::query_scalar("select oid::int8 from pg_database where datname = current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let (auth, worker) = (format!("open_auth_{oid}"), format!("open_worker_{oid}"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop role if exists {auth}; create role {auth}; drop role if exists {worker}; create role {worker};
         grant usage on schema ackloop to {auth}, {worker};
         grant select, insert on public.users, public.player_creation_jobs to {auth};
         grant select on public.players to {auth};
         grant select, update on public.player_creation_jobs to {worker};
         grant select on public.users to {worker};
         grant select, insert on public.players to {worker};"
    )))
    .execute(&pool)
    .await
    .unwrap();

    ackloop::run_migrations(&pool).await.expect("the upgrade");

    for (role, statement) in [
        (&auth, "select * from ackloop.sign_up('a@example.com', 'A')"),
        (&auth, "select ackloop.add_job('u-1', 'A')"),
        (&worker, "select * from ackloop.complete_jobs()"),
        (&worker, "select * from ackloop.claim_jobs()"),
    ] {
        assert_eq!(as_role(&pool, role, statement).await, None, "{role}: {statement}");
    }
    for (role, statement) in [
        (
            &auth,
            "insert into ackloop.player_creation_jobs (id, user_id, display_name) values (gen_random_uuid(), 'x', 'X')",
        ),
        (
            &auth,
            "insert into ackloop.builtin_users (email, display_name) values ('b@example.com', 'B')",
        ),
        (
            &worker,
            "update ackloop.player_creation_jobs set status = 'failed'",
        ),
        (
            &worker,
            "insert into ackloop.builtin_players (user_id, display_name) values (1, 'x')",
        ),
        (&auth, "select * from ackloop.claim_jobs()"),
        (&worker, "select ackloop.add_job('u-2', 'B')"),
    ] {
        assert_eq!(
            as_role(&pool, role, statement).await.as_deref(),
            Some("42501"),
            "{role}: {statement}"
        );
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop owned by {auth}; drop owned by {worker}; drop role {auth}; drop role {worker}"
    )))
    .execute(&pool)
    .await
    .unwrap();
}
