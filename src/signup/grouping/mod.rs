//! Groups concurrent signups into one transaction, each within its caller's deadline.
//!
//! Every commit costs a flush of the server's log, shared only by commits that happen at the
//! same moment; a commit that has notified holds a cluster-wide lock through its flush, so those
//! never share one (docs/protocol.md, "When a wake-up is sent"). So the callers of one
//! [`Signups`](crate::Signups) hand their signups to a few writer tasks, which write whatever is
//! queued in one call (`ackloop.sign_up_many_then_notify`): one commit for many signups, then
//! their wake-ups in a transaction of their own, after the commit.
//!
//! Each signup keeps its guarantee: its user and its job commit together in one transaction or
//! not at all, and its wake-up follows the commit, never precedes it. A taken email skips only its
//! own signup. Any other error raised before the commit writes nothing; each of its callers then
//! writes its signup alone, from its own task, so one signup blocked on a lock or breaking a rule
//! holds up no writer and fails alone.
//!
//! Every step is bounded by the deadlines of the signups in it: a signup still queued at its
//! deadline is never written; a batch may wait for row locks only briefly (`lock_timeout`); a
//! statement that outlives every deadline in it (a connection that stopped answering) is given
//! up and its connection closed.
//!
//! Here: the queue, the writer tasks and a batch's steps (`write_together`). Beside it,
//! `gather.rs`: taking a batch from the queue (gathering while another statement is in flight);
//! `statement.rs`: the one-signup statement and what an attempt came to ([`Attempt`]);
//! `turn.rs`: a queued signup's turn, and how a busy moment is told from a silent database. What
//! a caller does with each attempt's answer (retrying, resolving a lost one) is `attempts/`'s.

use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

mod gather;
mod statement;
mod turn;

use self::gather::{InFlight, Queued, take_batch};
pub(crate) use self::statement::Attempt;
use self::statement::write_one;
pub(crate) use self::turn::Unsent;
use self::turn::{LastAnswer, SharedTurn, Turn};
use super::input::NewUser;
use crate::channel::Channels;
use crate::job::{ANSWER_MARGIN, JobId};
use crate::store;

/// Signups waiting for a writer, at most: past this, callers wait (within their deadlines) for
/// room instead of growing memory without bound.
const QUEUE_CAPACITY: usize = 1024;

/// The longest a shared batch waits for a row lock. Signups with unique emails take no locks
/// others hold; a wait means one signup in the batch collides with someone's open transaction,
/// so the batch gives up quickly and its signups are written alone, the blocked one waiting on
/// its own time.
///
/// Not shortened for a signup near its deadline: its caller waits for a sent statement up to
/// `ANSWER_MARGIN` past it, longer than this wait. (A wait of a millisecond fails the whole
/// batch on any lock.)
const BATCH_LOCK_WAIT: Duration = Duration::from_millis(50);

/// How long past the last deadline in it a statement may run before its connection is deemed
/// dead and closed: its callers have all been answered by then.
const STATEMENT_GRACE: Duration = Duration::from_millis(500);

/// The writer tasks of one `Signups`. Dropping it stops them.
pub(crate) struct Writers {
    pool: PgPool,
    channels: Channels,
    queue: mpsc::Sender<Queued>,
    answered: Arc<LastAnswer>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Writers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Writers {
    pub(crate) fn start(pool: PgPool, channels: Channels, writers: usize, max_batch: usize) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let receiver = Arc::new(Mutex::new(receiver));
        let answered = Arc::new(LastAnswer::new());
        let in_flight = Arc::new(InFlight::default());
        let tasks = (0..writers.max(1))
            .map(|_| {
                tokio::spawn(write_batches(
                    pool.clone(),
                    channels.clone(),
                    Arc::clone(&receiver),
                    Arc::clone(&answered),
                    Arc::clone(&in_flight),
                    max_batch.max(1),
                ))
            })
            .collect();
        Self {
            pool,
            channels,
            queue,
            answered,
            tasks,
        }
    }

