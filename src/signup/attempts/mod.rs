//! One signup's attempts at being written, until its caller's deadline: tried again while the
//! database is away (a restart, a failover), resolved by its job id when an answer is lost, and
//! answered with the signup itself when its idempotency key is sent again. How signups queued at
//! the same moment share one commit is `grouping/`'s.

use std::time::Duration;

use sqlx::PgPool;
use tokio::time::Instant;

use super::error::{SignupError, classify};
use super::grouping::{Attempt, Unsent, Writers};
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
    let writing = Writing {
        writers,
        pool,
        new_user,
        job_id,
        started,
        deadline,
    };
    let mut attempts = Attempts::new(job_id, key, started, deadline);
    let mut step = Step::Grouped;
    loop {
        let then = match step {
            Step::Grouped => attempts.after_grouped(writing.grouped().await),
            Step::Alone => attempts.after(writing.alone().await),
            Step::Resolving(lost) => match writing.resolve(lost).await {
                Ok(attempt) => attempts.after(attempt),
                Err(lookup) => attempts.lookup_failed(lookup),
            },
        };
        step = match then {
            Then::Answer(answer) => return answer,
            Then::Attempt(next) => next,
            Then::Wait(delay, next) => {
                tokio::time::sleep(delay).await;
                next
            }
        };
    }
}

/// Where a signup's write stands: the attempt it makes next. It starts `Grouped` and, once it
/// leaves, never returns: every later attempt is the caller's own.
#[derive(Debug)]
enum Step {
    /// Queued for the writer tasks, to share a commit with the signups queued beside it.
    Grouped,
    /// Written in a transaction of its own, from the caller's task, where `sign_up` tells this
    /// signup's own earlier write (by its job id) from someone else's, and may wait for a lock
    /// all the time left.
    Alone,
    /// An attempt's answer was lost (this error): its job id is looked up before anything is
    /// written again. Only for a new job id: a caller's key may be someone else's job.
    Resolving(sqlx::Error),
}

/// What follows an attempt.
#[derive(Debug)]
enum Then {
    /// The caller's answer.
    Answer(Result<(UserId, Written), SignupError>),
    /// The next attempt, at once.
    Attempt(Step),
    /// The next attempt, after a wait.
    Wait(Duration, Step),
}

/// Whether some attempt may have committed unseen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Every attempt so far was answered, or never sent.
    Known,
    /// An attempt was sent and its answer lost. It may yet commit (the server can run a statement
    /// after its client has gone): every answer from then on keeps the job id.
    Uncertain,
}

impl Fate {
    /// The job an answer names as perhaps committed.
    fn job_id(self, job_id: JobId) -> Option<JobId> {
        match self {
            Self::Known => None,
            Self::Uncertain => Some(job_id),
        }
    }
}

/// What the retries have seen of the database.
#[derive(Debug)]
enum Reach {
    /// No retry met it away (it answered, if only with errors).
    Answering,
    /// A retry met it away: the last error that said it could not be reached.
    Away(sqlx::Error),
}

/// What makes a signup's attempts: the writer tasks, the pool, the signup and its time.
struct Writing<'a> {
    writers: &'a Writers,
    pool: &'a PgPool,
    new_user: &'a NewUser,
    job_id: JobId,
    started: Instant,
    deadline: Instant,
}

impl Writing<'_> {
    /// Hands the signup to the writer tasks, to be written with others queued at the moment.
    async fn grouped(&self) -> Attempt {
        self.writers
            .write(self.new_user, self.job_id, self.started, self.deadline)
            .await
    }

    /// Writes the signup in a transaction of its own.
    async fn alone(&self) -> Attempt {
        let write = self
            .writers
            .write_alone(self.new_user, self.job_id, self.started, self.deadline);
        Box::pin(write).await
    }

    /// Looks up whether the attempt whose answer was `lost` committed after all. An error: the
    /// lookups failed until the deadline.
    async fn resolve(&self, lost: sqlx::Error) -> Result<Attempt, sqlx::Error> {
        Ok(
            match Box::pin(committed_user(self.pool, self.job_id, self.deadline)).await? {
                Some(user_id) => Attempt::Written(user_id),
                // Not there now: write it again, alone. The lost statement may still commit later
                // (the server can run it after its client has gone); then `sign_up`, finding the
                // email taken by this very job id, returns that signup, so it is neither doubled nor
                // refused.
                None => Attempt::NotCommitted(lost),
            },
        )
    }
}

/// One signup's attempts so far, and what they learned: each transition takes an attempt's
/// result to the caller's answer or to the next step.
#[derive(Debug)]
struct Attempts {
    job_id: JobId,
    key: Key,
    started: Instant,
    deadline: Instant,
    fate: Fate,
    reach: Reach,
    /// Failed attempts, which set the wait before the next.
    failures: u32,
}

impl Attempts {
    fn new(job_id: JobId, key: Key, started: Instant, deadline: Instant) -> Self {
        Self {
            job_id,
            key,
            started,
            deadline,
            fate: Fate::Known,
            reach: Reach::Answering,
            failures: 0,
        }
    }

    /// After an attempt in a group.
    fn after_grouped(&mut self, attempt: Attempt) -> Then {
        match (self.key, attempt) {
            // A batch skips a taken email without asking whose it is; alone, `sign_up` tells
            // this signup's own earlier write (under the caller's key) from someone else's.
            (Key::Caller, Attempt::EmailTaken) => Then::Attempt(Step::Alone),
            (_, attempt) => self.after(attempt),
        }
    }

