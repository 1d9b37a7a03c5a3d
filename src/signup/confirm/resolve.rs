//! The tasks that turn notifications into delivered outcomes: the reader forwards what the
//! listener hears, the resolver confirms it from the tables (one query per burst) and answers
//! this process's markers, and the rechecker looks at every waiter's job each interval.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::shared::{Shared, count_confirmation, outcome_of};
use crate::channel::{IgnoredPayloads, parse_job_id};
use crate::job::JobId;
use crate::listen::{Event, Subscription};
use crate::store::{self, Outcomes};
use crate::telemetry;

/// The longest one look at the waiters' jobs may take before it is given up (the next one tries
/// again).
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the reader passes to the resolver.
pub(super) enum Hint {
    /// A confirmation (or a marker) arrived naming this id: maybe not ours, maybe forged.
    Notified(JobId),
    /// The listener reconnected: confirmations sent meanwhile are lost, look at every waiter's
    /// job.
    Resubscribed,
}

/// The listener task: reads notifications and passes ids on, never waiting on a query, so that
/// while the resolver confirms one burst from the tables, the next burst queues up whole.
pub(super) async fn read(
    shared: Arc<Shared>,
    mut subscription: Subscription,
    hints: mpsc::UnboundedSender<Hint>,
) {
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
            // Counted here, before anything heard after the reconnect (a marker) is handled.
            Event::Resubscribed => {
                shared.note_loss();
                Hint::Resubscribed
            }
        };
        if hints.send(hint).is_err() {
            return;
        }
    }
}

/// Looks at every waiter's job at each interval and delivers the finished ones: the only source
/// without a listener, and the safety net beside one (a listener that went silent without
/// closing). Only finished jobs come back, so a look at thousands of pending jobs stays cheap.
pub(super) async fn recheck(shared: Arc<Shared>, interval: std::time::Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let ids = shared.waited_ids();
        if ids.is_empty() {
            continue;
        }
        let deadline = Instant::now() + LOOKUP_TIMEOUT;
        match store::job_outcomes_by(&shared.pool, &ids, Outcomes::Finished, deadline).await {
            Ok(rows) => {
                for row in &rows {
                    if let Some(outcome) = outcome_of(row)
                        && shared.deliver(row.id, &outcome)
                    {
                        tracing::debug!(job.id = %row.id, "confirmed by a look at the tables");
                        count_confirmation("table_check", row);
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

/// The resolver task: confirms every notified job that someone here waits for with one query
/// per burst, delivers the outcomes, then answers the markers of that burst: every confirmation
/// that arrived before a marker has been handled when it is answered.
pub(super) async fn resolve(shared: Arc<Shared>, mut hints: mpsc::UnboundedReceiver<Hint>) {
    while let Some(first) = hints.recv().await {
        let mut notified = HashSet::new();
        let mut markers = Vec::new();
        let mut resubscribed = false;
        let mut next = Some(first);
        while let Some(hint) = next {
            match hint {
                Hint::Notified(id) => match shared.take_marker(&id) {
                    Some(marker) => markers.push(marker),
                    None => {
                        notified.insert(id);
                    }
                },
                Hint::Resubscribed => resubscribed = true,
            }
            next = hints.try_recv().ok();
        }
        // Others' callers, callers that gave up, and other processes' markers are not ours.
        notified.retain(|job_id| shared.is_waited(job_id));
        let mut ids = if resubscribed {
            shared.waited_ids()
        } else {
            Vec::new()
        };
        ids.extend(notified.iter().map(JobId::as_uuid));
        ids.sort_unstable();
        ids.dedup();
        if !ids.is_empty() {
            let deadline = Instant::now() + LOOKUP_TIMEOUT;
            match store::job_outcomes_by(&shared.pool, &ids, Outcomes::Finished, deadline).await {
                Ok(rows) => deliver(&shared, &rows, notified),
                Err(err) => {
                    // What these notifications announced is not delivered: for the waiters, as
                    // good as lost.
                    shared.note_loss();
                    tracing::warn!(
                        error = %crate::connect::Described(&err),
                        jobs = ids.len(),
                        "cannot read job outcomes; waiting callers will check again before they time out"
                    );
                }
            }
        }
        for marker in markers {
            let _ = marker.send(());
        }
    }
}

/// Delivers the finished jobs in `rows`; counts and reports the notified ones the tables do not
/// show finished.
fn deliver(shared: &Shared, rows: &[store::JobOutcomeRow], mut notified: HashSet<JobId>) {
    for row in rows {
        let was_notified = notified.remove(&row.id);
        let Some(outcome) = outcome_of(row) else {
            continue;
        };
        if shared.deliver(row.id, &outcome) {
            let via = if was_notified {
                "notification"
            } else {
                tracing::debug!(job.id = %row.id, "confirmed by a look at the tables: its notification was missed");
                "table_check"
            };
            count_confirmation(via, row);
        }
    }
    // Notified as finished while the tables say otherwise: forged, or early (the tables read
    // elsewhere than where the job was written?). A marker cannot answer for such jobs.
    if !notified.is_empty() {
        shared.note_loss();
    }
    for job_id in notified {
        ::metrics::counter!(telemetry::CONFIRMATIONS_IGNORED).increment(1);
        tracing::warn!(
            job.id = %job_id,
            "ignored a confirmation for a job the tables say is not finished"
        );
    }
}
