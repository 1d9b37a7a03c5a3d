//! `ackloop status`: job counts, the oldest pending job's age and recent failures.

use ackloop::admin::StatusReport;

use crate::args::ConnectionArgs;
use crate::exit::Failure;

pub(super) async fn run(connection: &ConnectionArgs, json: bool) -> Result<(), Failure> {
    let pool = connection
        .migrated_pool(1, connection.default_patience()?)
        .await?;
    let report = StatusReport::read(&pool).await.map_err(Failure::Query)?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("a status report always serialises")
        );
        return Ok(());
    }
    println!("{:<8} {:>10}", "pending", report.pending);
    println!("{:<8} {:>10}", "running", report.running);
    println!("{:<8} {:>10}", "done", report.done);
    println!("{:<8} {:>10}", "failed", report.failed);
    match report.oldest_pending_secs {
        Some(secs) => println!("oldest pending job: {secs:.1}s old"),
        None => println!("oldest pending job: none"),
    }
    if !report.recent_failures.is_empty() {
        println!("\nrecent failures:");
        for failure in &report.recent_failures {
            println!(
                "  {}  user {}  {} attempts  {}",
                failure.job_id,
                failure.user_id,
                failure.attempts,
                failure.last_error.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(())
}
