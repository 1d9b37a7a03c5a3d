//! Connecting as users do: a server that refuses connections without TLS, with a CA of its own
//! and client certificates; every connection-string form libpq users paste; `connect_timeout`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ackloop::{ConnectConfig, NewUser, Signups};
use sqlx::postgres::PgPoolOptions;

use crate::common::*;

/// Certificates from scripts/test-certs in a directory of their own, deleted on drop.
struct Certs(PathBuf);

impl Certs {
    async fn make(name: &str) -> Self {
        Self::make_with(name, &[]).await
    }

    /// With `--self-signed`: a server certificate that is its own CA (PostgreSQL's docs' recipe).
    async fn make_with(name: &str, flags: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("ackloop-certs-{name}-{}", std::process::id()));
        let status = within(
            "scripts/test-certs",
            tokio::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-certs"))
                .arg(&dir)
                .args(flags)
                .status(),
        )
        .await
        .unwrap();
        assert!(status.success(), "scripts/test-certs failed");
        Self(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).display().to_string()
    }

    fn dir(&self) -> &Path {
        &self.0
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The port in a `postgres://user@127.0.0.1:PORT/db` URL.
fn port_of(url: &str) -> u16 {
    ConnectConfig::parse(url).unwrap().options().get_port()
}

fn assert_ok(output: &std::process::Output, what: &str) {
    assert!(
        output.status.success(),
        "{what}: exit {:?}\n{}",
        output.status.code(),
        stderr(output)
    );
}

#[tokio::test]
async fn the_whole_loop_runs_over_tls_against_a_server_that_refuses_plain_connections() {
    let certs = Certs::make("loop").await;
    let (_cluster, url) = OwnCluster::start_tls("tls-loop", certs.dir()).await;
    let port = port_of(&url);
    let require = format!("{url}?sslmode=require");
    let verify_full = format!(
        "postgres://postgres@localhost:{port}/ackloop?sslmode=verify-full&sslrootcert={}",
        certs.path("ca.crt")
    );

    let migrated = run_ackloop(&require, &["migrate"]).await;
    assert_ok(&migrated, "migrate with sslmode=require");

    // The worker's pool and its LISTEN connection, verifying the server by the test CA.
    let mut worker = ackloop_command(&verify_full)
        .args(["worker", "--poll-interval", "1h"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The auth side in-process, through the library's own reading of the string.
    let config = ConnectConfig::parse(&verify_full).unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .connect_with(config.into_options())
        .await
        .expect("connect with verify-full and the CA");
    let signups = Signups::connect(pool.clone()).await.unwrap();
    let player = signups
        .create_user_and_await_player(&NewUser::new("tls@example.com", "Over TLS").unwrap(), DEADLINE)
        .await
        .expect("the signup is confirmed over TLS");
    let stored: String =
        sqlx::query_scalar("select display_name from ackloop.builtin_players as players where id = $1")
            .bind(player.id.get())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, "Over TLS");

    // Both listeners (the worker's on the jobs channel, ours on the done channel) are on TLS
    // connections, and no TCP connection got in without it.
    let (listeners, plain): (i64, i64) = sqlx::query_as(
        "select count(*) filter (where activity.query ilike 'listen%' and ssl.ssl), \
                count(*) filter (where activity.client_addr is not null and not ssl.ssl) \
         from pg_stat_activity as activity join pg_stat_ssl as ssl using (pid) \
         where activity.backend_type = 'client backend'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (listeners, plain),
        (2, 0),
        "listeners on TLS, plain TCP connections"
    );

    // Without TLS the server refuses, and the message says what to change.
    let plain = run_ackloop(&format!("{url}?sslmode=disable"), &["status"]).await;
    assert_eq!(plain.status.code(), Some(11));
    assert!(
        stderr(&plain).contains("requires TLS: add sslmode=require"),
        "{}",
        stderr(&plain)
    );

    // verify-full without the CA: the system's roots do not know it.
    let unknown_ca = run_ackloop(
        &format!("postgres://postgres@localhost:{port}/ackloop?sslmode=verify-full"),
        &["status"],
    )
    .await;
    assert_eq!(unknown_ca.status.code(), Some(11));
    let message = stderr(&unknown_ca);
    assert!(
        message.contains("not signed by a CA you trust") && message.contains("sslrootcert="),
        "{message}"
    );

    // A client certificate: the role ackloop_cert may only log in with one.
    sqlx::query("create role ackloop_cert login superuser")
        .execute(&pool)
        .await
        .unwrap();
    let with_cert = format!(
        "host=localhost port={port} dbname=ackloop user=ackloop_cert sslmode=verify-full \
         sslrootcert={} sslcert={} sslkey={}",
        certs.path("ca.crt"),
        certs.path("client.crt"),
        certs.path("client.key")
    );
    assert_ok(
        &run_ackloop(&with_cert, &["status"]).await,
        "status with a client certificate",
    );
    let without_cert = format!(
        "host=localhost port={port} dbname=ackloop user=ackloop_cert sslmode=verify-full sslrootcert={}",
        certs.path("ca.crt")
    );
    assert_eq!(
        run_ackloop(&without_cert, &["status"]).await.status.code(),
        Some(11)
    );

    signal(&worker, "-TERM").await;
    let status = within("the worker to stop", worker.wait()).await.unwrap();
    assert!(status.success(), "worker exit: {status:?}");
}

/// A connection-string form: what it is, DATABASE_URL (None: unset), and environment variables.
type Form<'a> = (&'a str, Option<String>, Vec<(&'a str, String)>);

/// Every way libpq users write where their database is, against a real server that checks
/// passwords over TLS and trusts its Unix socket.
#[tokio::test]
async fn every_connection_string_form_reaches_the_server() {
    let certs = Certs::make("forms").await;
    let (cluster, url) = OwnCluster::start_tls("tls-forms", certs.dir()).await;
    let port = port_of(&url);
    let ca = certs.path("ca.crt");
    let socket = cluster.socket_dir().display().to_string();
    let encoded_socket = socket.replace('/', "%2F");
    assert_ok(
        &run_ackloop(&format!("{url}?sslmode=require"), &["migrate"]).await,
        "migrate",
    );
    // A password with every character that needs care in a URL.
    let password = "p@ss:w/rd %?#";
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            ConnectConfig::parse(&format!("{url}?sslmode=require"))
                .unwrap()
                .into_options(),
        )
        .await
        .unwrap();
    sqlx::query("create role ackloop_password login superuser password 'p@ss:w/rd %?#'")
        .execute(&admin)
        .await
        .unwrap();

    let encoded = "p%40ss%3Aw%2Frd%20%25%3F%23";
    let forms: Vec<Form> = vec![
        (
            "URL with a percent-encoded password over TLS",
            Some(format!(
                "postgres://ackloop_password:{encoded}@localhost:{port}/ackloop?sslmode=verify-full&sslrootcert={ca}"
            )),
            vec![],
        ),
        (
            "postgresql:// scheme",
            Some(format!(
                "postgresql://ackloop_password:{encoded}@127.0.0.1:{port}/ackloop?sslmode=require"
            )),
            vec![],
        ),
        (
            "key=value with a quoted password",
            Some(format!(
                "host=localhost port={port} dbname=ackloop user=ackloop_password password='{password}' sslmode=verify-full sslrootcert={ca}"
            )),
            vec![],
        ),
        (
            "libpq's empty-host socket form",
            Some(format!("postgres://postgres@/ackloop?host={socket}&port={port}")),
            vec![],
        ),
        (
            "socket directory percent-encoded as the host",
            Some(format!("postgres://postgres@{encoded_socket}:{port}/ackloop")),
            vec![],
        ),
        (
            "key=value on the socket",
            Some(format!("host={socket} port={port} dbname=ackloop user=postgres")),
            vec![],
        ),
        (
            "no DATABASE_URL: PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE, PGSSLROOTCERT",
            None,
            vec![
                ("PGHOST", "localhost".to_owned()),
                ("PGPORT", port.to_string()),
                ("PGUSER", "ackloop_password".to_owned()),
                ("PGPASSWORD", password.to_owned()),
                ("PGDATABASE", "ackloop".to_owned()),
                ("PGSSLMODE", "verify-full".to_owned()),
                ("PGSSLROOTCERT", ca.clone()),
            ],
        ),
    ];
    for (form, database_url, env) in forms {
        let mut command = ackloop_command("unused");
        match &database_url {
            Some(database_url) => command.env("DATABASE_URL", database_url),
            None => command.env_remove("DATABASE_URL"),
        };
        let output = within(form, command.envs(env).args(["status", "--json"]).output())
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "{form}: exit {:?}\n{}",
            output.status.code(),
            stderr(&output)
        );
        assert_eq!(stdout_json(&output)["pending"], 0, "{form}");
    }

    // A wrong password is refused with advice, and neither password is shown.
    let wrong = run_ackloop(
        &format!("postgres://ackloop_password:not-{encoded}@localhost:{port}/ackloop?sslmode=require"),
        &["status"],
    )
    .await;
    assert_eq!(wrong.status.code(), Some(11));
    let message = stderr(&wrong);
    assert!(
        message.contains("password authentication failed")
            && message.contains("check the user name and password"),
        "{message}"
    );
    assert!(
        !message.contains("p@ss") && !message.contains(encoded),
        "{message}"
    );
    // Server-internal noise stays out of messages.
    assert!(
        !message.contains(" at line ") && !message.contains("error returned from database"),
        "{message}"
    );
}

/// `connect_timeout` bounds a connection attempt to a server that accepts TCP but never answers
/// (a black-holed path): the attempt ends with exit 7 after the string's timeout, not ackloop's
/// default of 10 seconds.
#[tokio::test]
async fn connect_timeout_in_the_string_is_honoured() {
    let (port, holder) = silent_server().await;
    let started = Instant::now();
    let output = run_ackloop(
        &format!("postgres://app@127.0.0.1:{port}/app?connect_timeout=2&sslmode=disable"),
        &["status"],
    )
    .await;
    let took = started.elapsed();
    holder.abort();
    assert_eq!(output.status.code(), Some(7), "{}", stderr(&output));
    // The string's limit is the one that ran out (the default is 10 s), and not early.
    assert!(
        stderr(&output).contains("timed out: no answer within connect_timeout=2 s"),
        "{}",
        stderr(&output)
    );
    assert!(took >= Duration::from_secs(2), "took {took:?}");
}

/// A server whose certificate is its own CA (PostgreSQL's docs' recipe for a test server), given
/// as `sslrootcert` with verify-full: psql accepts it, rustls refuses a CA certificate used as a
/// server's. ackloop says exactly that, at once, and what to give instead; sslmode=require
/// (encrypted, not verified) connects.
#[tokio::test]
async fn a_self_signed_server_certificate_is_refused_with_what_to_do_instead() {
    let certs = Certs::make_with("self-signed", &["--self-signed"]).await;
    let (_cluster, url) = OwnCluster::start_tls("tls-self-signed", certs.dir()).await;
    let verified = format!(
        "{url}?sslmode=verify-full&sslrootcert={}",
        certs.path("server.crt")
    );
    let started = std::time::Instant::now();
    let refused = run_ackloop(&verified, &["status"]).await;
    let message = stderr(&refused);
    assert_eq!(refused.status.code(), Some(11), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered in {:?}",
        started.elapsed()
    );
    assert!(
        message.contains("its own CA") && message.contains("sslmode=require"),
        "{message}"
    );
    // Migrated first, as a user would: status then has a schema to read.
    let required = format!("{url}?sslmode=require");
    assert_ok(
        &run_ackloop(&required, &["migrate"]).await,
        "migrate over sslmode=require",
    );
    assert_ok(
        &run_ackloop(&required, &["status"]).await,
        "status over sslmode=require",
    );
}