    /// Writes one signup together with others queued at the same moment, by `deadline`. A
    /// signup sent by then is answered once its statement is, waiting at most [`ANSWER_MARGIN`]
    /// past the deadline. `since`: when the caller began writing this signup.
    pub(crate) async fn write(
        &self,
        new_user: &NewUser,
        job_id: JobId,
        since: Instant,
        deadline: Instant,
    ) -> Attempt {
        let turn = Arc::new(SharedTurn::new());
        let (written, mut result) = oneshot::channel();
        let queued = Queued {
            new_user: new_user.clone(),
            job_id,
            since,
            deadline,
            turn: Arc::clone(&turn),
            written,
        };
        match tokio::time::timeout_at(deadline, self.queue.send(queued)).await {
            Ok(Ok(())) => tracing::trace!(job.id = %job_id, "signup queued"),
            Ok(Err(_)) => return Attempt::NotCommitted(sqlx::Error::PoolClosed),
            Err(_) => return Attempt::Unsent(self.answered.unsent_since(since)),
        }
        match tokio::time::timeout_at(deadline, &mut result).await {
            Ok(Ok(attempt)) => return attempt,
            // The writers stopped (the handle is being dropped) before or while writing.
            Ok(Err(_)) => {
                return match turn.now() {
                    Turn::Sent => Attempt::Unknown(sqlx::Error::PoolClosed),
                    _ => Attempt::NotCommitted(sqlx::Error::PoolClosed),
                };
            }
            Err(_) => {}
        }
        if turn.withdraw() {
            return Attempt::Unsent(self.answered.unsent_since(since));
        }
        // Sent just before the deadline: its answer is usually a moment away.
        match tokio::time::timeout_at(deadline + ANSWER_MARGIN, result).await {
            Ok(Ok(attempt)) => attempt,
            Ok(Err(_)) => Attempt::Unknown(sqlx::Error::PoolClosed),
            Err(_) => Attempt::Unknown(store::no_answer_in_time()),
        }
    }

    /// Writes one signup in a transaction of its own, from the caller's task, by `deadline`:
    /// after a shared batch failed, or to try again after an outage. It may wait for a lock all
    /// the time it has left.
    pub(crate) async fn write_alone(
        &self,
        new_user: &NewUser,
        job_id: JobId,
        since: Instant,
        deadline: Instant,
    ) -> Attempt {
        let conn = match tokio::time::timeout_at(deadline, self.pool.acquire()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(err)) => return Attempt::NotCommitted(err),
            Err(_) => return Attempt::Unsent(self.answered.unsent_since(since)),
        };
        let lock_wait = deadline.saturating_duration_since(Instant::now());
        // The caller's own task waits: its answer is due by the margin, not the writers' grace.
        let give_up = deadline + ANSWER_MARGIN;
        write_one(
            conn,
            &self.channels,
            &self.answered,
            new_user,
            job_id,
            lock_wait,
            give_up,
        )
        .await
    }
}

/// One writer: take everything queued (up to `max_batch`), write it, repeat. While one writer
/// waits for its commit, the next takes what queued up meanwhile, and keeps taking, up to
/// [`GATHER_WHILE_BUSY`], until that statement ends.
async fn write_batches(
    pool: PgPool,
    channels: Channels,
    receiver: Arc<Mutex<mpsc::Receiver<Queued>>>,
    answered: Arc<LastAnswer>,
    in_flight: Arc<InFlight>,
    max_batch: usize,
) {
    loop {
        let Some((batch, _writing)) = take_batch(&receiver, &answered, &in_flight, max_batch).await else {
            return;
        };
        if !batch.is_empty() {
            write_together(&pool, &channels, &answered, batch).await;
        }
    }
}

/// Writes a batch taken from the queue as one statement, one commit for all of it, and tells
/// each caller what came of its signup.
async fn write_together(pool: &PgPool, channels: &Channels, answered: &LastAnswer, batch: Vec<Queued>) {
    let batch = set_aside_repeated_keys(batch);
    let Some((conn, batch)) = connect(pool, answered, batch).await else {
        return;
    };
    // Callers that gave up while the connection came are not sent (they answered themselves),
    // nor are signups whose deadline passed meanwhile (their callers are told so here).
    let mut batch: Vec<Queued> = batch
        .into_iter()
        .filter_map(|queued| queued.send(answered))
        .collect();
    match batch.len() {
        0 => {}
        1 => {
            let queued = batch.pop().expect("one signup");
            write_lone(conn, channels, answered, queued).await;
        }
        _ => write_many(conn, channels, answered, batch).await,
    }
}

/// The batch without the signups whose job id came earlier in it, which are sent back to be
/// written alone. A job id already in the batch is a caller's key sent twice at once: the grouped
/// statement answers by job id alone, so it would tell both that the one written is theirs,
/// whatever their email and name. Alone, `sign_up` compares them.
fn set_aside_repeated_keys(batch: Vec<Queued>) -> Vec<Queued> {
    let mut ids = std::collections::HashSet::with_capacity(batch.len());
    let (batch, repeated): (Vec<Queued>, Vec<Queued>) =
        batch.into_iter().partition(|queued| ids.insert(queued.job_id));
    for queued in repeated {
        tracing::debug!(job.id = %queued.job_id, "a job id twice in one batch; the second is written alone");
        let _ = queued.written.send(Attempt::WriteAlone);
    }
    batch
}

