//! libpq's multi-host connection strings: hosts tried in order, `target_session_attrs` honoured,
//! by the library and the binary. (Following a failover needs a second server: `make failover`.)

use std::path::PathBuf;
use std::time::Duration;

use ackloop::{Channels, ConnectConfig, NewUser, SignupError, Signups};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::{TcpListener, UnixStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::common::*;

/// A key=value string listing a host that is down (nothing listens on a free loopback port)
/// before the test's server (its Unix socket), with `attrs`.
fn down_then_up(connect: &PgConnectOptions, attrs: &str) -> (String, u16) {
    let down = free_port();
    let socket = connect
        .get_socket()
        .expect("the test server is reached through its socket")
        .display()
        .to_string();
    let text = format!(
        "host=127.0.0.1,{socket} port={down},{} dbname={} user={} target_session_attrs={attrs}",
        connect.get_port(),
        connect.get_database().unwrap(),
        connect.get_username(),
    );
    (text, down)
}

#[sqlx::test]
async fn a_host_that_is_down_is_skipped_and_the_loop_runs_through_the_next(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect.clone(), 2).await;
    let (text, _) = down_then_up(&connect, "read-write");
    let config = ConnectConfig::parse(&text).unwrap();
    assert_eq!(config.hosts().len(), 2);

    // The library: a pool on the host that is up, with the signup side's listener on it too.
    let multi = config
        .connect_pool(PgPoolOptions::new().max_connections(3))
        .await
        .expect("the second host is read-write");
    let signups = Signups::connect(multi.clone()).await.unwrap();
    // The binary: a worker, and a signup, given the same string.
    let worker = ackloop_command(&text)
        .args(["worker", "--concurrency", "1"])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ada = NewUser::new("ada@example.com", "Ada").unwrap();
    let player = signups
        .create_user_and_await_player(&ada, DEADLINE)
        .await
        .expect("a player through the multi-host pool, made by a worker on the same string");
    let signed_up = run_ackloop(
        &text,
        &[
            "signup",
            "--email",
            "bo@example.com",
            "--display-name",
            "Bo",
            "--timeout",
            "30s",
            "--json",
        ],
    )
    .await;
    assert_eq!(signed_up.status.code(), Some(0), "{}", stderr(&signed_up));
    assert_eq!(stdout_json(&signed_up)["player"]["display_name"], "Bo");

    assert_eq!(player.display_name, "Ada");
    assert_eq!(counts(&pool).await.players, 2);
    drop(signups);
    multi.close().await;
    drop(worker);
}

#[sqlx::test]
async fn with_no_host_that_is_read_write_the_error_names_each_host_and_why(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool: PgPool = pool(options, connect.clone(), 2).await;
    // New sessions on this test's database are read-only, as on a fenced primary.
    execute(
        &pool,
        "do $$ begin
             execute format('alter database %I set default_transaction_read_only = on', current_database());
         end $$",
    )
    .await;
    let (text, down) = down_then_up(&connect, "read-write");

    let err = ConnectConfig::parse(&text)
        .unwrap()
        .connect_pool(PgPoolOptions::new())
        .await
        .expect_err("no host is read-write");
    assert!(ackloop::is_unavailable(&err), "{err:?}");
    let message = ackloop::describe_db_error(&err);
    assert!(message.contains("no server is read-write"), "{message}");
    assert!(message.contains(&format!("127.0.0.1:{down}")), "{message}");
    assert!(message.contains("read-only"), "{message}");

    // The binary exits 7 ("cannot reach the database") with the same reasons.
    let status = run_ackloop(&text, &["status"]).await;
    assert_eq!(status.status.code(), Some(7), "{}", stderr(&status));
    assert!(
        stderr(&status).contains("no server is read-write"),
        "{}",
        stderr(&status)
    );
    // Any server will do with target_session_attrs=any: the first that answers.
    let (any, _) = down_then_up(&connect, "any");
    let status = run_ackloop(&any, &["status"]).await;
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
}

/// A byte proxy from a loopback port to the test server's socket: a second "host" for the same
/// server. Abort the handle and that host is gone (port closed, its connections cut).
async fn proxy_to(connect: &PgConnectOptions) -> (u16, JoinHandle<()>) {
    let socket: PathBuf = connect
        .get_socket()
        .unwrap()
        .join(format!(".s.PGSQL.{}", connect.get_port()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = tokio::spawn(async move {
        let mut relays = JoinSet::new();
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            let socket = socket.clone();
            relays.spawn(async move {
                if let Ok(mut server) = UnixStream::connect(&socket).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (port, handle)
}

/// The first host dies: the pool moves to the second, whatever `target_session_attrs` is.
async fn first_host_dies(connect: PgConnectOptions, attrs: &str) {
    let (port, proxy) = proxy_to(&connect).await;
    let text = format!(
        "host=127.0.0.1,{} port={port},{} dbname={} user={} target_session_attrs={attrs}",
        connect.get_socket().unwrap().display(),
        connect.get_port(),
        connect.get_database().unwrap(),
        connect.get_username(),
    );
    let multi = ConnectConfig::parse(&text)
        .unwrap()
        .connect_pool(
            PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(3)),
        )
        .await
        .unwrap();
    assert_eq!(
        multi.connect_options().get_port(),
        port,
        "starts on the first host"
    );
    sqlx::query("select 1").execute(&multi).await.unwrap();
    proxy.abort();
    wait_until(
        &format!("attrs={attrs}: the pool moves off the dead first host"),
        || async { multi.connect_options().get_socket().is_some() },
    )
    .await;
    sqlx::query("select 1")
        .execute(&multi)
        .await
        .expect("a query on the second host");
    multi.close().await;
}

#[sqlx::test]
async fn a_pool_leaves_a_first_host_that_dies_with_any_attrs(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _pool = pool(options, connect.clone(), 1).await;
    first_host_dies(connect, "any").await;
}

#[sqlx::test]
async fn a_pool_leaves_a_first_host_that_dies_with_read_write_attrs(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let _pool = pool(options, connect.clone(), 1).await;
    first_host_dies(connect, "read-write").await;
}

/// A write refused as read-only (a fenced primary, or the caller's own read-only transaction)
/// certainly committed nothing: no job id to look up.
#[sqlx::test]
async fn create_user_refused_as_read_only_keeps_no_job_id(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 1).await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("set transaction read only")
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = ackloop::create_user(
        &mut tx,
        &Channels::default(),
        &NewUser::new("ro@example.com", "Ro").unwrap(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, SignupError::Unavailable { job_id: None, .. }),
        "{err:?}"
    );
}
