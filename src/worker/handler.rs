//! What the worker runs for each job: the [`Handler`] trait, the built-in [`InsertPlayer`], and
//! how a handler's answer (or panic) becomes the job's outcome.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::task::Poll;

use sqlx::PgConnection;

use crate::job::{JobId, UserId};
use crate::store;

/// A job handed to a [`Handler`]: the signup's data, and which attempt this is.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Job {
    /// The job's id, as the signup side knows it.
    pub id: JobId,
    /// The user the player is for.
    pub user_id: UserId,
    /// The display name given at signup (already validated and trimmed).
    pub display_name: String,
    /// 1 for the first attempt; a job is tried at most `WorkerConfig::max_attempts` times.
    pub attempt: u32,
}

impl Job {
    /// A job as the worker hands it to a handler: for calling a handler in your own tests.
    pub fn new(id: JobId, user_id: UserId, display_name: impl Into<String>, attempt: u32) -> Self {
        Self {
            id,
            user_id,
            display_name: display_name.into(),
            attempt,
        }
    }
}

/// Why a [`Handler`] did not finish its job. What happens next is decided by the variant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// Try again after the worker's backoff. After the last attempt the job fails with this
    /// reason, and the waiting caller hears `SignupError::JobFailed` with it.
    #[error("{0}")]
    RetryLater(String),
    /// Fail the job now, without further attempts; the waiting caller hears
    /// `SignupError::JobFailed` with this reason.
    #[error("{0}")]
    Fail(String),
    /// A statement failed (`?` on any sqlx call gives this). Treated as the built-in handler's
    /// own errors are: data or constraint errors (SQLSTATE classes 22, 23) fail the job now; a
    /// lock wait that ran out (`lock_timeout`, 55P03) puts the job back for after its backoff
    /// without counting the attempt; a lost connection or an unreachable database gives up the
    /// whole batch, which costs its jobs no attempt (a job being tried alone keeps its counted
    /// attempt, with this error as its reason); anything else is retried after the backoff.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl JobError {
    /// [`JobError::RetryLater`] with `reason`.
    pub fn retry_later(reason: impl Into<String>) -> Self {
        Self::RetryLater(reason.into())
    }

    /// [`JobError::Fail`] with `reason`.
    pub fn fail(reason: impl Into<String>) -> Self {
        Self::Fail(reason.into())
    }
}

/// The player service's own code: what creating a job's player means.
///
/// The worker calls [`Handler::handle`] for each job it claims, inside the claim's transaction,
/// in a savepoint of the job's own. Everything the handler writes through `conn` commits
/// together with the job's `done` status and the notification that tells the signup side, or
/// not at all:
///
/// - `Ok(())`: the writes are kept and the job is marked done.
/// - `Err(`[`JobError`]`)`: the writes are undone (the savepoint is rolled back) and the job is
///   retried or failed as the error says; the other jobs of the batch go on.
/// - A panic is caught: it is undone the same way and counts as a failed attempt (retried
///   after the backoff, failed after the last attempt); the worker and the batch go on.
///
/// A job is done at least once and its effect committed exactly once: an attempt whose
/// transaction did not commit (a crash, a lost connection) is made again, so code with effects
/// outside the database (an email, an HTTP call) should be idempotent, keyed by [`Job::id`].
/// Keep handlers short: the transaction holds the job's row lock while they run, a batch stops
/// starting jobs after 5 s (the rest wait for the next pass, uncounted) and is given up at the
/// worker's 10 s limit on a pass, and the server ends a session left idle in its transaction for
/// 10 s (see `worker_session_options`). The handler may be called again with the same
/// [`Job::attempt`]: an attempt whose transaction was lost is not counted.
///
/// What a handler must do and must not do:
/// - On success, leave the user's row in `players` (insert it, or call [`InsertPlayer`]): the
///   signup side reads the player from there, and reports a done job without one as failed.
/// - Never end or reshape the transaction: no `COMMIT`, `ROLLBACK`, `RELEASE` or `ROLLBACK TO`
///   of the worker's savepoint (`ackloop_job`), and no session-level `SET` (it would outlive the
///   job on a pooled connection; `SET LOCAL` lasts until the batch commits). Nested savepoints
///   (`conn.begin()`) are fine. A `COMMIT` would commit the batch's earlier jobs' writes without
///   their `done` status, and they would be made again.
/// - Constraints it writes to that are `DEFERRABLE INITIALLY DEFERRED` are checked at the
///   batch's commit, not in its savepoint: a violation there loses the whole batch, which is
///   then retried. Keep them immediate (or `SET CONSTRAINTS … IMMEDIATE` inside the handler).
/// - Each job's savepoint is a subtransaction; PostgreSQL caches 64 of them per transaction
///   and gets slower for every session beyond that, so keep `batch_size` × (1 + the savepoints
///   a handler opens) under 64 (the default, 32, with none of its own, is).
/// - A panic is caught only with unwinding (`panic = "unwind"`, Rust's default). State the
///   handler shares between jobs (a `std::sync::Mutex` poisoned by a panic) is its own concern.
///
/// Implement it with `async fn`; the future must be `Send`:
///
/// ```no_run
/// use ackloop::{Handler, InsertPlayer, Job, JobError};
/// use sqlx::PgConnection;
///
/// struct StarterKit;
///
/// impl Handler for StarterKit {
///     async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<(), JobError> {
///         // The built-in insert, then this service's own rows, in the same transaction.
///         InsertPlayer.handle(job, conn).await?;
///         sqlx::query("insert into inventory (user_id, item) values ($1, 'starter sword')")
///             .bind(job.user_id.get())
///             .execute(&mut *conn)
///             .await?;
///         Ok(())
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Does `job`'s work through `conn`, the connection of the claim's transaction.
    fn handle(&self, job: &Job, conn: &mut PgConnection)
    -> impl Future<Output = Result<(), JobError>> + Send;
}

