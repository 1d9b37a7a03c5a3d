//! The auth side's statements: write signups, read their outcomes.

use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use super::classify::is_unavailable;
use crate::channel::ChannelName;
use crate::job::{ExternalId, JobId, JobStatus, UnknownStatus, UserId};

/// Inserts a user and its player-creation job and notifies the jobs channel with the job id, in
/// one statement (`ackloop.sign_up`, which applies the input rules again): in autocommit that is one transaction and one round trip; inside a caller's
/// transaction, everything (the notification included) happens at that transaction's commit.
///
/// `lock_wait` bounds how long the insert may wait for a row lock (another session's
/// uncommitted insert of the same email, a `LOCK TABLE`): `lock_timeout`, set for this
/// statement's transaction before the insert runs.
/// `None` leaves the session's setting, for writes inside a caller's transaction.
pub(crate) async fn insert_user_and_job(
    executor: impl PgExecutor<'_>,
    email: &str,
    display_name: &str,
    job_id: JobId,
    jobs_channel: &ChannelName,
    lock_wait: Option<std::time::Duration>,
) -> Result<UserId, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        select user_id as "user_id!: UserId"
        from ackloop.sign_up($1, $2, $3, $4, $5)
        "#,
        email,
        display_name,
        job_id.as_uuid(),
        jobs_channel.as_str(),
        lock_wait.map(lock_wait_ms),
    )
    .fetch_one(executor)
    .await
}

/// Adds a player-creation job for a user of the caller's own service (`ackloop.add_job`), with
/// its wake-up, on `executor`: inside the caller's transaction, both happen at its commit. With
/// the caller's `job_id` again and the same data, the job added before is returned and nothing
/// written. `lock_wait` as in [`insert_user_and_job`].
pub(crate) async fn add_job(
    executor: impl PgExecutor<'_>,
    user_id: &ExternalId,
    display_name: &str,
    extra: Option<&serde_json::Value>,
    job_id: JobId,
    jobs_channel: &ChannelName,
    lock_wait: Option<std::time::Duration>,
) -> Result<JobId, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        select ackloop.add_job(
            user_id => $1,
            display_name => $2,
            extra => $3,
            new_job_id => $4,
            jobs_channel => $5,
            lock_wait_ms => $6
        ) as "job_id!: JobId"
        "#,
        user_id.as_str(),
        display_name,
        extra,
        job_id.as_uuid(),
        jobs_channel.as_str(),
        lock_wait.map(lock_wait_ms),
    )
    .fetch_one(executor)
    .await
}

/// A lock wait as whole milliseconds, at least 1 (0 would mean no limit).
fn lock_wait_ms(wait: std::time::Duration) -> i32 {
    i32::try_from(wait.as_millis().max(1)).unwrap_or(i32::MAX)
}

/// Writes one signup in its own transaction and sends its wake-up after the commit, in one round
/// trip (`ackloop.sign_up_then_notify`): the notifying transaction is a tiny one of its own, so
/// the write's commit does not hold PostgreSQL's notify lock through its flush and shares
/// flushes with other sessions' commits. On a plain connection only: a procedure that commits is
/// refused inside a transaction block. `lock_wait` as in [`insert_user_and_job`].
pub(crate) async fn write_user_and_job(
    executor: impl PgExecutor<'_>,
    email: &str,
    display_name: &str,
    job_id: JobId,
    jobs_channel: &ChannelName,
    lock_wait: std::time::Duration,
) -> Result<UserId, sqlx::Error> {
    let written = sqlx::query!(
        r#"call ackloop.sign_up_then_notify($1, $2, $3, $4, $5, null, null)"#,
        email,
        display_name,
        job_id.as_uuid(),
        jobs_channel.as_str(),
        lock_wait_ms(lock_wait),
    )
    .fetch_one(executor)
    .await?;
    written
        .user_id
        .map(UserId::from)
        .ok_or_else(|| missing_out("user_id"))
}

/// A procedure's OUT parameter that came back null, which the contract never does.
fn missing_out(name: &str) -> sqlx::Error {
    sqlx::Error::Protocol(format!("the contract's procedure returned no {name}"))
}

/// A signup that [`insert_users_and_jobs`] wrote.
#[derive(Debug)]
pub(crate) struct WrittenSignup {
    pub(crate) job_id: JobId,
    pub(crate) user_id: UserId,
}

/// Writes many signups in one transaction (one commit, one flush), each with its user and its
/// job exactly as [`insert_user_and_job`] would, and sends their wake-ups after the commit, in one
/// round trip (`ackloop.sign_up_many_then_notify`, on a plain connection as
/// [`write_user_and_job`]). A signup whose email is taken (by an existing user, or earlier in
/// the same batch, ignoring case) is skipped: it is the one signup missing from the result. Any
/// other error fails the whole write and writes nothing.
/// `lock_wait` bounds lock waits as in [`insert_user_and_job`].
pub(crate) async fn insert_users_and_jobs(
    executor: impl PgExecutor<'_>,
    emails: &[String],
    display_names: &[String],
    job_ids: &[Uuid],
    jobs_channel: &ChannelName,
    lock_wait: std::time::Duration,
) -> Result<Vec<WrittenSignup>, sqlx::Error> {
    let written = sqlx::query!(
        r#"call ackloop.sign_up_many_then_notify($1, $2, $3, $4, $5, null, null)"#,
        emails,
        display_names,
        job_ids,
        jobs_channel.as_str(),
        lock_wait_ms(lock_wait),
    )
    .fetch_one(executor)
    .await?;
    let job_ids = written.job_ids.ok_or_else(|| missing_out("job_ids"))?;
    let user_ids = written.user_ids.ok_or_else(|| missing_out("user_ids"))?;
    Ok(job_ids
        .into_iter()
        .zip(user_ids)
        .map(|(job_id, user_id)| WrittenSignup {
            job_id: JobId::from(job_id),
            user_id: UserId::from(user_id),
        })
        .collect())
}

