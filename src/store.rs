//! Every SQL statement the crate runs, each behind a named function.
//!
//! Nothing here begins or commits a transaction: the callers in `signup.rs` and `worker.rs`
//! decide the transaction boundaries, because that is where the atomicity argument is made.
//! `docs/protocol.md` repeats the statements that another language needs to take part.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use crate::channel::ChannelName;
use crate::job::{JobId, JobStatus, PlayerId, UnknownStatus, UserId};

/// Inserts a user and its player-creation job and notifies the jobs channel with the job id, in
/// one statement: in autocommit that is one transaction and one round trip; inside a caller's
/// transaction, everything (the notification included) happens at that transaction's commit.
///
/// `lock_wait` bounds how long the insert may wait for a row lock (another session's
/// uncommitted insert of the same email, a `LOCK TABLE`): `lock_timeout`, set for this
/// statement's transaction before the insert runs (the insert reads its row from `limits`).
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
        with limits as (
            select set_config('lock_timeout', coalesce($5, current_setting('lock_timeout')), true)
        ),
        new_user as (
            insert into users (email, display_name)
            select $1, $2
            from limits
            returning id
        ),
        new_job as (
            insert into player_creation_jobs (id, user_id)
            select $3, id
            from new_user
            returning id, user_id
        )
        select new_job.user_id as "user_id!: UserId"
        from new_job
        cross join lateral pg_notify($4, new_job.id::text) as notified
        "#,
        email,
        display_name,
        job_id.as_uuid(),
        jobs_channel.as_str(),
        lock_wait.map(lock_timeout_setting),
    )
    .fetch_one(executor)
    .await
}

/// A duration as a `lock_timeout` value: whole milliseconds, at least 1 (0 would mean no limit).
fn lock_timeout_setting(wait: std::time::Duration) -> String {
    format!("{}ms", wait.as_millis().max(1))
}

/// A signup that [`insert_users_and_jobs`] wrote.
#[derive(Debug)]
pub(crate) struct WrittenSignup {
    pub(crate) job_id: JobId,
    pub(crate) user_id: UserId,
}

/// Writes many signups in one statement (one commit, one fsync, one hold of Postgres' notify
/// lock), each with its user, its job and its wake-up, exactly as [`insert_user_and_job`] would.
/// A signup whose email is taken (by an existing user, or earlier in the same batch, ignoring
/// case) is skipped: it is the one signup missing from the result. Any other error fails the
/// whole statement and writes nothing.
/// `lock_wait` bounds lock waits as in [`insert_user_and_job`].
pub(crate) async fn insert_users_and_jobs(
    executor: impl PgExecutor<'_>,
    emails: &[String],
    display_names: &[String],
    job_ids: &[Uuid],
    jobs_channel: &ChannelName,
    lock_wait: std::time::Duration,
) -> Result<Vec<WrittenSignup>, sqlx::Error> {
    sqlx::query_as!(
        WrittenSignup,
        r#"
        with limits as (
            select set_config('lock_timeout', $5, true)
        ),
        input as (
            select *
            from unnest($1::text[], $2::text[], $3::uuid[])
                with ordinality as input (email, display_name, job_id, position)
        ),
        new_users as (
            insert into users (email, display_name)
            select email, display_name
            from input, limits
            order by position
            on conflict ((lower(email))) do nothing
            returning id, email
        ),
        new_jobs as (
            insert into player_creation_jobs (id, user_id)
            -- Identical emails in one batch: the first was inserted, the rest skipped.
            select distinct on (new_users.id) input.job_id, new_users.id
            from new_users
            join input on input.email = new_users.email
            order by new_users.id, input.position
            returning id, user_id
        )
        select new_jobs.id as "job_id!: JobId", new_jobs.user_id as "user_id!: UserId"
        from new_jobs
        cross join lateral pg_notify($4, new_jobs.id::text) as notified
        "#,
        emails,
        display_names,
        job_ids,
        jobs_channel.as_str(),
        lock_timeout_setting(lock_wait),
    )
    .fetch_all(executor)
    .await
}

/// A job [`complete_due_jobs`] completed.
#[derive(Debug)]
pub(crate) struct CompletedJob {
    pub(crate) id: JobId,
    /// From its signup to this claim.
    pub(crate) waited_secs: f64,
}

