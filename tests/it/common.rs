//! Helpers shared by the integration tests: workers, waits with deadlines, listeners, row counts.

use std::future::Future;
use std::time::Duration;

use ackloop::{Backoff, Channels, Handler, NewUser, Signups, SignupsConfig, Worker, WorkerConfig};
use sqlx::postgres::{PgConnectOptions, PgListener, PgNotification, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any awaited event may take before the test fails: generous, because a loaded 2-core
/// CI machine is slow, and a correct run never waits this long.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A pool of `connections` on the test's database.
pub async fn pool(options: PgPoolOptions, connect: PgConnectOptions, connections: u32) -> PgPool {
    options
        .max_connections(connections)
        .connect_with(connect)
        .await
        .expect("connect to the test database")
}

/// A worker config for tests: quick retries, and a poll so slow that only notifications (or the
/// sweep on start) can explain a job being picked up promptly.
pub fn worker_config() -> WorkerConfig {
    WorkerConfig {
        poll_interval: Duration::from_secs(3600),
        backoff: Backoff {
            base: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        shutdown_timeout: Duration::from_secs(10),
        ..WorkerConfig::default()
    }
}

/// A running worker; stop it with [`RunningWorker::stop`].
pub struct RunningWorker {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ackloop::WorkerError>>,
}

impl RunningWorker {
    /// Cancels the worker and waits for it to drain and return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("worker did not stop after shutdown")
            .expect("worker panicked")
            .expect("worker returned an error");
    }
}

/// Sends the library's logs to the test's captured output (shown when a test fails), filtered
/// by RUST_LOG (default: debug for ackloop).
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("ackloop=debug"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Runs the built-in worker on `pool` in the background.
pub fn spawn_worker(pool: &PgPool, config: WorkerConfig) -> RunningWorker {
    run_in_background(Worker::new(pool.clone(), config))
}

/// Runs `worker` (with whatever handler it has) in the background.
pub fn run_in_background<H: Handler>(worker: Worker<H>) -> RunningWorker {
    init_logs();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    RunningWorker { shutdown, task }
}

pub async fn signups(pool: &PgPool) -> Signups {
    Signups::connect(pool.clone())
        .await
        .expect("start the signup listener")
}

pub async fn signups_on(pool: &PgPool, channels: Channels) -> Signups {
    let config = SignupsConfig {
        channels,
        ..SignupsConfig::default()
    };
    Signups::connect_with(pool.clone(), config)
        .await
        .expect("start the signup listener")
}

pub fn user(n: usize) -> NewUser {
    NewUser::new(format!("user{n}@example.com"), format!("Player {n}")).expect("valid test user")
}

/// Polls `condition` until it holds; fails the test, naming `what`, after [`DEADLINE`].
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    tokio::time::timeout(DEADLINE, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

/// Awaits `future`, failing the test, naming `what`, after [`DEADLINE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A listener on `channel` of the test's database, listening when this returns.
pub async fn listen_on(pool: &PgPool, channel: &str) -> PgListener {
    let mut listener = PgListener::connect_with(pool).await.expect("listener connects");
    listener.listen(channel).await.expect("listen");
    listener
}

pub async fn next_notification(listener: &mut PgListener) -> PgNotification {
    within("a notification", listener.recv())
        .await
        .expect("listener receives")
}

/// Sends a marker on `channel` and asserts it is the first thing `listener` receives: delivery
/// follows commit order, so this proves nothing was sent before it, without a waiting window.
pub async fn assert_nothing_sent_before_marker(pool: &PgPool, listener: &mut PgListener, channel: &str) {
    notify(pool, channel, "marker").await;
    let first = next_notification(listener).await;
    assert_eq!(
        first.payload(),
        "marker",
        "something was notified before the marker"
    );
}

pub async fn notify(pool: &PgPool, channel: &str, payload: &str) {
    sqlx::query("select pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(pool)
        .await
        .expect("notify");
}

/// Rows in users, player_creation_jobs and players.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub users: i64,
    pub jobs: i64,
    pub players: i64,
}

/// No user, no job, no player: what a refused signup must leave.
pub const NOTHING: Counts = Counts {
    users: 0,
    jobs: 0,
    players: 0,
};

pub async fn counts(pool: &PgPool) -> Counts {
    let (users, jobs, players): (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from ackloop.builtin_users as users), (select count(*) from ackloop.player_creation_jobs), \
         (select count(*) from ackloop.builtin_players as players)",
    )
    .fetch_one(pool)
    .await
    .expect("count rows");
    Counts { users, jobs, players }
}

pub async fn count_jobs_with_status(pool: &PgPool, status: &str) -> i64 {
    sqlx::query_scalar("select count(*) from ackloop.player_creation_jobs where status = $1")
        .bind(status)
        .fetch_one(pool)
        .await
        .expect("count jobs")
}

/// A count the test asks for, `sql` returning one bigint.
pub async fn count_of(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"))
}

/// Runs `statement` as `role` in a transaction rolled back after: the SQLSTATE it failed with, or
/// `None` when it ran.
pub async fn as_role(pool: &PgPool, role: &str, statement: &str) -> Option<String> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("set local role {role}")))
        .execute(&mut *tx)
        .await
        .unwrap();
    let result = sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(&mut *tx)
        .await;
    tx.rollback().await.unwrap();
    result.err().map(|err| {
        err.as_database_error()
            .and_then(|db_err| db_err.code())
            .map_or_else(|| err.to_string(), |code| code.into_owned())
    })
}

