//! Every transition of a job's life, walked through the contract's functions alone (as a worker
//! in another language makes them), each checked in the job's row: the states and transitions
//! docs/protocol.md draws and migration 06 lists.

use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::common::{execute_owned, wait_until};

/// A job's row, as far as its state goes.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct Row {
    status: String,
    attempts: i32,
    last_error: Option<String>,
    /// `attempt_started_at is not null`.
    started: bool,
    /// `completed_at is not null`.
    completed: bool,
    /// `run_after > now()`: not due yet.
    later: bool,
}

async fn row(pool: &PgPool, job: Uuid) -> Row {
    sqlx::query_as(
        "select status, attempts, last_error, attempt_started_at is not null as started,
                completed_at is not null as completed, run_after > now() as later
         from ackloop.player_creation_jobs where id = $1",
    )
    .bind(job)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn state(status: &str, attempts: i32, error: Option<&str>) -> (String, i32, Option<String>) {
    (status.to_owned(), attempts, error.map(str::to_owned))
}

fn of(row: &Row) -> (String, i32, Option<String>) {
    (row.status.clone(), row.attempts, row.last_error.clone())
}

/// `add`: a new pending job of a service, due now.
async fn add(pool: &PgPool, user: &str) -> Uuid {
    let job = sqlx::query_scalar("select ackloop.add_job($1, 'Name')")
        .bind(user)
        .fetch_one(pool)
        .await
        .unwrap();
    let added = row(pool, job).await;
    assert_eq!(of(&added), state("pending", 0, None));
    assert!(!added.started && !added.completed && !added.later, "{added:?}");
    job
}

/// Claims exactly `job` in a batch of one (`claim_jobs`), in the transaction `tx` has open.
async fn claim(conn: &mut PgConnection, job: Uuid) -> i32 {
    let (claimed, attempt): (Uuid, i32) = sqlx::query_as("select job_id, attempt from ackloop.claim_jobs(1)")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(claimed, job, "the batch claims the oldest new job");
    attempt
}

async fn mark_done(conn: &mut PgConnection, job: Uuid, attempt: i32) -> bool {
    let marked: Vec<Uuid> = sqlx::query_scalar(
        "select * from ackloop.mark_done(array[$1], array[$2], array['p-1'], array['{}'::jsonb])",
    )
    .bind(job)
    .bind(attempt)
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    marked == [job]
}

/// `record_failure`: the status it reports, or `None` when it left the job alone.
async fn record_failure(conn: &mut PgConnection, job: Uuid, attempt: i32, retryable: bool) -> Option<String> {
    sqlx::query_scalar(
        "select status from ackloop.record_failure(job_id => $1, attempt => $2, error => 'it broke',
                 retryable => $3, max_attempts => 3, backoff_base_ms => 60000)",
    )
    .bind(job)
    .bind(attempt)
    .bind(retryable)
    .fetch_optional(&mut *conn)
    .await
    .unwrap()
}

