//! Operator calls: look a job up, retry failed jobs, repair done jobs whose player is missing,
//! prune finished ones. `ackloop jobs …` runs these; a service can call them too.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::channel::Channels;
use crate::job::{ExternalId, JobId, JobStatus, UnknownStatus};
use crate::store;

/// Everything about one job.
#[derive(Debug, Clone, Serialize)]
pub struct JobDetails {
    /// The job.
    pub job_id: JobId,
    /// Its user: the service's own id (a built-in user's, as text, for the built-in tables).
    pub user_id: ExternalId,
    /// The built-in user's email; `None` for a job a service added for a user of its own.
    pub email: Option<String>,
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
    /// The player service's answer when done: its player's id.
    pub player_id: Option<ExternalId>,
    /// The job, of the built-in tables, is done but its user has no built-in player: someone
    /// deleted the player, or a restore left it out. Its caller was told the player exists;
    /// [`repair_job`] makes it again. (ackloop cannot see a service's own players table.)
    pub player_missing: bool,
}

/// Why an operator call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// No job has this id (or no user this email).
    #[error("no job {0}")]
    UnknownJob(String),
    /// Retrying is for failed jobs, and repairing for done jobs without a player; this job is
    /// done and its player exists.
    #[error("job {0} is done and its player exists; nothing to retry or repair")]
    AlreadyDone(JobId),
    /// Retrying is for failed jobs; this one is done, but its player is missing (deleted, or
    /// left out of a restore). [`repair_job`] puts it back to pending.
    #[error("job {0} is done but its player is missing; run again with --repair to create it")]
    DoneWithoutPlayer(JobId),
    /// Retrying is for failed jobs; a pending (or running) one will be finished by a worker anyway.
    #[error("job {0} is not finished yet (pending or running); a worker will finish it")]
    StillPending(JobId),
    /// Repairing is for done jobs whose player is missing; a failed job is retried as it is.
    #[error("job {0} has failed; retry it without --repair")]
    StillFailed(JobId),
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
/// # async fn demo(pool: sqlx::PgPool, job_id: ackloop::JobId) -> Result<(), ackloop::admin::AdminError> {
/// let job = ackloop::admin::job_details(&pool, job_id).await?;
/// println!("{} after {} attempts", job.status, job.attempts);
/// # Ok(()) }
/// ```
pub async fn job_details(pool: &PgPool, job_id: JobId) -> Result<JobDetails, AdminError> {
    let row = store::job_details(pool, job_id)
        .await?
        .ok_or_else(|| AdminError::UnknownJob(job_id.to_string()))?;
    let status = row.status.parse()?;
    Ok(JobDetails {
        job_id: row.id,
        user_id: row.user_id,
        email: row.email,
        status,
        attempts: row.attempts,
        last_error: row.last_error,
        run_after: row.run_after,
        created_at: row.created_at,
        updated_at: row.updated_at,
        completed_at: row.completed_at,
        player_missing: row.player_missing,
        player_id: row.player_id,
    })
}