/// Claims up to `limit` due jobs never tried before, creates their players, marks them done and
/// notifies each id on the done channel, in one statement. Returns the ids completed; fewer than
/// `limit` means the queue had no more such jobs that nobody else holds.
///
/// Any failure fails the whole batch and leaves every job as it was, its attempt uncounted; the
/// worker then falls back to [`claim_due_jobs`] and one savepoint per job to find the culprit,
/// or, when the session died, to one job at a time with each attempt counted first. A job tried
/// before is always retried alone ([`lock_next_due_job`]): it may be the one that kills sessions.
pub(crate) async fn complete_due_jobs(
    executor: impl PgExecutor<'_>,
    limit: i64,
    done_channel: &ChannelName,
) -> Result<Vec<CompletedJob>, sqlx::Error> {
    sqlx::query_as!(
        CompletedJob,
        r#"
        with claimed as (
            select id, user_id
            from player_creation_jobs
            where status = 'pending'
              and run_after <= now()
              and attempts = 0
            order by run_after, id
            limit $1
            for update skip locked
        ),
        new_players as (
            insert into players (user_id, display_name)
            select users.id, users.display_name
            from claimed
            join users on users.id = claimed.user_id
            on conflict (user_id) do nothing
            returning user_id
        ),
        completed as (
            update player_creation_jobs
            set status = 'done',
                attempts = player_creation_jobs.attempts + 1,
                last_error = null,
                updated_at = now(),
                completed_at = now()
            from claimed
            where player_creation_jobs.id = claimed.id
            returning
                player_creation_jobs.id,
                extract(epoch from now() - player_creation_jobs.created_at)::float8 as waited_secs
        )
        select completed.id as "id!: JobId", completed.waited_secs as "waited_secs!"
        from completed
        cross join lateral pg_notify($2, completed.id::text) as notified
        "#,
        limit,
        done_channel.as_str(),
    )
    .fetch_all(executor)
    .await
}

/// A job locked by the current transaction, its attempt already counted, with the data a
/// handler needs.
#[derive(Debug)]
pub(crate) struct ClaimedJob {
    pub(crate) id: JobId,
    pub(crate) user_id: UserId,
    pub(crate) display_name: String,
    /// Attempts including this one.
    pub(crate) attempts: i32,
    /// From its signup to this claim.
    pub(crate) waited_secs: f64,
}

/// Locks up to `limit` due jobs never tried before for this transaction (skipping any another
/// worker holds) and counts the attempt: a custom handler's batch, or the jobs of a built-in
/// batch that failed. The lock lasts until the transaction ends; if it rolls back, or the
/// connection dies, the jobs are pending again with their attempt uncounted.
pub(crate) async fn claim_due_jobs(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<ClaimedJob>, sqlx::Error> {
    sqlx::query_as!(
        ClaimedJob,
        r#"
        with claimed as (
            select id
            from player_creation_jobs
            where status = 'pending'
              and run_after <= now()
              and attempts = 0
            order by run_after, id
            limit $1
            for update skip locked
        ),
        counted as (
            update player_creation_jobs
            set attempts = player_creation_jobs.attempts + 1,
                updated_at = now()
            from claimed
            where player_creation_jobs.id = claimed.id
            returning
                player_creation_jobs.id,
                player_creation_jobs.user_id,
                player_creation_jobs.attempts,
                player_creation_jobs.created_at
        )
        select
            counted.id as "id: JobId",
            counted.user_id as "user_id: UserId",
            users.display_name,
            counted.attempts,
            extract(epoch from now() - counted.created_at)::float8 as "waited_secs!"
        from counted
        join users on users.id = counted.user_id
        order by counted.id
        "#,
        limit,
    )
    .fetch_all(conn)
    .await
}

/// A due job locked for an attempt of its own, as it stands before that attempt.
#[derive(Debug)]
pub(crate) struct DueJob {
    pub(crate) id: JobId,
    pub(crate) user_id: UserId,
    pub(crate) display_name: String,
    /// Attempts made before this one.
    pub(crate) attempts: i32,
    pub(crate) last_error: Option<String>,
    /// From its signup to this claim.
    pub(crate) waited_secs: f64,
}

/// Which due jobs a lone attempt takes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Due {
    /// Any, new or retried: after a start or a session death.
    Any,
    /// Only jobs tried before (never taken in a batch), on their own small index.
    Retries,
}

