//! Services with tables of their own: the auth service adds the job inside its own
//! transaction, the player service's handler writes its own players, and the caller gets what
//! that handler answered, read from ackloop's job table. Nothing lands in the built-in tables.

use ackloop::{
    Created, ExternalId, Field, Handler, Job, JobError, JobId, NewJob, SignupError, Worker, add_job,
};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};

use super::upgrade::describe_schema;
use crate::common::*;

/// The two services' own schemas: accounts keyed by uuid, players by bigserial.
const SERVICES: &str = "
    create schema accounts;
    create table accounts.users (
        id uuid primary key,
        email text not null unique,
        password_hash text not null,
        created_at timestamptz not null default now()
    );
    create schema game;
    create table game.players (
        id bigserial primary key,
        account_id uuid not null unique,
        nickname text not null,
        level integer not null default 1,
        referrer text
    );";

/// The player service's handler: its own player row, keyed by the auth service's account id.
struct OwnPlayers;

impl Handler for OwnPlayers {
    async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<Created, JobError> {
        let account = job
            .user_id
            .to_uuid()
            .ok_or_else(|| JobError::fail("the user id is not an account id"))?;
        let referrer = job
            .extra
            .as_ref()
            .and_then(|extra| extra.get("referrer"))
            .and_then(Value::as_str);
        let (id, level): (i64, i32) = sqlx::query_as(
            "insert into game.players (account_id, nickname, referrer) values ($1, $2, $3)
             on conflict (account_id) do update set account_id = excluded.account_id
             returning id, level",
        )
        .bind(account)
        .bind(&job.display_name)
        .bind(referrer)
        .fetch_one(&mut *conn)
        .await?;
        Created::new(id).with_result(&json!({ "level": level }))
    }
}

/// Signs an account up the auth service's way: its own row and the job, one transaction.
async fn sign_up_account(
    pool: &PgPool,
    email: &str,
    job: &NewJob,
    account: uuid::Uuid,
) -> Result<JobId, SignupError> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("insert into accounts.users (id, email, password_hash) values ($1, $2, 'argon2:…')")
        .bind(account)
        .bind(email)
        .execute(&mut *tx)
        .await
        .unwrap();
    let job_id = add_job(&mut tx, &ackloop::Channels::default(), job).await?;
    tx.commit().await.unwrap();
    Ok(job_id)
}

#[sqlx::test]
async fn a_job_added_in_the_auth_services_transaction_is_answered_by_its_player_service(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 6).await;
    execute(&pool, SERVICES).await;
    let worker = run_in_background(Worker::new(pool.clone(), worker_config()).with_handler(OwnPlayers));
    let signups = signups(&pool).await;

    let account = uuid::Uuid::now_v7();
    let job = NewJob::new(account, "Ada")
        .unwrap()
        .with_extra(json!({ "referrer": "spring-campaign" }))
        .unwrap();
    let job_id = sign_up_account(&pool, "ada@example.com", &job, account)
        .await
        .unwrap();
    let confirmed = signups
        .await_job(job_id, DEADLINE)
        .await
        .expect("the player service's answer");
    let (player_id, nickname, referrer): (i64, String, Option<String>) =
        sqlx::query_as("select id, nickname, referrer from game.players where account_id = $1")
            .bind(account)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(confirmed.job_id, job_id);
    assert_eq!(confirmed.user_id, ExternalId::from(account));
    assert_eq!(confirmed.player_id, ExternalId::from(player_id));
    assert_eq!(confirmed.result, json!({ "level": 1 }));
    assert_eq!(
        (nickname.as_str(), referrer.as_deref()),
        ("Ada", Some("spring-campaign"))
    );

    // A signup the auth service rolls back leaves no job (counted below).
    let mut tx = pool.begin().await.unwrap();
    add_job(
        &mut tx,
        signups.channels(),
        &NewJob::new(uuid::Uuid::now_v7(), "Gone").unwrap(),
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();

    // Waiting for a built-in player on it says what to call instead.
    let err = signups.await_player(job_id, DEADLINE).await.unwrap_err();
    assert!(err.to_string().contains("await_job"), "{err}");

    let (jobs, builtin_users, builtin_players) = (
        count_of(&pool, "select count(*) from ackloop.player_creation_jobs").await,
        count_of(&pool, "select count(*) from ackloop.builtin_users").await,
        count_of(&pool, "select count(*) from ackloop.builtin_players").await,
    );
    assert_eq!((jobs, builtin_users, builtin_players), (1, 0, 0));
    worker.stop().await;
}

