//! A snapshot of the queue for operators: `ackloop status`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::job::{ExternalId, JobId};
use crate::store;
use crate::telemetry::{JOBS_PENDING, NOTIFICATION_QUEUE_USAGE, OLDEST_PENDING};

/// How many recent failures a report lists.
const RECENT_FAILURES: i64 = 10;

/// Job counts, the oldest pending job's age, and the latest failures.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// Jobs waiting for a worker (including those waiting for a retry).
    pub pending: i64,
    /// Jobs with an attempt under way that a worker counted before making it (a job taken
    /// alone); one whose worker died stays here until its lease ends.
    pub running: i64,
    /// Jobs whose player exists.
    pub done: i64,
    /// Jobs that ran out of attempts.
    pub failed: i64,
    /// Seconds since the oldest unfinished (pending or running) job was created; `None` when
    /// there is none. A value
    /// that keeps growing means no worker is running, or workers cannot keep up.
    pub oldest_pending_secs: Option<f64>,
    /// The most recent failures, newest first.
    pub recent_failures: Vec<FailedJob>,
}

/// A job that ran out of attempts.
#[derive(Debug, Clone, Serialize)]
pub struct FailedJob {
    /// The job.
    pub job_id: JobId,
    /// Its user, who has no player.
    pub user_id: ExternalId,
    /// Attempts made.
    pub attempts: i32,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When it was marked failed.
    pub failed_at: Option<DateTime<Utc>>,
}

impl From<store::FailedJobRow> for FailedJob {
    fn from(row: store::FailedJobRow) -> Self {
        Self {
            job_id: row.id,
            user_id: row.user_id,
            attempts: row.attempts,
            last_error: row.last_error,
            failed_at: row.failed_at,
        }
    }
}

impl StatusReport {
    /// Reads the report from the tables.
    ///
    /// # Errors
    /// The driver's error when the database cannot be read.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {
    /// let report = ackloop::admin::StatusReport::read(&pool).await?;
    /// println!("{} pending", report.pending);
    /// # Ok(()) }
    /// ```
    pub async fn read(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let counts = store::job_counts(pool).await?;
        let failures = store::recent_failures(pool, RECENT_FAILURES).await?;
        Ok(Self {
            pending: counts.pending,
            running: counts.running,
            done: counts.done,
            failed: counts.failed,
            oldest_pending_secs: counts.oldest_pending_secs,
            recent_failures: failures.into_iter().map(FailedJob::from).collect(),
        })
    }
}

/// Samples the queue gauges (pending jobs, oldest pending age, notification queue usage) every
/// `interval` until `shutdown`; errors are skipped, the next sample tries again.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) {
/// let shutdown = tokio_util::sync::CancellationToken::new();
/// let every = std::time::Duration::from_secs(5);
/// tokio::spawn(ackloop::sample_queue_gauges(pool, every, shutdown.clone()));
/// # }
/// ```
pub async fn sample_queue_gauges(pool: PgPool, interval: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Ok(pending) = store::pending_jobs(&pool).await {
            ::metrics::gauge!(JOBS_PENDING).set(pending.pending as f64);
            ::metrics::gauge!(OLDEST_PENDING).set(pending.oldest_pending_secs.unwrap_or(0.0));
        }
        if let Ok(usage) = store::notification_queue_usage(&pool).await {
            ::metrics::gauge!(NOTIFICATION_QUEUE_USAGE).set(usage);
        }
    }
}
