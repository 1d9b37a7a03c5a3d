//! A player service with its own tables: its own `players` (with its own columns: level, coins)
//! columns (level, coins) and a starter inventory, written by its own [`Handler`] inside
//! ackloop's claim transaction. The rows commit together with the job's `done` status and the
//! confirmation the signup side waits for, or not at all.
//!
//! The service keeps its own schema in `examples/player_service_migrations/`, applied by its own
//! migrator after ackloop's. Run it with a database and an auth side (`ackloop signup`, or the
//! auth_service example):
//!
//! ```sh
//! DATABASE_URL=postgres://… cargo run --example player_service
//! ```

use std::time::Duration;

use ackloop::{Created, Handler, Job, JobError, JobSource, Worker, WorkerConfig, worker_session_options};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// Coins every new player starts with.
pub const STARTING_COINS: i64 = 100;

/// Display names only staff may use.
const RESERVED_NAMES: &[&str] = &["admin", "moderator", "system"];

/// The handler: the player with this service's columns, then the starter inventory. It serves the
/// built-in tables' signups (`ackloop signup`, or the auth_service example).
pub struct StarterKit;

impl Handler for StarterKit {
    const SOURCE: JobSource = JobSource::BuiltinSignup;

    async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<Created, JobError> {
        if is_reserved(&job.display_name) {
            // Retrying cannot change the name: fail now, and the caller hears this reason.
            return Err(JobError::fail("the display name is reserved for staff"));
        }
        // `sqlx::query` rather than `query!`: these columns are this service's, not ackloop's,
        // and ackloop's offline query cache is prepared without them.
        // This service's own table. A player an earlier attempt made (its answer lost) is the same
        // player: the no-op update returns it.
        let (player_id, created_at): (i64, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
            "insert into players (user_id, display_name, level, coins)
             values ($1, $2, 1, $3)
             on conflict (user_id) do update set user_id = excluded.user_id
             returning id, created_at",
        )
        .bind(job.user_id.as_str())
        .bind(&job.display_name)
        .bind(STARTING_COINS)
        .fetch_one(&mut *conn)
        .await?;
        let kit = sqlx::query(
            "insert into player_inventory (user_id, item, quantity)
             select $1, item, quantity
             from starter_items
             on conflict (user_id, item) do nothing",
        )
        .bind(job.user_id.as_str())
        .execute(&mut *conn)
        .await?;
        if kit.rows_affected() == 0 && !has_inventory(conn, job).await? {
            // The player row above is undone with this error; the job is tried again after the
            // backoff, and an operator has until the last attempt to fill the table.
            return Err(JobError::retry_later(
                "no starter items are configured; add rows to starter_items",
            ));
        }
        // What the waiting caller gets back, read from ackloop's job table.
        Created::new(player_id).with_result(&serde_json::json!({
            "display_name": job.display_name,
            "created_at": created_at,
            "level": 1,
            "coins": STARTING_COINS,
        }))
    }
}

fn is_reserved(display_name: &str) -> bool {
    RESERVED_NAMES
        .iter()
        .any(|reserved| display_name.eq_ignore_ascii_case(reserved))
}

/// Whether an earlier attempt's kit is already in place (the job was put back by an operator).
async fn has_inventory(conn: &mut PgConnection, job: &Job) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("select exists (select 1 from player_inventory where user_id = $1)")
        .bind(job.user_id.as_str())
        .fetch_one(&mut *conn)
        .await
}

/// Applies ackloop's migrations, then this service's own.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    ackloop::run_migrations(pool).await?;
    let mut own = sqlx::migrate!("examples/player_service_migrations");
    own.dangerous_set_table_name("player_service_migrations");
    own.run(pool).await
}

/// The worker this service runs: ackloop's loop with [`StarterKit`] as its handler.
pub fn worker(pool: PgPool, config: WorkerConfig) -> Worker<StarterKit> {
    Worker::new(pool, config).with_handler(StarterKit)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("ackloop=info")),
        )
        .init();
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let options: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(worker_session_options(options))
        .await?;
    migrate(&pool).await?;

    // The service owns shutdown: Ctrl-C cancels the token, and the worker drains and returns.
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    worker(pool, WorkerConfig::default()).run(shutdown).await?;
    Ok(())
}