#[sqlx::test]
async fn a_job_added_again_with_its_key_is_the_same_job_and_other_data_is_refused(pool: PgPool) {
    let channels = ackloop::Channels::default();
    let key = JobId::new();
    let job = NewJob::new(42_i64, "Ada").unwrap().with_key(key);
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(add_job(&mut conn, &channels, &job).await.unwrap(), key);
    assert_eq!(
        add_job(&mut conn, &channels, &job).await.unwrap(),
        key,
        "sent again: the same job"
    );
    let renamed = NewJob::new(42_i64, "Ada B").unwrap().with_key(key);
    let err = add_job(&mut conn, &channels, &renamed).await.unwrap_err();
    assert!(matches!(err, SignupError::KeyReused(id) if id == key), "{err:?}");
    let other_job = NewJob::new(42_i64, "Ada").unwrap();
    let err = add_job(&mut conn, &channels, &other_job).await.unwrap_err();
    assert!(
        matches!(err, SignupError::UserHasJob { job_id: Some(id) } if id == key),
        "{err:?}"
    );
    assert!(err.to_string().contains("already has"), "{err}");
    let jobs: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("select id, user_id from ackloop.player_creation_jobs")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(jobs, [(key.as_uuid(), "42".to_owned())]);
}

#[sqlx::test]
async fn bad_input_to_add_job_is_refused_and_writes_nothing(pool: PgPool) {
    // The library refuses before anything is sent.
    for bad in ["", " padded", "line\nbreak", &"x".repeat(129)] {
        assert!(ExternalId::new(bad).is_err(), "{bad:?}");
    }
    let err = NewJob::new(1_i64, " Ada").unwrap_err();
    assert_eq!(err.field, Field::DisplayName);
    let big = json!({ "note": "x".repeat(ackloop::MAX_JSON_BYTES) });
    for extra in [json!([1, 2]), json!("text"), big.clone()] {
        let err = NewJob::new(1_i64, "Ada").unwrap().with_extra(extra).unwrap_err();
        assert_eq!(err.field, Field::Extra);
        assert!(err.to_string().starts_with("invalid extra data: "), "{err}");
    }
    // The contract refuses the same for a client in any language that skips those checks.
    for (user_id, name, extra, constraint) in [
        ("", "Ada", None, "player_creation_jobs_user_id_valid"),
        ("tab\there", "Ada", None, "player_creation_jobs_user_id_valid"),
        ("u1", "", None, "player_creation_jobs_display_name_valid"),
        ("u1", "Ada\n", None, "player_creation_jobs_display_name_valid"),
        ("u1", "Ada", Some(json!([1])), "player_creation_jobs_extra_valid"),
        ("u1", "Ada", Some(big.clone()), "player_creation_jobs_extra_valid"),
    ] {
        let err = sqlx::query("select ackloop.add_job($1, $2, $3)")
            .bind(user_id)
            .bind(name)
            .bind(extra)
            .execute(&pool)
            .await
            .unwrap_err();
        let db_err = err.as_database_error().expect("a database error");
        assert_eq!(
            (db_err.code().as_deref(), db_err.constraint()),
            (Some("23514"), Some(constraint)),
            "{user_id:?} {name:?}: {err}"
        );
    }
    assert_eq!(
        count_of(&pool, "select count(*) from ackloop.player_creation_jobs").await,
        0
    );
}

#[sqlx::test]
async fn the_built_in_worker_leaves_a_services_job_to_that_services_worker(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 5).await;
    let signups = signups(&pool).await;
    let mut conn = pool.acquire().await.unwrap();
    let job_id = add_job(
        &mut conn,
        signups.channels(),
        &NewJob::new(ExternalId::new("acct-7").unwrap(), "Ada").unwrap(),
    )
    .await
    .unwrap();
    drop(conn);
    let worker = spawn_worker(&pool, worker_config());
    // A built-in signup added after it is done: the built-in worker has looked at the queue.
    signups
        .create_user_and_await_player(&user(1), DEADLINE)
        .await
        .expect("the built-in signup");
    let (status, attempts): (String, i32) =
        sqlx::query_as("select status, attempts from ackloop.player_creation_jobs where id = $1")
            .bind(job_id.as_uuid())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), attempts),
        ("pending", 0),
        "untouched, for its own worker"
    );
    // And the built-in handler refuses it, should it be handed one, saying whose it is.
    let err = sqlx::query("select * from ackloop.insert_builtin_player($1)")
        .bind(job_id.as_uuid())
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("added by a service"), "{err}");
    assert_eq!(
        count_of(&pool, "select count(*) from ackloop.builtin_players").await,
        1
    );
    worker.stop().await;
}

