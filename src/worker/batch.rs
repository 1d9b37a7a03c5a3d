//! A handler's batch, in one transaction: claimed, handed whole to the handler's batch form
//! ([`Handler::handle_batch`]) in a savepoint and marked done there; when the handler has no
//! batch form, or it fails (rolled back to the savepoint, the jobs still locked), one job per
//! savepoint so that a bad job fails alone.

use sqlx::{Acquire, PgConnection};
use tokio::time::Instant;
use tracing::Instrument;

use super::handler::{self, BatchForm, Created, Handler, JobError};
use super::passes::{PASS_LIMIT, Pass, Processor, Then, done_job, earliest, handed, is_not_the_jobs_fault};
use crate::store::{self, ClaimedJob, DoneJob};
use crate::telemetry;

/// What the jobs of a batch came to.
struct Outcomes {
    /// Marked done in the transaction already.
    done: Vec<DoneJob>,
    /// The earliest retry scheduled.
    retry_at: Option<Instant>,
}

impl<H: Handler> Processor<H> {
    /// Claims a batch of new jobs and completes it in one transaction, in `form`: whole, through
    /// the handler's batch form, falling back to one job per savepoint on the same locked jobs.
    pub(super) async fn pass_handled(
        &self,
        conn: &mut PgConnection,
        limit: i32,
        form: BatchForm,
    ) -> Result<Pass, sqlx::Error> {
        let started = Instant::now();
        let mut tx = conn.begin().await?;
        let jobs = store::claim_due_jobs(&mut tx, limit, H::SOURCE).await?;
        self.claimed(jobs.len(), limit);
        if jobs.is_empty() {
            tx.commit().await?;
            return Ok(Pass {
                claimed: 0,
                retry_at: None,
            });
        }
        store::job_savepoint(&mut tx).await?;
        let together = match form {
            BatchForm::Together => self.handle_together(&mut tx, &jobs).await?,
            BatchForm::OneAtATime => None,
        };
        let outcomes = match together {
            Some(done) => Outcomes { done, retry_at: None },
            None => self.handle_one_by_one(&mut tx, &jobs, started).await?,
        };
        tx.commit().await?;
        record_done(&jobs, &outcomes.done, started);
        Ok(Pass {
            claimed: jobs.len(),
            retry_at: outcomes.retry_at,
        })
    }

    /// Hands the whole batch to [`Handler::handle_batch`] in the savepoint set for it, and marks
    /// the jobs done with its answers. `Some`: all done, the savepoint released. `None`: the
    /// batch form failed; everything it wrote is undone and the savepoint is still set, for the
    /// first job taken one at a time. An error: the pass is given up (the database could not be
    /// reached; or a lock wait ran out marking them done, which no job is blamed for).
    async fn handle_together(
        &self,
        conn: &mut PgConnection,
        jobs: &[ClaimedJob],
    ) -> Result<Option<Vec<DoneJob>>, sqlx::Error> {
        let handed: Vec<_> = jobs.iter().map(handed).collect();
        let span = tracing::debug_span!("process_batch", batch.size = jobs.len());
        let answer = handler::caught(|| self.handler.handle_batch(&handed, conn))
            .instrument(span)
            .await;
        let failure = match answer {
            Ok(created) if created.len() == jobs.len() => {
                let done = done_jobs(jobs, created);
                match self.mark_done_and_release(conn, &done).await {
                    Ok(()) => return Ok(Some(done)),
                    Err(err) if is_not_the_jobs_fault(&err) => return Err(err),
                    // A statement of the handler's failed and it answered anyway, or an answer
                    // cannot be stored: nothing it wrote can be kept.
                    Err(err) => format!(
                        "its answers could not be recorded: {}",
                        crate::describe_db_error(&err)
                    ),
                }
            }
            Ok(created) => format!("it answered for {} of {} jobs", created.len(), jobs.len()),
            // A lock wait that ran out is one job's to record, uncounted, one at a time.
            Err(JobError::Database(err)) if store::is_unavailable(&err) => return Err(err),
            Err(JobError::Database(err)) => crate::describe_db_error(&err),
            Err(err) => err.to_string(),
        };
        tracing::warn!(batch.size = jobs.len(), error = %failure, "the handler's batch form failed; handling each of the batch's jobs alone");
        store::rollback_to_job_savepoint(conn).await?;
        Ok(None)
    }