/// The built-in handler: inserts the player (`players (user_id, display_name)`), leaving one that
/// already exists as it is. [`crate::Worker::new`] runs it, as one statement per batch; call it
/// from your own handler to add to it.
#[derive(Debug, Clone, Copy, Default)]
pub struct InsertPlayer;

impl Handler for InsertPlayer {
    async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<(), JobError> {
        store::insert_player(conn, job.user_id, &job.display_name).await?;
        Ok(())
    }
}

/// Runs `handler` on `job`, turning a panic into a failed attempt with the panic's message.
pub(crate) async fn run_caught<H: Handler>(
    handler: &H,
    job: &Job,
    conn: &mut PgConnection,
) -> Result<(), JobError> {
    // A handler written without `async fn` may panic before it returns its future.
    let mut conn = Some(conn);
    let start = AssertUnwindSafe(|| handler.handle(job, conn.take().expect("called once")));
    let work = match std::panic::catch_unwind(start) {
        Ok(work) => work,
        Err(panic) => return Err(panicked(&*panic)),
    };
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(
        |cx| match std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => Poll::Ready(Err(panicked(&*panic))),
        },
    )
    .await
}

/// A caught panic as a failed attempt.
fn panicked(panic: &(dyn std::any::Any + Send)) -> JobError {
    JobError::RetryLater(format!("the handler panicked: {}", panic_message(panic)))
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = panic.downcast_ref::<&str>() {
        message
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message
    } else {
        "(no message)"
    }
}

/// The longest reason kept in a job's `last_error`, in characters: a handler's reason is its
/// own text, and a row is no place for a megabyte of it.
const MAX_REASON_CHARS: usize = 2_000;

/// A handler's reason as it can be stored: without NUL characters (PostgreSQL text cannot hold
/// them, and the failure could not be recorded) and at most [`MAX_REASON_CHARS`] long.
pub(crate) fn storable_reason(reason: &str) -> String {
    let mut kept: String = reason
        .chars()
        .filter(|c| *c != '\0')
        .take(MAX_REASON_CHARS)
        .collect();
    if reason
        .chars()
        .filter(|c| *c != '\0')
        .nth(MAX_REASON_CHARS)
        .is_some()
    {
        kept.push('…');
    }
    if kept.trim().is_empty() {
        kept = "the handler gave no reason".to_owned();
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_stored_without_nul_and_cut_to_length() {
        assert_eq!(storable_reason("out\0 of stock"), "out of stock");
        assert_eq!(storable_reason("  "), "the handler gave no reason");
        let long = "x".repeat(MAX_REASON_CHARS + 5);
        let stored = storable_reason(&long);
        assert_eq!(stored.chars().count(), MAX_REASON_CHARS + 1);
        assert!(stored.ends_with('…'));
        assert_eq!(
            storable_reason(&"y".repeat(MAX_REASON_CHARS)).chars().count(),
            MAX_REASON_CHARS
        );
    }
}
