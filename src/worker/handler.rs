//! What the worker runs for each job: the [`Handler`] trait, the built-in [`InsertPlayer`], and
//! how a handler's answer (or panic) becomes the job's outcome.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::task::Poll;

use sqlx::PgConnection;

use crate::job::{BuiltinAnswer, ExternalId, JobId, JobSource, json_object_problem};
use crate::store;

/// A job handed to a [`Handler`]: what the auth side added, and which attempt this is.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Job {
    /// The job's id, as the auth side knows it.
    pub id: JobId,
    /// The user the player is for: the auth service's own id (`to_i64`, `to_uuid` read it back
    /// as the key type it is).
    pub user_id: ExternalId,
    /// The display name given when the job was added (validated; stored exactly as given, never
    /// trimmed).
    pub display_name: String,
    /// The auth side's extra data for the player service, a JSON object, if it gave any.
    pub extra: Option<serde_json::Value>,
    /// 1 for the first attempt; a job is tried at most `WorkerConfig::max_attempts` times.
    pub attempt: u32,
}

impl Job {
    /// A job as the worker hands it to a handler: for calling a handler in your own tests.
    pub fn new(
        id: JobId,
        user_id: impl Into<ExternalId>,
        display_name: impl Into<String>,
        attempt: u32,
    ) -> Self {
        Self {
            id,
            user_id: user_id.into(),
            display_name: display_name.into(),
            extra: None,
            attempt,
        }
    }

    /// The same job with `extra` data, for calling a handler in your own tests.
    pub fn with_extra(mut self, extra: serde_json::Value) -> Self {
        self.extra = Some(extra);
        self
    }
}

/// What a [`Handler`] made: the player service's own id for the player, and a small result
/// (a JSON object of at most 8 KiB) for the caller. ackloop stores both with the job when it
/// marks it done, and the awaiting caller reads them from there
/// ([`Signups::await_job`](crate::Signups::await_job)), never from the service's tables.
///
/// ```
/// use ackloop::Created;
///
/// #[derive(serde::Serialize)]
/// struct Welcome { level: i32 }
///
/// let created = Created::new(42_i64).with_result(&Welcome { level: 1 }).unwrap();
/// assert_eq!(created.player_id().as_str(), "42");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    player_id: ExternalId,
    result: serde_json::Value,
}

impl Created {
    /// The player `player_id` was made, with an empty result (`{}`).
    pub fn new(player_id: impl Into<ExternalId>) -> Self {
        Self {
            player_id: player_id.into(),
            result: serde_json::Value::Object(serde_json::Map::new()),
        }
    }

    /// The same, with `result` for the caller: anything that serialises to a JSON object of at
    /// most 8 KiB.
    ///
    /// # Errors
    /// [`JobError::Fail`] when `result` does not serialise to such an object: the job fails with
    /// the reason, as retrying the same code would not help.
    pub fn with_result(mut self, result: &impl serde::Serialize) -> Result<Self, JobError> {
        let value = serde_json::to_value(result)
            .map_err(|err| JobError::fail(format!("the handler's result cannot be stored: {err}")))?;
        if let Some(problem) = json_object_problem(&value) {
            return Err(JobError::fail(format!("the handler's result {problem}")));
        }
        self.result = value;
        Ok(self)
    }

    /// The answer for a built-in signup (a job of [`JobSource::BuiltinSignup`]): its player's
    /// id, display name and creation time, which its caller reads back as a
    /// [`Player`](crate::Player) from [`Signups::await_player`](crate::Signups::await_player).
    pub fn builtin_player(
        player_id: i64,
        display_name: impl Into<String>,
        created_at: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        let answer = BuiltinAnswer {
            display_name: display_name.into(),
            created_at,
        };
        Self {
            player_id: ExternalId::from(player_id),
            result: serde_json::to_value(answer).expect("a string and a time serialise to JSON"),
        }
    }

    /// The player's id in the player service's own table.
    pub fn player_id(&self) -> &ExternalId {
        &self.player_id
    }

    /// The result for the caller.
    pub fn result(&self) -> &serde_json::Value {
        &self.result
    }

