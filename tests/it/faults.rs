//! Faults the loop must survive: a worker killed mid-batch, SIGTERM under load, a schema newer
//! than the binary, and running with no more privilege than each side needs.

use std::process::Stdio;
use std::sync::Arc;

use ackloop::{Channels, Signups, create_user};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use tokio::process::Child;
use tokio::task::JoinSet;

use crate::common::*;

fn worker_process(url: &str) -> Child {
    ackloop_command(url)
        .args(["worker", "--concurrency", "2"])
        .env("RUST_LOG", "ackloop=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ackloop worker")
}

async fn backends_waiting_on_locks(pool: &PgPool) -> i64 {
    sqlx::query_scalar!(
        r#"
        select count(*) as "count!"
        from pg_stat_activity
        where datname = current_database()
          and wait_event_type = 'Lock'
        "#
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn a_worker_killed_mid_job_releases_its_jobs_to_another(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 6).await;
    let mut conn = pool.acquire().await.unwrap();
    commit_signups(&mut conn, 0..5).await;
    drop(conn);
    // Hold every user row, so the worker claims jobs, then blocks creating their players (the
    // foreign key check needs a share lock on the user).
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query!("select id from ackloop.builtin_users for update")
        .fetch_all(&mut *blocker)
        .await
        .unwrap();

    let doomed = worker_process(&url);
    wait_until("the worker waits on the held users", || async {
        backends_waiting_on_locks(&pool).await >= 1
    })
    .await;
    signal(&doomed, "-KILL").await;

    // The dead worker's backends notice within client_connection_check_interval and roll back,
    // though the lock they wait for is still held.
    wait_until("the dead worker's backends give up their claims", || async {
        backends_waiting_on_locks(&pool).await == 0
    })
    .await;
    let before = sqlx::query!("select id, status, attempts from ackloop.player_creation_jobs order by id")
        .fetch_all(&pool)
        .await
        .unwrap();
    // A starting worker takes jobs one at a time, counting each attempt (the job `running`)
    // before it makes it: the jobs it died on (one per processing loop at most) stay running
    // with their attempt, until their lease ends; the rest were only locked, and are pending
    // with none.
    let running: Vec<_> = before.iter().filter(|job| job.status == "running").collect();
    assert!(
        running.len() <= 2
            && running.iter().all(|job| job.attempts == 1)
            && before
                .iter()
                .all(|job| job.status == "running" || (job.status == "pending" && job.attempts == 0)),
        "an attempt counted only for the jobs in hand: {before:?}"
    );
    blocker.commit().await.unwrap();

    let survivor = spawn_worker(&pool, worker_config());
    wait_until("another worker completes the jobs", || async {
        count_jobs_with_status(&pool, "done").await == 5
    })
    .await;
    assert_eq!(counts(&pool).await.players, 5);
    let after = sqlx::query!("select id, attempts from ackloop.player_creation_jobs order by id")
        .fetch_all(&pool)
        .await
        .unwrap();
    for (before, after) in before.iter().zip(&after) {
        assert_eq!(
            after.attempts,
            before.attempts + 1,
            "the surviving worker made one attempt at job {}",
            after.id
        );
    }
    survivor.stop().await;
}

#[sqlx::test]
async fn sigterm_under_load_drains_and_no_signup_is_lost(options: PgPoolOptions, connect: PgConnectOptions) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 8).await;
    let worker = worker_process(&url);
    let signups = Arc::new(signups(&pool).await);
    const TOTAL: usize = 200;

    let mut callers = JoinSet::new();
    for caller in 0..16 {
        let signups = Arc::clone(&signups);
        callers.spawn(async move {
            for n in (caller..TOTAL).step_by(16) {
                signups
                    .create_user_and_await_player(&user(n), DEADLINE)
                    .await
                    .unwrap_or_else(|err| panic!("signup {n}: {err}"));
            }
        });
    }
    wait_until("the worker has done some of the work", || async {
        counts(&pool).await.players >= 20
    })
    .await;
    terminate_worker(worker, "the worker to drain and exit").await;

    // What the stopped worker left is pending, not half-done; a new worker finishes it and every
    // caller is confirmed.
    let replacement = spawn_worker(&pool, worker_config());
    within("every caller to be confirmed", callers.join_all()).await;
    let counts = counts(&pool).await;
    assert_eq!((counts.users, counts.jobs, counts.players), (200, 200, 200));
    assert_eq!(count_jobs_with_status(&pool, "done").await, 200);
    replacement.stop().await;
}

