//! What can go wrong with a signup, sorted so a caller can act on it: [`SignupError`], and the
//! one classifier that turns a driver error into it (a taken email is matched by constraint name).

use std::time::Duration;

use super::input::{Field, InvalidInput, Rule};
use crate::job::{JobId, UserId};
use crate::store;

/// Why a signup, or a wait for its player, did not return a player.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignupError {
    /// The input broke a rule; nothing was written.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// Another user has this email (compared without case); nothing was written.
    #[error("email already registered")]
    EmailTaken,
    /// The idempotency key (the job id the caller chose) belongs to a signup with another email
    /// or display name; nothing was written. A new signup needs a new key.
    #[error(
        "idempotency key {0} was used for a signup with another email or display name; send a new key for a new signup"
    )]
    KeyReused(JobId),
    /// The caller's timeout ran out before the signup could be written, while the database
    /// answered: more signups at once than the writers could take in that time, another
    /// session's open transaction holding the same email until then, or no time at all. Nothing
    /// was written; sign up again (with a longer timeout, or fewer signups at once). A database
    /// that cannot be reached is [`SignupError::Unavailable`].
    #[error(
        "signup not written: its timeout ran out after {waited:.1?}, before it could be written (its turn did not come, or another session held its email); nothing was committed: sign up again"
    )]
    NotWritten {
        /// How long the signup waited for its turn.
        waited: Duration,
    },
    /// The signup committed but no worker finished its job in time. Nothing is lost: the job is
    /// durable and will be completed; wait again with
    /// [`Signups::await_player`](crate::Signups::await_player).
    #[error("job {job_id} still pending after {waited:.1?}; it will complete when a worker takes it")]
    TimedOut {
        /// The pending job.
        job_id: JobId,
        /// The user, who exists already.
        user_id: Option<UserId>,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The worker gave up on the job after its last attempt.
    #[error("job {job_id} failed: {reason}")]
    JobFailed {
        /// The failed job; `ackloop status` lists it.
        job_id: JobId,
        /// The error recorded with the job.
        reason: String,
    },
    /// This user (of the auth service's own tables) has a player-creation job already; nothing
    /// was written. Wait on that job ([`Signups::await_job`](crate::Signups::await_job)).
    #[error("this user already has a player-creation job{}; wait on it instead of adding another", job_hint_of(.job_id))]
    UserHasJob {
        /// The user's job, when the database named it.
        job_id: Option<JobId>,
    },
    /// No job has this id.
    #[error("no job {0}")]
    UnknownJob(JobId),
    /// The database could not be reached. With a job id, the signup may have committed before the
    /// connection broke: look the job up (or wait on it) before signing up again.
    #[error("database unavailable{}", job_hint(.job_id))]
    Unavailable {
        /// The job that may or may not have been committed.
        job_id: Option<JobId>,
        /// What the driver reported.
        #[source]
        source: sqlx::Error,
    },
    /// Any other database error: a schema that is missing or newer, a permission, a bug.
    #[error("database error")]
    Database(#[source] sqlx::Error),
}

fn job_hint_of(job_id: &Option<JobId>) -> String {
    job_id.map_or_else(String::new, |id| format!(" (job {id})"))
}

fn job_hint(job_id: &Option<JobId>) -> String {
    job_id.map_or_else(String::new, |id| format!(" (job {id} may have been committed)"))
}

impl SignupError {
    /// The job concerned, when there is one: wait on it or look it up.
    ///
    /// ```
    /// use std::time::Duration;
    /// let job_id = ackloop::JobId::new();
    /// let err = ackloop::SignupError::TimedOut { job_id, user_id: None, waited: Duration::from_secs(5) };
    /// assert_eq!(err.job_id(), Some(job_id));
    /// assert_eq!(ackloop::SignupError::EmailTaken.job_id(), None);
    /// ```
    pub fn job_id(&self) -> Option<JobId> {
        match self {
            Self::TimedOut { job_id, .. } | Self::JobFailed { job_id, .. } => Some(*job_id),
            Self::UnknownJob(job_id) => Some(*job_id),
            Self::UserHasJob { job_id } => *job_id,
            Self::Unavailable { job_id, .. } => *job_id,
            _ => None,
        }
    }
}

/// Sorts a driver error into what a caller can act on. `job_id` is the job whose commit the error
/// leaves uncertain, if any.
pub(super) fn classify(err: sqlx::Error, job_id: Option<JobId>) -> SignupError {
    // Matched by constraint name: what the contract's functions and the tables name.
    if let Some(db_err) = err.as_database_error() {
        match (db_err.is_unique_violation(), db_err.constraint()) {
            (true, Some("builtin_users_email_key")) => return SignupError::EmailTaken,
            (true, Some("player_creation_jobs_user_id_key")) => {
                // `ackloop.add_job` names the user's job in the error's detail.
                let job_id = db_err
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .and_then(|pg| pg.detail())
                    .and_then(|detail| detail.parse().ok());
                return SignupError::UserHasJob { job_id };
            }
            (true, Some("player_creation_jobs_pkey")) => {
                if let Some(key) = job_id {
                    return SignupError::KeyReused(key);
                }
            }
            // Rust checks the extra data first; what PostgreSQL measures otherwise (it prints
            // numbers in full) is still the caller's input, refused.
            (false, Some("player_creation_jobs_extra_valid")) => {
                return SignupError::Invalid(InvalidInput {
                    field: Field::Extra,
                    rule: Rule::Json("must be at most 8192 bytes as JSON text (as PostgreSQL prints it)"),
                });
            }
            _ => {}
        }
    }
    if store::is_unavailable(&err) {
        // A request that never left the pool cannot have committed anything, nor one the server
        // refused as a write on a read-only session (25006).
        let refused = err
            .as_database_error()
            .and_then(|db_err| db_err.code())
            .is_some_and(|code| code == "25006");
        let job_id = job_id
            .filter(|_| !refused && !matches!(err, sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed));
        return SignupError::Unavailable { job_id, source: err };
    }
    SignupError::Database(err)
}
