//! Confirmations: one LISTEN connection per process on the done channel, routing finished jobs
//! to the callers waiting for them.
//!
//! A notification only says "look at job X". The outcome handed to a caller is always read from
//! the tables, so a forged or early notification cannot make a signup report success. A reader
//! task only forwards ids; a resolver task confirms everything forwarded meanwhile with one
//! query, so under load one query confirms a whole burst. A waiter whose deadline comes gets a
//! last look, shared by every waiter due at the same moment.
//!
//! ```text
//! confirm/mod.rs ─┬─▶ resolve.rs  reader, resolver, rechecker ─▶ shared, channel, listen, store
//!                 ├─▶ look.rs     the last looks at deadlines  ─▶ shared, channel, store
//!                 └─▶ shared.rs   waiters, losses, markers     ─▶ input, job, store (a leaf here)
//! ```

mod look;
mod resolve;
mod shared;

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

pub(crate) use self::shared::{Checked, Outcome};
use self::shared::{FinalLook, Shared, count_confirmation, outcome_of};
use crate::channel::ChannelName;
use crate::job::{ANSWER_MARGIN, JobId};
use crate::listen::{ListenTarget, Subscription};
use crate::store::{self, Outcomes};

/// Where confirmations come from.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// LISTEN on the done channel, through a connection of its own to this target.
    Listen(Box<ListenTarget>),
    /// No LISTEN (a pooler that cannot carry it): look at every waiter's job at this interval.
    Poll(std::time::Duration),
}

/// How often every waiting caller's job is looked up in the tables, notifications or not: the
/// most a silently dead listener (a connection that stopped answering without closing) costs a
/// caller before the listener's own liveness check replaces it.
const RECHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The process's confirmation router. Dropping it stops its tasks.
pub(crate) struct Confirmations {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Confirmations {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Confirmations {
    /// Connects the listener and returns once it is listening (or, with the server away, once
    /// the reader has taken over trying), so that a job committed after this returns is
    /// confirmed by notification or by the tables.
    pub(crate) async fn start(
        pool: PgPool,
        channel: ChannelName,
        source: Source,
    ) -> Result<Self, sqlx::Error> {
        let (final_looks, due) = mpsc::unbounded_channel();
        let listening = matches!(source, Source::Listen(_));
        let shared = Arc::new(Shared::new(pool, listening, final_looks));
        let span = tracing::info_span!("listener", channel = %channel);
        let looker = look::look_at_deadlines(Arc::clone(&shared), channel.clone(), due);
        let tasks = match source {
            Source::Listen(target) => {
                // A server down or restarting while the service starts is no error: the reader
                // keeps trying, and the table checks find whatever it missed. (A refusal returns
                // here, before any task is spawned.)
                let subscription = Subscription::connect_or_later(*target, channel).await?;
                let looker = tokio::spawn(looker);
                let (hints, hinted) = mpsc::unbounded_channel();
                let reader = resolve::read(Arc::clone(&shared), subscription, hints);
                let resolver = resolve::resolve(Arc::clone(&shared), hinted);
                vec![
                    looker,
                    tokio::spawn(reader.instrument(span.clone())),
                    tokio::spawn(resolver.instrument(span.clone())),
                    tokio::spawn(resolve::recheck(Arc::clone(&shared), RECHECK_INTERVAL).instrument(span)),
                ]
            }
            Source::Poll(interval) => vec![
                tokio::spawn(looker),
                tokio::spawn(resolve::recheck(Arc::clone(&shared), interval).instrument(span)),
            ],
        };
        Ok(Self { shared, tasks })
    }

    /// Starts waiting for `job_id`. Register before the job can commit (or check the tables after
    /// registering, see [`Waiter::check`]), so that its confirmation cannot slip by unseen.
    pub(crate) fn register(&self, job_id: JobId) -> Waiter {
        // Read before the waiter exists: a loss counted from here on concerns it.
        let losses_then = self.shared.losses();
        let (token, receiver) = self.shared.add_waiter(job_id);
        Waiter {
            job_id,
            token,
            losses_then,
            receiver,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// One caller's wait for one job. Dropping it (a cancelled caller) unregisters it.
pub(crate) struct Waiter {
    job_id: JobId,
    token: u64,
    /// How many times confirmations may have been lost before it was registered.
    losses_then: u64,
    receiver: oneshot::Receiver<Outcome>,
    shared: Arc<Shared>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.shared.remove_waiter(self.job_id, self.token);
    }
}

impl Waiter {
    /// Waits for the job's confirmation until `deadline`; then takes a last look, answered by
    /// `deadline` + [`ANSWER_MARGIN`], so that a confirmation whose notification was lost still
    /// counts. The look is shared with every other waiter due at that moment (`look.rs`). A look
    /// that fails or takes too long reads as pending: the caller's answer is then "not done
    /// yet, here is the job id", never an error that loses the id.
    pub(crate) async fn outcome(mut self, deadline: Instant) -> Checked {
        if let Ok(Ok(outcome)) = tokio::time::timeout_at(deadline, &mut self.receiver).await {
            return Checked::Finished(outcome);
        }
        let by = deadline + ANSWER_MARGIN;
        let (answer, looked) = oneshot::channel();
        let look = FinalLook {
            job_id: self.job_id,
            losses_then: self.losses_then,
            by,
            answer,
        };
        if self.shared.final_looks.send(look).is_err() {
            return Checked::Pending;
        }
        tokio::select! {
            biased;
            // Confirmed while the look was under way (a marker's resolver delivers before it
            // answers).
            Ok(outcome) = &mut self.receiver => Checked::Finished(outcome),
            looked = tokio::time::timeout_at(by, looked) => {
                looked.ok().and_then(Result::ok).unwrap_or(Checked::Pending)
            }
        }
    }

    /// The job's state from the tables, now, answered by `deadline`: a look before waiting (the
    /// job may have finished before anyone waited for it).
    pub(crate) async fn check(&self, deadline: Instant) -> Result<Checked, sqlx::Error> {
        let ids = [self.job_id.as_uuid()];
        let rows = store::job_outcomes_by(&self.shared.pool, &ids, Outcomes::All, deadline).await?;
        Ok(match rows.first() {
            None => Checked::Missing,
            Some(row) => match outcome_of(row) {
                Some(outcome) => {
                    count_confirmation("already_finished", row);
                    Checked::Finished(outcome)
                }
                None => Checked::Pending,
            },
        })
    }
}
