//! The contract in the database (`ackloop.*`, docs/protocol.md) applies exactly the Rust side's
//! rules and defaults, refuses what Rust refuses whoever writes, and is recognised however the
//! migrations were applied.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::common::*;

/// Characters that sit on the edges of the rules: Unicode whitespace and controls (the ones
/// ASCII does not have too), the local part's forbidden set, dots, hyphens, letters beyond
/// ASCII, symbols, an emoji.
const EDGES: &[char] = &[
    'a', 'Z', '0', '9', '.', '-', '_', '@', '+', '\'', ' ', '\t', '\n', '\r', '\u{b}', '\u{c}', '\u{1}',
    '\u{1f}', '\u{7f}', '\u{80}', '\u{85}', '\u{9f}', '\u{a0}', '\u{1680}', '\u{2000}', '\u{200a}',
    '\u{200b}', '\u{2028}', '\u{2029}', '\u{202f}', '\u{205f}', '\u{3000}', '\u{feff}', '<', '>', '(', ')',
    '[', ']', '\\', ',', ';', ':', '"', 'é', 'ß', 'ǅ', '用', '例', '٣', 'Ⅻ', '²', '\u{301}', '…', '☃', '🎮',
    '。',
];

/// Hand-picked inputs, then `count` strings drawn from [`EDGES`] around real-looking addresses.
fn corpus(count: usize) -> Vec<String> {
    let mut inputs: Vec<String> = [
        "",
        "a",
        "ada@example.com",
        "Ada.Lovelace+tag@mail.example.co.uk",
        "o'brien@example.ie",
        "用户@例子.广告",
        "a@b.co",
        "plain",
        "a@b",
        "@example.com",
        "a@@example.com",
        "a@b@example.com",
        "a b@example.com",
        " ada@example.com",
        "ada@example.com\n",
        "a@-example.com",
        "a@example-.com",
        "a@example..com",
        "a@.example.com",
        "a@example.com.",
        "a@exa_mple.com",
        "a;drop@example.com",
        "a@ex\u{a0}ample.com",
        "a@☃.com",
        "a@x.٣",
        "Ada",
        "Ada Lovelace",
        " Ada",
        "Ada ",
        "\u{3000}",
        "   ",
        "Ada\nLovelace",
        "ǅemal 🎮",
        "'; drop table ackloop.builtin_users; --",
        "\u{85}Ada",
        "Ada\u{200b}",
        "\u{feff}",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    inputs.push(format!("{}@example.com", "a".repeat(64)));
    inputs.push(format!("{}@example.com", "a".repeat(65)));
    inputs.push(format!("a@{}.com", "b".repeat(250)));
    inputs.push(format!("a@{}.com", "b".repeat(248)));
    inputs.push("é".repeat(64));
    inputs.push("é".repeat(65));
    // A small deterministic generator: the same corpus on every run.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        usize::try_from(state % bound as u64).expect("small")
    };
    for _ in 0..count {
        let mut text: Vec<char> = "ada.l@mail.example.com".chars().collect();
        for _ in 0..=next(3) {
            let at = next(text.len() + 1);
            match next(3) {
                0 => text.insert(at, EDGES[next(EDGES.len())]),
                1 if at < text.len() => text[at] = EDGES[next(EDGES.len())],
                _ if at < text.len() => {
                    text.remove(at);
                }
                _ => text.push(EDGES[next(EDGES.len())]),
            }
        }
        inputs.push(text.into_iter().collect());
    }
    inputs
}

/// What Rust says of `email` and `name`: the rule each breaks, as its message reads.
fn rust_problems(email: &str, name: &str) -> (Option<String>, Option<String>) {
    let email_problem = match ackloop::NewUser::new(email, "Ada") {
        Ok(_) => None,
        Err(err) => Some(err.rule.to_string()),
    };
    let name_problem = match ackloop::NewUser::new("ada@example.com", name) {
        Ok(_) => None,
        Err(err) => Some(err.rule.to_string()),
    };
    (email_problem, name_problem)
}

#[sqlx::test]
async fn rust_and_the_database_apply_the_same_input_rules(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 2).await;
    let inputs = corpus(4000);
    let rows: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "select input, ackloop.email_problem(input), ackloop.display_name_problem(input)
         from unnest($1::text[]) as input",
    )
    .bind(&inputs)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), inputs.len());
    let (mut accepted, mut refused) = (0, 0);
    for (input, email_in_db, name_in_db) in rows {
        let (email_in_rust, name_in_rust) = rust_problems(&input, &input);
        assert_eq!(email_in_db, email_in_rust, "the email rules differ for {input:?}");
        assert_eq!(
            name_in_db, name_in_rust,
            "the display-name rules differ for {input:?}"
        );
        if email_in_rust.is_some() {
            refused += 1
        } else {
            accepted += 1
        }
    }
    // Both outcomes are well represented, or the comparison proves little.
    assert!(
        accepted > 500 && refused > 500,
        "accepted {accepted}, refused {refused}"
    );
}

