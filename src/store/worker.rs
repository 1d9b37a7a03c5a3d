//! The player side's statements: claim, complete, retry and fail jobs.

use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::channel::ChannelName;
use chrono::{DateTime, Utc};

use crate::job::{Backoff, ExternalId, JobId, JobSource};

/// A job [`complete_due_jobs`] completed.
#[derive(Debug)]
pub(crate) struct CompletedJob {
    pub(crate) id: JobId,
    /// From its signup to this claim.
    pub(crate) waited_secs: f64,
}

/// Claims up to `limit` due jobs never tried before, creates their players, marks them done
/// and notifies each id on the done channel, in one statement. Returns the ids completed; fewer
/// than `limit` means the queue had no more such jobs that nobody else holds.
///
/// The done wake-ups stay inside the transaction, unlike a signup's: delivered in commit order,
/// they let a waiting process answer every caller due at one moment with one marker
/// (`signup/confirm/look.rs`), which a wake-up sent after its commit could overtake.
///
/// Any failure fails the whole batch and leaves every job as it was, its attempt uncounted; the
/// worker then falls back to [`claim_due_jobs`] and one savepoint per job to find the culprit,
/// or, when the session died, to one job at a time with each attempt counted first. A job tried
/// before is always retried alone ([`start_attempt`]): it may be the one that kills sessions.
pub(crate) async fn complete_due_jobs(
    executor: impl PgExecutor<'_>,
    limit: i32,
    done_channel: &ChannelName,
) -> Result<Vec<CompletedJob>, sqlx::Error> {
    sqlx::query_as!(
        CompletedJob,
        r#"
        select job_id as "id!: JobId", waited_secs as "waited_secs!"
        from ackloop.complete_jobs($1, $2)
        "#,
        limit,
        done_channel.as_str(),
    )
    .fetch_all(executor)
    .await
}

/// A job locked by the current transaction for an attempt, with the data a handler needs. The
/// attempt is counted in the job's row by the statement that records its outcome.
#[derive(Debug)]
pub(crate) struct ClaimedJob {
    pub(crate) id: JobId,
    pub(crate) user_id: ExternalId,
    pub(crate) display_name: String,
    pub(crate) extra: Option<serde_json::Value>,
    /// Attempts including this one.
    pub(crate) attempts: i32,
    /// From its signup to this claim.
    pub(crate) waited_secs: f64,
}

/// Locks up to `limit` due jobs never tried before for this transaction (skipping any another
/// worker holds): a custom handler's batch, or the jobs of a built-in batch that failed. The
/// attempt is counted by the statement that records its outcome ([`mark_jobs_done`],
/// [`record_failure`]) in the same transaction, so each job gets one new
/// row version, not two: the attempt is committed, or uncounted, with the transaction. The lock
/// lasts until the transaction ends; if it rolls back, or the connection dies, the jobs are
/// pending again with their attempt uncounted.
pub(crate) async fn claim_due_jobs(
    conn: &mut PgConnection,
    limit: i32,
    source: JobSource,
) -> Result<Vec<ClaimedJob>, sqlx::Error> {
    sqlx::query_as!(
        ClaimedJob,
        r#"
        select
            job_id as "id!: JobId",
            user_id as "user_id!: ExternalId",
            display_name as "display_name!",
            extra,
            attempt as "attempts!",
            waited_secs as "waited_secs!"
        from ackloop.claim_jobs($1, $2)
        "#,
        limit,
        source == JobSource::BuiltinSignup,
    )
    .fetch_all(conn)
    .await
}

/// A player of the built-in tables, as [`insert_builtin_player`] made (or found) it.
#[derive(Debug)]
pub(crate) struct BuiltinPlayer {
    pub(crate) id: i64,
    pub(crate) display_name: String,
    pub(crate) created_at: DateTime<Utc>,
}

/// The built-in player service: creates the player of a claimed job's built-in user
/// (`ackloop.insert_builtin_player`). A player that already exists is kept and returned: the
/// effect is in place, so the job can be marked done. A job a service added has no built-in user:
/// an error of class 22, which fails the job.
pub(crate) async fn insert_builtin_player(
    conn: &mut PgConnection,
    job_id: JobId,
) -> Result<BuiltinPlayer, sqlx::Error> {
    sqlx::query_as!(
        BuiltinPlayer,
        r#"
        select player_id as "id!", display_name as "display_name!", created_at as "created_at!"
        from ackloop.insert_builtin_player($1)
        "#,
        job_id.as_uuid(),
    )
    .fetch_one(conn)
    .await
}

/// The built-in player service's batch form: creates the players of claimed jobs' built-in users
/// in one statement (`ackloop.insert_builtin_players`), keeping any that exist, and returns them
/// in the order of `job_ids`. A job that is not a built-in signup: an error of class 22.
pub(crate) async fn insert_builtin_players(
    conn: &mut PgConnection,
    job_ids: &[JobId],
) -> Result<Vec<BuiltinPlayer>, sqlx::Error> {
    let ids: Vec<Uuid> = job_ids.iter().map(|id| id.as_uuid()).collect();
    let rows = sqlx::query!(
        r#"
        select
            job_id as "job_id!: JobId",
            player_id as "id!",
            display_name as "display_name!",
            created_at as "created_at!"
        from ackloop.insert_builtin_players($1)
        "#,
        &ids,
    )
    .fetch_all(conn)
    .await?;
    // One row per job, in the order asked: checked, not trusted, since answers are matched to
    // jobs by position.
    if !rows.iter().map(|row| row.job_id).eq(job_ids.iter().copied()) {
        return Err(sqlx::Error::Protocol(
            "ackloop.insert_builtin_players answered for other jobs than it was given".into(),
        ));
    }
    Ok(rows
        .into_iter()
        .map(|row| BuiltinPlayer {
            id: row.id,
            display_name: row.display_name,
            created_at: row.created_at,
        })
        .collect())
}

