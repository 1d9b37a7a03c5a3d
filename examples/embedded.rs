//! One service that embeds both sides: a worker running in the background and a signup handle,
//! sharing one pool. Run with a migrated database:
//!
//! ```sh
//! DATABASE_URL=postgres://… cargo run --example embedded -- ada@example.com Ada
//! ```

use std::time::Duration;

use ackloop::{NewUser, Signups, Worker, WorkerConfig};
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(email), Some(display_name)) = (args.next(), args.next()) else {
        return Err("usage: embedded EMAIL DISPLAY_NAME".into());
    };
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let pool = PgPoolOptions::new().max_connections(4).connect(&url).await?;
    ackloop::run_migrations(&pool).await?;

    // The service owns shutdown: cancel the token when it stops.
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(pool.clone(), WorkerConfig::default()).run(shutdown.clone()));

    let signups = Signups::connect(pool).await?;
    let user = NewUser::new(email, display_name)?;
    let player = signups
        .create_user_and_await_player(&user, Duration::from_secs(5))
        .await?;
    println!("player {} ({}) is ready", player.id, player.display_name);

    shutdown.cancel();
    worker.await??;
    Ok(())
}
