//! One processing loop: drain the queue pass after pass, take jobs alone when a session may
//! have died of one, and wait for a wake-up, a retry coming due or the poll tick.
//!
//! Why a job that kills its session (a crashing extension, an out-of-memory kill of its backend)
//! cannot stall the queue, in three rules the SQL keeps:
//! - A batch takes only jobs never tried (`attempts = 0`: `ackloop.claim_jobs`,
//!   `ackloop.complete_jobs`), and counts their attempts in the transaction that records the
//!   outcome. A batch that dies with its session leaves its jobs `pending`, uncounted.
//! - So after a session died (and when a loop starts: the last process may have died of a job),
//!   the loop is in [`Mode::Alone`]: its next `batch_size` jobs are taken one at a time by
//!   `ackloop.start_attempt`, which marks the job `running`, counts the attempt and commits
//!   before the attempt is made, with a lease (`run_after`: the backoff after this attempt).
//!   The job at fault is among them: the dying backend may still hold its row for a moment, so
//!   an empty look is repeated for [`ALONE_AT_LEAST`] before batches resume.
//! - A job tried before never goes back into a batch. Found `running` past its lease, its attempt
//!   ended with its session: `start_attempt` counts another, or, its `max_attempts` used up,
//!   fails it. So the job ends at most `max_attempts` sessions (plus one per loop that met it in
//!   a batch first) and is failed, while every other job flows in batches.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::handler::Handler;
use super::passes::{ALONE_AT_LEAST, Lone, Processor, earliest};
use crate::connect::Described;
use crate::job::Backoff;
use crate::store::{self, Due};

/// Waits after the database could not be reached, before trying again.
const UNAVAILABLE_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(100),
    max: Duration::from_secs(5),
};

/// How soon to look again for a retry that is due but held by someone (another worker's
/// attempt, or the backend of a session a job just killed).
const RETRY_RECHECK: Duration = Duration::from_millis(250);

/// How a processing loop takes jobs.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// One at a time, each attempt counted in its own committed transaction before it is made
    /// (`ackloop.start_attempt`): `left` more at most, since `since`. Taken when the loop starts
    /// (the last process may have died of a job) and after any pass the session did not survive
    /// (a job may have killed it), so a job that kills sessions is counted, retried with backoff
    /// and failed, instead of taking its batch down with it for ever.
    Alone { left: usize, since: Instant },
    /// In batches, as many jobs per transaction as the batch size.
    Batches,
}

impl Mode {
    /// Alone for the next `batch_size` jobs: a batch's worth, so the job that killed the
    /// session is among them.
    fn alone(batch_size: u16) -> Self {
        Self::Alone {
            left: usize::from(batch_size),
            since: Instant::now(),
        }
    }

    /// Alone when the loop starts. No dying backend of this loop's holds a job yet, so an empty
    /// queue ends it at once.
    fn starting(batch_size: u16) -> Self {
        Self::Alone {
            left: usize::from(batch_size),
            since: Instant::now()
                .checked_sub(ALONE_AT_LEAST)
                .unwrap_or_else(Instant::now),
        }
    }

    /// After a lone attempt took a job: one fewer left; none left, back to batches.
    fn took_one(self) -> Self {
        match self {
            Self::Alone { left, since } if left > 1 => Self::Alone {
                left: left - 1,
                since,
            },
            _ => Self::Batches,
        }
    }
}

/// Where a processing loop stands between passes.
struct LoopState {
    mode: Mode,
    /// When a retry this loop knows of comes due.
    next_retry: Option<Instant>,
    /// When retries were last looked for and none was due; `None`: look now (on start, at a
    /// poll tick, when a retry comes due). Retries are looked for at least once a poll interval,
    /// even while wake-ups keep the loop busy with batches.
    retries_looked_at: Option<Instant>,
    /// Failed passes in a row, for the backoff.
    unavailable: u32,
}

