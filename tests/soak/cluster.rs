//! The soak's cluster and its processes: a fresh database, reached directly or through a proxy
//! that can go silent; the poison signups; restarts and crashes of the server; the worker
//! processes and the signals sent to them; queries retried through a server that may be away.

use std::process::Stdio;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use tokio::process::{Child, Command};

use crate::silent_proxy::SilentProxy;
use crate::{ACKLOOP, Rng};

/// The run's database on the soak cluster.
pub struct Cluster {
    /// The server, directly.
    pub url: String,
    /// The server through the proxy that can go silent.
    pub proxied_url: String,
}

/// A new, empty database `name` on the cluster at `admin_url` (dropped first if a run left it).
pub async fn fresh_database(admin_url: &str, name: &str) -> PgConnectOptions {
    let admin_options: PgConnectOptions = admin_url.parse().expect("ACKLOOP_SOAK_URL");
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(admin_options.clone())
        .await
        .unwrap();
    for statement in [
        format!("drop database if exists {name} with (force)"),
        format!("create database {name}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
    admin_options.database(name)
}

impl Cluster {
    /// A fresh, migrated database for this run (`soak_SEED`) on the cluster at `admin_url`, and
    /// the proxy that can go silent in front of it; returns them with a pool on the database.
    pub async fn create(admin_url: &str, seed: u64) -> (Self, SilentProxy, PgPool) {
        let options = fresh_database(admin_url, &format!("soak_{seed}")).await;
        // Worker 0 and signer 0 reach the server through a proxy that can go silent.
        let proxy = SilentProxy::start(options.get_port()).await;
        let cluster = Cluster {
            url: options.to_url_lossy().to_string(),
            proxied_url: options.clone().port(proxy.port).to_url_lossy().to_string(),
        };
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
            .unwrap();
        ackloop::run_migrations(&pool).await.unwrap();
        (cluster, proxy, pool)
    }

    /// Worker 0 and signer 0 reach the server through the proxy that can go silent; the others
    /// directly.
    pub fn url_for(&self, index: u64) -> &str {
        if index == 0 { &self.proxied_url } else { &self.url }
    }

    /// The URL of worker `index` (see [`Cluster::url_for`]).
    pub fn worker_url(&self, index: usize) -> String {
        self.url_for(index as u64).to_owned()
    }

    /// `scripts/pg restart` (a fast shutdown) or `scripts/pg crash` (kill -9 of the postmaster).
    pub async fn pg(&self, command: &str) {
        let status = Command::new("scripts/pg")
            .arg(command)
            .status()
            .await
            .expect("run scripts/pg");
        assert!(status.success(), "scripts/pg {command} failed");
    }
}

/// Poison: creating the players of two seeded signups (of `signups`) kills the session, every
/// time, counted in the sequence `poison_kills`. Returns the poisoned signups.
pub async fn poison(pool: &PgPool, rng: &mut Rng, signups: u64) -> Vec<u64> {
    let poisoned: Vec<u64> = (0..2).map(|_| rng.below(signups)).collect();
    let poison_names: Vec<String> = poisoned.iter().map(|n| format!("'Soak {n}'")).collect();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create sequence poison_kills;
         create function kill_own_session() returns trigger language plpgsql as $$
         begin
             if new.display_name in ({}) then
                 perform nextval('public.poison_kills');
                 perform pg_terminate_backend(pg_backend_pid());
                 perform pg_sleep(1);
             end if;
             return new;
         end $$;
         create trigger kill_own_session before insert on ackloop.builtin_players
             for each row execute function kill_own_session();",
        poison_names.join(", ")
    )))
    .execute(pool)
    .await
    .unwrap();
    poisoned
}

pub fn spawn_worker(url: &str) -> Child {
    Command::new(ACKLOOP)
        .args([
            "worker",
            "--concurrency",
            "2",
            "--poll-interval",
            "1s",
            "--retry-backoff",
            "100ms",
            "--shutdown-timeout",
            "5s",
        ])
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "ackloop=error")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start ackloop worker")
}

pub async fn signal(child: &Child, name: &str) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill").args([name, &pid.to_string()]).status().await;
    }
}

/// Waits until `child` has installed its SIGTERM handler (bit 15 of SigCgt in /proc): a worker
/// restarted a moment ago may not have yet, and would die of the signal instead of draining.
pub async fn catches_sigterm(child: &Child) {
    const SIGTERM_BIT: u64 = 1 << (15 - 1);
    let Some(pid) = child.id() else { return };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let caught = status
            .lines()
            .find_map(|line| line.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .unwrap_or(0);
        if caught & SIGTERM_BIT != 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Retries `query` through a server that may be restarting.
pub async fn patiently<T, F, Fut>(mut query: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match query().await {
            Ok(value) => return value,
            Err(err) if Instant::now() < deadline => {
                eprintln!("soak: retrying a query: {err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("soak: the database did not come back: {err}"),
        }
    }
}
