//! One signup's attempts at being written, until its caller's deadline: tried again while the
//! database is away (a restart, a failover), resolved by its job id when an answer is lost, and
//! answered with the signup itself when its idempotency key is sent again. How signups queued at
//! the same moment share one commit is `grouping/`'s.

use std::time::Duration;

use sqlx::PgPool;
use tokio::time::Instant;

use super::error::{SignupError, classify};
use super::grouping::{self, Writers};
use super::input::NewUser;
use crate::job::{JobId, UserId};
use crate::store;

/// Whose job id a signup has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Key {
    /// A new one: no earlier signup can have it.
    None,
    /// The caller's idempotency key: an earlier call may have written this very signup.
    Caller,
}

/// When the signup a write returned was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Written {
    /// By this call (perhaps by an attempt whose answer was lost): its waiter, registered before
    /// the write, receives the confirmation.
    Now,
    /// Perhaps by an earlier call with the same key: its job may have finished before this call's
    /// waiter was registered.
    Earlier,
}

/// Waits between attempts to write a signup while the database is away: quick at first (a
/// restarted server is back within a second), never past the caller's deadline.
const WRITE_RETRY_BACKOFF: crate::job::Backoff = crate::job::Backoff {
    base: Duration::from_millis(50),
    max: Duration::from_secs(1),
};

/// The answer to a signup whose deadline came before it was sent (`unsent`), after this call
/// met the database away (`unreachable`, its last error) or not, and, after an attempt whose fate
/// was unknown, perhaps committed (`uncertain_job`).
fn unsent(
    unsent: grouping::Unsent,
    unreachable: Option<sqlx::Error>,
    uncertain_job: Option<JobId>,
    waited: Duration,
) -> SignupError {
    match (unsent, unreachable, uncertain_job) {
        // The database was fine and busy: not an outage, and certainly nothing written.
        (grouping::Unsent::Busy, None, None) => SignupError::NotWritten { waited },
        (_, unreachable, job_id) => SignupError::Unavailable {
            job_id,
            source: unreachable.unwrap_or_else(store::no_answer_in_time),
        },
    }
}

