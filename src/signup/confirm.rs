//! Confirmations: one LISTEN connection per process on the done channel, routing finished jobs
//! to the callers waiting for them.
//!
//! A notification only says "look at job X". The outcome handed to a caller is always read from
//! the tables, so a forged or early notification cannot make a signup report success. A reader
//! task only forwards ids; a resolver task confirms everything forwarded meanwhile with one
//! query, so under load one query confirms a whole burst.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use super::input::Confirmed;
use crate::channel::{ChannelName, IgnoredPayloads, parse_job_id};
use crate::job::{JobId, JobStatus};
use crate::listen::{Event, ListenTarget, Subscription};
use crate::store::{self, JobOutcomeRow};
use crate::telemetry;

/// Where confirmations come from.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// LISTEN on the done channel, through a connection of its own to this target.
    Listen(Box<ListenTarget>),
    /// No LISTEN (a pooler that cannot carry it): look at every waiter's job at this interval.
    Poll(std::time::Duration),
}

/// How a finished job ended, as the tables say.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Done(Confirmed),
    Failed(String),
}

/// What a final look at the tables found.
#[derive(Debug)]
pub(crate) enum Checked {
    Finished(Outcome),
    Pending,
    /// No job has this id.
    Missing,
}

type Senders = Vec<(u64, oneshot::Sender<Outcome>)>;

/// How long past its deadline a wait may take for its last look at the tables: the bound on how
/// late a caller is answered, whatever the database does.
pub(crate) const FINAL_CHECK_MARGIN: std::time::Duration = std::time::Duration::from_millis(100);

/// How often every waiting caller's job is looked up in the tables, notifications or not: the
/// most a silently dead listener (a connection that stopped answering without closing) costs a
/// caller before the listener's own liveness check replaces it.
const RECHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest one look at the waiters' jobs may take before the resolver gives up on it (the
/// next tick tries again).
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

struct Shared {
    pool: PgPool,
    /// Callers waiting, by job id; a job may have several (a signup and an `await` on it).
    waiters: Mutex<HashMap<JobId, Senders>>,
    next_token: AtomicU64,
}

/// The process's confirmation router. Dropping it stops its tasks.
pub(crate) struct Confirmations {
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    resolver: JoinHandle<()>,
    rechecker: Option<JoinHandle<()>>,
}

impl Drop for Confirmations {
    fn drop(&mut self) {
        self.reader.abort();
        self.resolver.abort();
        if let Some(rechecker) = &self.rechecker {
            rechecker.abort();
        }
    }
}

impl Confirmations {
    /// Connects the listener and returns once it is listening, so that a job committed after this
    /// returns is confirmed by notification.
    pub(crate) async fn start(
        pool: PgPool,
        channel: ChannelName,
        source: Source,
    ) -> Result<Self, sqlx::Error> {
        let shared = Arc::new(Shared {
            pool,
            waiters: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(0),
        });
        let (hints, hinted) = mpsc::unbounded_channel();
        let span = tracing::info_span!("listener", channel = %channel);
        let (reader, rechecker) = match source {
            Source::Listen(listen_options) => {
                // A server down or restarting while the service starts is no error: the reader keeps
                // trying, and the table checks find whatever it missed.
                let subscription = Subscription::connect_or_later(*listen_options, channel).await?;
                let rechecker = tokio::spawn(tick(RECHECK_INTERVAL, hints.clone()));
                let reader = tokio::spawn(read(subscription, hints).instrument(span.clone()));
                (reader, Some(rechecker))
            }
            Source::Poll(interval) => (tokio::spawn(tick(interval, hints)), None),
        };
        let resolver = tokio::spawn(resolve(Arc::clone(&shared), hinted).instrument(span));
        Ok(Self {
            shared,
            reader,
            resolver,
            rechecker,
        })
    }