#[sqlx::test]
async fn a_client_that_skips_the_checks_cannot_store_what_rust_refuses(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 2).await;
    for (email, name, constraint) in [
        (" ada@example.com", "Ada", "builtin_users_email_valid"),
        ("ada@example.com", "Ada\t", "builtin_users_display_name_valid"),
    ] {
        // Among other entries, as a grouping client sends them: the whole call is refused.
        let many = sqlx::query("select * from ackloop.sign_up_many($1, $2, array[null, null]::uuid[])")
            .bind(vec!["grace@example.com", email])
            .bind(vec!["Grace", name])
            .execute(&pool)
            .await
            .expect_err("sign_up_many of refused input");
        let many = many.as_database_error().expect("a database error");
        assert_eq!(many.code().as_deref(), Some("23514"));
        assert_eq!(many.constraint(), Some(constraint));

        let through = sqlx::query("select * from ackloop.sign_up($1, $2)")
            .bind(email)
            .bind(name)
            .execute(&pool)
            .await
            .expect_err("sign_up of refused input");
        let through = through.as_database_error().expect("a database error");
        assert_eq!(through.code().as_deref(), Some("23514"));
        assert_eq!(through.constraint(), Some(constraint));
        let (email_rule, name_rule) = rust_problems(email, name);
        let rule = email_rule.or(name_rule).expect("Rust refuses it too");
        for refusal in [through, many] {
            assert!(
                refusal.message().ends_with(&rule),
                "{} should name the rule {rule:?}",
                refusal.message()
            );
        }
    }
    let counts = counts(&pool).await;
    assert_eq!((counts.users, counts.jobs), (0, 0), "nothing partial was written");
}

#[sqlx::test]
async fn the_databases_defaults_are_the_rust_sides(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 2).await;
    let config = ackloop::WorkerConfig::default();
    let arguments = |function: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("select pg_get_function_arguments($1::regproc)")
                .bind(function)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let record = arguments("ackloop.record_failure").await;
    for expected in [
        format!("max_attempts integer DEFAULT {}", config.max_attempts),
        format!(
            "backoff_base_ms bigint DEFAULT {}",
            config.backoff.base.as_millis()
        ),
        format!("backoff_max_ms bigint DEFAULT {}", config.backoff.max.as_millis()),
        format!(
            "done_channel text DEFAULT '{}'::text",
            ackloop::DEFAULT_DONE_CHANNEL
        ),
    ] {
        assert!(
            record.contains(&expected),
            "record_failure({record}) lacks {expected}"
        );
    }
    let batch = format!("batch_size integer DEFAULT {}", config.batch_size);
    assert!(arguments("ackloop.claim_jobs").await.contains(&batch));
    assert!(arguments("ackloop.complete_jobs").await.contains(&batch));
    let jobs_channel = format!(
        "jobs_channel text DEFAULT '{}'::text",
        ackloop::DEFAULT_JOBS_CHANNEL
    );
    assert!(arguments("ackloop.sign_up").await.contains(&jobs_channel));
    for failed in 1..=40u32 {
        let in_db: i64 = sqlx::query_scalar("select ackloop.backoff_ms($1)")
            .bind(i32::try_from(failed).unwrap())
            .fetch_one(&pool)
            .await
            .unwrap();
        let in_rust = config.backoff.delay(failed).as_millis();
        assert_eq!(
            u128::try_from(in_db).unwrap(),
            in_rust,
            "backoff after {failed} failures"
        );
    }
}

#[sqlx::test]
async fn uuid_v7_makes_version_7_ids_stamped_with_now(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 2).await;
    let before = now_ms(&pool).await;
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("select ackloop.uuid_v7() from generate_series(1, 1000)")
        .fetch_all(&pool)
        .await
        .unwrap();
    let after = now_ms(&pool).await;
    let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
    for id in &ids {
        assert_eq!(id.get_version_num(), 7, "{id}");
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122, "{id}");
        let bytes = id.as_bytes();
        let stamp = bytes[..6]
            .iter()
            .fold(0u64, |ms, byte| ms << 8 | u64::from(*byte));
        assert!(
            (before..=after).contains(&stamp),
            "{id}: {stamp} not in {before}..={after}"
        );
    }
}