    pub(crate) fn into_parts(self) -> (ExternalId, serde_json::Value) {
        (self.player_id, self.result)
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

/// Turns any error into a [`JobError`] with one call, in a handler: `.retry_later()?` for what
/// may pass (a service that is down, a timeout), `.fail()?` for what no retry fixes (input the
/// player service refuses). The reason kept with the job is the error's message followed by its
/// causes.
///
/// ```
/// use ackloop::{JobError, JobResultExt};
///
/// fn level(extra: &str) -> Result<u32, JobError> {
///     let level: u32 = extra.parse().fail()?;
///     Ok(level)
/// }
/// assert!(matches!(level("x"), Err(JobError::Fail(reason)) if reason == "invalid digit found in string"));
/// assert_eq!(level("7").unwrap(), 7);
/// ```
pub trait JobResultExt<T> {
    /// [`JobError::RetryLater`] with the error's message: tried again after the backoff, failed
    /// after the last attempt.
    ///
    /// # Errors
    /// The error, as [`JobError::RetryLater`].
    fn retry_later(self) -> Result<T, JobError>;

    /// [`JobError::Fail`] with the error's message: the job fails now, with no further attempt.
    ///
    /// # Errors
    /// The error, as [`JobError::Fail`].
    fn fail(self) -> Result<T, JobError>;
}

impl<T, E: std::error::Error> JobResultExt<T> for Result<T, E> {
    fn retry_later(self) -> Result<T, JobError> {
        self.map_err(|err| JobError::RetryLater(reason_of(&err)))
    }

    fn fail(self) -> Result<T, JobError> {
        self.map_err(|err| JobError::Fail(reason_of(&err)))
    }
}

/// An error's message and its causes, each once.
fn reason_of(err: &dyn std::error::Error) -> String {
    let mut reason = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !reason.contains(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        source = cause.source();
    }
    reason
}

/// The player service's own code: what creating a job's player means.
///
/// The worker calls [`Handler::handle`] for each job it claims, inside the claim's transaction,
/// in a savepoint of the job's own. Everything the handler writes through `conn` commits
/// together with the job's `done` status and the notification that tells the signup side, or
/// not at all:
///
/// - `Ok(`[`Created`]`)`: the writes are kept and the job is marked done, with the player's id
///   and the result stored for the awaiting caller.
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
/// - On success, return the player's id in your own table (a player that already exists for
///   this user, made by an attempt whose answer was lost, is the same player: return it). The
///   caller gets exactly what you return, read from ackloop's job table.
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
/// A handler may also write a whole batch at once ([`Handler::BATCH_FORM`],
/// [`Handler::handle_batch`]): one statement per batch instead of one per job and a savepoint
/// each, the same rules applying to the batch as to a job. Its time counts toward the pass's
/// 5 s; the jobs it leaves after a failure are taken one at a time in what is left (at least one).
///
/// Implement it with `async fn`; the future must be `Send`:
///
/// ```no_run
/// use ackloop::{Created, Handler, Job, JobError};
/// use sqlx::PgConnection;
///
/// /// The player service's own `players (id bigserial, account_id uuid unique, nickname text)`.
/// struct CreatePlayer;
///
/// impl Handler for CreatePlayer {
///     async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<Created, JobError> {
///         let account = job.user_id.to_uuid().ok_or_else(|| JobError::fail("user id is not a uuid"))?;
///         // Insert, or find the player an earlier attempt made: the same player either way.
///         let id: i64 = sqlx::query_scalar(
///             "insert into players (account_id, nickname) values ($1, $2)
///              on conflict (account_id) do update set nickname = players.nickname
///              returning id",
///         )
///         .bind(account)
///         .bind(&job.display_name)
///         .fetch_one(&mut *conn)
///         .await?;
///         Ok(Created::new(id))
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// The jobs this handler serves, and so the only ones its worker claims: those services
    /// added with [`add_job`](crate::add_job) (the default), or the built-in tables' signups.
    const SOURCE: JobSource = JobSource::AddJob;

    /// Does `job`'s work through `conn`, the connection of the claim's transaction, and says
    /// what it made.
    fn handle(
        &self,
        job: &Job,
        conn: &mut PgConnection,
    ) -> impl Future<Output = Result<Created, JobError>> + Send;

    /// Whether the worker hands a claimed batch of new jobs to [`Handler::handle_batch`]
    /// ([`BatchForm::Together`]) or each job to [`Handler::handle`] in a savepoint of its own
    /// (the default).
    const BATCH_FORM: BatchForm = BatchForm::OneAtATime;

    /// With [`Handler::BATCH_FORM`] `Together`: does a whole batch's work at once, through
    /// `conn`, the claim's transaction (one statement for every job, say), and answers one
    /// [`Created`] per job, in the order of `jobs`. It runs in a savepoint: on any error (a panic
    /// included), an answer of the wrong length or one that cannot be stored, ackloop rolls back
    /// to it, undoing everything this call wrote, and runs [`Handler::handle`] on each of the
    /// same jobs, still locked, in a savepoint of its own, so one bad job fails alone and the
    /// rest complete. A job tried before is always handed to `handle`, alone. The default
    /// refuses: write it when you set `BATCH_FORM`.
    fn handle_batch(
        &self,
        jobs: &[Job],
        conn: &mut PgConnection,
    ) -> impl Future<Output = Result<Vec<Created>, JobError>> + Send {
        let _ = (jobs, conn);
        std::future::ready(Err(JobError::retry_later(
            "BATCH_FORM is Together but handle_batch is not written",
        )))
    }
}

/// How a worker hands a [`Handler`] its batches of new jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchForm {
    /// Each job to [`Handler::handle`], in a savepoint of its own: a statement (or more) and a
    /// round trip for the savepoint per job.
    OneAtATime,
    /// The whole batch to [`Handler::handle_batch`], falling back to one at a time when it fails.
    Together,
}