impl<H: Handler> Processor<H> {
    /// One processing loop: drain the queue, then wait for a reason to look again.
    pub(super) async fn process_until(self: Arc<Self>, shutdown: CancellationToken) {
        let mut poll = tokio::time::interval_at(
            Instant::now() + self.config.poll_interval,
            self.config.poll_interval,
        );
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut state = LoopState {
            mode: Mode::starting(self.config.batch_size),
            next_retry: None,
            retries_looked_at: None,
            unavailable: 0,
        };
        loop {
            // Drain: on start, after every wake-up and tick, until nothing due is left.
            while !shutdown.is_cancelled() {
                match self.drain_step(&mut state).await {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(err) => {
                        let delay = self.after_failed_step(&mut state, &err);
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
            let next_retry = state.next_retry;
            let retry_due = async {
                match next_retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = retry_due => {
                    state.next_retry = None;
                    state.retries_looked_at = None;
                }
                _ = poll.tick() => state.retries_looked_at = None,
            }
        }
    }

    /// After a step failed: how long to wait before the next. A lock wait that ran out backs
    /// off; anything else may mean a job killed the session, so the next jobs are taken alone,
    /// the first at once, so that its attempt is counted before the other loops' batches meet
    /// it too.
    fn after_failed_step(&self, state: &mut LoopState, err: &sqlx::Error) -> Duration {
        state.unavailable += 1;
        if store::is_lock_timeout(err) {
            let delay = UNAVAILABLE_BACKOFF.delay(state.unavailable - 1);
            tracing::warn!(
                retry_in_ms = delay.as_millis() as u64,
                "jobs wait for a lock another session holds; retrying"
            );
            return delay;
        }
        let delay = if state.unavailable == 1 {
            Duration::ZERO
        } else {
            UNAVAILABLE_BACKOFF.delay(state.unavailable - 1)
        };
        state.mode = Mode::alone(self.config.batch_size);
        tracing::warn!(
            error = %Described(err),
            retry_in_ms = delay.as_millis() as u64,
            "cannot process jobs; retrying (the next jobs one at a time)"
        );
        delay
    }

    /// One step of a drain; true while there may be more to do.
    async fn drain_step(&self, state: &mut LoopState) -> Result<bool, sqlx::Error> {
        if let Mode::Alone { since, .. } = state.mode {
            let lone = self.attempt_alone(Due::Any, state).await?;
            state.unavailable = 0;
            match lone {
                Lone::Taken { .. } => state.mode = state.mode.took_one(),
                Lone::NoneDue if since.elapsed() >= ALONE_AT_LEAST => state.mode = Mode::Batches,
                Lone::NoneDue => {
                    // Nothing due that nobody holds: look again (alone) a little later.
                    state.next_retry = earliest(state.next_retry, Some(since + ALONE_AT_LEAST));
                    return Ok(false);
                }
            }
            return Ok(true);
        }
        // Retries first when they may be due, so that a busy queue cannot starve them.
        let now = Instant::now();
        let retry_due = state.next_retry.is_some_and(|at| at <= now);
        let look_overdue = state
            .retries_looked_at
            .is_none_or(|at| now.duration_since(at) >= self.config.poll_interval);
        if retry_due || look_overdue {
            let lone = self.attempt_alone(Due::Retries, state).await?;
            state.unavailable = 0;
            if let Lone::NoneDue = lone {
                state.retries_looked_at = Some(now);
                // Ask the table when the next retry is due (any worker's), so that none waits
                // for a poll tick; one due but held by someone is looked at again shortly.
                let due_in = self.next_retry_due_in().await?;
                state.next_retry = due_in.map(|secs| {
                    let wait = Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX);
                    now + wait.clamp(RETRY_RECHECK, self.config.poll_interval.max(RETRY_RECHECK))
                });
            }
            return Ok(true);
        }
        let pass = self.pass().await?;
        state.unavailable = 0;
        state.next_retry = earliest(state.next_retry, pass.retry_at);
        Ok(pass.claimed == usize::from(self.config.batch_size))
    }

    /// Takes the next due job of the kind asked for, alone: counts the attempt and
    /// pushes the job's next try back by its backoff in one committed transaction, then makes
    /// the attempt in another. If the attempt kills the session (or the process), the job keeps
    /// its count and waits out its backoff; once it has used every attempt it is failed here,
    /// before another is made.
    async fn attempt_alone(&self, due: Due, state: &mut LoopState) -> Result<Lone, sqlx::Error> {
        let mut unfinished_due = None;
        let result = self
            .on_own_connection(async |conn| self.attempt_alone_on(conn, due, &mut unfinished_due).await)
            .await;
        match &result {
            Ok(Lone::Taken { retry_at }) => state.next_retry = earliest(state.next_retry, *retry_at),
            Ok(Lone::NoneDue) => {}
            // The attempt may not have finished: look again when its job is due.
            Err(_) => state.next_retry = earliest(state.next_retry, unfinished_due),
        }
        result
    }
}