/// The job of the user with this email (compared without case).
///
/// # Errors
/// [`AdminError::UnknownJob`] when no user has the email, [`AdminError::Database`].
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), ackloop::admin::AdminError> {
/// let job_id = ackloop::admin::find_job_by_email(&pool, "ada@example.com").await?;
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
/// [`AdminError::AlreadyDone`], [`AdminError::DoneWithoutPlayer`] (use [`repair_job`]) and
/// [`AdminError::StillPending`] (nothing is changed), [`AdminError::UnknownJob`],
/// [`AdminError::Database`].
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, job_id: ackloop::JobId) -> Result<(), ackloop::admin::AdminError> {
/// ackloop::admin::retry_failed_job(&pool, &ackloop::Channels::default(), job_id).await?;
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
    let job = job_details(pool, job_id).await?;
    match job.status {
        JobStatus::Done if job.player_missing => Err(AdminError::DoneWithoutPlayer(job_id)),
        JobStatus::Done => Err(AdminError::AlreadyDone(job_id)),
        JobStatus::Pending | JobStatus::Running => Err(AdminError::StillPending(job_id)),
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
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), ackloop::admin::AdminError> {
/// let retried = ackloop::admin::retry_all_failed_jobs(&pool, &ackloop::Channels::default()).await?;
/// # Ok(()) }
/// ```
pub async fn retry_all_failed_jobs(pool: &PgPool, channels: &Channels) -> Result<Vec<JobId>, AdminError> {
    Ok(store::retry_failed_jobs(pool, None, &channels.jobs).await?)
}

/// How many times [`repair_job`] tries when the job changes under it: a refused repair is
/// explained by a second look, and a job that became repairable in between is tried again.
const REPAIR_ROUNDS: usize = 3;

/// Puts a done job whose player is missing (deleted, or left out of a restore) back to pending,
/// with fresh attempts, and wakes the workers, which create the player and mark it done again.
/// A job whose player exists is never touched, even if the player appears while this runs.
///
/// # Errors
/// [`AdminError::AlreadyDone`] (its player exists), [`AdminError::StillPending`] and
/// [`AdminError::StillFailed`] (use [`retry_failed_job`]): nothing is changed.
/// [`AdminError::UnknownJob`], [`AdminError::Database`].
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, job_id: ackloop::JobId) -> Result<(), ackloop::admin::AdminError> {
/// let job = ackloop::admin::job_details(&pool, job_id).await?;
/// if job.player_missing {
///     ackloop::admin::repair_job(&pool, &ackloop::Channels::default(), job_id).await?;
/// }
/// # Ok(()) }
/// ```
pub async fn repair_job(pool: &PgPool, channels: &Channels, job_id: JobId) -> Result<(), AdminError> {
    for _ in 0..REPAIR_ROUNDS {
        if !store::repair_done_jobs_without_player(pool, Some(job_id), &channels.jobs)
            .await?
            .is_empty()
        {
            return Ok(());
        }
        // Not repairable (or gone): say why, so the operator knows why nothing happened.
        let job = job_details(pool, job_id).await?;
        match job.status {
            // Its player went missing after the repair looked: try again.
            JobStatus::Done if job.player_missing => {}
            JobStatus::Done => return Err(AdminError::AlreadyDone(job_id)),
            JobStatus::Pending | JobStatus::Running => return Err(AdminError::StillPending(job_id)),
            JobStatus::Failed => return Err(AdminError::StillFailed(job_id)),
        }
    }
    // The job kept changing between looks (a player deleted again and again while another
    // operator repairs it): report what the last look saw.
    Err(AdminError::DoneWithoutPlayer(job_id))
}

/// Puts every done job whose player is missing back to pending, with fresh attempts, and wakes
/// the workers. Returns the ids put back. Reads every done job (see `ackloop doctor`'s check of
/// the same name): an operator's call, not one for a request path.
///
/// # Errors
/// [`AdminError::Database`].
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), ackloop::admin::AdminError> {
/// let repaired = ackloop::admin::repair_all_missing_players(&pool, &ackloop::Channels::default()).await?;
/// # Ok(()) }
/// ```
pub async fn repair_all_missing_players(
    pool: &PgPool,
    channels: &Channels,
) -> Result<Vec<JobId>, AdminError> {
    Ok(store::repair_done_jobs_without_player(pool, None, &channels.jobs).await?)
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
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), ackloop::admin::AdminError> {
/// let week = std::time::Duration::from_secs(7 * 24 * 3600);
/// let deleted = ackloop::admin::prune_finished_jobs(&pool, week).await?;
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
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), ackloop::admin::AdminError> {
/// let would = ackloop::admin::count_prunable_jobs(&pool, std::time::Duration::from_secs(86400)).await?;
/// # Ok(()) }
/// ```
pub async fn count_prunable_jobs(pool: &PgPool, older_than: Duration) -> Result<i64, AdminError> {
    Ok(store::count_finished_jobs(pool, older_than.as_secs_f64()).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_what_to_do() {
        let id = JobId::new();
        let missing = AdminError::DoneWithoutPlayer(id).to_string();
        assert!(
            missing.contains(&id.to_string()) && missing.contains("--repair"),
            "{missing}"
        );
        assert!(
            AdminError::StillFailed(id)
                .to_string()
                .contains("without --repair")
        );
        assert!(
            AdminError::AlreadyDone(id)
                .to_string()
                .contains("its player exists")
        );
    }
}