    /// Starts waiting for `job_id`. Register before the job can commit (or check the tables after
    /// registering, see [`Waiter::check`]), so that its confirmation cannot slip by unseen.
    pub(crate) fn register(&self, job_id: JobId) -> Waiter {
        let token = self.shared.next_token.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.shared
            .lock_waiters()
            .entry(job_id)
            .or_default()
            .push((token, sender));
        Waiter {
            job_id,
            token,
            receiver,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// One caller's wait for one job. Dropping it (a cancelled caller) unregisters it.
pub(crate) struct Waiter {
    job_id: JobId,
    token: u64,
    receiver: oneshot::Receiver<Outcome>,
    shared: Arc<Shared>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiters = self.shared.lock_waiters();
        if let Some(senders) = waiters.get_mut(&self.job_id) {
            senders.retain(|(token, _)| *token != self.token);
            if senders.is_empty() {
                waiters.remove(&self.job_id);
            }
        }
    }
}

/// When a waiter looks at the tables, which says what a finished job found there means.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Look {
    /// Before waiting (`await_player`): the job had finished before anyone waited for it.
    BeforeWaiting,
    /// At the end of a wait with no confirmation: a notification was missed.
    AtTheDeadline,
}

impl Waiter {
    /// Waits for the job's confirmation until `deadline`; then looks at the tables one last time
    /// (for at most [`FINAL_CHECK_MARGIN`]), so a confirmation lost with a dropped connection
    /// still counts. A look that fails or takes too long reads as pending: the caller's answer
    /// is then "not done yet, here is the job id", never an error that loses the id.
    pub(crate) async fn outcome(mut self, deadline: Instant) -> Checked {
        if let Ok(Ok(outcome)) = tokio::time::timeout_at(deadline, &mut self.receiver).await {
            return Checked::Finished(outcome);
        }
        match self
            .check(Instant::now() + FINAL_CHECK_MARGIN, Look::AtTheDeadline)
            .await
        {
            Ok(checked) => checked,
            Err(err) => {
                tracing::debug!(job.id = %self.job_id, error = %crate::connect::Described(&err), "final look at the job failed");
                Checked::Pending
            }
        }
    }

    /// The job's state from the tables, now, answered by `deadline`; a finished job is counted as
    /// confirmed by this `look`.
    pub(crate) async fn check(&self, deadline: Instant, look: Look) -> Result<Checked, sqlx::Error> {
        let rows = store::job_outcomes_by(&self.shared.pool, &[self.job_id.as_uuid()], deadline).await?;
        Ok(match rows.first() {
            None => Checked::Missing,
            Some(row) => match outcome_of(row) {
                Some(outcome) => {
                    let via = match look {
                        Look::BeforeWaiting => "already_finished",
                        Look::AtTheDeadline => {
                            tracing::debug!(job.id = %self.job_id, "confirmed at the deadline by a look at the tables");
                            "table_check"
                        }
                    };
                    count_confirmation(via, row);
                    Checked::Finished(outcome)
                }
                None => Checked::Pending,
            },
        })
    }
}

impl Shared {
    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Senders>> {
        // A panic while holding this lock cannot leave the map half-updated (every change is one
        // call), so a poisoned lock is still safe to use.
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_waited(&self, job_id: &JobId) -> bool {
        self.lock_waiters().contains_key(job_id)
    }

    fn waited_ids(&self) -> Vec<Uuid> {
        self.lock_waiters().keys().map(JobId::as_uuid).collect()
    }

    /// Hands `outcome` to every caller waiting for `job_id`; whether there was one.
    fn deliver(&self, job_id: JobId, outcome: &Outcome) -> bool {
        let senders = self.lock_waiters().remove(&job_id).unwrap_or_default();
        let delivered = !senders.is_empty();
        for (_, sender) in senders {
            // The caller may have given up a moment ago; nothing is lost, the row stays.
            let _ = sender.send(outcome.clone());
        }
        delivered
    }
}

/// What the reader passes to the resolver.
enum Hint {
    /// A confirmation arrived for this job (maybe not ours, maybe forged).
    Notified(JobId),
    /// Look at every waiter's job: the listener reconnected (confirmations may have been lost),
    /// or, without a listener, the poll interval passed.
    CheckAll,
}

/// The listener task: reads notifications and passes job ids on, never waiting on a query, so
/// that while the resolver confirms one burst from the tables, the next burst queues up whole.
async fn read(mut subscription: Subscription, hints: mpsc::UnboundedSender<Hint>) {
    let mut ignored = IgnoredPayloads::new(subscription.channel().clone());
    loop {
        let hint = match subscription.next().await {
            Event::Notification(notification) => match parse_job_id(notification.payload()) {
                Ok(job_id) => Hint::Notified(job_id),
                Err(err) => {
                    ignored.record(&err);
                    continue;
                }
            },
            Event::Resubscribed => Hint::CheckAll,
        };
        if hints.send(hint).is_err() {
            return;
        }
    }
}

/// Asks the resolver to look at every waiter's job at each interval: the only source without a
/// listener, and the safety net beside one.
async fn tick(interval: std::time::Duration, hints: mpsc::UnboundedSender<Hint>) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if hints.send(Hint::CheckAll).is_err() {
            return;
        }
    }
}