/// Locks the next due job of the kind asked for (skipping any another worker holds), for this
/// transaction, without counting an attempt: [`start_attempt`] does.
pub(crate) async fn lock_next_due_job(
    conn: &mut PgConnection,
    due: Due,
) -> Result<Option<DueJob>, sqlx::Error> {
    match due {
        Due::Any => {
            sqlx::query_as!(
                DueJob,
                r#"
                select
                    jobs.id as "id: JobId",
                    jobs.user_id as "user_id: UserId",
                    users.display_name,
                    jobs.attempts,
                    jobs.last_error,
                    extract(epoch from now() - jobs.created_at)::float8 as "waited_secs!"
                from player_creation_jobs as jobs
                join users on users.id = jobs.user_id
                where status = 'pending'
                  and run_after <= now()
                order by run_after, jobs.id
                limit 1
                for update of jobs skip locked
                "#,
            )
            .fetch_optional(conn)
            .await
        }
        Due::Retries => {
            sqlx::query_as!(
                DueJob,
                r#"
                select
                    jobs.id as "id: JobId",
                    jobs.user_id as "user_id: UserId",
                    users.display_name,
                    jobs.attempts,
                    jobs.last_error,
                    extract(epoch from now() - jobs.created_at)::float8 as "waited_secs!"
                from player_creation_jobs as jobs
                join users on users.id = jobs.user_id
                where status = 'pending'
                  and attempts > 0
                  and run_after <= now()
                order by run_after, jobs.id
                limit 1
                for update of jobs skip locked
                "#,
            )
            .fetch_optional(conn)
            .await
        }
    }
}

/// Seconds until the next job tried before is due (negative if one is due now, but held), or
/// `None` if no such job is pending.
pub(crate) async fn next_retry_due_in(executor: impl PgExecutor<'_>) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        select extract(epoch from min(run_after) - now())::float8 as "due_in_secs?"
        from player_creation_jobs
        where status = 'pending'
          and attempts > 0
        "#
    )
    .fetch_one(executor)
    .await
}

