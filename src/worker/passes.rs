//! One pass over the queue, and its transactions: a batch (one statement for the built-in
//! handler, a savepoint per job for another), or one job alone with its attempt counted first.

use std::time::Duration;

use sqlx::{Acquire, PgConnection, PgPool};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::Instrument;

use super::config::WorkerConfig;
use super::handler::{self, Created, Handler, Job, JobError, PassPath};
use crate::connect::Described;
use crate::store::{self, ClaimedJob, DoneJob, Due, millis};
use crate::telemetry;

/// How long a loop keeps taking jobs alone after it starts or its session died, at least: a
/// job that killed a session stays locked by the dying backend for a moment, so a loop that
/// found nothing due at once looks again before it goes back to batches.
pub(super) const ALONE_AT_LEAST: Duration = Duration::from_secs(1);

/// The longest one pass (a batch, or one job alone) may take before the loop gives its
/// connection up: a connection that stopped answering without closing (a NAT or load balancer
/// that dropped it) would otherwise hold the loop until TCP gives up, minutes later. A pass takes
/// milliseconds; lock waits end sooner, at the session's `lock_timeout` (see
/// [`worker_session_options`](super::config::worker_session_options)), as an error that costs no attempt.
pub(super) const PASS_LIMIT: Duration = Duration::from_secs(10);

/// What the processing loops share: the pool, the wake-up, the settings and the handler.
pub(super) struct Processor<H> {
    pub(super) pool: PgPool,
    pub(super) wake: Notify,
    pub(super) config: WorkerConfig,
    pub(super) handler: H,
}

/// What one pass over the queue did.
pub(super) struct Pass {
    pub(super) claimed: usize,
    /// The earliest retry this pass scheduled.
    pub(super) retry_at: Option<Instant>,
}

/// What one lone attempt did.
pub(super) enum Lone {
    /// No due job was left to take.
    NoneDue,
    /// A job was taken: done, failed, scheduled for a retry, or found changed.
    Taken {
        /// When its retry is due, if one was scheduled.
        retry_at: Option<Instant>,
    },
}

impl<H: Handler> Processor<H> {
    /// Seconds until the next retry is due (see [`store::next_retry_due_in`]), within the pass
    /// limit like every other statement of a loop.
    pub(super) async fn next_retry_due_in(&self) -> Result<Option<f64>, sqlx::Error> {
        self.on_own_connection(async |conn| store::next_retry_due_in(conn, H::SOURCE).await)
            .await
    }

    /// Runs `work` on a pool connection of its own within [`PASS_LIMIT`]. A connection whose
    /// work failed for want of the database (or ran out of time) is closed, not handed to the
    /// next pass: its session may be gone, or never answer again.
    pub(super) async fn on_own_connection<T>(
        &self,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let result = tokio::time::timeout(PASS_LIMIT, work(&mut conn))
            .await
            .unwrap_or_else(|_| Err(store::no_answer_in_time()));
        if result.as_ref().is_err_and(store::is_unavailable) {
            conn.close_on_drop();
        }
        result
    }

    /// [`Self::attempt_alone`] on `conn`; sets `unfinished_due` to when the job is due again
    /// should the attempt it counted never finish.
    pub(super) async fn attempt_alone_on(
        &self,
        conn: &mut PgConnection,
        due: Due,
        unfinished_due: &mut Option<Instant>,
    ) -> Result<Lone, sqlx::Error> {
        let config = &self.config;
        // One statement in autocommit: the attempt is counted, and committed, before it is made.
        let started = store::start_attempt(
            &mut *conn,
            due,
            config.max_attempts,
            &config.backoff,
            &config.channels.done,
            H::SOURCE,
        )
        .await?;
        let (job, lease) = match started {
            None => return Ok(Lone::NoneDue),
            Some(store::Started::GaveUp { id, attempts, reason }) => {
                ::metrics::counter!(telemetry::JOBS_FAILED).increment(1);
                tracing::error!(job.id = %id, attempt = attempts, error = reason, "job failed");
                return Ok(Lone::Taken { retry_at: None });
            }
            Some(store::Started::Running {
                job,
                lease,
                abandoned_attempt,
            }) => {
                if let Some(abandoned) = abandoned_attempt {
                    tracing::warn!(job.id = %job.id, attempt = abandoned, "job's last attempt ended with its session; retrying it alone");
                }
                (job, lease)
            }
        };
        *unfinished_due = Some(Instant::now() + lease);
        // A retry waited for its backoff, not for a worker: only a first attempt measures that.
        if job.attempts == 1 {
            ::metrics::histogram!(telemetry::COMMIT_TO_CLAIM).record(job.waited_secs);
        }
        let span = tracing::debug_span!("process_job", job.id = %job.id, attempt = job.attempts);
        match self
            .make_attempt(conn, &job, Instant::now())
            .instrument(span)
            .await
        {
            Ok(retry_at) => Ok(Lone::Taken { retry_at }),
            Err(err) => self.end_unfinished_attempt(conn, &job, err).await,
        }
    }

