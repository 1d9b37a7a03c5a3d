//! Starting and writing while the server is down, refusing, or rolling a write back: every
//! entry point keeps its deadline, and what waiting cannot fix is answered at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ackloop::SignupError;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::task::JoinSet;

use crate::common::*;

/// How many `ackloop signup` processes start while the server is down.
const STARTED_WHILE_DOWN: usize = 100;

/// `ackloop signup` and `ackloop worker` processes started while the server is down (a service
/// deployed during a restart or a failover): each keeps trying until its deadline, and every
/// signup gets its player once the server is back within it. Before, start-up was outside the
/// deadline's retries and such calls failed within milliseconds.
#[tokio::test]
async fn cli_processes_started_while_the_server_is_down_wait_for_it() {
    let (cluster, url) = OwnCluster::start("down-at-cli-start").await;
    cluster_pool(&url).await.close().await;
    cluster.pg("stop").await;
    // Each process says when it met the outage (the worker at its default level, the signups
    // at debug): the server starts only once all have.
    let mut worker = ackloop_command(&url)
        .args(["worker", "--shutdown-timeout", "2s"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (worker_met, worker_log) = met_the_outage(worker.stderr.take().unwrap());
    let mut calls = JoinSet::new();
    let mut all_met = vec![worker_met];
    for n in 0..STARTED_WHILE_DOWN {
        let mut child = ackloop_command(&url)
            .args([
                "signup",
                "--email",
                &format!("down-{n}@example.com"),
                "--display-name",
                &format!("Down {n}"),
                "--timeout",
                "60s",
                "--json",
            ])
            .env("RUST_LOG", "ackloop=debug")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (met, log) = met_the_outage(child.stderr.take().unwrap());
        all_met.push(met);
        calls.spawn(async move { (child.wait().await.unwrap(), log.await.unwrap()) });
    }
    for met in all_met {
        within("every process to meet the outage", met)
            .await
            .expect("a process ended before it met the outage");
    }
    cluster.pg("start").await;
    for (status, log) in within("the signup processes", calls.join_all()).await {
        assert_eq!(
            status.code(),
            Some(0),
            "a signup started during the outage: {log}"
        );
    }
    let pool = cluster_pool(&url).await;
    let counts = counts(&pool).await;
    let started = STARTED_WHILE_DOWN as i64;
    assert_eq!(
        (counts.users, counts.jobs, counts.players),
        (started, started, started)
    );
    signal(&worker, "-TERM").await;
    let status = within("the worker to stop", worker.wait()).await.unwrap();
    assert!(status.success(), "the worker: {status:?}");
    drop(worker_log);
}

/// Reads a process's stderr: the first receiver fires when it logs that it cannot reach the
/// database yet; the task returns everything it logged.
fn met_the_outage(
    stderr: tokio::process::ChildStderr,
) -> (
    tokio::sync::oneshot::Receiver<()>,
    tokio::task::JoinHandle<String>,
) {
    use tokio::io::AsyncBufReadExt;
    let (met, met_rx) = tokio::sync::oneshot::channel();
    let log = tokio::spawn(async move {
        let mut met = Some(met);
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut log = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(met) = met.take_if(|_| line.contains("cannot reach the database yet")) {
                let _ = met.send(());
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    (met_rx, log)
}

/// A pool the server refuses for good (here, a database that does not exist; a wrong password
/// is the same) answers a signup at once with the server's error, its SQLSTATE kept, instead of
/// trying again until the caller's timeout as if the server were away.
#[sqlx::test]
async fn a_refused_connection_answers_a_signup_at_once_with_the_servers_error(
    _options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let refused = PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy_with(connect.clone().database("ackloop_no_such_database"));
    // The listener reaches the real database: only the writers' connections are refused.
    let config = ackloop::SignupsConfig {
        listen_options: Some(connect),
        ..ackloop::SignupsConfig::default()
    };
    let signups = Arc::new(ackloop::Signups::connect_with(refused, config).await.unwrap());
    let started = Instant::now();
    // Many at once, so that the writers group them and meet the refusal for all of them.
    let mut calls = JoinSet::new();
    for n in 0..20 {
        let signups = Arc::clone(&signups);
        calls.spawn(async move { signups.create_user_and_await_player(&user(n), DEADLINE).await });
    }
    for result in within("the callers", calls.join_all()).await {
        let err = result.expect_err("a signup through a refused pool");
        let code = match &err {
            SignupError::Database(source) => source
                .as_database_error()
                .and_then(|db_err| db_err.code())
                .map(|code| code.into_owned()),
            other => panic!("not the server's error: {other:?}"),
        };
        assert_eq!(code.as_deref(), Some("3D000"), "{err}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered after {:?}",
        started.elapsed()
    );
}

/// A signup the server rolls back to resolve a conflict (40001, as a database whose default
/// isolation is serializable does now and then; here raised once by a trigger) certainly did
/// not commit: it is written again and gets its player, where it used to fail the caller.
#[sqlx::test]
async fn a_serialization_failure_is_written_again_and_costs_the_caller_nothing(pool: PgPool) {
    for statement in [
        "create sequence conflicts_raised",
        r#"create function raise_one_conflict() returns trigger language plpgsql as $$
           begin
               if nextval('public.conflicts_raised') = 1 then
                   raise exception 'could not serialize access' using errcode = 'serialization_failure';
               end if;
               return new;
           end $$"#,
        "create trigger one_conflict before insert on ackloop.builtin_users
             for each row execute function raise_one_conflict()",
    ] {
        execute(&pool, statement).await;
    }
    let worker = spawn_worker(&pool, worker_config());
    let player = signups(&pool)
        .await
        .create_user_and_await_player(&user(1), DEADLINE)
        .await
        .expect("the signup is written again after the conflict");
    let raised: i64 = sqlx::query_scalar("select last_value from conflicts_raised")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        raised >= 2,
        "the conflict was raised, then the signup written: {raised}"
    );
    assert_eq!(counts(&pool).await.players, 1, "{player:?}");
    worker.stop().await;
}
