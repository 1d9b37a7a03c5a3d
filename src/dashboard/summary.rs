//! The dashboard's figures: read from the tables each refresh (each statement bounded by an
//! index, whatever the table holds) and, when endpoints are given, from the loop's metrics.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::scrape::LoopHealth;
use crate::admin::FailedJob;
use crate::store;

/// How far back the per-second series goes.
const SERIES_WINDOW: Duration = Duration::from_secs(60);
/// The rates shown are averages over this much of the series' end.
const RATE_WINDOW: i64 = 10;
/// How far back the metrics latencies go.
pub(super) const HEALTH_WINDOW: Duration = Duration::from_secs(10);
/// Failed jobs listed, newest first.
const FAILED_LISTED: i64 = 20;

/// What the page shows, as `GET /api/summary` returns it.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// When the figures were read.
    pub at: DateTime<Utc>,
    /// Signups per second, over the last 10 s.
    pub signups_per_sec: f64,
    /// Jobs finished (done or failed) per second, over the last 10 s.
    pub completions_per_sec: f64,
    /// Jobs done in the last 60 s.
    pub done_last_minute: i64,
    /// Jobs waiting for a worker.
    pub pending: i64,
    /// Seconds the oldest pending job has waited.
    pub oldest_pending_secs: Option<f64>,
    /// Jobs that ran out of attempts, in total.
    pub failed_total: i64,
    /// The latest of them, newest first (at most 20), without emails.
    pub failed_jobs: Vec<FailedJob>,
    /// `pg_notification_queue_usage()`: the share of the notification queue in use.
    pub queue_usage: f64,
    /// Median and 99th percentile, in ms, from a signup's insert to its job done, over the last
    /// 60 s (from the tables).
    pub commit_to_done_p50_ms: Option<f64>,
    /// As above, the 99th percentile.
    pub commit_to_done_p99_ms: Option<f64>,
    /// The last 60 s, one entry a second, oldest first.
    pub series: Vec<SummarySecond>,
    /// From the metrics endpoints, when the dashboard was given any.
    pub health: Option<LoopHealth>,
    /// Whether the page may offer actions.
    pub actions: bool,
}

/// One second of the series.
#[derive(Debug, Clone, Serialize)]
pub struct SummarySecond {
    /// Unix seconds.
    pub second: i64,
    /// Signups made.
    pub signups: i64,
    /// Jobs done.
    pub done: i64,
    /// Jobs failed.
    pub failed: i64,
    /// Median ms from insert to done of the jobs done that second.
    pub commit_to_done_p50_ms: Option<f64>,
}

pub(super) async fn read(
    pool: &PgPool,
    health: Option<LoopHealth>,
    actions: bool,
) -> Result<Summary, sqlx::Error> {
    let window = SERIES_WINDOW.as_secs_f64();
    let signups = store::signups_per_second(pool, window).await?;
    let finished = store::finished_per_second(pool, window).await?;
    // The row for the whole window (none when nothing finished in it).
    let whole = finished.iter().find(|row| row.second.is_none());
    let pending = store::pending_jobs(pool).await?;
    let failed_total = store::failed_jobs(pool).await?;
    let failures = store::recent_failures(pool, FAILED_LISTED).await?;
    let queue_usage = store::notification_queue_usage(pool).await?;
    let at = Utc::now();
    let now = at.timestamp();
    let series: Vec<SummarySecond> = (now - SERIES_WINDOW.as_secs() as i64 + 1..=now)
        .map(|second| {
            let made = signups.iter().find(|row| row.second == second);
            let ended = finished.iter().find(|row| row.second == Some(second));
            SummarySecond {
                second,
                signups: made.map_or(0, |row| row.signups),
                done: ended.map_or(0, |row| row.done),
                failed: ended.map_or(0, |row| row.failed),
                commit_to_done_p50_ms: ended.and_then(|row| row.commit_to_done_p50).map(|s| s * 1000.0),
            }
        })
        .collect();
    // The current second is still filling: rates use the ten before it.
    let recent = |count: fn(&SummarySecond) -> i64| {
        let total: i64 = series
            .iter()
            .rev()
            .skip(1)
            .take(RATE_WINDOW as usize)
            .map(count)
            .sum();
        total as f64 / RATE_WINDOW as f64
    };
    Ok(Summary {
        at,
        signups_per_sec: recent(|s| s.signups),
        completions_per_sec: recent(|s| s.done + s.failed),
        done_last_minute: whole.map_or(0, |row| row.done),
        pending: pending.pending,
        oldest_pending_secs: pending.oldest_pending_secs,
        failed_total,
        failed_jobs: failures.into_iter().map(FailedJob::from).collect(),
        queue_usage,
        commit_to_done_p50_ms: whole.and_then(|row| row.commit_to_done_p50).map(|s| s * 1000.0),
        commit_to_done_p99_ms: whole.and_then(|row| row.commit_to_done_p99).map(|s| s * 1000.0),
        series,
        health,
        actions,
    })
}
