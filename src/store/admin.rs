//! The operators' statements: counts, job details, retries, repairs, pruning, probes.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use crate::channel::ChannelName;
use crate::job::{ExternalId, JobId};

/// Job counts by status and the age of the oldest unfinished (pending or running) job.
#[derive(Debug, Clone)]
pub(crate) struct JobCounts {
    pub(crate) pending: i64,
    pub(crate) running: i64,
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
            count(*) filter (where status = 'running') as "running!",
            count(*) filter (where status = 'done') as "done!",
            count(*) filter (where status = 'failed') as "failed!",
            extract(epoch from now() - min(created_at) filter (where status in ('pending', 'running')))::float8
                as "oldest_pending_secs?"
        from ackloop.player_creation_jobs
        "#,
    )
    .fetch_one(executor)
    .await
}

/// The pending jobs the queue gauges show: how many, and how long the oldest has waited.
#[derive(Debug, Clone)]
pub(crate) struct PendingJobs {
    pub(crate) pending: i64,
    pub(crate) oldest_pending_secs: Option<f64>,
}

/// [`PendingJobs`], reading only pending rows (through the partial pending index): it runs
/// every few seconds in every worker, so it must not grow with the finished jobs kept.
pub(crate) async fn pending_jobs(executor: impl PgExecutor<'_>) -> Result<PendingJobs, sqlx::Error> {
    // Through the contract: a worker's role may call it, and has no right on the table.
    sqlx::query_as!(
        PendingJobs,
        r#"
        select pending as "pending!", oldest_pending_secs
        from ackloop.pending_jobs()
        "#,
    )
    .fetch_one(executor)
    .await
}

/// A failed job, for the status report.
#[derive(Debug, Clone)]
pub(crate) struct FailedJobRow {
    pub(crate) id: JobId,
    pub(crate) user_id: ExternalId,
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
            user_id as "user_id: ExternalId",
            attempts,
            last_error,
            completed_at as failed_at
        from ackloop.player_creation_jobs
        where status = 'failed'
        order by completed_at desc
        limit $1
        "#,
        limit,
    )
    .fetch_all(executor)
    .await
}

/// The versions of the migrations applied, in order, as the migrations themselves record them
/// (since the contract's, 20261126000002): whatever tool applied them.
pub(crate) async fn applied_migrations(executor: impl PgExecutor<'_>) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        select version
        from ackloop.applied_migrations
        order by version
        "#
    )
    .fetch_all(executor)
    .await
}

/// The versions the migrations recorded themselves that sqlx did not record as applied: a schema
/// applied, at least in part, by another tool.
pub(crate) async fn versions_sqlx_did_not_apply(
    executor: impl PgExecutor<'_>,
) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        select version
        from ackloop.applied_migrations
        where version not in (select version from ackloop._sqlx_migrations where success)
        order by version
        "#
    )
    .fetch_all(executor)
    .await
}

/// The versions sqlx recorded as applied, in order: what tells a schema older than the
/// contract's migration, which recorded nothing itself.
pub(crate) async fn applied_sqlx_migrations(executor: impl PgExecutor<'_>) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        select version
        from ackloop._sqlx_migrations
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
    pub(crate) user_id: ExternalId,
    /// The built-in user's email; none for a job a service added.
    pub(crate) email: Option<String>,
    pub(crate) status: String,
    pub(crate) attempts: i32,
    pub(crate) last_error: Option<String>,
    pub(crate) run_after: DateTime<Utc>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) completed_at: Option<DateTime<Utc>>,
    /// The player service's answer, when done.
    pub(crate) player_id: Option<ExternalId>,
    /// A done job of the built-in tables whose built-in player is gone (deleted since).
    pub(crate) player_missing: bool,
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
            jobs.user_id as "user_id!: ExternalId",
            users.email as "email?",
            jobs.status,
            jobs.attempts,
            jobs.last_error,
            jobs.run_after,
            jobs.created_at,
            jobs.updated_at,
            jobs.completed_at,
            jobs.player_id as "player_id?: ExternalId",
            (jobs.status = 'done' and jobs.builtin_user_id is not null and players.id is null)
                as "player_missing!"
        from ackloop.player_creation_jobs as jobs
        left join ackloop.builtin_users as users on users.id = jobs.builtin_user_id
        left join ackloop.builtin_players as players on players.user_id = jobs.builtin_user_id
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
        from ackloop.builtin_users as users
        join ackloop.player_creation_jobs as jobs on jobs.builtin_user_id = users.id
        where ackloop.fold_email(users.email) = ackloop.fold_email($1)
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
            update ackloop.player_creation_jobs
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
            update ackloop.player_creation_jobs as jobs
            set status = 'pending',
                attempts = 0,
                last_error = null,
                run_after = now(),
                updated_at = now(),
                completed_at = null,
                player_id = null,
                result = null
            where jobs.status = 'done'
              and ($1::uuid is null or jobs.id = $1)
              and jobs.builtin_user_id is not null
              and not exists (
                  select 1
                  from ackloop.builtin_players as players
                  where players.user_id = jobs.builtin_user_id
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
        from ackloop.player_creation_jobs as jobs
        where jobs.status = 'done'
          and jobs.builtin_user_id is not null
          and not exists (
              select 1
              from ackloop.builtin_players as players
              where players.user_id = jobs.builtin_user_id
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
        delete from ackloop.player_creation_jobs
        -- An array, not a join: the planner hashes a join against the whole table.
        where id = any(array(
            select id
            from ackloop.player_creation_jobs
            where status in ('done', 'failed')
              and completed_at < now() - make_interval(secs => $1)
            order by completed_at
            limit $2
            for update skip locked
        ))
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
        from ackloop.player_creation_jobs
        where status in ('done', 'failed')
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

/// The server process of the session on `executor`: a different one means a new connection.
pub(crate) async fn backend_pid(executor: impl PgExecutor<'_>) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar!(r#"select pg_backend_pid() as "pid!""#)
        .fetch_one(executor)
        .await
}

/// Whether the server is in recovery (a standby), and whether this session's transactions are
/// read-only by default: what libpq's `target_session_attrs` looks at.
pub(crate) async fn session_state(executor: impl PgExecutor<'_>) -> Result<(bool, bool), sqlx::Error> {
    let row = sqlx::query!(
        r#"
        select
            pg_is_in_recovery() as "in_recovery!",
            current_setting('transaction_read_only') = 'on' as "read_only!"
        "#
    )
    .fetch_one(executor)
    .await?;
    Ok((row.in_recovery, row.read_only))
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

/// Unfinished (pending or running) jobs created more than `older_than_secs` ago, and the oldest
/// one's age.
pub(crate) async fn stale_pending_jobs(
    executor: impl PgExecutor<'_>,
    older_than_secs: f64,
) -> Result<(i64, Option<f64>), sqlx::Error> {
    let row = sqlx::query!(
        r#"
        select
            count(*) as "stale!",
            extract(epoch from now() - min(created_at))::float8 as "oldest_secs?"
        from ackloop.player_creation_jobs
        where status in ('pending', 'running')
          and created_at < now() - make_interval(secs => $1)
        "#,
        older_than_secs,
    )
    .fetch_one(executor)
    .await?;
    Ok((row.stale, row.oldest_secs))
}
