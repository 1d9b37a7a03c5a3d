//! The player side's one-job-at-a-time statements: a job tried before (or every job after a lost
//! session) is taken alone, its attempt counted and committed before it is made, so a job that
//! kills its session uses up its attempts instead of stalling batches.

use sqlx::{PgConnection, PgExecutor};

use super::worker::{ClaimedJob, millis};
use crate::channel::ChannelName;
use crate::job::{Backoff, ExternalId, JobId, JobSource};

/// The row `ackloop.start_attempt` answers with.
struct StartAttemptRow {
    status: String,
    id: JobId,
    user_id: ExternalId,
    display_name: String,
    extra: Option<serde_json::Value>,
    attempt: i32,
    waited_secs: f64,
    last_error: Option<String>,
    lease_ms: Option<i64>,
    abandoned_attempt: Option<i32>,
}

/// What [`start_attempt`] did with the next due job.
#[derive(Debug)]
pub(crate) enum Started {
    /// The job is `running` attempt `job.attempts`, counted and committed.
    Running {
        job: ClaimedJob,
        /// How long the job stays not due should this attempt never finish: its lease.
        lease: std::time::Duration,
        /// The attempt before this one, if it was found running past its lease: it ended with
        /// its session (a crash, a killed backend, a job that kills sessions).
        abandoned_attempt: Option<i32>,
    },
    /// Its attempts were used up, so it was failed (and its caller told) instead.
    GaveUp {
        id: JobId,
        attempts: i32,
        reason: String,
    },
}

/// Which due jobs a lone attempt takes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Due {
    /// Any, new or retried: after a start or a session death.
    Any,
    /// Only jobs tried before (never taken in a batch), on their own small index.
    Retries,
}

/// Counts an attempt of the next due job of the kind asked for and commits it before the attempt
/// is made (`ackloop.start_attempt`, in autocommit), so the count survives a job that kills its
/// session; or fails a job whose attempts are used up. `None`: nothing is due.
pub(crate) async fn start_attempt(
    executor: impl PgExecutor<'_>,
    due: Due,
    max_attempts: u32,
    backoff: &Backoff,
    done_channel: &ChannelName,
    source: JobSource,
) -> Result<Option<Started>, sqlx::Error> {
    let row = sqlx::query_as!(
        StartAttemptRow,
        r#"
        select
            status as "status!",
            job_id as "id!: JobId",
            user_id as "user_id!: ExternalId",
            display_name as "display_name!",
            extra,
            attempt as "attempt!",
            waited_secs as "waited_secs!",
            last_error,
            lease_ms,
            abandoned_attempt
        from ackloop.start_attempt(
            max_attempts => $1,
            backoff_base_ms => $2,
            backoff_max_ms => $3,
            done_channel => $4,
            any_job => $5,
            builtin_signups => $6
        )
        "#,
        i32::try_from(max_attempts).unwrap_or(i32::MAX),
        millis(backoff.base),
        millis(backoff.max),
        done_channel.as_str(),
        matches!(due, Due::Any),
        source == JobSource::BuiltinSignup,
    )
    .fetch_optional(executor)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let started = match row.status.as_str() {
        "gave_up" => Started::GaveUp {
            id: row.id,
            attempts: row.attempt,
            reason: row.last_error.unwrap_or_default(),
        },
        "started" => Started::Running {
            lease: std::time::Duration::from_millis(row.lease_ms.unwrap_or_default().unsigned_abs()),
            abandoned_attempt: row.abandoned_attempt,
            job: ClaimedJob {
                id: row.id,
                user_id: row.user_id,
                display_name: row.display_name,
                extra: row.extra,
                attempts: row.attempt,
                waited_secs: row.waited_secs,
            },
        },
        other => {
            return Err(sqlx::Error::Decode(
                format!("ackloop.start_attempt answered with an unknown status {other:?}").into(),
            ));
        }
    };
    Ok(Some(started))
}

/// Seconds until the next job tried before is due (negative if one is due now, but held), or
/// `None` if no such job is pending.
pub(crate) async fn next_retry_due_in(
    executor: impl PgExecutor<'_>,
    source: JobSource,
) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select ackloop.next_retry_due_in_secs($1) as "due_in_secs?""#,
        source == JobSource::BuiltinSignup,
    )
    .fetch_one(executor)
    .await
}

/// Ends attempt `attempt`, which [`start_attempt`] started, with what ended it, when that was an
/// error its session survived (`ackloop.note_unfinished_attempt`): the job is pending again, the
/// attempt counted; only if the job is still running that attempt.
pub(crate) async fn note_unfinished_attempt(
    executor: impl PgExecutor<'_>,
    job_id: JobId,
    attempt: i32,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query_scalar!(
        r#"select ackloop.note_unfinished_attempt($1, $2, $3) as "noted!""#,
        job_id.as_uuid(),
        attempt,
        error,
    )
    .fetch_one(executor)
    .await?;
    Ok(())
}

/// Takes back attempt `attempt` of a job (it never ran: it waited for a lock another session
/// holds): the job is pending again, showing `error`, due after the backoff for `attempt`
/// (`ackloop.give_back_attempt`); only if the job is still running that attempt.
pub(crate) async fn give_back_attempt(
    executor: impl PgExecutor<'_>,
    job_id: JobId,
    attempt: i32,
    error: &str,
    backoff: &Backoff,
) -> Result<(), sqlx::Error> {
    sqlx::query_scalar!(
        r#"select ackloop.give_back_attempt($1, $2, $3, $4, $5) as "given_back!""#,
        job_id.as_uuid(),
        attempt,
        error,
        millis(backoff.base),
        millis(backoff.max),
    )
    .fetch_one(executor)
    .await?;
    Ok(())
}

/// Locks a job for the attempt [`start_attempt`] counted (`ackloop.lock_attempt`); false when
/// the job has changed since (an operator finished or retried it, or its lease ran out and
/// another worker took it).
pub(crate) async fn lock_started_attempt(
    conn: &mut PgConnection,
    job_id: JobId,
    attempt: i32,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select ackloop.lock_attempt($1, $2) as "locked!""#,
        job_id.as_uuid(),
        attempt,
    )
    .fetch_one(conn)
    .await
}
