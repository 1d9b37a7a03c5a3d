//! ackloop hands work from one service to another through PostgreSQL, and tells the sender
//! when it is done.
//!
//! The flagship use: an auth service signs a user up; a player service creates that user's
//! player; the signup call returns once the player exists, or fails clearly within a timeout.
//!
//! ```text
//!  auth service                       PostgreSQL                          player worker
//!  ────────────                       ──────────                          ─────────────
//!  one transaction of its own:
//!   │ insert its user ──────────────▶ its users
//!   │ add_job ──────────────────────▶ ackloop.player_creation_jobs
//!   │   (register waiter first)       pg_notify(player_jobs, job id) ───▶ wake up
//!   │ commit                                                              one transaction:
//!   │                                 its players ◀────────────────────── claim (SKIP LOCKED),
//!   │                                 job done + the handler's answer     handler inserts player,
//!   │ ◀────── player_jobs_done ────── pg_notify(player_jobs_done, id) ◀── mark done, notify id
//!   │ await_job: read the answer from ackloop's job table
//!   ▼ Confirmed { player_id, result }, or TimedOut { job_id } / JobFailed { reason }
//! ```
//!
//! Everything ackloop creates lives in the schema `ackloop` (nothing in `public`): the job table,
//! the contract's functions (which pin their search_path and run as ackloop's owner, so a service's
//! role needs EXECUTE and nothing else), and the built-in services' `builtin_users` and
//! `builtin_players`, which the quick start's one-call path
//! [`Signups::create_user_and_await_player`] and the built-in worker use.
//!
//! # Guarantees
//! - **Commit means everything or nothing.** The user and the job are one transaction, and the
//!   wake-up follows its commit: after an error raised before the commit nothing was written
//!   and no worker was woken (an error that may follow it, [`SignupError::Unavailable`], carries
//!   the job id).
//! - **A committed job is completed**, by whichever worker gets to it, whenever one runs:
//!   notifications only save time; workers also look at the table on start, after every
//!   reconnect and on a poll.
//! - **One player per user, exactly.** Claim, player and completion are one transaction; a worker
//!   that dies mid-job rolls back and the job is claimed again. A unique constraint backs this up.
//! - **A timeout is not a failure.** [`SignupError::TimedOut`] carries the job id; the job stays
//!   and will complete; [`Signups::await_player`] waits again.
//! - **Success is read from the tables.** Payloads on either channel are untrusted hints; a forged
//!   confirmation cannot make a signup report a player that does not exist.
//! - **No ordering** between jobs is promised.
//!
//! # Use
//! - Auth side with its own users table: [`Signups::connect`] once per process; per signup, your
//!   user and [`add_job`] in one transaction of yours, then [`Signups::await_job`].
//! - Player side with its own players table: [`Worker::with_handler`] and a [`Handler`] that
//!   writes your player and returns [`Created`]; run it with [`Worker::run`].
//! - The built-in services (quick start, `make demo`): [`Signups::create_user_and_await_player`]
//!   per signup (or [`create_user`] in your transaction and [`Signups::await_player`]), and
//!   [`Worker::new`] or `ackloop worker`.
//! - Schema: [`MIGRATOR`] (or `sqlx migrate run` on `migrations/`).
//! - Operators: [`admin`], or `ackloop jobs`, `status` and `doctor`.
//!
//! # The public surface
//! The crate root holds what a service running the loop uses:
//! - auth side: [`Signups`], [`SignupsConfig`], [`add_job`], [`NewJob`], [`Confirmed`],
//!   [`SignupError`]; on the built-in tables [`Signup`], [`create_user`], [`NewUser`], [`Player`];
//!   the input rules: [`InvalidInput`], [`Field`], [`Rule`], [`MAX_EMAIL_CHARS`],
//!   [`MAX_DISPLAY_NAME_CHARS`], [`MAX_JSON_BYTES`];
//! - player side: [`Worker`], [`WorkerConfig`], [`WorkerError`], [`worker_session_options`],
//!   [`Backoff`]; the player service's own code: [`Handler`], [`Job`], [`Created`], [`JobError`],
//!   [`JobSource`], and the built-in [`InsertPlayer`];
//! - ids: [`JobId`], [`ExternalId`] (a service's own id, as text), [`InvalidExternalId`],
//!   [`MAX_EXTERNAL_ID_CHARS`], [`UserId`] and [`PlayerId`] (the built-in tables'), [`JobStatus`],
//!   [`UnknownStatus`];
//! - channels: [`Channels`], [`ChannelName`], [`DEFAULT_JOBS_CHANNEL`], [`DEFAULT_DONE_CHANNEL`],
//!   [`InvalidChannelName`], [`parse_job_id`], [`BadPayload`];
//! - connecting: [`ConnectConfig`] (libpq strings, several hosts), [`TargetSessionAttrs`],
//!   [`BadConnectionString`], [`describe_db_error`],
//!   [`is_unavailable`], [`is_refusal`];
//! - schema: [`MIGRATOR`], [`run_migrations`], [`check_schema`], [`SchemaError`];
//! - metrics: [`describe_metrics`], [`sample_queue_gauges`], and with the `http` feature
//!   `MetricsHandle` and `MetricsError`.
//!
//! And two modules:
//! - [`admin`]: operator calls, what `ackloop jobs`, `status` and `doctor` run: look jobs up,
//!   retry, repair and prune them ([`admin::job_details`], [`admin::retry_failed_job`],
//!   [`admin::repair_job`], [`admin::prune_finished_jobs`], …), [`admin::StatusReport`],
//!   [`admin::diagnose`];
//! - [`metric_names`]: the names of the metrics recorded.
//!
//! Every item has one path, but [`check_schema`] and [`SchemaError`]: a service calls them at
//! start-up, beside [`run_migrations`], and an operator finds them in [`admin`] beside
//! [`admin::diagnose`], which runs the same check.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod admin;
mod channel;
mod connect;
#[cfg(feature = "http")]
pub mod dashboard;
#[cfg(feature = "http")]
mod exporter;
mod job;
mod listen;
mod signup;
mod store;
mod telemetry;
mod worker;