/// Counts attempt number `attempt` before it is made, and leaves the job as it should be found
/// if the attempt never finishes: `unfinished_error` as its error, not due again for `lease_ms`.
/// Committed before the attempt, so the count survives a session the attempt kills.
pub(crate) async fn start_attempt(
    conn: &mut PgConnection,
    job_id: JobId,
    attempt: i32,
    unfinished_error: &str,
    lease_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"
        update player_creation_jobs
        set attempts = $2,
            last_error = $3,
            run_after = now() + make_interval(secs => $4::bigint / 1000.0),
            updated_at = now()
        where id = $1
        "#,
        job_id.as_uuid(),
        attempt,
        unfinished_error,
        lease_ms,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes back attempt `attempt` of a job (it never ran: it waited for a lock another session
/// holds), leaving `error` and the job due again after `delay_ms`; only if the job is as that
/// attempt left it.
pub(crate) async fn give_back_attempt(
    conn: &mut PgConnection,
    job_id: JobId,
    attempt: i32,
    error: &str,
    delay_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"
        update player_creation_jobs
        set attempts = attempts - 1,
            last_error = $3,
            run_after = now() + make_interval(secs => $4::bigint / 1000.0),
            updated_at = now()
        where id = $1
          and status = 'pending'
          and attempts = $2
        "#,
        job_id.as_uuid(),
        attempt,
        error,
        delay_ms,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Locks a job for the attempt [`start_attempt`] counted; false when the job has changed since
/// (an operator finished or retried it, or its lease ran out and another worker took it).
pub(crate) async fn lock_started_attempt(
    conn: &mut PgConnection,
    job_id: JobId,
    attempt: i32,
) -> Result<bool, sqlx::Error> {
    let locked = sqlx::query_scalar!(
        r#"
        select id
        from player_creation_jobs
        where id = $1
          and status = 'pending'
          and attempts = $2
        for update
        "#,
        job_id.as_uuid(),
        attempt,
    )
    .fetch_optional(conn)
    .await?;
    Ok(locked.is_some())
}

/// Creates the user's player from the display name the job carries. A player that already
/// exists is left as it is: the effect is in place, so the job can be marked done.
pub(crate) async fn insert_player(
    conn: &mut PgConnection,
    user_id: UserId,
    display_name: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"
        insert into players (user_id, display_name)
        values ($1, $2)
        on conflict (user_id) do nothing
        "#,
        user_id.get(),
        display_name,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks claimed jobs done and notifies each id on the done channel (delivered at commit).
pub(crate) async fn mark_jobs_done(
    conn: &mut PgConnection,
    job_ids: &[JobId],
    done_channel: &ChannelName,
) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = job_ids.iter().map(|id| id.as_uuid()).collect();
    sqlx::query!(
        r#"
        with completed as (
            update player_creation_jobs
            set status = 'done',
                last_error = null,
                updated_at = now(),
                completed_at = now()
            where id = any($1)
            returning id
        )
        select completed.id
        from completed
        cross join lateral pg_notify($2, completed.id::text) as notified
        "#,
        &ids,
        done_channel.as_str(),
    )
    .fetch_all(conn)
    .await?;
    Ok(())
}

/// Marks the point one job's work can be undone to, inside the current transaction. Released
/// by [`release_job_savepoint`] or undone by [`rollback_to_job_savepoint`]; the same name each
/// time, so the innermost one is meant.
pub(crate) async fn job_savepoint(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("savepoint ackloop_job").execute(conn).await?;
    Ok(())
}

/// Keeps what a job wrote since its savepoint (it commits, or not, with the transaction).
pub(crate) async fn release_job_savepoint(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("release savepoint ackloop_job")
        .execute(conn)
        .await?;
    Ok(())
}

/// Undoes everything a job wrote since its savepoint, and the error state a failed statement
/// left the transaction in.
pub(crate) async fn rollback_to_job_savepoint(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("rollback to savepoint ackloop_job; release savepoint ackloop_job")
        .execute(conn)
        .await?;
    Ok(())
}

/// Marks a claimed job failed for good and notifies its id on the done channel, so a waiting
/// caller learns of the failure at once instead of timing out.
pub(crate) async fn mark_job_failed(
    conn: &mut PgConnection,
    job_id: JobId,
    error: &str,
    done_channel: &ChannelName,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"
        with failed as (
            update player_creation_jobs
            set status = 'failed',
                last_error = $2,
                updated_at = now(),
                completed_at = now()
            where id = $1
            returning id
        )
        select failed.id
        from failed
        cross join lateral pg_notify($3, failed.id::text) as notified
        "#,
        job_id.as_uuid(),
        error,
        done_channel.as_str(),
    )
    .fetch_one(conn)
    .await?;
    Ok(())
}

/// Leaves a claimed job pending with its error, not to be claimed again before `delay_ms` from now.
pub(crate) async fn schedule_retry(
    conn: &mut PgConnection,
    job_id: JobId,
    error: &str,
    delay_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"
        update player_creation_jobs
        set last_error = $2,
            run_after = now() + make_interval(secs => $3::bigint / 1000.0),
            updated_at = now()
        where id = $1
        "#,
        job_id.as_uuid(),
        error,
        delay_ms,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A job's state as the tables tell it, with its player when there is one.
#[derive(Debug, Clone)]
pub(crate) struct JobOutcomeRow {
    pub(crate) id: JobId,
    pub(crate) user_id: UserId,
    pub(crate) status: String,
    pub(crate) last_error: Option<String>,
    pub(crate) player_id: Option<PlayerId>,
    pub(crate) player_display_name: Option<String>,
    pub(crate) player_created_at: Option<DateTime<Utc>>,
    /// Seconds since the job finished, by the server's clock.
    pub(crate) since_done_secs: Option<f64>,
}

impl JobOutcomeRow {
    pub(crate) fn status(&self) -> Result<JobStatus, UnknownStatus> {
        self.status.parse()
    }
}

/// Reads the state of each of `ids` that exists (ids of no job are simply absent).
/// [`job_outcomes`] by `deadline`, on a pool connection of its own. A look still unanswered then
/// closes its connection instead of returning it: sqlx tests a returned connection with a ping
/// that has no time limit, so a connection that stopped answering without closing (a NAT or load
/// balancer that dropped it) would hold its pool slot for ever.
pub(crate) async fn job_outcomes_by(
    pool: &PgPool,
    ids: &[Uuid],
    deadline: tokio::time::Instant,
) -> Result<Vec<JobOutcomeRow>, sqlx::Error> {
    let mut conn = match tokio::time::timeout_at(deadline, pool.acquire()).await {
        Ok(conn) => conn?,
        Err(_) => return Err(sqlx::Error::PoolTimedOut),
    };
    match tokio::time::timeout_at(deadline, job_outcomes(&mut *conn, ids)).await {
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
            jobs.id as "id!: JobId",
            jobs.user_id as "user_id!: UserId",
            jobs.status as "status!",
            jobs.last_error,
            players.id as "player_id?: PlayerId",
            players.display_name as "player_display_name?",
            players.created_at as "player_created_at?",
            extract(epoch from clock_timestamp() - jobs.completed_at)::float8 as "since_done_secs?"
        from player_creation_jobs as jobs
        left join players on players.user_id = jobs.user_id
        where jobs.id = any($1)
        "#,
        ids,
    )
    .fetch_all(executor)
    .await
}

/// Job counts by status and the age of the oldest pending job.
#[derive(Debug, Clone)]
pub(crate) struct JobCounts {
    pub(crate) pending: i64,
    pub(crate) done: i64,
    pub(crate) failed: i64,
    pub(crate) oldest_pending_secs: Option<f64>,
}

pub(crate) async fn job_counts(executor: impl PgExecutor<'_>) -> Result<JobCounts, sqlx::Error> {
    sqlx::query_as!(
        JobCounts,
        r#"
        select
            count(*) filter (where status = 'pending') as "pending!",
            count(*) filter (where status = 'done') as "done!",
            count(*) filter (where status = 'failed') as "failed!",
            extract(epoch from now() - min(created_at) filter (where status = 'pending'))::float8
                as "oldest_pending_secs?"
        from player_creation_jobs
        "#,
    )
    .fetch_one(executor)
    .await
}

/// A failed job, for the status report.
#[derive(Debug, Clone)]
pub(crate) struct FailedJobRow {
    pub(crate) id: JobId,
    pub(crate) user_id: UserId,
    pub(crate) attempts: i32,
    pub(crate) last_error: Option<String>,
    pub(crate) failed_at: Option<DateTime<Utc>>,
}

/// The `limit` most recently failed jobs, newest first.
pub(crate) async fn recent_failures(
    executor: impl PgExecutor<'_>,
    limit: i64,
) -> Result<Vec<FailedJobRow>, sqlx::Error> {
    sqlx::query_as!(
        FailedJobRow,
        r#"
        select
            id as "id: JobId",
            user_id as "user_id: UserId",
            attempts,
            last_error,
            completed_at as failed_at
        from player_creation_jobs
        where status = 'failed'
        order by completed_at desc
        limit $1
        "#,
        limit,
    )
    .fetch_all(executor)
    .await
}

/// Whether `err` means the database could not be reached (as opposed to refusing a statement):
/// worth retrying later, and reported to callers as "unavailable".
pub(crate) fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        // Protocol: the stream broke off mid-message, e.g. a proxy or load balancer that accepted
        // the connection and closed it (no server behind it, a restart): sqlx reports the
        // empty answer to its TLS request as "unexpected response from SSLRequest: 0x00".
        sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db_err) => db_err.code().is_some_and(|code| {
            // 08: connection exceptions; 57P01-03: the server is shutting down, crashed or
            // starting; 53300: too many connections.
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// Whether a statement gave up waiting for a row lock (`lock_timeout`, SQLSTATE 55P03).
pub(crate) fn is_lock_timeout(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|db_err| db_err.code())
        .is_some_and(|code| code == "55P03")
}

/// Whether a failed attempt cannot succeed by being tried again as it is: the data breaks a
/// constraint or a type (SQLSTATE classes 22 and 23).
pub(crate) fn is_permanent(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|db_err| db_err.code())
        .is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
}

/// The versions of the migrations applied successfully, in order.
pub(crate) async fn applied_migrations(executor: impl PgExecutor<'_>) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        select version
        from _sqlx_migrations
        where success
        order by version
        "#
    )
    .fetch_all(executor)
    .await
}

/// Everything about one job, for operators.
#[derive(Debug, Clone)]
pub(crate) struct JobDetailsRow {
    pub(crate) id: JobId,
    pub(crate) user_id: UserId,
    pub(crate) email: String,
    pub(crate) status: String,
    pub(crate) attempts: i32,
    pub(crate) last_error: Option<String>,
    pub(crate) run_after: DateTime<Utc>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) completed_at: Option<DateTime<Utc>>,
    pub(crate) player_id: Option<PlayerId>,
}

