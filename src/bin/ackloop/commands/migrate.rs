//! `ackloop migrate`: apply the embedded migrations the database lacks, and say which.

use serde_json::json;

use crate::args::ConnectionArgs;
use crate::exit::Failure;

pub(super) async fn run(connection: &ConnectionArgs, json: bool) -> Result<(), Failure> {
    let pool = connection.pool(1, connection.default_patience()?).await?;
    let pending: Vec<i64> = match ackloop::check_schema(&pool).await {
        Ok(()) => Vec::new(),
        Err(ackloop::SchemaError::Behind { missing }) => missing,
        Err(_) => ackloop::MIGRATOR
            .iter()
            .map(|migration| migration.version)
            .collect(),
    };
    ackloop::run_migrations(&pool)
        .await
        .map_err(Failure::from_migrate)?;
    let latest = ackloop::MIGRATOR.iter().map(|migration| migration.version).max();
    if json {
        println!("{}", json!({ "applied": pending, "latest": latest }));
    } else if pending.is_empty() {
        println!("schema up to date (migration {})", latest.unwrap_or_default());
    } else {
        println!(
            "applied {} migration(s); schema at {}",
            pending.len(),
            latest.unwrap_or_default()
        );
    }
    Ok(())
}