/// The resolver task: confirms every hinted job that someone waits for with one query per
/// burst, and delivers the outcomes.
async fn resolve(shared: Arc<Shared>, mut hints: mpsc::UnboundedReceiver<Hint>) {
    while let Some(first) = hints.recv().await {
        let mut notified = Vec::new();
        let mut resubscribed = false;
        let mut next = Some(first);
        while let Some(hint) = next {
            match hint {
                Hint::Notified(job_id) => notified.push(job_id),
                Hint::CheckAll => resubscribed = true,
            }
            next = hints.try_recv().ok();
        }
        // Confirmations sent while the listener was away are gone: check every waiter's job.
        let mut ids = if resubscribed {
            shared.waited_ids()
        } else {
            Vec::new()
        };
        // Others' callers, or callers that gave up, are not ours to confirm.
        ids.extend(
            notified
                .iter()
                .filter(|job_id| shared.is_waited(job_id))
                .map(JobId::as_uuid),
        );
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            continue;
        }
        match store::job_outcomes_by(&shared.pool, &ids, Instant::now() + LOOKUP_TIMEOUT).await {
            Ok(rows) => {
                for row in &rows {
                    let Some(outcome) = outcome_of(row) else {
                        if notified.contains(&row.id) {
                            ::metrics::counter!(telemetry::CONFIRMATIONS_IGNORED).increment(1);
                            tracing::warn!(
                                job.id = %row.id,
                                "ignored a confirmation for a job the tables say is not finished"
                            );
                        }
                        continue;
                    };
                    if shared.deliver(row.id, &outcome) {
                        let via = if notified.contains(&row.id) {
                            "notification"
                        } else {
                            tracing::debug!(job.id = %row.id, "confirmed by a look at the tables: its notification was missed");
                            "table_check"
                        };
                        count_confirmation(via, row);
                    }
                }
            }
            Err(err) => tracing::warn!(
                error = %crate::connect::Described(&err),
                jobs = ids.len(),
                "cannot read job outcomes; waiting callers will check again before they time out"
            ),
        }
    }
}

/// Counts a caller confirmed `via` a notification or a look at the tables, and how long after the
/// job finished.
fn count_confirmation(via: &'static str, row: &JobOutcomeRow) {
    ::metrics::counter!(telemetry::CONFIRMATIONS, "via" => via).increment(1);
    if let Some(secs) = row.since_done_secs {
        ::metrics::histogram!(telemetry::DONE_TO_CONFIRMED).record(secs.max(0.0));
    }
}

/// The outcome of a finished job, or `None` while it is pending.
fn outcome_of(row: &JobOutcomeRow) -> Option<Outcome> {
    match row.status() {
        Ok(JobStatus::Pending) => None,
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
