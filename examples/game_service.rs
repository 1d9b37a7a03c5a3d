//! The game (player) service of a pair that existed before ackloop: it owns `players (id
//! bigserial, account_id uuid, nickname, level, …)`, and runs ackloop's worker with its own
//! handler, which writes its own players. See `examples/existing_services/README.md`.
//!
//! ```sh
//! DATABASE_URL=postgres://… cargo run --example game_service
//! ```

use ackloop::{Created, Handler, Job, JobError, Worker, WorkerConfig, worker_session_options};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// What the accounts service gets back with the player's id.
#[derive(Debug, Serialize)]
pub struct NewPlayer {
    /// The level a new player starts at.
    pub level: i32,
}

/// The handler: this service's own player row, inside ackloop's claim transaction, so the row
/// commits together with the job's `done` and the answer the accounts service waits for.
pub struct CreatePlayer;

impl Handler for CreatePlayer {
    async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<Created, JobError> {
        // Retrying cannot turn another id into an account id: fail now, with the reason.
        let account_id = job
            .user_id
            .to_uuid()
            .ok_or_else(|| JobError::fail(format!("user id {} is not an account id", job.user_id)))?;
        // A player an earlier attempt made (its commit's answer lost) is the same player: the
        // no-op update returns it instead of a second row.
        let (player_id, level): (i64, i32) = sqlx::query_as(
            "insert into players (account_id, nickname) values ($1, $2)
             on conflict (account_id) do update set account_id = excluded.account_id
             returning id, level",
        )
        .bind(account_id)
        .bind(&job.display_name)
        .fetch_one(&mut *conn)
        .await?;
        Created::new(player_id).with_result(&NewPlayer { level })
    }
}

/// Applies ackloop's migrations (its own schema, `ackloop`), then this service's own.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    ackloop::run_migrations(pool).await?;
    let mut own = sqlx::migrate!("examples/existing_services/game_migrations");
    // Its own record: `migrate!` takes ackloop's sqlx.toml settings in this crate.
    own.dangerous_set_table_name("game_migrations");
    own.create_schemas = std::borrow::Cow::Borrowed(&[]);
    own.run(pool).await
}

/// The worker this service runs: ackloop's loop with [`CreatePlayer`].
pub async fn worker(connect: PgConnectOptions) -> Result<Worker<CreatePlayer>, sqlx::Error> {
    let config = WorkerConfig::default();
    let pool = PgPoolOptions::new()
        .max_connections(
            u32::try_from(config.concurrency)
                .unwrap_or(u32::MAX)
                .saturating_add(1),
        )
        .connect_with(worker_session_options(connect))
        .await?;
    Ok(Worker::new(pool, config).with_handler(CreatePlayer))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let connect: PgConnectOptions = std::env::var("DATABASE_URL")?.parse()?;
    let pool = PgPool::connect_with(connect.clone()).await?;
    migrate(&pool).await?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    println!("game service: creating players (ctrl-c stops)");
    worker(connect).await?.run(shutdown).await?;
    Ok(())
}
