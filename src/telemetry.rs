//! Metrics of the acknowledgement path, through the `metrics` facade: every metric name, with
//! the moment it measures. A leaf: the modules that record import it, never the reverse (the
//! gauges' sampler lives with the status report it shares its queries with). The library only records;
//! nothing is exported until a recorder is installed (`MetricsHandle::install` with the `http`
//! feature, which also serves them over HTTP, or any `metrics` recorder of your own).

/// Histogram: from a signup's write (its commit follows in the same round trip, unless the job was
/// written inside the caller's own transaction) to a worker claiming its job for its first
/// attempt: the queueing delay. Retries are not measured (they wait for their backoff).
pub const COMMIT_TO_CLAIM: &str = "ackloop_commit_to_claim_seconds";
/// Histogram: from claiming a batch to its commit (the worker's statement), per job.
pub const CLAIM_TO_DONE: &str = "ackloop_claim_to_done_seconds";
/// Histogram: from a job's completion to its caller being confirmed.
pub const DONE_TO_CONFIRMED: &str = "ackloop_done_to_confirmed_seconds";
/// Counter: jobs completed.
pub const JOBS_DONE: &str = "ackloop_jobs_done_total";
/// Counter: failed attempts scheduled for a retry.
pub const JOBS_RETRIED: &str = "ackloop_jobs_retried_total";
/// Counter: jobs marked failed.
pub const JOBS_FAILED: &str = "ackloop_jobs_failed_total";
/// Counter, label `via`: waiting callers confirmed by a notification (`notification`), by a look
/// at the tables after a reconnect, a poll or at the deadline (`table_check`: a missed
/// notification), or callers whose job had finished before they waited (`already_finished`:
/// status polls through `await_player`, and signups sent again with their idempotency key; not
/// a sign of lost notifications).
pub const CONFIRMATIONS: &str = "ackloop_confirmations_total";
/// Counter, label `by`: waiters whose deadline came without a confirmation, answered by a
/// `marker` (one notification through the listener for everyone due at once) or from the
/// `tables` (their jobs read: after a listener reconnect, when a marker did not come back in
/// time, or when polling instead of listening).
pub const LAST_LOOKS: &str = "ackloop_last_looks_total";
/// Counter, label `channel`: listener reconnects.
pub const LISTENER_RECONNECTS: &str = "ackloop_listener_reconnects_total";
/// Counter: callers that waited their whole timeout for a job still pending (the job still
/// completes); an `await_player` with a zero timeout is a status poll, not counted.
pub const CALLER_TIMEOUTS: &str = "ackloop_caller_timeouts_total";
/// Counter, label `channel`: payloads that were not job ids, ignored.
pub const PAYLOADS_IGNORED: &str = "ackloop_payloads_ignored_total";
/// Counter: confirmations (job ids on the done channel) for jobs the tables say are not
/// finished, ignored: forged, or sent by something other than a worker's commit.
pub const CONFIRMATIONS_IGNORED: &str = "ackloop_confirmations_ignored_total";
/// Gauge: unfinished jobs, pending or running (sampled).
pub const JOBS_PENDING: &str = "ackloop_jobs_pending";
/// Gauge: age of the oldest unfinished job, 0 when none (sampled).
pub const OLDEST_PENDING: &str = "ackloop_oldest_pending_seconds";
/// Gauge: share of the server's notification queue in use, 0 to 1 (sampled).
pub const NOTIFICATION_QUEUE_USAGE: &str = "ackloop_notification_queue_usage";

/// Describes every metric (unit and help text) to the installed `metrics` recorder: call it once
/// after installing a recorder of your own. (`MetricsHandle::install` does it for you.)
///
/// ```
/// ackloop::describe_metrics();
/// ```
pub fn describe_metrics() {
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        COMMIT_TO_CLAIM,
        Unit::Seconds,
        "signup write to a worker claiming the job for a first attempt"
    );
    describe_histogram!(
        CLAIM_TO_DONE,
        Unit::Seconds,
        "claim to the worker's commit, per job"
    );
    describe_histogram!(
        DONE_TO_CONFIRMED,
        Unit::Seconds,
        "job done to its caller confirmed"
    );
    describe_counter!(JOBS_DONE, "jobs completed");
    describe_counter!(JOBS_RETRIED, "failed attempts scheduled for a retry");
    describe_counter!(JOBS_FAILED, "jobs marked failed");
    describe_counter!(
        CONFIRMATIONS,
        "callers confirmed: by notification, by a look at the tables, or already finished"
    );
    describe_counter!(LISTENER_RECONNECTS, "listener reconnects");
    describe_counter!(
        CALLER_TIMEOUTS,
        "callers that waited their whole timeout (the job still completes)"
    );
    describe_counter!(PAYLOADS_IGNORED, "payloads that were not job ids");
    describe_counter!(
        CONFIRMATIONS_IGNORED,
        "confirmations for jobs the tables say are not finished"
    );
    describe_gauge!(JOBS_PENDING, "unfinished jobs: pending or running");
    describe_gauge!(OLDEST_PENDING, Unit::Seconds, "age of the oldest unfinished job");
    describe_gauge!(NOTIFICATION_QUEUE_USAGE, "share of the notification queue in use");
}
