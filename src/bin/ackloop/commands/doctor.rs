//! `ackloop doctor`: check everything the loop needs, print how to fix what is wrong.

use std::time::Duration;

use serde_json::json;

use crate::args::ConnectionArgs;
use crate::exit::Failure;

pub(super) async fn run(
    connection: &ConnectionArgs,
    stale_after: Duration,
    json: bool,
) -> Result<(), Failure> {
    let pool = connection.pool(2, connection.default_patience()?).await?;
    let listen_options = match connection.listen_options()? {
        Some(options) => options,
        None => connection.connect_options()?,
    };
    let checks = ackloop::admin::diagnose(&pool, listen_options, stale_after).await;
    let problems = checks.iter().filter(|check| !check.ok).count();
    if json {
        println!("{}", json!({ "ok": problems == 0, "checks": checks }));
    } else {
        let width = checks
            .iter()
            .map(|check| check.name.len())
            .max()
            .unwrap_or_default();
        for check in &checks {
            println!(
                "{:<4} {:<width$} {}",
                if check.ok { "ok" } else { "FAIL" },
                check.name,
                check.detail
            );
            if let Some(fix) = &check.fix {
                println!("{:<4} {:<width$} fix: {fix}", "", "");
            }
        }
    }
    if problems == 0 {
        Ok(())
    } else {
        Err(Failure::Doctor(problems))
    }
}