#[sqlx::test]
async fn a_schema_newer_than_the_binary_is_refused_with_exit_9(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 2).await;
    // What a newer ackloop's migration leaves: sqlx's row, and the migration's own record.
    execute(
        &pool,
        "insert into ackloop._sqlx_migrations (version, description, success, checksum, execution_time)
         values (99990101000000, 'from the future', true, '\\x00', 0);
         insert into ackloop.applied_migrations (version, description)
         values (99990101000000, 'from the future')",
    )
    .await;

    for args in [&["status"][..], &["worker"], &["migrate"]] {
        let output = within("ackloop to refuse", ackloop_command(&url).args(args).output())
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(9), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
    let err = ackloop::check_schema(&pool).await.unwrap_err();
    assert!(matches!(err, ackloop::SchemaError::Newer { ref unknown } if unknown == &[99990101000000]));
}

/// A login role for this test alone (roles are cluster-wide, tests run in parallel), member of
/// one of the group roles from `sql/roles.sql`.
async fn login_role(pool: &PgPool, group: &str) -> String {
    // The database's oid: short, lower case and unique among the tests running now.
    let database = sqlx::query_scalar!(
        r#"select oid::int8 as "oid!" from pg_database where datname = current_database()"#
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let role = format!("{group}_{database}");
    let sql = format!("drop role if exists {role}; create role {role} login in role {group}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await
        .unwrap();
    role
}

#[sqlx::test]
async fn the_whole_loop_runs_as_least_privileged_roles(options: PgPoolOptions, connect: PgConnectOptions) {
    let admin = pool(options.clone(), connect.clone(), 2).await;
    sqlx::raw_sql(include_str!("../../sql/roles.sql"))
        .execute(&admin)
        .await
        .unwrap();
    let auth_role = login_role(&admin, "ackloop_auth").await;
    let worker_role = login_role(&admin, "ackloop_worker").await;
    let auth_pool = pool(options.clone(), connect.clone().username(&auth_role), 3).await;
    let worker_options = ackloop::worker_session_options(connect.clone().username(&worker_role));
    let worker_pool = pool(options, worker_options, 3).await;

    ackloop::check_schema(&auth_pool)
        .await
        .expect("auth role reads the schema version");
    ackloop::check_schema(&worker_pool)
        .await
        .expect("worker role reads the schema version");
    let worker = spawn_worker(&worker_pool, worker_config());
    let signups = Signups::connect(auth_pool.clone()).await.unwrap();
    for n in 0..3 {
        signups
            .create_user_and_await_player(&user(n), DEADLINE)
            .await
            .expect("signup as the auth role");
    }
    let taken = signups.create_user_and_await_player(&user(0), DEADLINE).await;
    assert!(
        matches!(taken, Err(ackloop::SignupError::EmailTaken)),
        "{taken:?}"
    );

    // Neither side can do the other's work.
    let forged_player =
        sqlx::query("insert into ackloop.builtin_players (user_id, display_name) values (1, 'x')")
            .execute(&auth_pool)
            .await
            .unwrap_err();
    assert!(
        forged_player.to_string().contains("permission denied"),
        "{forged_player}"
    );
    let forged_user =
        sqlx::query("insert into ackloop.builtin_users (email, display_name) values ('w@example.com', 'W')")
            .execute(&worker_pool)
            .await
            .unwrap_err();
    assert!(
        forged_user.to_string().contains("permission denied"),
        "{forged_user}"
    );

    worker.stop().await;
    assert_eq!(counts(&admin).await.players, 3);
    worker_pool.close().await;
    auth_pool.close().await;
    drop(signups);
    let sql = format!("drop owned by {auth_role}, {worker_role}; drop role {auth_role}, {worker_role}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&admin)
        .await
        .unwrap();
}

#[sqlx::test]
async fn a_signup_whose_connection_drops_before_commit_leaves_nothing(pool: PgPool) {
    let mut listener = listen_on(&pool, ackloop::DEFAULT_JOBS_CHANNEL).await;
    let mut tx = pool.begin().await.unwrap();
    create_user(&mut tx, &Channels::default(), &user(1))
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar!(r#"select pg_backend_pid() as "pid!""#)
        .fetch_one(&mut *tx)
        .await
        .unwrap();

    let terminated = sqlx::query_scalar!(r#"select pg_terminate_backend($1) as "ok!""#, pid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(terminated);
    assert!(tx.commit().await.is_err(), "a dead connection cannot commit");

    assert_eq!(counts(&pool).await, NOTHING);
    assert_nothing_sent_before_marker(&pool, &mut listener, ackloop::DEFAULT_JOBS_CHANNEL).await;
}

#[tokio::test]
async fn workers_and_waiting_callers_carry_on_after_postgres_restarts() {
    let (cluster, url) = OwnCluster::start("restart").await;
    let pool = cluster_pool(&url).await;
    let worker_pool = cluster_worker_pool(&url).await;
    let worker = spawn_worker(&worker_pool, worker_config());
    let signups = Arc::new(signups(&pool).await);
    signups
        .create_user_and_await_player(&user(0), DEADLINE)
        .await
        .expect("signup before the restart");

    // Callers in flight while the server restarts have time to spare: each gets its player.
    // Their writes are retried while the server is away, and a write whose answer the restart
    // took is resolved by its job id, never written twice.
    let mut in_flight = JoinSet::new();
    for n in 1..=20 {
        let signups = Arc::clone(&signups);
        in_flight.spawn(async move { signups.create_user_and_await_player(&user(n), DEADLINE).await });
    }
    cluster.pg("restart").await;
    for (n, result) in within("callers in flight", in_flight.join_all())
        .await
        .into_iter()
        .enumerate()
    {
        if let Err(err) = result {
            panic!("caller {n} had time to outlast the restart but got {err:?}");
        }
    }

    // After the restart, the worker (poll an hour away) and the signup listener come back by
    // themselves, and a connection the restart killed costs no signup: the first one is confirmed.
    signups
        .create_user_and_await_player(&user(100), DEADLINE)
        .await
        .expect("the first signup after the restart");

    // Nothing committed is lost: every job that exists ends done, including those of callers
    // who got an error.
    wait_until("every committed job is done", || async {
        count_jobs_with_status(&pool, "pending").await == 0
    })
    .await;
    let counts = counts(&pool).await;
    assert_eq!(counts.users, counts.players);
    assert_eq!(counts.jobs, counts.players);
    worker.stop().await;
    drop(signups);
    pool.close().await;
    worker_pool.close().await;
    drop(cluster);
}

#[sqlx::test]
async fn a_frozen_worker_holds_up_nobody(options: PgPoolOptions, connect: PgConnectOptions) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 6).await;
    let frozen = worker_process(&url);
    let signups = signups(&pool).await;
    signups
        .create_user_and_await_player(&user(0), DEADLINE)
        .await
        .expect("the worker process is up");

    signal(&frozen, "-STOP").await;
    let other = spawn_worker(&pool, worker_config());
    for n in 1..=5 {
        signups
            .create_user_and_await_player(&user(n), DEADLINE)
            .await
            .expect("confirmed by the worker that is not frozen");
    }
    signal(&frozen, "-CONT").await;
    signal(&frozen, "-TERM").await;
    let exited = within("the thawed worker to exit", frozen.wait_with_output())
        .await
        .unwrap();
    assert_eq!(
        exited.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&exited.stderr)
    );

    assert_eq!(counts(&pool).await.players, 6);
    other.stop().await;
}