/// The way a worker's passes complete a batch of new jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PassPath {
    /// Claim the batch (`ackloop.claim_jobs`) and hand it to the handler (as its
    /// [`BatchForm`] says), then mark the jobs it finished done, in one transaction.
    ThroughTheHandler,
    /// Claim, create and complete the whole batch in one statement (`ackloop.complete_jobs`),
    /// which does in SQL exactly what [`InsertPlayer`] does. If the statement fails, the batch is
    /// taken again through the handler, to find the job at fault.
    BuiltinStatement,
}

impl PassPath {
    /// How `H`'s batches go: in one statement for the built-in [`InsertPlayer`] however the
    /// worker was given it ([`Worker::new`](crate::Worker::new) or
    /// [`Worker::with_handler`](crate::Worker::with_handler)), since that statement is its
    /// effect written in SQL; through the handler for any other, whose effect only it knows.
    pub(crate) fn of<H: Handler>() -> Self {
        if std::any::TypeId::of::<H>() == std::any::TypeId::of::<InsertPlayer>() {
            Self::BuiltinStatement
        } else {
            Self::ThroughTheHandler
        }
    }
}

/// The built-in player service's handler: creates the player of a job signed up on the
/// built-in tables in `ackloop.builtin_players`, leaving one that already exists as it is, and
/// answers with its id, display name and creation time. [`crate::Worker::new`] runs it, as one
/// statement per batch. It serves the built-in tables' signups only
/// ([`JobSource::BuiltinSignup`]): jobs services add are their own handlers'.
#[derive(Debug, Clone, Copy, Default)]
pub struct InsertPlayer;

impl Handler for InsertPlayer {
    const SOURCE: JobSource = JobSource::BuiltinSignup;
    // Used after the one-statement batch failed: a player made by hand is answered with at once.
    const BATCH_FORM: BatchForm = BatchForm::Together;

    async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<Created, JobError> {
        let player = store::insert_builtin_player(conn, job.id).await?;
        Ok(Created::builtin_player(
            player.id,
            player.display_name,
            player.created_at,
        ))
    }

    async fn handle_batch(&self, jobs: &[Job], conn: &mut PgConnection) -> Result<Vec<Created>, JobError> {
        let ids: Vec<JobId> = jobs.iter().map(|job| job.id).collect();
        let players = store::insert_builtin_players(conn, &ids).await?;
        Ok(players
            .into_iter()
            .map(|player| Created::builtin_player(player.id, player.display_name, player.created_at))
            .collect())
    }
}

/// Runs the handler's future that `start` makes, turning a panic (in making it, or while it
/// runs) into a failed attempt with the panic's message.
pub(crate) async fn caught<T, F>(start: impl FnOnce() -> F) -> Result<T, JobError>
where
    F: Future<Output = Result<T, JobError>>,
{
    // A handler written without `async fn` may panic before it returns its future.
    let work = match std::panic::catch_unwind(AssertUnwindSafe(start)) {
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