async fn now_ms(pool: &PgPool) -> u64 {
    let ms: i64 = sqlx::query_scalar("select floor(extract(epoch from clock_timestamp()) * 1000)::bigint")
        .fetch_one(pool)
        .await
        .unwrap();
    u64::try_from(ms).unwrap()
}

#[sqlx::test]
async fn a_schema_migrated_by_another_tool_is_recognised(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 2).await;
    // What psql or Flyway leaves: the migrations' own record, no sqlx bookkeeping.
    execute(&pool, "drop table ackloop._sqlx_migrations").await;
    ackloop::check_schema(&pool)
        .await
        .expect("the migrations' own record suffices");
    execute(
        &pool,
        "delete from ackloop.applied_migrations where version = 20261207000003",
    )
    .await;
    assert!(
        matches!(
            ackloop::check_schema(&pool).await,
            Err(ackloop::SchemaError::Behind { ref missing }) if missing == &[20261207000003]
        ),
        "a missing version is reported"
    );
    execute(
        &pool,
        "insert into ackloop.applied_migrations (version, description) values (20991231000001, 'future')",
    )
    .await;
    assert!(matches!(
        ackloop::check_schema(&pool).await,
        Err(ackloop::SchemaError::Newer { .. })
    ));
}

#[sqlx::test]
async fn a_schema_from_before_the_contract_is_behind(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 2).await;
    // As the earlier layout left it: only its own versions recorded.
    execute(
        &pool,
        "delete from ackloop.applied_migrations;
         insert into ackloop.applied_migrations (version, description) values (20261126000004, 'index failed jobs')",
    )
    .await;
    let known: Vec<i64> = ackloop::MIGRATOR
        .iter()
        .map(|migration| migration.version)
        .collect();
    assert!(matches!(
        ackloop::check_schema(&pool).await,
        Err(ackloop::SchemaError::Behind { ref missing }) if missing == &known
    ));
}

#[sqlx::test]
async fn every_migration_records_itself(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 2).await;
    let recorded: Vec<i64> =
        sqlx::query_scalar("select version from ackloop.applied_migrations order by version")
            .fetch_all(&pool)
            .await
            .unwrap();
    let known: Vec<i64> = ackloop::MIGRATOR
        .iter()
        .map(|migration| migration.version)
        .collect();
    assert_eq!(
        recorded, known,
        "a migration must end by inserting its row into ackloop.applied_migrations"
    );
}

#[sqlx::test]
async fn a_signup_without_a_lock_wait_leaves_the_callers_limit(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 2).await;
    let mut tx = pool.begin().await.unwrap();
    execute_in(&mut tx, "set local lock_timeout = '7s'").await;
    sqlx::query("select * from ackloop.sign_up('ada@example.com', 'Ada')")
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(
        lock_timeout(&mut tx).await,
        "7s",
        "no lock wait given: the caller's own stands"
    );
    sqlx::query("select * from ackloop.sign_up_many(array['bo@example.com'], array['Bo'], array[null::uuid], lock_wait_ms => 250)")
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(lock_timeout(&mut tx).await, "250ms");
    tx.commit().await.unwrap();
    let jobs: i64 =
        sqlx::query_scalar("select count(*) from ackloop.player_creation_jobs where id is not null")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(jobs, 2, "a null job id got one made for it");
}

async fn execute_in(conn: &mut sqlx::PgConnection, sql: &'static str) {
    sqlx::raw_sql(sql).execute(conn).await.unwrap();
}

async fn lock_timeout(conn: &mut sqlx::PgConnection) -> String {
    sqlx::query_scalar("select current_setting('lock_timeout')")
        .fetch_one(conn)
        .await
        .unwrap()
}

#[sqlx::test]
async fn migrating_a_schema_another_tool_applied_is_refused_clearly(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 2).await;
    execute(&pool, "drop table ackloop._sqlx_migrations").await;
    let err = ackloop::run_migrations(&pool)
        .await
        .expect_err("sqlx would apply every file again");
    assert!(err.to_string().contains("applied by another tool"), "{err}");
    // The binary says so once, in its own words, with the schema's exit code.
    let cli = run_ackloop(&url, &["migrate"]).await;
    assert_eq!(cli.status.code(), Some(8), "{}", stderr(&cli));
    let message = stderr(&cli);
    assert!(
        message.starts_with("error: the schema was applied by another tool") && message.lines().count() == 1,
        "{message}"
    );
    assert_eq!(counts(&pool).await.users, 0);
    let tables: i64 = sqlx::query_scalar(
        "select count(*) from pg_tables where schemaname = 'ackloop' and tablename = '_sqlx_migrations'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 0, "nothing was written, not even sqlx's table");
}