/// Writes the signup by `deadline`, trying again while the database is away (a restart, a
/// failover) and resolving by its job id any attempt whose fate the connection took with it,
/// so a signup is never written twice nor refused as a taken email because of itself.
pub(super) async fn write(
    writers: &Writers,
    pool: &PgPool,
    new_user: &NewUser,
    job_id: JobId,
    key: Key,
    deadline: Instant,
) -> Result<(UserId, Written), SignupError> {
    let started = Instant::now();
    // No time at all (a zero timeout): nothing is sent.
    if started >= deadline {
        return Err(SignupError::NotWritten {
            waited: Duration::ZERO,
        });
    }
    // The last error that said the database could not be reached, while retrying.
    let mut unreachable: Option<sqlx::Error> = None;
    // An attempt whose fate is unknown, still to be resolved by the job id.
    let mut maybe_committed: Option<sqlx::Error> = None;
    // Whether any attempt's fate was ever unknown: it may have committed, so every answer keeps
    // the job id.
    let mut was_uncertain = false;
    let mut alone = false;
    let mut failures = 0;
    loop {
        let attempt = if let Some(err) = maybe_committed.take() {
            match Box::pin(committed_user(pool, job_id, deadline)).await {
                Ok(Some(user_id)) => return Ok((user_id, Written::Now)),
                // Not there now: write it again, alone. The lost statement may still commit
                // later (the server can run it after its client has gone); then `sign_up`,
                // finding the email taken by this very job id, returns that signup, so it is
                // neither doubled nor refused.
                Ok(None) => grouping::Attempt::NotCommitted(err),
                Err(lookup) => grouping::Attempt::Unknown(lookup),
            }
        } else if alone {
            Box::pin(writers.write_alone(new_user, job_id, started, deadline)).await
        } else {
            writers.write(new_user, job_id, started, deadline).await
        };
        // Once an attempt's fate was unknown, it may yet commit (the server can run a
        // statement after its client has gone): every answer then keeps the job id.
        let uncertain_job = was_uncertain.then_some(job_id);
        let retry_after = match attempt {
            grouping::Attempt::Written(user_id) => return Ok((user_id, Written::Now)),
            // Only a caller's key can name a signup that an earlier call wrote.
            grouping::Attempt::Found(user_id) if key == Key::Caller => {
                return Ok((user_id, Written::Earlier));
            }
            grouping::Attempt::Found(user_id) => return Ok((user_id, Written::Now)),
            // A batch skips a taken email without asking whose it is; alone, `sign_up` tells
            // this signup's own earlier write from someone else's.
            grouping::Attempt::EmailTaken if key == Key::Caller && !alone => {
                alone = true;
                continue;
            }
            grouping::Attempt::KeyReused => return Err(SignupError::KeyReused(job_id)),
            // Written alone after an attempt whose fate was unknown, `sign_up` has already told
            // a taken email from this signup's own earlier write (by the job id).
            grouping::Attempt::EmailTaken => return Err(SignupError::EmailTaken),
            grouping::Attempt::WriteAlone => {
                alone = true;
                continue;
            }
            grouping::Attempt::Unsent(reason) => {
                return Err(unsent(reason, unreachable, uncertain_job, started.elapsed()));
            }
            // What waiting cannot change (a statement the server refused, or a connection it
            // refuses for good) is answered at once.
            // A lock wait given up, or a conflict the server rolled back (40001, 40P01: under
            // a serializable default isolation, say), is written again alone until the deadline.
            grouping::Attempt::NotCommitted(err)
                if store::is_refusal(&err)
                    || !(store::is_unavailable(&err)
                        || store::is_lock_timeout(&err)
                        || store::is_transaction_conflict(&err)) =>
            {
                return Err(classify(err, uncertain_job));
            }
            grouping::Attempt::NotCommitted(err) => {
                alone = true;
                err
            }
            grouping::Attempt::Unknown(err) => {
                alone = true;
                was_uncertain = true;
                failures += 1;
                if key == Key::None {
                    // Look the job id up at once if there is time (the look backs off if it
                    // fails). A caller's key may be someone else's job, so a keyed signup is
                    // resolved by writing it again alone, where `sign_up` compares email and
                    // name: a write, which backs off as any write does.
                    maybe_committed = Some(err);
                    if Instant::now() < deadline {
                        continue;
                    }
                    return Err(SignupError::Unavailable {
                        job_id: Some(job_id),
                        source: maybe_committed.take().expect("just set"),
                    });
                }
                let delay = WRITE_RETRY_BACKOFF.delay(failures);
                if Instant::now() + delay >= deadline {
                    return Err(SignupError::Unavailable {
                        job_id: Some(job_id),
                        source: err,
                    });
                }
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        failures += 1;
        let delay = WRITE_RETRY_BACKOFF.delay(failures);
        if Instant::now() + delay >= deadline {
            // Out of time. Certainly not written, and the database answered (a lock held on the
            // email, a conflict it rolled back): not an outage.
            let reached = !store::is_unavailable(&retry_after) && unreachable.is_none();
            return Err(match uncertain_job {
                None if reached => SignupError::NotWritten {
                    waited: started.elapsed(),
                },
                job_id => SignupError::Unavailable {
                    job_id,
                    source: retry_after,
                },
            });
        }
        tracing::debug!(
            job.id = %job_id,
            error = %crate::connect::Described(&retry_after),
            retry_in_ms = delay.as_millis() as u64,
            "signup not written; retrying"
        );
        if store::is_unavailable(&retry_after) {
            unreachable = Some(retry_after);
        }
        tokio::time::sleep(delay).await;
    }
}

/// The user of `job_id` if its signup committed; `None` if it certainly did not.
async fn committed_user(
    pool: &PgPool,
    job_id: JobId,
    deadline: Instant,
) -> Result<Option<UserId>, sqlx::Error> {
    let mut failures = 0;
    loop {
        let ids = [job_id.as_uuid()];
        let err = match store::job_outcomes_by(pool, &ids, store::Outcomes::All, deadline).await {
            // A job of the built-in tables: its user is a built-in user's id.
            Ok(rows) => {
                return Ok(rows
                    .first()
                    .and_then(|row| row.user_id.to_i64())
                    .map(UserId::from));
            }
            Err(err) => err,
        };
        failures += 1;
        let delay = WRITE_RETRY_BACKOFF.delay(failures);
        if Instant::now() + delay >= deadline {
            return Err(err);
        }
        tokio::time::sleep(delay).await;
    }
}