pub use admin::status::sample_queue_gauges;
pub use admin::{SchemaError, check_schema};
pub use channel::{
    BadPayload, ChannelName, Channels, DEFAULT_DONE_CHANNEL, DEFAULT_JOBS_CHANNEL, InvalidChannelName,
    parse_job_id,
};
pub use connect::{BadConnectionString, ConnectConfig, TargetSessionAttrs, describe_db_error};
#[cfg(feature = "http")]
pub use exporter::{MetricsError, MetricsHandle};
pub use job::{
    ANSWER_MARGIN, Backoff, ExternalId, InvalidExternalId, JobId, JobSource, JobStatus,
    MAX_EXTERNAL_ID_CHARS, MAX_JSON_BYTES, PlayerId, UnknownStatus, UserId,
};
pub use signup::{
    Confirmed, Field, InvalidInput, MAX_DISPLAY_NAME_CHARS, MAX_EMAIL_CHARS, NewJob, NewUser, Player, Rule,
    Signup, SignupError, Signups, SignupsConfig, add_job, create_user,
};
pub use store::{is_refusal, is_unavailable};
pub use telemetry::describe_metrics;
/// The names of the metrics ackloop records.
pub mod metric_names {
    pub use crate::telemetry::{
        CALLER_TIMEOUTS, CLAIM_TO_DONE, COMMIT_TO_CLAIM, CONFIRMATIONS, CONFIRMATIONS_IGNORED,
        DONE_TO_CONFIRMED, JOBS_DONE, JOBS_FAILED, JOBS_PENDING, JOBS_RETRIED, LISTENER_RECONNECTS,
        NOTIFICATION_QUEUE_USAGE, OLDEST_PENDING, PAYLOADS_IGNORED,
    };
}
pub use worker::{
    BatchForm, Created, Handler, InsertPlayer, Job, JobError, JobResultExt, Worker, WorkerConfig,
    WorkerError, worker_session_options,
};

/// The schema migrations, embedded: `MIGRATOR.run(&pool)` applies those not yet applied.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Applies the embedded migrations that `pool`'s database does not have yet.
///
/// # Errors
/// The migrator's error: the database is unreachable, a migration failed, the database has
/// migrations this binary does not know (it is newer) or whose checksum differs, or its schema
/// was applied by another tool ([`admin::AppliedByAnotherTool`], as `MigrateError::Source`).
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
/// ackloop::run_migrations(&pool).await?;
/// # Ok(()) }
/// ```
pub async fn run_migrations(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    // sqlx knows only its own record: on a schema applied by psql it would run every file again.
    if let Some(elsewhere) = admin::schema::applied_by_another_tool(pool).await? {
        return Err(sqlx::migrate::MigrateError::Source(Box::new(elsewhere)));
    }
    // On one connection of its own, closed if a migration fails: sqlx holds its advisory lock
    // for the session and does not release it on an error, so a pooled connection would keep
    // it and the next `run_migrations` in this process would wait for ever.
    let mut conn = pool.acquire().await?;
    let result = MIGRATOR.run(&mut *conn).await;
    if result.is_err() {
        conn.close_on_drop();
    }
    result
}