/// A job's state as ackloop's job table tells it, with the player service's answer when done.
#[derive(Debug, Clone)]
pub(crate) struct JobOutcomeRow {
    pub(crate) id: JobId,
    pub(crate) user_id: ExternalId,
    pub(crate) status: String,
    pub(crate) last_error: Option<String>,
    pub(crate) player_id: Option<ExternalId>,
    pub(crate) result: Option<serde_json::Value>,
    /// Seconds since the job finished, by the server's clock.
    pub(crate) since_done_secs: Option<f64>,
}

impl JobOutcomeRow {
    pub(crate) fn status(&self) -> Result<JobStatus, UnknownStatus> {
        self.status.parse()
    }
}

/// Which of the jobs asked for a look returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcomes {
    /// Every job that exists, pending ones included (ids of no job are simply absent).
    All,
    /// Only finished jobs: a periodic look at thousands of waiting jobs, most of them pending,
    /// costs the client nothing for those.
    Finished,
}

/// Reads the state of `ids` ([`Outcomes`] says which return) by `deadline`, on a pool connection
/// of its own. A look still unanswered then
/// closes its connection instead of returning it: sqlx tests a returned connection with a ping
/// that has no time limit, so a connection that stopped answering without closing (a NAT or load
/// balancer that dropped it) would hold its pool slot for ever.
pub(crate) async fn job_outcomes_by(
    pool: &PgPool,
    ids: &[Uuid],
    which: Outcomes,
    deadline: tokio::time::Instant,
) -> Result<Vec<JobOutcomeRow>, sqlx::Error> {
    let mut conn = match tokio::time::timeout_at(deadline, pool.acquire()).await {
        Ok(conn) => conn?,
        Err(_) => return Err(sqlx::Error::PoolTimedOut),
    };
    let look = async {
        match which {
            Outcomes::All => job_outcomes(&mut *conn, ids).await,
            Outcomes::Finished => finished_job_outcomes(&mut *conn, ids).await,
        }
    };
    match tokio::time::timeout_at(deadline, look).await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(err)) => {
            if is_unavailable(&err) {
                conn.close_on_drop();
            }
            Err(err)
        }
        Err(_) => {
            conn.close_on_drop();
            Err(no_answer_in_time())
        }
    }
}

/// The error for a statement given up because no answer came by its deadline.
pub(crate) fn no_answer_in_time() -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no answer from the database in time",
    ))
}

pub(crate) async fn job_outcomes(
    executor: impl PgExecutor<'_>,
    ids: &[Uuid],
) -> Result<Vec<JobOutcomeRow>, sqlx::Error> {
    sqlx::query_as!(
        JobOutcomeRow,
        r#"
        select
            job_id as "id!: JobId",
            user_id as "user_id!: ExternalId",
            status as "status!",
            last_error,
            player_id as "player_id?: ExternalId",
            result,
            since_done_secs
        from ackloop.job_outcomes($1)
        "#,
        ids,
    )
    .fetch_all(executor)
    .await
}

async fn finished_job_outcomes(
    executor: impl PgExecutor<'_>,
    ids: &[Uuid],
) -> Result<Vec<JobOutcomeRow>, sqlx::Error> {
    sqlx::query_as!(
        JobOutcomeRow,
        r#"
        select
            job_id as "id!: JobId",
            user_id as "user_id!: ExternalId",
            status as "status!",
            last_error,
            player_id as "player_id?: ExternalId",
            result,
            since_done_secs
        from ackloop.job_outcomes($1)
        where status <> 'pending'
        "#,
        ids,
    )
    .fetch_all(executor)
    .await
}

/// Sends `payload` on `channel` by `deadline`, without waiting for the commit to be flushed to
/// disk: a marker that nobody needs after a crash.
pub(crate) async fn notify_unlogged(
    pool: &PgPool,
    channel: &ChannelName,
    payload: &str,
    deadline: tokio::time::Instant,
) -> Result<(), sqlx::Error> {
    let mut conn = match tokio::time::timeout_at(deadline, pool.acquire()).await {
        Ok(conn) => conn?,
        Err(_) => return Err(sqlx::Error::PoolTimedOut),
    };
    let notify = sqlx::query_scalar!(
        r#"
        select set_config('synchronous_commit', 'off', true) as "off!"
        from pg_notify($1, $2) as notified
        "#,
        channel.as_str(),
        payload,
    )
    .fetch_one(&mut *conn);
    match tokio::time::timeout_at(deadline, notify).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => {
            if is_unavailable(&err) {
                conn.close_on_drop();
            }
            Err(err)
        }
        Err(_) => {
            conn.close_on_drop();
            Err(no_answer_in_time())
        }
    }
}
