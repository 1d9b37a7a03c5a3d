//! One statement's answer for each signup in it ([`Attempt`]), and the statement that writes a
//! single signup in its own transaction: a batch of one, or a caller's signup written alone.

use std::time::Duration;

use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use tokio::time::Instant;

use super::turn::{LastAnswer, Unsent};
use crate::channel::Channels;
use crate::job::{JobId, UserId};
use crate::signup::input::NewUser;
use crate::store;

/// What one attempt at writing a signup came to.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// Committed: the user exists and the job will be done.
    Written(UserId),
    /// Written by `sign_up`, which answers a job id sent again (with the same email and display
    /// name) with the signup written before: committed now, or earlier.
    Found(UserId),
    /// The email belongs to someone (maybe to this very signup, if an earlier attempt's fate was
    /// unknown, or if its job id is a key sent again: the caller checks).
    EmailTaken,
    /// The job id belongs to a signup with another email or display name.
    KeyReused,
    /// The statement failed in a batch for a reason that may be one signup's: write it alone.
    WriteAlone,
    /// Certainly not committed (the server answered with an error, or nothing was sent): the
    /// caller may try again while it has time.
    NotCommitted(sqlx::Error),
    /// The statement was sent and its answer never came: it may have committed.
    Unknown(sqlx::Error),
    /// The deadline passed before the signup was sent: it will never be written.
    Unsent(Unsent),
}

/// Writes one signup on `conn` in its own transaction, waiting at most `lock_wait` for row locks
/// and giving the statement up (closing its connection) at `give_up`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn write_one(
    mut conn: PoolConnection<Postgres>,
    channels: &Channels,
    answered: &LastAnswer,
    new_user: &NewUser,
    job_id: JobId,
    lock_wait: Duration,
    give_up: Instant,
) -> Attempt {
    let statement = store::write_user_and_job(
        &mut *conn,
        new_user.email(),
        new_user.display_name(),
        job_id,
        &channels.jobs,
        lock_wait,
    );
    let answer = tokio::time::timeout_at(give_up, statement).await;
    if let Ok(answer) = &answer {
        answered.record_if_reached(answer);
    }
    match answer {
        Ok(Ok(user_id)) => Attempt::Found(user_id),
        Ok(Err(err)) => attempt_failed(err),
        Err(_) => {
            conn.close_on_drop();
            Attempt::Unknown(sqlx::Error::Io(std::io::ErrorKind::TimedOut.into()))
        }
    }
}

/// Sorts a failed statement: only a server's error that comes before the commit
/// ([`store::came_before_the_commit`]) means its write did not commit.
fn attempt_failed(err: sqlx::Error) -> Attempt {
    match &err {
        sqlx::Error::Database(db_err)
            if db_err.is_unique_violation() && db_err.constraint() == Some("builtin_users_email_key") =>
        {
            Attempt::EmailTaken
        }
        sqlx::Error::Database(db_err)
            if db_err.is_unique_violation() && db_err.constraint() == Some("player_creation_jobs_pkey") =>
        {
            Attempt::KeyReused
        }
        sqlx::Error::Database(_) if store::came_before_the_commit(&err) => Attempt::NotCommitted(err),
        // Anything else may have struck the wake-up after the commit (the session ended, a
        // cancel): the signup may be written.
        _ => Attempt::Unknown(err),
    }
}
