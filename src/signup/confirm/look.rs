//! The last look of waiters whose deadline came without a confirmation. A notification may have
//! been lost (a listener that reconnected, a resolver that could not read the tables): the look
//! finds such a job finished. Everything due at the same moment is answered together:
//!
//! - **By a marker**, when listening: a notification this process sends on the done channel.
//!   Notifications arrive in commit order, so once the resolver has handled everything that
//!   arrived before the marker, a waiter not confirmed by then has no finished job, unless
//!   confirmations may have been lost since it was registered. One commit answers any number
//!   of waiters, where reading their jobs costs the server a few microseconds each (a burst of
//!   50,000 callers timing out together took longer than the margin to read).
//! - **From the tables**, for the rest: waiters that lived through a possible loss, a marker
//!   that did not come back in time, or no listener at all.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use uuid::Uuid;

use super::shared::{Checked, FinalLook, Shared, count_confirmation, outcome_of};
use crate::channel::ChannelName;
use crate::job::JobId;
use crate::store::{self, JobOutcomeRow, Outcomes};
use crate::telemetry;

/// The most jobs one look reads from the tables: a larger number of waiters due at once is
/// looked up in several queries, each answering its waiters as soon as it returns.
const MAX_TABLE_LOOK: usize = 4096;

/// Rounds of looks under way at once: a round that waits for its marker or reads the tables does
/// not hold up the looks falling due meanwhile, which gather into the next round.
const ROUNDS_AT_ONCE: usize = 4;

/// The part of a look's time (from the deadline to the bound) the marker may take: the rest is
/// left for reading the tables should it not come back.
const MARKER_SHARE: f64 = 0.5;

/// Answers the last looks of waiters as they fall due (see the module's docs).
pub(super) async fn look_at_deadlines(
    shared: Arc<Shared>,
    done_channel: ChannelName,
    mut due: mpsc::UnboundedReceiver<FinalLook>,
) {
    let rounds = Arc::new(Semaphore::new(ROUNDS_AT_ONCE));
    while let Some(first) = due.recv().await {
        let Ok(round) = Arc::clone(&rounds).acquire_owned().await else {
            return;
        };
        // Taken once a round may start: what fell due meanwhile is answered together.
        let mut looks = vec![first];
        while let Ok(look) = due.try_recv() {
            looks.push(look);
        }
        // A waiter past its own bound has answered itself already.
        let now = Instant::now();
        looks.retain(|look| look.by > now && !look.answer.is_closed());
        if looks.is_empty() {
            continue;
        }
        let shared = Arc::clone(&shared);
        let done_channel = done_channel.clone();
        // Every step of a round is bounded by its looks' bounds: it ends by itself.
        tokio::spawn(async move {
            let mut looks = looks;
            if shared.listening {
                looks = answer_by_marker(&shared, &done_channel, looks).await;
            }
            for chunk in chunks(looks, MAX_TABLE_LOOK) {
                answer_from_the_tables(&shared, chunk).await;
            }
            drop(round);
        });
    }
}

/// Sends a marker and waits for it to come back through the listener and the resolver; answers
/// the looks it covers as pending (a finished job among them has been delivered to its waiter,
/// who prefers that) and returns the others.
async fn answer_by_marker(
    shared: &Shared,
    done_channel: &ChannelName,
    looks: Vec<FinalLook>,
) -> Vec<FinalLook> {
    let now = Instant::now();
    let earliest = looks
        .iter()
        .map(|look| look.by)
        .min()
        .expect("looks is not empty");
    let until = now + earliest.saturating_duration_since(now).mul_f64(MARKER_SHARE);
    let (marker, returned) = shared.new_marker();
    let sent = store::notify_unlogged(&shared.pool, done_channel, &marker.to_string(), until).await;
    let came_back = match sent {
        Ok(()) => matches!(tokio::time::timeout_at(until, returned).await, Ok(Ok(()))),
        Err(err) => {
            tracing::debug!(error = %crate::connect::Described(&err), "cannot send a marker; reading the tables");
            false
        }
    };
    if !came_back {
        shared.forget_marker(&marker);
        return looks;
    }
    let losses = shared.losses();
    let (covered, uncovered): (Vec<FinalLook>, Vec<FinalLook>) =
        looks.into_iter().partition(|look| look.losses_then == losses);
    ::metrics::counter!(telemetry::LAST_LOOKS, "by" => "marker").increment(covered.len() as u64);
    for look in covered {
        let _ = look.answer.send(Checked::Pending);
    }
    uncovered
}

/// Reads the looks' jobs from the tables and answers each, by the latest of their bounds (each
/// waiter stops waiting at its own).
async fn answer_from_the_tables(shared: &Shared, looks: Vec<FinalLook>) {
    let Some(by) = looks.iter().map(|look| look.by).max() else {
        return;
    };
    ::metrics::counter!(telemetry::LAST_LOOKS, "by" => "tables").increment(looks.len() as u64);
    let mut ids: Vec<Uuid> = looks.iter().map(|look| look.job_id.as_uuid()).collect();
    ids.sort_unstable();
    ids.dedup();
    let rows = match store::job_outcomes_by(&shared.pool, &ids, Outcomes::All, by).await {
        Ok(rows) => rows,
        Err(err) => {
            // Each waiter reads this as pending: a timeout with its job id.
            tracing::debug!(error = %crate::connect::Described(&err), jobs = ids.len(), "last look at the jobs failed");
            return;
        }
    };
    let rows: HashMap<JobId, &JobOutcomeRow> = rows.iter().map(|row| (row.id, row)).collect();
    for look in looks {
        let checked = match rows.get(&look.job_id) {
            None => Checked::Missing,
            Some(row) => match outcome_of(row) {
                Some(outcome) => {
                    tracing::debug!(job.id = %look.job_id, "confirmed at the deadline by a look at the tables");
                    count_confirmation("table_check", row);
                    Checked::Finished(outcome)
                }
                None => Checked::Pending,
            },
        };
        let _ = look.answer.send(checked);
    }
}

fn chunks(mut looks: Vec<FinalLook>, size: usize) -> Vec<Vec<FinalLook>> {
    let mut chunks = Vec::with_capacity(looks.len().div_ceil(size));
    while looks.len() > size {
        let rest = looks.split_off(size);
        chunks.push(looks);
        looks = rest;
    }
    if !looks.is_empty() {
        chunks.push(looks);
    }
    chunks
}