/// `start_attempt` of any due job of a service: its status, job, attempt and abandoned attempt.
async fn start(pool: &PgPool, max_attempts: i32) -> Option<(String, Uuid, i32, Option<i32>)> {
    sqlx::query_as(
        "select status, job_id, attempt, abandoned_attempt
         from ackloop.start_attempt(max_attempts => $1, backoff_base_ms => 1000, any_job => true)",
    )
    .bind(max_attempts)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// Starts `job` alone (`pending ──start──▶ running`), checked.
async fn start_alone(pool: &PgPool, job: Uuid, attempts_before: i32) -> i32 {
    let (status, started, attempt, abandoned) = start(pool, 3).await.expect("a job is due");
    assert_eq!(
        (status.as_str(), started, attempt, abandoned),
        ("started", job, attempts_before + 1, None)
    );
    let running = row(pool, job).await;
    assert_eq!((running.status.as_str(), running.attempts), ("running", attempt));
    assert!(
        running.started && !running.completed && running.later,
        "leased: {running:?}"
    );
    attempt
}

async fn lock_attempt(conn: &mut PgConnection, job: Uuid, attempt: i32) -> bool {
    sqlx::query_scalar("select ackloop.lock_attempt($1, $2)")
        .bind(job)
        .bind(attempt)
        .fetch_one(&mut *conn)
        .await
        .unwrap()
}

/// Waits for `job`'s lease to end: `start_attempt` then finds it running past it, and answers.
async fn start_after_lease(pool: &PgPool, max_attempts: i32) -> (String, Uuid, i32, Option<i32>) {
    let found = std::sync::Mutex::new(None);
    wait_until(
        "the running job's lease ends and start_attempt takes it",
        || async {
            let started = start(pool, max_attempts).await;
            let taken = started.is_some();
            *found.lock().unwrap() = started;
            taken
        },
    )
    .await;
    found.into_inner().unwrap().expect("found")
}

/// The batch's transitions: `pending ──complete──▶ done`, `──fail──▶ failed`, `──retry──▶ pending`,
/// and a batch rolled back leaves its job pending with no attempt counted.
#[sqlx::test]
async fn a_batch_completes_fails_or_retries_its_jobs_in_one_transaction(pool: PgPool) {
    let mut conn = pool.acquire().await.unwrap();
    for (user, outcome) in [("done", None), ("failed", Some(false)), ("retried", Some(true))] {
        let job = add(&pool, user).await;
        let mut tx = conn.begin().await.unwrap();
        let attempt = claim(&mut tx, job).await;
        assert_eq!(attempt, 1);
        assert_eq!(
            of(&row(&pool, job).await),
            state("pending", 0, None),
            "a claim is a lock, not a state"
        );
        match outcome {
            None => assert!(mark_done(&mut tx, job, attempt).await),
            Some(retryable) => {
                let expected = if retryable { "pending" } else { "failed" };
                assert_eq!(
                    record_failure(&mut tx, job, attempt, retryable).await.as_deref(),
                    Some(expected)
                );
            }
        }
        tx.commit().await.unwrap();
        let after = row(&pool, job).await;
        match outcome {
            None => assert_eq!(of(&after), state("done", 1, None)),
            Some(false) => assert_eq!(of(&after), state("failed", 1, Some("it broke"))),
            Some(true) => {
                assert_eq!(of(&after), state("pending", 1, Some("it broke")));
                assert!(after.later, "due after its backoff: {after:?}");
            }
        }
        assert_eq!(after.completed, outcome != Some(true), "{after:?}");
        assert!(!after.started, "{after:?}");
    }
    // A batch that dies: its job as it was, the attempt uncounted.
    let job = add(&pool, "rolled-back").await;
    let mut tx = conn.begin().await.unwrap();
    claim(&mut tx, job).await;
    tx.rollback().await.unwrap();
    assert_eq!(of(&row(&pool, job).await), state("pending", 0, None));
}

/// How a lone attempt ends, in the transition test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Complete,
    Fail,
    Retry,
    GiveBack,
    Unfinished,
}