    /// Ends a running attempt whose transaction failed. A lock wait that ran out is not the
    /// job's fault: the attempt is given back. Otherwise the attempt stays counted and the job is
    /// pending again with what ended it, if the session survived (the handler's own connection
    /// elsewhere failed, say); if the session did not, the job stays running until its lease
    /// ends, and whoever finds it then knows its attempt ended with its session.
    async fn end_unfinished_attempt(
        &self,
        conn: &mut PgConnection,
        job: &ClaimedJob,
        err: sqlx::Error,
    ) -> Result<Lone, sqlx::Error> {
        let attempt = job.attempts;
        if store::is_lock_timeout(&err) {
            // The same backoff give_back_attempt schedules, for the loop's next look.
            let delay = self
                .config
                .backoff
                .delay(u32::try_from(attempt).unwrap_or(u32::MAX));
            let reason = lock_wait_reason(attempt);
            store::give_back_attempt(&mut *conn, job.id, attempt, &reason, &self.config.backoff).await?;
            tracing::warn!(job.id = %job.id, attempt, retry_in_ms = millis(delay), "job waited for a lock; will retry");
            return Ok(Lone::Taken {
                retry_at: Some(Instant::now() + delay),
            });
        }
        let reason = format!(
            "attempt {attempt} did not finish: {}",
            crate::describe_db_error(&err)
        );
        if store::note_unfinished_attempt(conn, job.id, attempt, &reason)
            .await
            .is_ok()
        {
            tracing::warn!(job.id = %job.id, attempt, error = %Described(&err), "job's attempt did not finish");
        }
        Err(err)
    }

    /// Makes attempt `job.attempts`, already counted, in a transaction of its own: completes the
    /// job, or records its failure while still holding its row. Returns when a retry is due, if
    /// one was scheduled.
    async fn make_attempt(
        &self,
        conn: &mut PgConnection,
        job: &ClaimedJob,
        claimed_at: Instant,
    ) -> Result<Option<Instant>, sqlx::Error> {
        let mut tx = conn.begin().await?;
        if !store::lock_started_attempt(&mut tx, job.id, job.attempts).await? {
            tx.commit().await?;
            return Ok(None);
        }
        store::job_savepoint(&mut tx).await?;
        match self.attempt(&mut tx, job, Then::Release).await? {
            Ok(created) => {
                store::mark_jobs_done(&mut tx, &[done_job(job, created)], &self.config.channels.done).await?;
                tx.commit().await?;
                tracing::debug!(job.id = %job.id, attempt = job.attempts, "job done");
                ::metrics::counter!(telemetry::JOBS_DONE).increment(1);
                ::metrics::histogram!(telemetry::CLAIM_TO_DONE).record(claimed_at.elapsed().as_secs_f64());
                Ok(None)
            }
            Err(err) => {
                let retry_at = self.record_failure(&mut tx, job, &err).await?;
                tx.commit().await?;
                Ok(retry_at)
            }
        }
    }

    /// After a claim: a full batch means more may be queued than this loop takes quickly (a
    /// wake-up stands for up to a batch of jobs), so another loop is brought in at once, before
    /// this batch's work is done.
    pub(super) fn claimed(&self, jobs: usize, limit: i32) {
        if i32::try_from(jobs).is_ok_and(|jobs| jobs == limit) {
            self.wake.notify_one();
        }
    }