/// A job finished by its handler, to mark done with [`mark_jobs_done`].
#[derive(Debug)]
pub(crate) struct DoneJob {
    pub(crate) id: JobId,
    /// The attempt that did it.
    pub(crate) attempt: i32,
    /// The player service's answer: its player's id and a JSON object.
    pub(crate) player_id: ExternalId,
    pub(crate) result: serde_json::Value,
}

/// Marks claimed jobs done, each with the attempt that did it (the number of attempts it took)
/// and the handler's answer, and notifies each id on the done channel (delivered at commit, in
/// commit order: see [`complete_due_jobs`]).
pub(crate) async fn mark_jobs_done(
    conn: &mut PgConnection,
    jobs: &[DoneJob],
    done_channel: &ChannelName,
) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = jobs.iter().map(|job| job.id.as_uuid()).collect();
    let attempts: Vec<i32> = jobs.iter().map(|job| job.attempt).collect();
    let player_ids: Vec<String> = jobs.iter().map(|job| job.player_id.as_str().to_owned()).collect();
    let results: Vec<serde_json::Value> = jobs.iter().map(|job| job.result.clone()).collect();
    sqlx::query!(
        r#"
        select id as "id!"
        from ackloop.mark_done($1, $2, $3, $4, $5) as id
        "#,
        &ids,
        &attempts,
        &player_ids,
        &results,
        done_channel.as_str(),
    )
    .fetch_all(conn)
    .await?;
    Ok(())
}

/// Sets the point one job's work can be undone to, inside the current transaction: a
/// savepoint, always of the same name, so there is never more than one.
pub(crate) async fn job_savepoint(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("savepoint ackloop_job").execute(conn).await?;
    Ok(())
}

/// Keeps what the last job wrote (it commits, or not, with the transaction) and sets the next
/// job's savepoint, in one round trip. If the release fails (the transaction is aborted), the
/// savepoint is still set, and nothing else ran.
pub(crate) async fn renew_job_savepoint(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("release savepoint ackloop_job; savepoint ackloop_job")
        .execute(conn)
        .await?;
    Ok(())
}

/// Keeps what the last job wrote; no savepoint is left set.
pub(crate) async fn release_job_savepoint(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("release savepoint ackloop_job")
        .execute(conn)
        .await?;
    Ok(())
}

/// Undoes everything written since the job's savepoint, and the error state a failed statement
/// left the transaction in; the savepoint stays set.
pub(crate) async fn rollback_to_job_savepoint(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("rollback to savepoint ackloop_job")
        .execute(conn)
        .await?;
    Ok(())
}

/// A claimed job's failed attempt, to record with [`record_failure`].
#[derive(Debug)]
pub(crate) struct Failure<'a> {
    pub(crate) job_id: JobId,
    /// The attempt that failed: claim_jobs' number, or the one a lone attempt counted.
    pub(crate) attempt: i32,
    pub(crate) error: &'a str,
    /// False for an error retrying cannot fix: the job fails now.
    pub(crate) retryable: bool,
    /// False when the attempt never ran (it waited for a lock another session holds): it is
    /// given back, and the job retried after the backoff, however many attempts it has made.
    pub(crate) counted: bool,
}

/// What [`record_failure`] made of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// Failed for good; its id was notified on the done channel.
    Failed,
    /// Pending again, due after this many milliseconds.
    RetryInMs(i64),
    /// Left as it was: no longer pending (an operator finished it meanwhile).
    NotPending,
}

/// Records a claimed job's failed attempt (`ackloop.record_failure`): the job is failed and its
/// id notified on the done channel (so a waiting caller hears at once) when the error is not
/// retryable or the attempt was the last of `max_attempts`; otherwise it is pending again after
/// the backoff.
pub(crate) async fn record_failure(
    conn: &mut PgConnection,
    failure: &Failure<'_>,
    max_attempts: u32,
    backoff: &Backoff,
    done_channel: &ChannelName,
) -> Result<Recorded, sqlx::Error> {
    let recorded = sqlx::query!(
        r#"
        select status as "status!", retry_in_ms
        from ackloop.record_failure(
            job_id => $1,
            attempt => $2,
            error => $3,
            retryable => $4,
            done_channel => $5,
            max_attempts => $6,
            backoff_base_ms => $7,
            backoff_max_ms => $8,
            counted => $9
        )
        "#,
        failure.job_id.as_uuid(),
        failure.attempt,
        failure.error,
        failure.retryable,
        done_channel.as_str(),
        i32::try_from(max_attempts).unwrap_or(i32::MAX),
        millis(backoff.base),
        millis(backoff.max),
        failure.counted,
    )
    .fetch_optional(conn)
    .await?;
    Ok(match recorded {
        None => Recorded::NotPending,
        Some(row) => match (row.status.as_str(), row.retry_in_ms) {
            ("pending", Some(delay)) => Recorded::RetryInMs(delay),
            _ => Recorded::Failed,
        },
    })
}

/// A duration as whole milliseconds.
pub(crate) fn millis(delay: std::time::Duration) -> i64 {
    i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)
}
