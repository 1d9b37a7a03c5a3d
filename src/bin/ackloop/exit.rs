//! The one place where an error becomes an exit code: the table `--help` prints (README's
//! table says the same), the `match` that implements it, and how a failure is reported.

use std::fmt::Write as _;
use std::process::ExitCode;

use ackloop::{SignupError, WorkerError};
use serde_json::json;

/// Printed after `--help`; kept beside [`Failure::exit_code`] so the two change together.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  unexpected database error
  2  usage error
  3  invalid input (the message names the field)
  4  email already registered, or --idempotency-key names a signup of another email or name
  5  timed out: the signup is committed and its job will still complete
  6  the job failed (the message gives the recorded error)
  7  cannot reach the database, or the connection string is malformed
  8  the schema is missing or behind: run `ackloop migrate`
  9  the schema is newer than this ackloop: upgrade ackloop
  10 doctor found something that needs attention; `jobs retry` was given a job it cannot act
     on (the message says why and what to do)
  11 the server refused the connection: wrong password, unknown user or database, no
     permission to connect, or a TLS certificate that does not verify (answered at once; an
     unreachable or restarting server is tried again until the timeout, then exit 7)
  12 no such job: no job with that id, or no signup with that email (never written,
     rolled back, or pruned)
  13 not written: the timeout ran out before the signup's turn to be written came (the
     database was answering, busy with others); nothing was committed: sign up again
  130 worker: a second SIGINT or SIGTERM stopped it at once";