    /// Claims and completes one batch in one statement. If that fails, something in the batch is
    /// bad: go through a batch again one job per savepoint, to complete the good jobs and record
    /// the bad one's error.
    pub(super) async fn pass(&self) -> Result<Pass, sqlx::Error> {
        self.on_own_connection(async |conn| self.pass_on(conn).await)
            .await
    }

    async fn pass_on(&self, conn: &mut PgConnection) -> Result<Pass, sqlx::Error> {
        let limit = i32::from(self.config.batch_size);
        match PassPath::of::<H>() {
            PassPath::ThroughTheHandler => self.pass_handled(conn, limit, H::BATCH_FORM).await,
            PassPath::BuiltinStatement => self.pass_in_one_statement(conn, limit).await,
        }
    }

    /// The built-in batch: claimed, created and completed in one statement.
    async fn pass_in_one_statement(&self, conn: &mut PgConnection, limit: i32) -> Result<Pass, sqlx::Error> {
        let started = Instant::now();
        match store::complete_due_jobs(&mut *conn, limit, &self.config.channels.done).await {
            Ok(done) => {
                self.claimed(done.len(), limit);
                if !done.is_empty() {
                    tracing::debug!(batch.size = done.len(), "batch done");
                    let took = started.elapsed().as_secs_f64();
                    for job in &done {
                        tracing::debug!(job.id = %job.id, attempt = 1, waited_secs = job.waited_secs, "job done");
                        ::metrics::histogram!(telemetry::COMMIT_TO_CLAIM).record(job.waited_secs);
                        ::metrics::histogram!(telemetry::CLAIM_TO_DONE).record(took);
                    }
                    ::metrics::counter!(telemetry::JOBS_DONE).increment(done.len() as u64);
                }
                Ok(Pass {
                    claimed: done.len(),
                    retry_at: None,
                })
            }
            Err(err) if is_not_the_jobs_fault(&err) => Err(err),
            // On the same connection: Postgres reports a failed statement before it has finished
            // aborting it, so for a moment the batch's rows are still locked, and a claim on
            // another connection would skip them and find nothing to do. This connection's next
            // command waits for the abort.
            Err(err) => {
                tracing::debug!(error = %Described(&err), "batch failed; completing its jobs one at a time");
                self.pass_handled(conn, limit, H::BATCH_FORM).await
            }
        }
    }

    /// Runs the handler on `job` in the savepoint set for it: on success the savepoint is released
    /// (and, with [`Then::Renew`], a new one set for the next job); otherwise it is rolled back
    /// to, undoing the job's writes, and left set for the failure to be recorded in. The inner
    /// error is the job's (to be recorded); the outer one is the pass's (the database could not
    /// be reached, or a lock wait ran out), for which the whole transaction is given up and no
    /// attempt counted.
    pub(super) async fn attempt(
        &self,
        conn: &mut PgConnection,
        job: &ClaimedJob,
        then: Then,
    ) -> Result<Result<Created, JobError>, sqlx::Error> {
        let handed = handed(job);
        let error = match handler::caught(|| self.handler.handle(&handed, conn)).await {
            Ok(created) => {
                let kept = match then {
                    Then::Renew => store::renew_job_savepoint(conn).await,
                    Then::Release => store::release_job_savepoint(conn).await,
                };
                match kept {
                    Ok(()) => return Ok(Ok(created)),
                    Err(err) if is_not_the_jobs_fault(&err) => return Err(err),
                    // A statement of the handler's failed and it returned success anyway: the
                    // transaction is aborted and nothing it wrote can be kept.
                    Err(_) => JobError::retry_later(
                        "the handler returned success after one of its statements failed; nothing \
                         it wrote was kept",
                    ),
                }
            }
            // The database out of reach gives up the pass. A lock wait that ran out is not
            // passed up: it is this job's to record (postponed, uncounted, by record_failure),
            // so that it cannot take the rest of its batch down with it.
            Err(JobError::Database(err)) if store::is_unavailable(&err) => return Err(err),
            Err(err) => err,
        };
        store::rollback_to_job_savepoint(conn).await?;
        Ok(Err(error))
    }