/// `running ──give back──▶ pending`: whether the attempt was given back.
async fn give_back(pool: &PgPool, job: Uuid, attempt: i32) -> bool {
    sqlx::query_scalar("select ackloop.give_back_attempt($1, $2, 'waited for a lock')")
        .bind(job)
        .bind(attempt)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// `running ──end──▶ pending`: whether the attempt was ended.
async fn note_unfinished(pool: &PgPool, job: Uuid, attempt: i32) -> bool {
    sqlx::query_scalar("select ackloop.note_unfinished_attempt($1, $2, 'lost')")
        .bind(job)
        .bind(attempt)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The lone path's transitions: `pending ──start──▶ running`, then `──complete──▶ done`,
/// `──fail──▶ failed`, `──retry──▶ pending`, `──give back──▶ pending` (uncounted) and
/// `──end──▶ pending` (counted); an attempt no longer running cannot be locked or ended again.
#[sqlx::test]
async fn a_job_taken_alone_runs_its_counted_attempt_to_each_end(pool: PgPool) {
    let mut conn = pool.acquire().await.unwrap();
    for end in [
        End::Complete,
        End::Fail,
        End::Retry,
        End::GiveBack,
        End::Unfinished,
    ] {
        let job = add(&pool, &format!("{end:?}")).await;
        let attempt = start_alone(&pool, job, 0).await;
        match end {
            End::GiveBack => assert!(give_back(&pool, job, attempt).await),
            End::Unfinished => assert!(note_unfinished(&pool, job, attempt).await),
            End::Complete | End::Fail | End::Retry => {
                let mut tx = conn.begin().await.unwrap();
                assert!(lock_attempt(&mut tx, job, attempt).await);
                let recorded = match end {
                    End::Complete => mark_done(&mut tx, job, attempt).await.then(|| "done".to_owned()),
                    _ => record_failure(&mut tx, job, attempt, end == End::Retry).await,
                };
                let expected = match end {
                    End::Complete => "done",
                    End::Fail => "failed",
                    _ => "pending",
                };
                assert_eq!(recorded.as_deref(), Some(expected), "{end:?}");
                tx.commit().await.unwrap();
            }
        }
        let after = row(&pool, job).await;
        let expected = match end {
            End::Complete => state("done", 1, None),
            End::Fail => state("failed", 1, Some("it broke")),
            End::Retry => state("pending", 1, Some("it broke")),
            End::GiveBack => state("pending", 0, Some("waited for a lock")),
            End::Unfinished => state("pending", 1, Some("lost")),
        };
        assert_eq!(of(&after), expected, "{end:?}");
        assert!(!after.started, "only a running job has its start: {after:?}");
        assert_eq!(
            after.completed,
            matches!(end, End::Complete | End::Fail),
            "{end:?}: {after:?}"
        );
        // Its attempt is over: it cannot be locked, given back or ended again.
        let mut tx = conn.begin().await.unwrap();
        assert!(!lock_attempt(&mut tx, job, attempt).await, "{end:?}");
        tx.rollback().await.unwrap();
        assert!(!give_back(&pool, job, attempt).await, "{end:?}");
        assert!(!note_unfinished(&pool, job, attempt).await, "{end:?}");
        if matches!(end, End::Retry | End::GiveBack | End::Unfinished) {
            // Out of the way of the next round's start.
            execute_owned(
                &pool,
                format!("update ackloop.player_creation_jobs set run_after = now() + interval '1 hour' where id = '{job}'"),
            )
            .await;
        }
    }
}

/// A running job whose lease ran out ended with its session: `running ──restart──▶ running`
/// with a new attempt counted and the error saying so, then `──give up──▶ failed` when its
/// attempts are used up; a pending job whose attempts are used up is given up too.
#[sqlx::test]
async fn a_running_job_past_its_lease_is_restarted_then_given_up(pool: PgPool) {
    let job = add(&pool, "dies").await;
    start_alone(&pool, job, 0).await;
    // Its session dies with the attempt: nothing records it. After the lease, a worker finds it.
    let (status, restarted, attempt, abandoned) = start_after_lease(&pool, 2).await;
    assert_eq!(
        (status.as_str(), restarted, attempt, abandoned),
        ("started", job, 2, Some(1))
    );
    let running = row(&pool, job).await;
    assert_eq!(running.status, "running");
    assert!(
        running
            .last_error
            .as_deref()
            .is_some_and(|error| error.starts_with("attempt 1 did not finish: its database session ended")),
        "{running:?}"
    );
    // Dies again, with its last attempt: given up.
    let (status, given_up, attempts, _) = start_after_lease(&pool, 2).await;
    assert_eq!((status.as_str(), given_up, attempts), ("gave_up", job, 2));
    let failed = row(&pool, job).await;
    assert_eq!((failed.status.as_str(), failed.attempts), ("failed", 2));
    assert!(failed.completed && !failed.started, "{failed:?}");
    assert!(
        failed
            .last_error
            .as_deref()
            .is_some_and(|error| error.starts_with("gave up after 2 attempts; attempt 2 did not finish")),
        "{failed:?}"
    );

    // A pending job whose attempts are used up (its last one ended with an error its session
    // survived): given up when it is next due.
    let job = add(&pool, "tired").await;
    let attempt = start_alone(&pool, job, 0).await;
    assert!(note_unfinished(&pool, job, attempt).await);
    let (status, given_up, _, _) = start_after_lease(&pool, 1).await;
    assert_eq!((status.as_str(), given_up), ("gave_up", job));
    assert_eq!(
        of(&row(&pool, job).await),
        state("failed", 1, Some("gave up after 1 attempts; lost"))
    );
}

/// An operator's transitions: `failed ──retry──▶ pending` with fresh attempts, and a done job
/// whose player is missing back to pending; a job not finished is refused, unchanged.
#[sqlx::test]
async fn an_operator_puts_failed_jobs_back_and_leaves_unfinished_ones_alone(pool: PgPool) {
    let channels = ackloop::Channels::default();
    let failed = add(&pool, "failed").await;
    let mut tx = pool.begin().await.unwrap();
    let attempt = claim(&mut tx, failed).await;
    record_failure(&mut tx, failed, attempt, false).await;
    tx.commit().await.unwrap();
    ackloop::admin::retry_failed_job(&pool, &channels, ackloop::JobId::from(failed))
        .await
        .expect("retried");
    let retried = row(&pool, failed).await;
    assert_eq!((retried.status.as_str(), retried.attempts), ("pending", 0));
    assert!(!retried.completed && !retried.started, "{retried:?}");

    let running = start_alone(&pool, failed, 0).await;
    let refused = ackloop::admin::retry_failed_job(&pool, &channels, ackloop::JobId::from(failed)).await;
    assert!(
        matches!(refused, Err(ackloop::admin::AdminError::StillPending(_))),
        "{refused:?}"
    );
    assert_eq!(
        (row(&pool, failed).await.status.as_str(), running),
        ("running", 1)
    );
}