/// Runs statements that set up a fault (a constraint, a trigger) in the test's own database.
/// Runs a statement made at run time (names with the test database's oid in them, say).
pub async fn execute_owned(pool: &PgPool, sql: String) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await
        .unwrap();
}

pub async fn execute(pool: &PgPool, sql: &'static str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .expect("set up the test's fault");
}

/// The `ackloop` binary against `url`, with no listen URL or log format from the environment;
/// killed if the test ends first.
pub fn ackloop_command(url: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ackloop"));
    command
        .env("DATABASE_URL", url)
        .env_remove("ACKLOOP_LISTEN_URL")
        .env_remove("ACKLOOP_LOG_FORMAT")
        .kill_on_drop(true);
    command
}

/// Runs `ackloop args…` against `url` to its end.
pub async fn run_ackloop(url: &str, args: &[&str]) -> std::process::Output {
    within(
        "the ackloop command to exit",
        ackloop_command(url).args(args).output(),
    )
    .await
    .expect("run ackloop")
}

/// The one JSON object a `--json` command printed.
pub fn stdout_json(output: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|err| {
        panic!(
            "stdout is not one JSON object ({err}): {text}\nstderr: {}",
            stderr(output)
        )
    })
}

pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Sends signal `name` (`-TERM`, `-KILL`, `-STOP`, …) to a child process.
pub async fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("the process is running").to_string();
    let status = tokio::process::Command::new("kill")
        .args([name, &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "kill {name} {pid}");
}

/// Sends SIGTERM to an `ackloop worker` process and waits, naming `what`, for it to exit;
/// asserts that it drained and exited 0 ("worker stopped"), and returns its log (stderr).
pub async fn terminate_worker(worker: tokio::process::Child, what: &str) -> String {
    signal(&worker, "-TERM").await;
    let exited = within(what, worker.wait_with_output()).await.unwrap();
    let log = String::from_utf8_lossy(&exited.stderr).into_owned();
    assert_eq!(exited.status.code(), Some(0), "{log}");
    assert!(log.contains("worker stopped"), "{log}");
    log
}

/// A signup committed with no worker running; returns its job id.
pub async fn pending_signup(pool: &PgPool, n: usize) -> ackloop::JobId {
    let mut conn = pool.acquire().await.unwrap();
    ackloop::create_user(&mut conn, &ackloop::Channels::default(), &user(n))
        .await
        .unwrap()
        .job_id
}

/// Signups `numbers` committed one after another on `conn`, with no worker running.
pub async fn commit_signups(conn: &mut PgConnection, numbers: impl IntoIterator<Item = usize>) {
    for n in numbers {
        ackloop::create_user(conn, &Channels::default(), &user(n))
            .await
            .unwrap();
    }
}