pub(crate) async fn job_details(
    executor: impl PgExecutor<'_>,
    job_id: JobId,
) -> Result<Option<JobDetailsRow>, sqlx::Error> {
    sqlx::query_as!(
        JobDetailsRow,
        r#"
        select
            jobs.id as "id!: JobId",
            jobs.user_id as "user_id!: UserId",
            users.email,
            jobs.status,
            jobs.attempts,
            jobs.last_error,
            jobs.run_after,
            jobs.created_at,
            jobs.updated_at,
            jobs.completed_at,
            players.id as "player_id?: PlayerId"
        from player_creation_jobs as jobs
        join users on users.id = jobs.user_id
        left join players on players.user_id = jobs.user_id
        where jobs.id = $1
        "#,
        job_id.as_uuid(),
    )
    .fetch_optional(executor)
    .await
}

/// The job of the user with this email (compared without case, as uniqueness is).
pub(crate) async fn job_id_by_email(
    executor: impl PgExecutor<'_>,
    email: &str,
) -> Result<Option<JobId>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        select jobs.id as "id!: JobId"
        from users
        join player_creation_jobs as jobs on jobs.user_id = users.id
        where lower(users.email) = lower($1)
        "#,
        email,
    )
    .fetch_optional(executor)
    .await
}

/// Puts failed jobs back to pending with fresh attempts, due now, and wakes the workers: the
/// job `only` if given, else every failed job. Returns the ids retried; a job that is not failed
/// is left alone.
pub(crate) async fn retry_failed_jobs(
    executor: impl PgExecutor<'_>,
    only: Option<JobId>,
    jobs_channel: &ChannelName,
) -> Result<Vec<JobId>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        with retried as (
            update player_creation_jobs
            set status = 'pending',
                attempts = 0,
                run_after = now(),
                updated_at = now(),
                completed_at = null
            where status = 'failed'
              and ($1::uuid is null or id = $1)
            returning id
        )
        select retried.id as "id!: JobId"
        from retried
        cross join lateral pg_notify($2, retried.id::text) as notified
        "#,
        only.map(|id| id.as_uuid()),
        jobs_channel.as_str(),
    )
    .fetch_all(executor)
    .await
}