    /// Marks a batch form's jobs done and keeps it (the savepoint released).
    async fn mark_done_and_release(
        &self,
        conn: &mut PgConnection,
        done: &[DoneJob],
    ) -> Result<(), sqlx::Error> {
        store::mark_jobs_done(&mut *conn, done, &self.config.channels.done).await?;
        store::release_job_savepoint(conn).await
    }

    /// Runs the handler on each job in a savepoint of its own (set for the first already),
    /// records each failure, and marks the finished jobs done. Between two jobs, one round trip
    /// releases the last job's savepoint and sets the next one's: what a handler costs beyond
    /// its own statements. After half the pass limit (counted from the pass's start, so a slow
    /// batch form's time too), the jobs not reached are left for the next pass; the first is
    /// always taken, so every pass makes progress.
    async fn handle_one_by_one(
        &self,
        conn: &mut PgConnection,
        jobs: &[ClaimedJob],
        started: Instant,
    ) -> Result<Outcomes, sqlx::Error> {
        let mut outcomes = Outcomes {
            done: Vec::with_capacity(jobs.len()),
            retry_at: None,
        };
        for (index, job) in jobs.iter().enumerate() {
            if index > 0 && started.elapsed() >= PASS_LIMIT / 2 {
                // Slow handlers: commit what is done before the pass limit gives it all up. The
                // jobs not reached were only locked: the commit releases them, uncounted.
                tracing::warn!(
                    batch.size = jobs.len(),
                    left = jobs.len() - index,
                    "handlers are slow; leaving the rest of the batch for the next pass"
                );
                break;
            }
            let more = index + 1 < jobs.len();
            let then = if more { Then::Renew } else { Then::Release };
            let span = tracing::debug_span!("process_job", job.id = %job.id, attempt = job.attempts);
            match self.attempt(conn, job, then).instrument(span).await? {
                Ok(created) => outcomes.done.push(done_job(job, created)),
                Err(err) => {
                    let retry_at = self.record_failure(conn, job, &err).await?;
                    outcomes.retry_at = earliest(outcomes.retry_at, retry_at);
                    // The record is kept (released into the transaction) before the next job
                    // starts, so that job's rollback cannot undo it.
                    if more {
                        store::renew_job_savepoint(conn).await?;
                    }
                }
            }
        }
        if !outcomes.done.is_empty() {
            store::mark_jobs_done(conn, &outcomes.done, &self.config.channels.done).await?;
        }
        Ok(outcomes)
    }
}

/// The batch's answers as the jobs `mark_done` records.
fn done_jobs(jobs: &[ClaimedJob], created: Vec<Created>) -> Vec<DoneJob> {
    jobs.iter()
        .zip(created)
        .map(|(job, created)| done_job(job, created))
        .collect()
}

/// Logs and measures the jobs a committed batch finished.
fn record_done(jobs: &[ClaimedJob], done: &[DoneJob], started: Instant) {
    tracing::debug!(batch.size = jobs.len(), done = done.len(), "batch done");
    let took = started.elapsed().as_secs_f64();
    for job in jobs
        .iter()
        .filter(|job| done.iter().any(|done| done.id == job.id))
    {
        tracing::debug!(job.id = %job.id, attempt = job.attempts, waited_secs = job.waited_secs, "job done");
        ::metrics::histogram!(telemetry::COMMIT_TO_CLAIM).record(job.waited_secs);
        ::metrics::histogram!(telemetry::CLAIM_TO_DONE).record(took);
    }
    ::metrics::counter!(telemetry::JOBS_DONE).increment(done.len() as u64);
}