    /// After any attempt (a grouped one's taken email under a caller's key aside).
    fn after(&mut self, attempt: Attempt) -> Then {
        match attempt {
            Attempt::Written(user_id) => Then::Answer(Ok((user_id, Written::Now))),
            Attempt::Found(user_id) => Then::Answer(Ok((user_id, self.key.written_when_found()))),
            Attempt::KeyReused => Then::Answer(Err(SignupError::KeyReused(self.job_id))),
            // Written alone after an attempt whose fate was unknown, `sign_up` has already told
            // a taken email from this signup's own earlier write (by the job id).
            Attempt::EmailTaken => Then::Answer(Err(SignupError::EmailTaken)),
            Attempt::WriteAlone => Then::Attempt(Step::Alone),
            Attempt::Unsent(reason) => Then::Answer(Err(self.unsent(reason))),
            Attempt::NotCommitted(err) if !worth_retrying(&err) => {
                Then::Answer(Err(classify(err, self.fate.job_id(self.job_id))))
            }
            Attempt::NotCommitted(err) => self.retry_alone(err),
            Attempt::Unknown(err) => self.answer_lost(err),
        }
    }

    /// Certainly not committed, and worth trying again: written again alone after a backoff,
    /// or, out of time, answered.
    fn retry_alone(&mut self, err: sqlx::Error) -> Then {
        self.failures += 1;
        let delay = WRITE_RETRY_BACKOFF.delay(self.failures);
        if Instant::now() + delay >= self.deadline {
            return Then::Answer(Err(self.out_of_time(err)));
        }
        tracing::debug!(
            job.id = %self.job_id,
            error = %crate::connect::Described(&err),
            retry_in_ms = delay.as_millis() as u64,
            "signup not written; retrying"
        );
        if store::is_unavailable(&err) {
            self.reach = Reach::Away(err);
        }
        Then::Wait(delay, Step::Alone)
    }

    /// An attempt sent and never answered: it may have committed. A new job id is looked up at
    /// once if there is time (the look backs off if it fails). A caller's key may be someone
    /// else's job, so a keyed signup is resolved by writing it again alone, where `sign_up`
    /// compares email and name: a write, which backs off as any write does.
    fn answer_lost(&mut self, err: sqlx::Error) -> Then {
        self.fate = Fate::Uncertain;
        self.failures += 1;
        let job_id = Some(self.job_id);
        let given_up = |source| Then::Answer(Err(SignupError::Unavailable { job_id, source }));
        match self.key {
            Key::None if Instant::now() < self.deadline => Then::Attempt(Step::Resolving(err)),
            Key::None => given_up(err),
            Key::Caller => {
                let delay = WRITE_RETRY_BACKOFF.delay(self.failures);
                if Instant::now() + delay >= self.deadline {
                    return given_up(err);
                }
                Then::Wait(delay, Step::Alone)
            }
        }
    }

    /// The lookups of a lost answer failed, backing off, until the deadline: the signup may have
    /// committed (its job id goes with the answer).
    fn lookup_failed(&mut self, lookup: sqlx::Error) -> Then {
        self.fate = Fate::Uncertain;
        Then::Answer(Err(SignupError::Unavailable {
            job_id: Some(self.job_id),
            source: lookup,
        }))
    }

    /// The answer to a signup out of time before its next attempt, after `last` certainly did
    /// not commit.
    fn out_of_time(&self, last: sqlx::Error) -> SignupError {
        // Certainly not written, and the database answered (a lock held on the email, a conflict
        // it rolled back): not an outage.
        let reached = !store::is_unavailable(&last) && matches!(self.reach, Reach::Answering);
        match self.fate.job_id(self.job_id) {
            None if reached => SignupError::NotWritten {
                waited: self.started.elapsed(),
            },
            job_id => SignupError::Unavailable { job_id, source: last },
        }
    }

    /// The answer to a signup whose deadline came before it was sent, for the reason given. It is
    /// the last answer, so it takes the error that said the database was away.
    fn unsent(&mut self, unsent: Unsent) -> SignupError {
        let reach = std::mem::replace(&mut self.reach, Reach::Answering);
        match (unsent, reach, self.fate.job_id(self.job_id)) {
            // The database was fine and busy: not an outage, and certainly nothing written.
            (Unsent::Busy, Reach::Answering, None) => SignupError::NotWritten {
                waited: self.started.elapsed(),
            },
            (_, reach, job_id) => SignupError::Unavailable {
                job_id,
                source: match reach {
                    Reach::Away(err) => err,
                    Reach::Answering => store::no_answer_in_time(),
                },
            },
        }
    }
}

impl Key {
    /// When a signup that `sign_up` found already written under this job id was written. Only a
    /// caller's key can name a signup that an earlier call wrote.
    fn written_when_found(self) -> Written {
        match self {
            Self::None => Written::Now,
            Self::Caller => Written::Earlier,
        }
    }
}

/// Whether a statement that certainly did not commit may succeed if written again before the
/// deadline: the database away, a lock wait given up, or a conflict the server rolled back
/// (40001, 40P01: under a serializable default isolation, say). What waiting cannot change (a
/// statement the server refused, or a connection it refuses for good) is answered at once.
fn worth_retrying(err: &sqlx::Error) -> bool {
    !store::is_refusal(err)
        && (store::is_unavailable(err) || store::is_lock_timeout(err) || store::is_transaction_conflict(err))
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
        // Backing off, and closer together as the deadline nears, so the last look comes just
        // before it: an unanswered signup may have committed, and its caller would rather know.
        let left = deadline.saturating_duration_since(Instant::now());
        if left < LAST_LOOK {
            return Err(err);
        }
        tokio::time::sleep(WRITE_RETRY_BACKOFF.delay(failures).min(left / 2)).await;
    }
}

/// Too little time left for another look at a lost answer's job.
const LAST_LOOK: Duration = Duration::from_millis(5);

#[cfg(test)]
mod tests;