/// Puts done jobs whose user has no player (the player was deleted, or a restore left it out)
/// back to pending with fresh attempts, due now, and wakes the workers: the job `only` if given,
/// else every such job. Returns the ids put back; any other job is left alone.
///
/// Race-safe by its `where`: a job a concurrent repair put back first is no longer `done`
/// when this statement gets its row lock, so it is skipped; a job whose player exists is never
/// touched. The worker's insert ignores an existing player, so a repair that races a manual fix
/// costs one claim, not a second player.
pub(crate) async fn repair_done_jobs_without_player(
    executor: impl PgExecutor<'_>,
    only: Option<JobId>,
    jobs_channel: &ChannelName,
) -> Result<Vec<JobId>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        with repaired as (
            update player_creation_jobs as jobs
            set status = 'pending',
                attempts = 0,
                last_error = null,
                run_after = now(),
                updated_at = now(),
                completed_at = null
            where jobs.status = 'done'
              and ($1::uuid is null or jobs.id = $1)
              and not exists (
                  select 1
                  from players
                  where players.user_id = jobs.user_id
              )
            returning jobs.id
        )
        select repaired.id as "id!: JobId"
        from repaired
        cross join lateral pg_notify($2, repaired.id::text) as notified
        "#,
        only.map(|id| id.as_uuid()),
        jobs_channel.as_str(),
    )
    .fetch_all(executor)
    .await
}

