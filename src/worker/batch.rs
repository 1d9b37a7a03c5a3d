//! A handler's batch, in one transaction: claimed, handed whole to the handler's batch form
//! ([`Handler::handle_batch`]) and marked done; when that is not written, or fails (then after
//! a rollback and the same claim again), one job per savepoint so that a bad job fails alone.

use sqlx::{Acquire, PgConnection};
use tokio::time::Instant;
use tracing::Instrument;

use super::handler::{self, Batch, Created, Handler, JobError};
use super::passes::{PASS_LIMIT, Pass, Processor, Then, done_job, earliest, handed, is_not_the_jobs_fault};
use crate::store::{self, ClaimedJob, DoneJob};
use crate::telemetry;

/// What the jobs of a batch handled one at a time came to.
struct Outcomes {
    done: Vec<DoneJob>,
    /// The earliest retry scheduled.
    retry_at: Option<Instant>,
}

/// How a pass hands its batch to the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// Whole, to [`Handler::handle_batch`], with no savepoint: one round trip fewer each way.
    Together,
    /// One job per savepoint, to [`Handler::handle`].
    OneAtATime,
}

/// What handing the whole batch came to.
enum Together {
    /// Every job done and marked done in the transaction, which is still to commit.
    Done(Vec<DoneJob>),
    /// The handler takes jobs one at a time, and wrote nothing.
    OneAtATime,
    /// The batch form failed: the transaction must be rolled back, and the jobs taken again one
    /// at a time.
    Failed,
}

impl<H: Handler> Processor<H> {
    /// Claims a batch of new jobs and completes it in one transaction: whole, through the
    /// handler's batch form if it has one; if that fails, the transaction is rolled back and the
    /// batch claimed again (on the same connection, which gets the same jobs: see
    /// [`Self::pass`]) and handled one job per savepoint, so that a bad job fails alone.
    pub(super) async fn pass_handled(
        &self,
        conn: &mut PgConnection,
        limit: i32,
    ) -> Result<Pass, sqlx::Error> {
        let mut form = Form::Together;
        loop {
            let started = Instant::now();
            let mut tx = conn.begin().await?;
            let jobs = store::claim_due_jobs(&mut tx, limit, H::SOURCE).await?;
            if jobs.is_empty() {
                tx.commit().await?;
                return Ok(Pass {
                    claimed: 0,
                    retry_at: None,
                });
            }
            if form == Form::Together {
                match self.handle_together(&mut tx, &jobs).await? {
                    Together::Done(done) => {
                        tx.commit().await?;
                        record_done(&jobs, &done, started);
                        return Ok(Pass {
                            claimed: jobs.len(),
                            retry_at: None,
                        });
                    }
                    Together::OneAtATime => {}
                    Together::Failed => {
                        tx.rollback().await?;
                        form = Form::OneAtATime;
                        continue;
                    }
                }
            }
            store::job_savepoint(&mut tx).await?;
            let outcomes = self.handle_one_by_one(&mut tx, &jobs, started).await?;
            if !outcomes.done.is_empty() {
                store::mark_jobs_done(&mut tx, &outcomes.done, &self.config.channels.done).await?;
            }
            tx.commit().await?;
            record_done(&jobs, &outcomes.done, started);
            return Ok(Pass {
                claimed: jobs.len(),
                retry_at: outcomes.retry_at,
            });
        }
    }

    /// Hands the whole batch to [`Handler::handle_batch`] and marks the jobs done with its
    /// answers. An error: the pass is given up (the database could not be reached, or a lock
    /// wait ran out: not the jobs' fault).
    async fn handle_together(
        &self,
        conn: &mut PgConnection,
        jobs: &[ClaimedJob],
    ) -> Result<Together, sqlx::Error> {
        let handed: Vec<_> = jobs.iter().map(handed).collect();
        let span = tracing::debug_span!("process_batch", batch.size = jobs.len());
        let answer = handler::caught(|| self.handler.handle_batch(&handed, conn))
            .instrument(span)
            .await;
        let failure = match answer {
            Ok(Batch::OneAtATime) => return Ok(Together::OneAtATime),
            Ok(Batch::Done(created)) if created.len() == jobs.len() => {
                let done = done_jobs(jobs, created);
                match store::mark_jobs_done(conn, &done, &self.config.channels.done).await {
                    Ok(()) => return Ok(Together::Done(done)),
                    Err(err) if is_not_the_jobs_fault(&err) => return Err(err),
                    // A statement of the handler's failed and it answered anyway, or an answer
                    // is not valid: nothing it wrote can be kept.
                    Err(err) => format!(
                        "its answers could not be recorded: {}",
                        crate::describe_db_error(&err)
                    ),
                }
            }
            Ok(Batch::Done(created)) => format!("it answered for {} of {} jobs", created.len(), jobs.len()),
            // A lock wait that ran out is one job's to record, uncounted, one at a time.
            Err(JobError::Database(err)) if store::is_unavailable(&err) => return Err(err),
            Err(err) => err.to_string(),
        };
        tracing::debug!(batch.size = jobs.len(), error = %failure, "batch handler failed; handling its jobs one at a time");
        Ok(Together::Failed)
    }

    /// Runs the handler on each job in a savepoint of its own (set for the first already), and
    /// records each failure. Between two jobs, one round trip releases the last job's savepoint
    /// and sets the next one's: what a handler costs beyond its own statements.
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
            if started.elapsed() >= PASS_LIMIT / 2 {
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