/// A private cluster for one test, so that restarting it (or configuring it) disturbs no other
/// test. Stopped and deleted when dropped.
pub struct OwnCluster {
    dir: std::path::PathBuf,
    env: Vec<(&'static str, String)>,
}

impl OwnCluster {
    /// A cluster on a Unix socket only; returns it and its URL.
    pub async fn start(name: &str) -> (Self, String) {
        Self::start_with(name, Vec::new()).await
    }

    /// A cluster that listens on 127.0.0.1 with TLS on and refuses TCP without it, as managed
    /// servers do; certificates from scripts/test-certs in `certs`. Returns it and its URL
    /// (without sslmode).
    pub async fn start_tls(name: &str, certs: &std::path::Path) -> (Self, String) {
        let port = free_port();
        let env = vec![
            ("PG_PORT", port.to_string()),
            ("PG_LISTEN", "127.0.0.1".to_owned()),
            ("PG_TLS", certs.display().to_string()),
        ];
        Self::start_with(name, env).await
    }

    /// A cluster that also listens on 127.0.0.1 (no TLS); returns it and its TCP URL.
    pub async fn start_tcp(name: &str) -> (Self, String) {
        let env = vec![
            ("PG_PORT", free_port().to_string()),
            ("PG_LISTEN", "127.0.0.1".to_owned()),
        ];
        Self::start_with(name, env).await
    }

    async fn start_with(name: &str, env: Vec<(&'static str, String)>) -> (Self, String) {
        let dir = std::env::temp_dir().join(format!("ackloop-{name}-{}", std::process::id()));
        let cluster = Self { dir, env };
        cluster.pg("start").await;
        let url = cluster.pg("url").await;
        (cluster, url.trim().to_owned())
    }

    /// The directory holding the cluster's Unix socket.
    pub fn socket_dir(&self) -> std::path::PathBuf {
        let real = std::fs::read_link(&self.dir).unwrap_or_else(|_| self.dir.clone());
        real.join("run")
    }

    /// Runs `scripts/pg command` on this cluster and returns what it printed.
    pub async fn pg(&self, command: &str) -> String {
        let output = within(
            "scripts/pg",
            tokio::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg"))
                .arg(command)
                .env("PG_DIR", &self.dir)
                .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
                .output(),
        )
        .await
        .unwrap();
        assert!(
            output.status.success(),
            "scripts/pg {command}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg"))
            .arg("stop")
            .env("PG_DIR", &self.dir)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .status();
        if let Ok(target) = std::fs::read_link(&self.dir) {
            let _ = std::fs::remove_dir_all(target);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.dir);
    }
}

/// The application pool on a test's own cluster, migrated: pooled connections are not pinged
/// before use (as `ackloop` builds them), so a restart leaves dead ones for the code to handle.
pub async fn cluster_pool(url: &str) -> PgPool {
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(1))
        .connect_with(url.parse::<PgConnectOptions>().unwrap())
        .await
        .expect("connect to the test's cluster");
    ackloop::run_migrations(&pool).await.unwrap();
    pool
}

/// A pool of `connections` on `connect` (through a proxy, as a rule) whose connections are not
/// pinged before use, as `ackloop` builds them: one that went silent is handed out to the code.
pub async fn unpinged_pool(connect: PgConnectOptions, connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(connections)
        .test_before_acquire(false)
        .connect_with(connect)
        .await
        .expect("connect through the proxy")
}

/// A worker's pool on a test's own cluster, with the worker session settings.
pub async fn cluster_worker_pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(3)
        .connect_with(ackloop::worker_session_options(url.parse().unwrap()))
        .await
        .expect("connect to the test's cluster")
}

/// A server on 127.0.0.1 that accepts connections and never writes a byte, as a host behind a
/// dead route or a hung proxy looks: its port, and the task holding the connections (abort it
/// to close them).
pub async fn silent_server() -> (u16, JoinHandle<()>) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    (port, holder)
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub use crate::silent_proxy::SilentProxy;

/// Everything the library logs on this test's thread, as text.
#[derive(Clone, Default)]
pub struct Log(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Log {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }
}

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures the library's events for this (one-thread) test runtime.
pub fn capture_logs() -> (Log, tracing::subscriber::DefaultGuard) {
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("ackloop=trace")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (log, tracing::subscriber::set_default(subscriber))
}
