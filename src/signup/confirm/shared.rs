//! What the confirmation tasks and the waiters share: the waiters by job id, the count of
//! moments when confirmations may have been lost, the markers in flight; and how a job's row
//! reads as an outcome.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use crate::job::{JobId, JobStatus};
use crate::signup::input::Confirmed;
use crate::store::JobOutcomeRow;
use crate::telemetry;

/// How a finished job ended, as the tables say.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Done(Confirmed),
    Failed(String),
}

/// What a look at the tables found.
#[derive(Debug)]
pub(crate) enum Checked {
    Finished(Outcome),
    Pending,
    /// No job has this id.
    Missing,
}

type Senders = Vec<(u64, oneshot::Sender<Outcome>)>;

/// A waiter's last look, at its deadline.
pub(super) struct FinalLook {
    pub(super) job_id: JobId,
    /// [`Shared::losses`] when the waiter was registered: a marker answers for it only if no
    /// confirmation may have been lost since.
    pub(super) losses_then: u64,
    /// When the waiter stops waiting for the answer.
    pub(super) by: Instant,
    pub(super) answer: oneshot::Sender<Checked>,
}

pub(super) struct Shared {
    pub(super) pool: PgPool,
    /// Whether confirmations come by LISTEN (and markers can be sent), or only by polling.
    pub(super) listening: bool,
    /// Callers waiting, by job id; a job may have several (a signup and an `await` on it).
    waiters: Mutex<HashMap<JobId, Senders>>,
    next_token: AtomicU64,
    /// How many times confirmations may have been lost: the listener reconnected (what was sent
    /// meanwhile is gone), or the resolver could not read the jobs it was told of.
    losses: AtomicU64,
    /// Markers this process sent on the done channel, by payload, each answered once the
    /// resolver has handled every confirmation that arrived before it.
    markers: Mutex<HashMap<JobId, oneshot::Sender<()>>>,
    /// Waiters whose deadline came without a confirmation, for their last look.
    pub(super) final_looks: mpsc::UnboundedSender<FinalLook>,
}

/// Locks a map. A panic while holding one cannot leave it half-updated (every change is one
/// call), so a poisoned lock is still safe to use.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub(super) fn new(pool: PgPool, listening: bool, final_looks: mpsc::UnboundedSender<FinalLook>) -> Self {
        Self {
            pool,
            listening,
            waiters: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(0),
            losses: AtomicU64::new(0),
            markers: Mutex::new(HashMap::new()),
            final_looks,
        }
    }

    /// Registers a waiter for `job_id`: its token (to unregister it) and its receiver.
    pub(super) fn add_waiter(&self, job_id: JobId) -> (u64, oneshot::Receiver<Outcome>) {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        lock(&self.waiters)
            .entry(job_id)
            .or_default()
            .push((token, sender));
        (token, receiver)
    }

    pub(super) fn remove_waiter(&self, job_id: JobId, token: u64) {
        let mut waiters = lock(&self.waiters);
        if let Some(senders) = waiters.get_mut(&job_id) {
            senders.retain(|(t, _)| *t != token);
            if senders.is_empty() {
                waiters.remove(&job_id);
            }
        }
    }

    pub(super) fn is_waited(&self, job_id: &JobId) -> bool {
        lock(&self.waiters).contains_key(job_id)
    }

    pub(super) fn waited_ids(&self) -> Vec<Uuid> {
        lock(&self.waiters).keys().map(JobId::as_uuid).collect()
    }

    /// Hands `outcome` to every caller waiting for `job_id`; whether there was one.
    pub(super) fn deliver(&self, job_id: JobId, outcome: &Outcome) -> bool {
        let senders = lock(&self.waiters).remove(&job_id).unwrap_or_default();
        let delivered = !senders.is_empty();
        for (_, sender) in senders {
            // The caller may have given up a moment ago; nothing is lost, the row stays.
            let _ = sender.send(outcome.clone());
        }
        delivered
    }

    pub(super) fn losses(&self) -> u64 {
        self.losses.load(Ordering::Acquire)
    }

    /// Confirmations may have been lost from here on: waiters registered before now get a look
    /// at the tables at their deadline, not a marker's word.
    pub(super) fn note_loss(&self) {
        self.losses.fetch_add(1, Ordering::AcqRel);
    }

    /// A new marker to send on the done channel, and what its return answers.
    pub(super) fn new_marker(&self) -> (JobId, oneshot::Receiver<()>) {
        let marker = JobId::new();
        let (sender, receiver) = oneshot::channel();
        lock(&self.markers).insert(marker, sender);
        (marker, receiver)
    }

    /// The marker `payload` names, if it is one of this process's.
    pub(super) fn take_marker(&self, payload: &JobId) -> Option<oneshot::Sender<()>> {
        lock(&self.markers).remove(payload)
    }

    pub(super) fn forget_marker(&self, marker: &JobId) {
        lock(&self.markers).remove(marker);
    }
}

/// Counts a caller confirmed `via` a notification or a look at the tables, and how long after the
/// job finished.
pub(super) fn count_confirmation(via: &'static str, row: &JobOutcomeRow) {
    ::metrics::counter!(telemetry::CONFIRMATIONS, "via" => via).increment(1);
    if let Some(secs) = row.since_done_secs {
        ::metrics::histogram!(telemetry::DONE_TO_CONFIRMED).record(secs.max(0.0));
    }
}

/// The outcome of a finished job, or `None` while it is pending.
pub(super) fn outcome_of(row: &JobOutcomeRow) -> Option<Outcome> {
    match row.status() {
        Ok(JobStatus::Pending | JobStatus::Running) => None,
        Ok(JobStatus::Done) => Some(match (&row.player_id, &row.result) {
            (Some(player_id), Some(result)) => Outcome::Done(Confirmed {
                job_id: row.id,
                user_id: row.user_id.clone(),
                player_id: player_id.clone(),
                result: result.clone(),
            }),
            // The table's checks make this impossible; said plainly should they be dropped.
            _ => Outcome::Failed("the job is done but has no answer from its player service".to_owned()),
        }),
        Ok(JobStatus::Failed) => Some(Outcome::Failed(
            row.last_error
                .clone()
                .unwrap_or_else(|| "no error recorded".to_owned()),
        )),
        Err(err) => {
            tracing::warn!(job.id = %row.id, error = %err, "job has a status this version does not know");
            None
        }
    }
}
