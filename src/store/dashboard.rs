//! The dashboard's statements: what the loop did in the last minute, each read through an index
//! so that a page refreshing every second costs the same on a table of millions of jobs.

use sqlx::PgExecutor;

/// Signups made in one second.
#[derive(Debug, Clone)]
pub(crate) struct SignupSecond {
    /// Unix seconds.
    pub(crate) second: i64,
    pub(crate) signups: i64,
}

/// Signups per second over the last `window_secs`, by their jobs' ids: ids are UUIDv7, which
/// start with their millisecond, so the primary key finds the window's rows without a scan. (A
/// job id a caller chose as a random UUID lands in the window only by chance, and is then left
/// out by its `created_at`.)
pub(crate) async fn signups_per_second(
    executor: impl PgExecutor<'_>,
    window_secs: f64,
) -> Result<Vec<SignupSecond>, sqlx::Error> {
    sqlx::query_as!(
        SignupSecond,
        r#"
        with bounds as (
            select
                (lpad(to_hex((extract(epoch from now()) * 1000 - $1::float8 * 1000)::bigint), 12, '0')
                    || repeat('0', 20))::uuid as low,
                (lpad(to_hex((extract(epoch from now()) * 1000 + 60000)::bigint), 12, '0')
                    || repeat('f', 20))::uuid as high
        )
        select
            floor(extract(epoch from jobs.created_at))::bigint as "second!",
            count(*) as "signups!"
        from ackloop.player_creation_jobs as jobs, bounds
        where jobs.id between bounds.low and bounds.high
          and jobs.created_at >= now() - make_interval(secs => $1)
        group by 1
        order by 1
        "#,
        window_secs,
    )
    .fetch_all(executor)
    .await
}

/// Jobs finished in one second (or, `second` `None`, in the whole window), and how long their
/// signups waited for them.
#[derive(Debug, Clone)]
pub(crate) struct FinishedSecond {
    /// Unix seconds; `None` on the row for the whole window.
    pub(crate) second: Option<i64>,
    pub(crate) done: i64,
    pub(crate) failed: i64,
    /// Median seconds from the signup's insert to its job done, of the jobs done in it.
    pub(crate) commit_to_done_p50: Option<f64>,
    /// The 99th percentile of the same.
    pub(crate) commit_to_done_p99: Option<f64>,
}

/// Jobs finished per second over the last `window_secs`, and over the whole window, in one
/// pass through the index on finished jobs (`status in ('done', 'failed')` implies its predicate, `status <> 'pending'`).
pub(crate) async fn finished_per_second(
    executor: impl PgExecutor<'_>,
    window_secs: f64,
) -> Result<Vec<FinishedSecond>, sqlx::Error> {
    sqlx::query_as!(
        FinishedSecond,
        r#"
        select
            floor(extract(epoch from completed_at))::bigint as "second",
            count(*) filter (where status = 'done') as "done!",
            count(*) filter (where status = 'failed') as "failed!",
            percentile_cont(0.5) within group (order by extract(epoch from completed_at - created_at))
                filter (where status = 'done') as "commit_to_done_p50",
            percentile_cont(0.99) within group (order by extract(epoch from completed_at - created_at))
                filter (where status = 'done') as "commit_to_done_p99"
        from ackloop.player_creation_jobs
        where status in ('done', 'failed')
          and completed_at >= now() - make_interval(secs => $1)
        group by grouping sets ((floor(extract(epoch from completed_at))::bigint), ())
        order by 1 nulls first
        "#,
        window_secs,
    )
    .fetch_all(executor)
    .await
}

/// How many jobs have failed, through the index on failed jobs.
pub(crate) async fn failed_jobs(executor: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"
        select count(*) as "failed!"
        from ackloop.player_creation_jobs
        where status = 'failed'
        "#
    )
    .fetch_one(executor)
    .await
}