    /// Records a failed attempt of `job`: failed for good (and its caller told) or scheduled for
    /// a retry, decided by `ackloop.record_failure`. A lock wait that ran out (a `lock_timeout`)
    /// is given back uncounted: a lock another session holds is the database's state, not the
    /// job's fault. Returns when the retry is due.
    pub(super) async fn record_failure(
        &self,
        conn: &mut PgConnection,
        job: &ClaimedJob,
        err: &JobError,
    ) -> Result<Option<Instant>, sqlx::Error> {
        let lock_wait = matches!(err, JobError::Database(db_err) if store::is_lock_timeout(db_err));
        let (error, permanent) = match err {
            _ if lock_wait => (lock_wait_reason(job.attempts), false),
            JobError::Database(err) => (crate::describe_db_error(err), store::is_permanent(err)),
            JobError::RetryLater(reason) => (handler::storable_reason(reason), false),
            JobError::Fail(reason) => (handler::storable_reason(reason), true),
        };
        let failure = store::Failure {
            job_id: job.id,
            attempt: job.attempts,
            error: &error,
            retryable: !permanent,
            counted: !lock_wait,
        };
        let config = &self.config;
        let attempt = job.attempts;
        match store::record_failure(
            conn,
            &failure,
            config.max_attempts,
            &config.backoff,
            &config.channels.done,
        )
        .await?
        {
            store::Recorded::Failed => {
                ::metrics::counter!(telemetry::JOBS_FAILED).increment(1);
                tracing::error!(job.id = %job.id, attempt, error, "job failed");
                Ok(None)
            }
            store::Recorded::NotPending => {
                tracing::warn!(job.id = %job.id, attempt, error = %error, "job finished elsewhere meanwhile; its failed attempt was not recorded");
                Ok(None)
            }
            store::Recorded::RetryInMs(delay) if lock_wait => {
                tracing::warn!(job.id = %job.id, attempt, retry_in_ms = delay, "job waited for a lock; will retry");
                Ok(Some(Instant::now() + Duration::from_millis(delay.unsigned_abs())))
            }
            store::Recorded::RetryInMs(delay) => {
                ::metrics::counter!(telemetry::JOBS_RETRIED).increment(1);
                tracing::warn!(job.id = %job.id, attempt, retry_in_ms = delay, error = %error, "job attempt failed; will retry");
                Ok(Some(Instant::now() + Duration::from_millis(delay.unsigned_abs())))
            }
        }
    }
}

/// What to do with a job's savepoint once its handler succeeded.
#[derive(Debug, Clone, Copy)]
pub(super) enum Then {
    /// Release it and set the next job's, in one round trip.
    Renew,
    /// Release it: no job follows.
    Release,
}

/// A job's error after attempt `attempt` waited too long for a lock and was given back,
/// uncounted (by the lone path's own statements, or by a handler).
fn lock_wait_reason(attempt: i32) -> String {
    format!(
        "attempt {attempt} waited too long for a lock another session holds (the lock_timeout \
         ackloop.limit_claim_session sets); it will be tried again, not counted"
    )
}

/// Whether a statement failed for want of the database (or of a lock another session holds)
/// rather than for anything in the job: then the pass is given up, not the job's attempt.
pub(super) fn is_not_the_jobs_fault(err: &sqlx::Error) -> bool {
    store::is_unavailable(err) || store::is_lock_timeout(err)
}

/// A claimed job as its handler sees it.
pub(super) fn handed(job: &ClaimedJob) -> Job {
    Job {
        id: job.id,
        user_id: job.user_id.clone(),
        display_name: job.display_name.clone(),
        extra: job.extra.clone(),
        attempt: u32::try_from(job.attempts).unwrap_or(u32::MAX),
    }
}

/// A job its handler finished, as `mark_done` records it.
pub(super) fn done_job(job: &ClaimedJob, created: Created) -> DoneJob {
    let (player_id, result) = created.into_parts();
    DoneJob {
        id: job.id,
        attempt: job.attempts,
        player_id,
        result,
    }
}

/// The sooner of two optional instants.
pub(super) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
