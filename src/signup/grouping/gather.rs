//! Taking signups from the queue into a batch: everything queued at that moment, and, while
//! another writer's statement is in flight, what comes until it ends (briefly), so that a
//! process with few callers still writes several per commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio::time::Instant;

use super::statement::Attempt;
use super::turn::{LastAnswer, SharedTurn};
use crate::job::JobId;
use crate::signup::input::NewUser;

/// How long before the earliest deadline in a batch the gathering stops.
const DEADLINE_SPARE: Duration = Duration::from_millis(1);

/// A signup waiting for a writer.
pub(super) struct Queued {
    pub(super) new_user: NewUser,
    pub(super) job_id: JobId,
    /// When its caller queued it.
    pub(super) since: Instant,
    pub(super) deadline: Instant,
    pub(super) turn: Arc<SharedTurn>,
    pub(super) written: oneshot::Sender<Attempt>,
}

impl Queued {
    /// Claims the signup for writing; false if its caller withdrew it or its deadline passed.
    pub(super) fn take(&self) -> bool {
        Instant::now() < self.deadline && self.turn.take()
    }

    /// Marks a taken signup as sent, unless its caller withdrew it, or its deadline passed (then
    /// the writer withdraws it and tells its caller).
    pub(super) fn send(self, answered: &LastAnswer) -> Option<Self> {
        if Instant::now() >= self.deadline {
            if self.turn.withdraw() {
                let _ = self
                    .written
                    .send(Attempt::Unsent(answered.unsent_since(self.since)));
            }
            return None;
        }
        self.turn.send().then_some(self)
    }
}

/// The longest a writer holding fewer than a full batch waits for more while another writer's
/// statement is in flight: a process with few callers (one of several replicas) otherwise
/// writes them one or two per commit, and every commit wakes every worker process. Short
/// against any caller's deadline; no wait at all when no other statement is in flight (a lone
/// caller's signup goes at once).
const GATHER_WHILE_BUSY: Duration = Duration::from_millis(2);

/// The writers' statements in flight, and a wake-up when one ends.
#[derive(Default)]
pub(super) struct InFlight {
    statements: AtomicUsize,
    ended: Notify,
}

/// Counts a writer's statement in flight until dropped (also when its task is aborted).
pub(super) struct Writing<'a>(&'a InFlight);

impl<'a> Writing<'a> {
    pub(super) fn start(in_flight: &'a InFlight) -> Self {
        in_flight.statements.fetch_add(1, Ordering::SeqCst);
        Self(in_flight)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.statements.fetch_sub(1, Ordering::SeqCst);
        self.0.ended.notify_waiters();
    }
}

/// Takes the next batch: waits for a first signup, adds everything queued behind it (up to
/// `max_batch`), then gathers while another writer's statement is in flight; returns it counted
/// in flight until the [`Writing`] is dropped. `None` once the
/// queue is closed. Signups whose callers gave up, or whose deadline passed, are answered here
/// and left out (the batch may come back empty).
pub(super) async fn take_batch<'a>(
    receiver: &Mutex<mpsc::Receiver<Queued>>,
    answered: &LastAnswer,
    in_flight: &'a InFlight,
    max_batch: usize,
) -> Option<(Vec<Queued>, Writing<'a>)> {
    let mut receiver = receiver.lock().await;
    let first = receiver.recv().await?;
    let mut batch = Vec::with_capacity(max_batch);
    let mut next = Some(first);
    while let Some(queued) = next {
        add_unless_gone(&mut batch, queued, answered);
        if batch.len() >= max_batch {
            break;
        }
        next = receiver.try_recv().ok();
    }
    gather_while_busy(&mut receiver, &mut batch, answered, in_flight, max_batch).await;
    // Counted in flight before the queue is let go, so the next writer gathers behind it.
    let writing = Writing::start(in_flight);
    Some((batch, writing))
}

/// Adds a queued signup to the batch, or, if its caller gave up or its deadline passed, tells
/// its caller it was never written.
fn add_unless_gone(batch: &mut Vec<Queued>, queued: Queued, answered: &LastAnswer) {
    if queued.take() {
        batch.push(queued);
    } else {
        let _ = queued
            .written
            .send(Attempt::Unsent(answered.unsent_since(queued.since)));
    }
}

/// While another writer's statement is in flight and the batch has room, takes more signups as
/// they come, until a statement ends, [`GATHER_WHILE_BUSY`] has passed, or the earliest deadline
/// in the batch is a millisecond away: one commit for them instead of one each.
async fn gather_while_busy(
    receiver: &mut mpsc::Receiver<Queued>,
    batch: &mut Vec<Queued>,
    answered: &LastAnswer,
    in_flight: &InFlight,
    max_batch: usize,
) {
    let mut until = Instant::now() + GATHER_WHILE_BUSY;
    while batch.len() < max_batch {
        // Created before the count is read: `notify_waiters` wakes every `Notified` made before
        // it, so an end in between is not missed.
        let ended = in_flight.ended.notified();
        if batch.is_empty() || in_flight.statements.load(Ordering::SeqCst) == 0 {
            return;
        }
        // A signup is sent before its deadline, never held up past it.
        if let Some(earliest) = batch.iter().map(|queued| queued.deadline).min() {
            until = until.min(earliest.checked_sub(DEADLINE_SPARE).unwrap_or(earliest));
        }
        tokio::select! {
            queued = receiver.recv() => match queued {
                Some(queued) => add_unless_gone(batch, queued, answered),
                None => return,
            },
            () = ended => return,
            () = tokio::time::sleep_until(until) => return,
        }
    }
}