/// How many done jobs have a user without a player.
///
/// Reads every done job and probes `players` for each (an anti-join): a full scan of the done
/// rows, which no index narrows, since done is the common state. Fine for `doctor`, an
/// operator's occasional command, and pruning keeps the done rows few; never put it on a hot
/// path or a metrics sampler.
pub(crate) async fn count_done_jobs_without_player(
    executor: impl PgExecutor<'_>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        select count(*) as "count!"
        from player_creation_jobs as jobs
        where jobs.status = 'done'
          and not exists (
              select 1
              from players
              where players.user_id = jobs.user_id
          )
        "#,
    )
    .fetch_one(executor)
    .await
}

/// Deletes up to `limit` finished (done or failed) jobs that finished more than `older_than_secs`
/// ago, oldest first, skipping rows anyone holds. Returns how many it deleted.
pub(crate) async fn delete_finished_jobs(
    executor: impl PgExecutor<'_>,
    older_than_secs: f64,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let result = sqlx::query!(
        r#"
        with doomed as (
            select id
            from player_creation_jobs
            where status <> 'pending'
              and completed_at < now() - make_interval(secs => $1)
            order by completed_at
            limit $2
            for update skip locked
        )
        delete from player_creation_jobs
        using doomed
        where player_creation_jobs.id = doomed.id
        "#,
        older_than_secs,
        limit,
    )
    .execute(executor)
    .await?;
    Ok(result.rows_affected())
}

/// How many finished jobs [`delete_finished_jobs`] would delete.
pub(crate) async fn count_finished_jobs(
    executor: impl PgExecutor<'_>,
    older_than_secs: f64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        select count(*) as "count!"
        from player_creation_jobs
        where status <> 'pending'
          and completed_at < now() - make_interval(secs => $1)
        "#,
        older_than_secs,
    )
    .fetch_one(executor)
    .await
}

/// A round trip that proves the connection still answers (the listeners' liveness check). The
/// simple protocol: nothing is prepared on a connection that is only listening.
pub(crate) async fn ping(executor: impl PgExecutor<'_>) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("select 1").execute(executor).await?;
    Ok(())
}

/// The server's version string.
pub(crate) async fn server_version(executor: impl PgExecutor<'_>) -> Result<String, sqlx::Error> {
    sqlx::query_scalar!(r#"select version() as "version!""#)
        .fetch_one(executor)
        .await
}

// The doctor's LISTEN probe runs on the connection under test, which may go through a
// transaction-mode pooler: there, a named prepared statement (what the query macros use) is gone
// by the next round trip. So these two use the simple protocol, which prepares nothing.

/// Starts listening on the doctor's probe channel (in whatever transaction `conn` is in).
pub(crate) async fn listen_for_probe(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("listen ackloop_doctor").execute(conn).await?;
    Ok(())
}

/// Whether this session is listening on the doctor's probe channel.
pub(crate) async fn is_listening_for_probe(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Row;
    let row = sqlx::raw_sql(
        "select exists (select from pg_listening_channels() as channel where channel = 'ackloop_doctor')",
    )
    .fetch_one(conn)
    .await?;
    row.try_get(0)
}

/// Sends the doctor's probe notification.
pub(crate) async fn notify_probe(executor: impl PgExecutor<'_>, payload: &str) -> Result<(), sqlx::Error> {
    sqlx::query!("select pg_notify('ackloop_doctor', $1)", payload)
        .execute(executor)
        .await?;
    Ok(())
}

/// The fraction of the server's notification queue in use (0 to 1).
pub(crate) async fn notification_queue_usage(executor: impl PgExecutor<'_>) -> Result<f64, sqlx::Error> {
    sqlx::query_scalar!(r#"select pg_notification_queue_usage() as "usage!""#)
        .fetch_one(executor)
        .await
}

/// Pending jobs created more than `older_than_secs` ago, and the oldest one's age.
pub(crate) async fn stale_pending_jobs(
    executor: impl PgExecutor<'_>,
    older_than_secs: f64,
) -> Result<(i64, Option<f64>), sqlx::Error> {
    let row = sqlx::query!(
        r#"
        select
            count(*) as "stale!",
            extract(epoch from now() - min(created_at))::float8 as "oldest_secs?"
        from player_creation_jobs
        where status = 'pending'
          and created_at < now() - make_interval(secs => $1)
        "#,
        older_than_secs,
    )
    .fetch_one(executor)
    .await?;
    Ok((row.stale, row.oldest_secs))
}