#[sqlx::test(migrations = false)]
async fn migrating_beside_a_services_own_tables_of_the_same_names_leaves_them_as_they_were(pool: PgPool) {
    execute(
        &pool,
        "create table public.users (id uuid primary key, email text unique, password_hash text);
         create table public.players (id bigserial primary key, account_id uuid, nickname text, level int);
         create table public.player_creation_jobs (id int primary key, note text);
         create table public._sqlx_migrations (version bigint primary key, description text not null,
             installed_on timestamptz not null default now(), success boolean not null,
             checksum bytea not null, execution_time bigint not null);
         insert into public.users values ('018f0000-0000-7000-8000-000000000001', 'theirs@example.com', 'h');
         insert into public.players (account_id, nickname, level)
             values ('018f0000-0000-7000-8000-000000000001', 'Theirs', 9);
         insert into public.player_creation_jobs values (1, 'their own queue');
         insert into public._sqlx_migrations values (20250101000000, 'their own', now(), true, '\\x00', 1);",
    )
    .await;
    let shape = describe_schema(&pool, "public").await;
    let rows = |table: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, Value>(sqlx::AssertSqlSafe(format!(
                "select coalesce(jsonb_agg(to_jsonb(t) order by t::text), '[]') from public.{table} as t"
            )))
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let before = [
        rows("users").await,
        rows("players").await,
        rows("player_creation_jobs").await,
        rows("_sqlx_migrations").await,
    ];

    ackloop::run_migrations(&pool)
        .await
        .expect("migrate beside the service's own tables");
    ackloop::check_schema(&pool)
        .await
        .expect("ackloop's schema is complete");

    assert_eq!(
        describe_schema(&pool, "public").await,
        shape,
        "public's tables keep their shape"
    );
    let after = [
        rows("users").await,
        rows("players").await,
        rows("player_creation_jobs").await,
        rows("_sqlx_migrations").await,
    ];
    assert_eq!(after, before, "and their rows");
    // The loop runs beside them.
    let signups = signups(&pool).await;
    let worker = spawn_worker(&pool, worker_config());
    signups
        .create_user_and_await_player(&user(1), DEADLINE)
        .await
        .expect("the built-in loop beside the service's own tables");
    worker.stop().await;
    assert_eq!(count_of(&pool, "select count(*) from public.players").await, 1);
}

/// A player service whose users have numeric ids, as the built-in tables' users do.
struct NumberedPlayers;

impl Handler for NumberedPlayers {
    async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<Created, JobError> {
        let user = job
            .user_id
            .to_i64()
            .ok_or_else(|| JobError::fail("not a numeric user id"))?;
        let id: i64 = sqlx::query_scalar(
            "insert into numbered.players (user_id, name) values ($1, $2)
             on conflict (user_id) do update set user_id = excluded.user_id
             returning id",
        )
        .bind(user)
        .bind(&job.display_name)
        .fetch_one(&mut *conn)
        .await?;
        Ok(Created::new(id))
    }
}

#[sqlx::test]
async fn a_services_users_and_the_built_in_users_of_the_same_ids_each_get_their_own_player(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 8).await;
    execute(
        &pool,
        "create schema numbered;
         create table numbered.players (id bigserial primary key, user_id bigint unique, name text)",
    )
    .await;
    // Both workers on one database: each takes its own kind of job only.
    let builtin_worker = spawn_worker(&pool, worker_config());
    let service_worker =
        run_in_background(Worker::new(pool.clone(), worker_config()).with_handler(NumberedPlayers));
    let signups = signups(&pool).await;
    for signup in 1..=3 {
        let player = signups
            .create_user_and_await_player(&user(signup), DEADLINE)
            .await
            .expect("a built-in signup, by the built-in worker");
        // The service's user of the very same number.
        let n = player.user_id.get();
        let mut conn = pool.acquire().await.unwrap();
        let job_id = add_job(
            &mut conn,
            signups.channels(),
            &NewJob::new(n, format!("Service {n}")).unwrap(),
        )
        .await
        .expect("the service's user of the same id has a job of its own");
        drop(conn);
        let confirmed = signups
            .await_job(job_id, DEADLINE)
            .await
            .expect("by the service's worker");
        let (service_player,): (i64,) = sqlx::query_as("select id from numbered.players where user_id = $1")
            .bind(n)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(confirmed.player_id, ExternalId::from(service_player));
    }
    let (builtin, service, names): (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from ackloop.builtin_players),
                (select count(*) from numbered.players),
                (select count(*) from numbered.players where name like 'Service %')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (builtin, service, names),
        (3, 3, 3),
        "no worker took the other's jobs"
    );
    builtin_worker.stop().await;
    service_worker.stop().await;
}