/// Everything a subcommand can fail with, each mapped to one exit code in [`Failure::exit_code`].
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("invalid {which}")]
    BadUrl {
        which: &'static str,
        #[source]
        source: ackloop::BadConnectionString,
    },
    #[error("cannot connect to the database at {target}{}", unset_hint(.from_env))]
    Connect {
        target: String,
        /// Whether DATABASE_URL was unset and libpq's defaults were tried.
        from_env: bool,
        #[source]
        source: sqlx::Error,
    },
    #[error(transparent)]
    Channel(#[from] ackloop::InvalidChannelName),
    #[error(transparent)]
    Signup(#[from] SignupError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// `migrate` on a schema psql (or another tool) applied: sqlx would apply every file again.
    #[error(transparent)]
    AppliedElsewhere(ackloop::admin::AppliedByAnotherTool),
    #[error(transparent)]
    Schema(#[from] ackloop::SchemaError),
    #[error(transparent)]
    Admin(#[from] ackloop::admin::AdminError),
    #[error("doctor found {0} problem(s)")]
    Doctor(usize),
    #[error(transparent)]
    Metrics(ackloop::MetricsError),
    #[error("cannot listen on {addr}")]
    ListenAddr {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the queue")]
    Query(#[source] sqlx::Error),
    #[error("benchmark failed")]
    Bench(#[source] sqlx::Error),
    /// Bench flags that do not go together (the message says which).
    #[error("{0}")]
    BenchFlags(&'static str),
    #[error("benchmark verification failed: not every signup got exactly one player")]
    BenchVerification,
}

impl Failure {
    /// A migration's failure; the refusal to migrate a schema another tool applied is told as
    /// itself, not as a failed migration.
    pub fn from_migrate(err: sqlx::migrate::MigrateError) -> Self {
        match err {
            sqlx::migrate::MigrateError::Source(source) => {
                match source.downcast::<ackloop::admin::AppliedByAnotherTool>() {
                    Ok(elsewhere) => Self::AppliedElsewhere(*elsewhere),
                    Err(source) => Self::Migrate(sqlx::migrate::MigrateError::Source(source)),
                }
            }
            other => Self::Migrate(other),
        }
    }

    fn exit_code(&self) -> u8 {
        match self {
            // A refusal anywhere in the chain (the pool's, the listener's, the worker's).
            _ if self.database_refused() => 11,
            Self::Signup(SignupError::Invalid(_)) | Self::Channel(_) => 3,
            Self::Signup(SignupError::EmailTaken | SignupError::KeyReused(_)) => 4,
            Self::Signup(SignupError::TimedOut { .. }) => 5,
            Self::Signup(SignupError::JobFailed { .. }) => 6,
            Self::BadUrl { .. }
            | Self::Connect { .. }
            | Self::Signup(SignupError::Unavailable { .. })
            | Self::Worker(WorkerError::Listen { .. }) => 7,
            Self::Schema(ackloop::SchemaError::Missing | ackloop::SchemaError::Behind { .. })
            | Self::AppliedElsewhere(_) => 8,
            // sqlx refuses to migrate a database holding migrations it does not have.
            Self::Schema(ackloop::SchemaError::Newer { .. })
            | Self::Migrate(sqlx::migrate::MigrateError::VersionMissing(_)) => 9,
            Self::Worker(WorkerError::Config(_)) | Self::ListenAddr { .. } | Self::BenchFlags(_) => 2,
            Self::Admin(ackloop::admin::AdminError::UnknownJob(_))
            | Self::Signup(SignupError::UnknownJob(_)) => 12,
            Self::Signup(SignupError::NotWritten { .. }) => 13,
            Self::Admin(
                ackloop::admin::AdminError::AlreadyDone(_)
                | ackloop::admin::AdminError::DoneWithoutPlayer(_)
                | ackloop::admin::AdminError::StillPending(_)
                | ackloop::admin::AdminError::StillFailed(_),
            )
            | Self::Doctor(_) => 10,
            // The database went away after the connection was made: still "cannot reach".
            _ if self.database_unreachable() => 7,
            _ => 1,
        }
    }

    /// Whether a driver error in the chain of causes says the server refused the connection
    /// for good ([`ackloop::is_refusal`]).
    fn database_refused(&self) -> bool {
        self.first_driver_error().is_some_and(ackloop::is_refusal)
    }

    /// The first driver error in the chain of causes.
    fn first_driver_error(&self) -> Option<&sqlx::Error> {
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            if let Some(db_err) = cause.downcast_ref::<sqlx::Error>() {
                return Some(db_err);
            }
            source = cause.source();
        }
        None
    }

    /// Whether a driver error in the chain of causes says the database could not be reached.
    fn database_unreachable(&self) -> bool {
        self.first_driver_error().is_some_and(ackloop::is_unavailable)
    }

    /// A short machine-readable name for `--json` output.
    fn kind(&self) -> &'static str {
        if let Self::Signup(SignupError::KeyReused(_)) = self {
            return "key_reused";
        }
        if let Self::AppliedElsewhere(_) = self {
            return "schema_applied_elsewhere";
        }
        match self.exit_code() {
            3 => "invalid_input",
            4 => "email_taken",
            5 => "timed_out",
            6 => "job_failed",
            7 => "unavailable",
            8 => "schema_missing",
            9 => "schema_newer",
            10 => "attention",
            11 => "refused",
            12 => "unknown_job",
            13 => "not_written",
            _ => "error",
        }
    }

    /// The error and its chain of causes, one line. A driver error ends the chain, told in a
    /// user's words (its own text and causes carry internals such as the server's source line).
    fn message(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            if let Some(db_err) = cause.downcast_ref::<sqlx::Error>() {
                let _ = write!(message, ": {}", ackloop::describe_db_error(db_err));
                break;
            }
            // sqlx's migration errors print the driver's error (its internals included) inside
            // their own text: say which step failed, and let the driver error end the chain.
            if let Some(migrate) = cause.downcast_ref::<sqlx::migrate::MigrateError>() {
                match migrate {
                    sqlx::migrate::MigrateError::ExecuteMigration(_, version) => {
                        let _ = write!(
                            message,
                            ": migration {version} was rolled back (nothing of it is applied)"
                        );
                    }
                    sqlx::migrate::MigrateError::Execute(_) => {
                        let _ = write!(message, ": the migration that failed was rolled back");
                    }
                    other => {
                        let _ = write!(message, ": {other}");
                    }
                }
                source = cause.source();
                continue;
            }
            // Many errors already print their source in their own message; say each thing once.
            let text = cause.to_string();
            if !message.contains(&text) {
                let _ = write!(message, ": {text}");
            }
            source = cause.source();
        }
        message
    }
}

/// The exit code for a command's result. A failure is printed on stderr, as `error: <message>`
/// or, with `json_logs`, as one JSON object shaped like the log lines (so that a log pipeline
/// reading stderr parses every line); and also as one JSON object on stdout when `json` is set.
pub fn report(result: Result<(), Failure>, json: bool, json_logs: bool) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let job_id = match &failure {
                Failure::Signup(err) => err.job_id(),
                _ => None,
            };
            // doctor has printed its report, problems included.
            if json && !matches!(failure, Failure::Doctor(_)) {
                let mut object = json!({ "error": failure.kind(), "message": failure.message() });
                if let Some(job_id) = job_id {
                    object["job_id"] = json!(job_id);
                }
                println!("{object}");
            }
            if json_logs {
                eprintln!("{}", failure_log_line(&failure, job_id));
            } else {
                eprintln!("error: {}", failure.message());
            }
            ExitCode::from(failure.exit_code())
        }
    }
}

/// A failure as a JSON log line: the fields of the tracing formatter's lines (`timestamp` in
/// the same RFC 3339 form, `level`, `target`, `message`), plus what a script acts on.
fn failure_log_line(failure: &Failure, job_id: Option<ackloop::JobId>) -> serde_json::Value {
    let mut line = json!({
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "level": "ERROR",
        "message": failure.message(),
        "error.kind": failure.kind(),
        "exit_code": failure.exit_code(),
        "target": "ackloop",
    });
    if let Some(job_id) = job_id {
        line["job.id"] = json!(job_id);
    }
    line
}

fn unset_hint(from_env: &bool) -> &'static str {
    if *from_env {
        " (DATABASE_URL is not set, so libpq's PGHOST, PGUSER, ... and defaults were used)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losing_the_database_mid_command_exits_7_and_other_database_errors_1() {
        let lost = Failure::Query(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(lost.exit_code(), 7);
        assert_eq!(Failure::Bench(sqlx::Error::PoolTimedOut).exit_code(), 7);
        assert_eq!(Failure::Query(sqlx::Error::RowNotFound).exit_code(), 1);
    }
}
