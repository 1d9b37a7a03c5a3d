//! A real pgbouncer in transaction mode in front of the test's database: `doctor` must notice that
//! LISTEN cannot work through it, and the loop must work with the listeners given a direct URL.

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::process::{Child, Command};

use crate::common::*;

/// A pgbouncer of this test's own, in transaction mode, resetting each server session after
/// every transaction: exactly what makes LISTEN useless through it. (Without the reset the next
/// transaction might or might not land on the same server session; the reset makes the test
/// deterministic, not the pooler any kinder.)
struct Bouncer {
    dir: PathBuf,
    process: Child,
    port: u16,
}

impl Bouncer {
    async fn start(direct: &PgConnectOptions) -> Self {
        let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|path| std::path::Path::new(path).exists())
            .expect("pgbouncer not found: `make test` installs it (apt-get install pgbouncer)");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("ackloop-bouncer-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let server = match direct.get_socket() {
            Some(socket_dir) => socket_dir.display().to_string(),
            None => direct.get_host().to_owned(),
        };
        let config = format!(
            "[databases]\n* = host={server} port={} user={}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = any\npool_mode = transaction\n\
             server_reset_query = DISCARD ALL\nserver_reset_query_always = 1\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n",
            direct.get_port(),
            direct.get_username(),
            dir = dir.display(),
        );
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(&ini, config).unwrap();
        // pgbouncer refuses to run as root. setpriv execs it (runuser would fork, and killing
        // runuser would orphan pgbouncer); its output goes to its log, never to our pipes.
        let mut command = if nix_is_root() {
            let _ = std::process::Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&dir)
                .status();
            let mut command = Command::new("setpriv");
            command.args(["--reuid=postgres", "--regid=postgres", "--init-groups", binary]);
            command
        } else {
            Command::new(binary)
        };
        let process = command
            .arg(&ini)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start pgbouncer");
        let bouncer = Self { dir, process, port };
        wait_until("pgbouncer accepts connections", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", bouncer.port))
                .await
                .is_ok()
        })
        .await;
        bouncer
    }

    /// A URL through the bouncer.
    fn url(&self, direct: &PgConnectOptions) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}?sslmode=disable",
            direct.get_username(),
            self.port,
            direct.get_database().unwrap()
        )
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.process.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .map(|uids| uids.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// `ackloop doctor --json` with queries on `database_url` and the listeners on `listen_url`.
async fn doctor(database_url: &str, listen_url: &str) -> Output {
    let mut command = ackloop_command(database_url);
    command
        .env("ACKLOOP_LISTEN_URL", listen_url)
        .args(["doctor", "--json"]);
    within("ackloop doctor to exit", command.output()).await.unwrap()
}

fn listen_check(output: &Output) -> Value {
    stdout_json(output)["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == "listen")
        .cloned()
        .unwrap()
}

#[sqlx::test]
async fn doctor_catches_a_transaction_pooler_on_the_listen_connection(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let direct = connect.to_url_lossy().to_string();
    let _pool = pool(options, connect.clone(), 2).await;
    let bouncer = Bouncer::start(&connect).await;
    let pooled = bouncer.url(&connect);

    // The listeners would connect through the pooler: LISTEN cannot work there.
    let through = doctor(&direct, &pooled).await;
    assert_eq!(
        through.status.code(),
        Some(10),
        "{}",
        String::from_utf8_lossy(&through.stdout)
    );
    let check = listen_check(&through);
    assert_eq!(check["ok"], false, "{check}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("transaction-mode pooler"),
        "{check}"
    );
    assert!(
        check["fix"].as_str().unwrap().contains("ACKLOOP_LISTEN_URL"),
        "{check}"
    );

    // Given a direct listen connection, the same check passes.
    let fixed = doctor(&direct, &direct).await;
    assert_eq!(
        fixed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&fixed.stdout)
    );
    assert_eq!(listen_check(&fixed)["ok"], true);
    drop(bouncer);
}