/// A connection for the batch, waiting at most until its latest deadline. Without one, every
/// caller in it is answered here, and `None` returned.
async fn connect(
    pool: &PgPool,
    answered: &LastAnswer,
    batch: Vec<Queued>,
) -> Option<(PoolConnection<Postgres>, Vec<Queued>)> {
    let latest = batch.iter().map(|q| q.deadline).max()?;
    match tokio::time::timeout_at(latest, pool.acquire()).await {
        Ok(Ok(conn)) => return Some((conn, batch)),
        // A refusal (a wrong password, an unknown database) will not pass by waiting: each
        // caller meets it again on a connection of its own, and is answered with the server's
        // error, its SQLSTATE kept, at once. (`sqlx::Error` cannot be cloned for every caller.)
        Ok(Err(err)) if store::is_refusal(&err) || !store::is_unavailable(&err) => {
            tracing::debug!(error = %crate::connect::Described(&err), "cannot connect; each signup tries alone");
            answer_all(batch, || Attempt::WriteAlone);
        }
        Ok(Err(err)) => {
            let message = err.to_string();
            answer_all(batch, || {
                Attempt::NotCommitted(sqlx::Error::Io(std::io::Error::other(message.clone())))
            });
        }
        // Every caller's deadline has passed, and nothing was sent.
        Err(_) => {
            for queued in batch {
                let unsent = answered.unsent_since(queued.since);
                let _ = queued.written.send(Attempt::Unsent(unsent));
            }
        }
    }
    None
}

/// Writes a batch of one signup with the single-signup statement.
async fn write_lone(
    conn: PoolConnection<Postgres>,
    channels: &Channels,
    answered: &LastAnswer,
    queued: Queued,
) {
    let attempt = match write_one(
        conn,
        channels,
        answered,
        &queued.new_user,
        queued.job_id,
        BATCH_LOCK_WAIT,
        queued.deadline + STATEMENT_GRACE,
    )
    .await
    {
        // A lone signup that met a lock writes itself again, waiting with its whole time.
        Attempt::NotCommitted(err) if store::is_lock_timeout(&err) => Attempt::WriteAlone,
        attempt => attempt,
    };
    let _ = queued.written.send(attempt);
}

/// Writes two or more signups in one statement, given up (its connection closed) past the
/// latest deadline in it.
async fn write_many(
    mut conn: PoolConnection<Postgres>,
    channels: &Channels,
    answered: &LastAnswer,
    batch: Vec<Queued>,
) {
    let Some(latest) = batch.iter().map(|q| q.deadline).max() else {
        return;
    };
    let emails: Vec<String> = batch.iter().map(|q| q.new_user.email().to_owned()).collect();
    let names: Vec<String> = batch
        .iter()
        .map(|q| q.new_user.display_name().to_owned())
        .collect();
    let job_ids: Vec<Uuid> = batch.iter().map(|q| q.job_id.as_uuid()).collect();
    let statement = store::insert_users_and_jobs(
        &mut *conn,
        &emails,
        &names,
        &job_ids,
        &channels.jobs,
        BATCH_LOCK_WAIT,
    );
    let answer = tokio::time::timeout_at(latest + STATEMENT_GRACE, statement).await;
    if let Ok(answer) = &answer {
        answered.record_if_reached(answer);
    }
    match answer {
        Ok(Ok(written)) => answer_written(batch, &written),
        // The server refused the call before its commit, so nothing was written: each caller
        // writes its own signup alone, so that whatever failed the batch fails only its signup.
        Ok(Err(err)) if store::came_before_the_commit(&err) => {
            tracing::debug!(
                error = %crate::connect::Described(&err),
                batch.size = batch.len(),
                "batch failed; each signup is written alone"
            );
            answer_all(batch, || Attempt::WriteAlone);
        }
        // The connection broke or stopped answering mid-call, or an error came that may follow
        // the commit (the session ended while the wake-ups were sent): the commit may or may not
        // have happened. Writing again could report someone's own signup as a taken email; each
        // caller resolves its signup by its job id.
        Ok(Err(err)) => {
            let message = err.to_string();
            answer_all(batch, || {
                Attempt::Unknown(sqlx::Error::Io(std::io::Error::other(message.clone())))
            });
        }
        Err(_) => {
            conn.close_on_drop();
            answer_all(batch, || {
                Attempt::Unknown(sqlx::Error::Io(std::io::ErrorKind::TimedOut.into()))
            });
        }
    }
}

/// Tells each caller of a committed batch its user, or that its email was taken (the statement
/// skips a taken email, writing the others).
fn answer_written(batch: Vec<Queued>, written: &[store::WrittenSignup]) {
    tracing::debug!(
        batch.size = batch.len(),
        written = written.len(),
        "signups written"
    );
    for queued in batch {
        let attempt = written
            .iter()
            .find(|w| w.job_id == queued.job_id)
            .map_or(Attempt::EmailTaken, |w| Attempt::Written(w.user_id));
        let _ = queued.written.send(attempt);
    }
}

/// Gives every caller in `batch` the same answer (`sqlx::Error` cannot be cloned, so each gets
/// its own, made by `attempt`).
fn answer_all(batch: Vec<Queued>, attempt: impl Fn() -> Attempt) {
    for queued in batch {
        let _ = queued.written.send(attempt());
    }
}
