//! Operator calls: look a job up, retry failed jobs, prune finished ones. `ackloop jobs …` runs
//! these; a service can call them too.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::channel::Channels;
use crate::job::{JobId, JobStatus, PlayerId, UnknownStatus, UserId};
use crate::store;

/// Everything about one job.
#[derive(Debug, Clone, Serialize)]
pub struct JobDetails {
    /// The job.
    pub job_id: JobId,
    /// Its user.
    pub user_id: UserId,
    /// The user's email.
    pub email: String,
    /// Where the job is.
    pub status: JobStatus,
    /// Claims so far.
    pub attempts: i32,
    /// The last failed attempt's error.
    pub last_error: Option<String>,
    /// Not claimed before this (a retry's backoff).
    pub run_after: DateTime<Utc>,
    /// When the signup committed.
    pub created_at: DateTime<Utc>,
    /// The last change.
    pub updated_at: DateTime<Utc>,
    /// When it became done or failed.
    pub completed_at: Option<DateTime<Utc>>,
    /// The user's player, if one exists.
    pub player_id: Option<PlayerId>,
}

/// Why an operator call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// No job has this id (or no user this email).
    #[error("no job {0}")]
    UnknownJob(String),
    /// Retrying is for failed jobs; a done job's player exists already.
    #[error("job {0} is done (its player exists); nothing to retry")]
    AlreadyDone(JobId),
    /// Retrying is for failed jobs; a pending one will be taken by a worker anyway.
    #[error("job {0} is still pending; a worker will take it")]
    StillPending(JobId),
    /// A status this version does not know.
    #[error(transparent)]
    UnknownStatus(#[from] UnknownStatus),
    /// The database failed the call.
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

/// Reads one job, its user's email and whether a player exists.
///
/// # Errors
/// [`AdminError::UnknownJob`], [`AdminError::Database`].
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, job_id: ackloop::JobId) -> Result<(), ackloop::AdminError> {
/// let job = ackloop::job_details(&pool, job_id).await?;
/// println!("{} after {} attempts", job.status, job.attempts);
/// # Ok(()) }
/// ```
pub async fn job_details(pool: &PgPool, job_id: JobId) -> Result<JobDetails, AdminError> {
    let row = store::job_details(pool, job_id)
        .await?
        .ok_or_else(|| AdminError::UnknownJob(job_id.to_string()))?;
    Ok(JobDetails {
        job_id: row.id,
        user_id: row.user_id,
        email: row.email,
        status: row.status.parse()?,
        attempts: row.attempts,
        last_error: row.last_error,
        run_after: row.run_after,
        created_at: row.created_at,
        updated_at: row.updated_at,
        completed_at: row.completed_at,
        player_id: row.player_id,
    })
}

/// The job of the user with this email (compared without case).
///
/// # Errors
/// [`AdminError::UnknownJob`] when no user has the email, [`AdminError::Database`].
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), ackloop::AdminError> {
/// let job_id = ackloop::find_job_by_email(&pool, "ada@example.com").await?;
/// # Ok(()) }
/// ```
pub async fn find_job_by_email(pool: &PgPool, email: &str) -> Result<JobId, AdminError> {
    store::job_id_by_email(pool, email)
        .await?
        .ok_or_else(|| AdminError::UnknownJob(format!("for a user with email {email:?}")))
}

/// Puts a failed job back to pending, with fresh attempts, and wakes the workers.
///
/// # Errors
/// [`AdminError::AlreadyDone`] and [`AdminError::StillPending`] (nothing is changed),
/// [`AdminError::UnknownJob`], [`AdminError::Database`].
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, job_id: ackloop::JobId) -> Result<(), ackloop::AdminError> {
/// ackloop::retry_failed_job(&pool, &ackloop::Channels::default(), job_id).await?;
/// # Ok(()) }
/// ```
pub async fn retry_failed_job(pool: &PgPool, channels: &Channels, job_id: JobId) -> Result<(), AdminError> {
    if !store::retry_failed_jobs(pool, Some(job_id), &channels.jobs)
        .await?
        .is_empty()
    {
        return Ok(());
    }
    // Not failed (or gone): say which, so the operator knows why nothing happened.
    match job_details(pool, job_id).await?.status {
        JobStatus::Done => Err(AdminError::AlreadyDone(job_id)),
        JobStatus::Pending => Err(AdminError::StillPending(job_id)),
        // It failed between the two statements: the retry applies now.
        JobStatus::Failed => {
            store::retry_failed_jobs(pool, Some(job_id), &channels.jobs).await?;
            Ok(())
        }
    }
}

/// Puts every failed job back to pending, with fresh attempts, and wakes the workers.
///
/// # Errors
/// [`AdminError::Database`].
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), ackloop::AdminError> {
/// let retried = ackloop::retry_all_failed_jobs(&pool, &ackloop::Channels::default()).await?;
/// # Ok(()) }
/// ```
pub async fn retry_all_failed_jobs(pool: &PgPool, channels: &Channels) -> Result<Vec<JobId>, AdminError> {
    Ok(store::retry_failed_jobs(pool, None, &channels.jobs).await?)
}

/// Rows deleted per statement when pruning: each statement locks only these rows, briefly, and
/// skips any that a worker or another pruner holds.
pub const PRUNE_BATCH: i64 = 1000;

/// Deletes done and failed jobs that finished more than `older_than` ago, [`PRUNE_BATCH`] rows
/// per statement (each its own short transaction), until none is left. Users and players stay.
/// Returns how many jobs were deleted.
///
/// # Errors
/// [`AdminError::Database`]; the batches deleted before the error stay deleted.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), ackloop::AdminError> {
/// let week = std::time::Duration::from_secs(7 * 24 * 3600);
/// let deleted = ackloop::prune_finished_jobs(&pool, week).await?;
/// # Ok(()) }
/// ```
pub async fn prune_finished_jobs(pool: &PgPool, older_than: Duration) -> Result<u64, AdminError> {
    let mut deleted = 0;
    loop {
        let batch = store::delete_finished_jobs(pool, older_than.as_secs_f64(), PRUNE_BATCH).await?;
        deleted += batch;
        if batch == 0 {
            return Ok(deleted);
        }
    }
}

/// How many jobs [`prune_finished_jobs`] would delete now.
///
/// # Errors
/// [`AdminError::Database`].
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), ackloop::AdminError> {
/// let would = ackloop::count_prunable_jobs(&pool, std::time::Duration::from_secs(86400)).await?;
/// # Ok(()) }
/// ```
pub async fn count_prunable_jobs(pool: &PgPool, older_than: Duration) -> Result<i64, AdminError> {
    Ok(store::count_finished_jobs(pool, older_than.as_secs_f64()).await?)
}
