//! Metrics of the acknowledgement path, through the `metrics` facade, and a Prometheus endpoint
//! for them (`ackloop worker --metrics-addr`, or [`MetricsHandle::serve`] in your service).
//!
//! Every metric name is here, with the moment it measures. The library only records; nothing is
//! exported until a recorder is installed ([`MetricsHandle::install`], or any `metrics`
//! recorder of your own).

use std::future::IntoFuture;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::store;

/// Histogram: from a signup's commit to a worker claiming its job (queueing delay).
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
/// Counter, label `via`: callers confirmed by a notification (`notification`) or by a look at the
/// tables after a reconnect, a poll or at the deadline (`table_check`: a missed notification).
pub const CONFIRMATIONS: &str = "ackloop_confirmations_total";
/// Counter, label `channel`: listener reconnects.
pub const LISTENER_RECONNECTS: &str = "ackloop_listener_reconnects_total";
/// Counter: signups whose caller timed out (the job still completes).
pub const CALLER_TIMEOUTS: &str = "ackloop_caller_timeouts_total";
/// Counter, label `channel`: payloads that were not job ids, ignored.
pub const PAYLOADS_IGNORED: &str = "ackloop_payloads_ignored_total";
/// Gauge: pending jobs (sampled).
pub const JOBS_PENDING: &str = "ackloop_jobs_pending";
/// Gauge: age of the oldest pending job, 0 when none (sampled).
pub const OLDEST_PENDING: &str = "ackloop_oldest_pending_seconds";
/// Gauge: share of the server's notification queue in use, 0 to 1 (sampled).
pub const NOTIFICATION_QUEUE_USAGE: &str = "ackloop_notification_queue_usage";

/// Histogram buckets for the loop's latencies: from 0.5 ms (a local commit) to 30 s (a timeout).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];

/// Prometheus-formatted metrics of this process.
#[derive(Clone)]
pub struct MetricsHandle {
    prometheus: PrometheusHandle,
}

/// The recorder could not be built or installed (another global recorder exists already).
#[derive(Debug, thiserror::Error)]
#[error("cannot install the metrics recorder")]
pub struct MetricsError(#[source] BuildError);

fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new().set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
}

impl MetricsHandle {
    /// Installs a Prometheus recorder as this process's global `metrics` recorder.
    ///
    /// # Errors
    /// [`MetricsError`] when a global recorder is already installed.
    ///
    /// ```no_run
    /// let metrics = ackloop::MetricsHandle::install()?;
    /// println!("{}", metrics.render());
    /// # Ok::<(), ackloop::MetricsError>(())
    /// ```
    pub fn install() -> Result<Self, MetricsError> {
        let prometheus = builder()
            .and_then(PrometheusBuilder::install_recorder)
            .map_err(MetricsError)?;
        describe();
        Ok(Self { prometheus })
    }

    /// A recorder that is not installed anywhere, with its handle: make it the default of one
    /// thread with `metrics::set_default_local_recorder` (tests do, to count only their own work).
    ///
    /// # Errors
    /// [`MetricsError`] if the histogram buckets are refused.
    ///
    /// ```
    /// let (recorder, metrics) = ackloop::MetricsHandle::unregistered()?;
    /// metrics::with_local_recorder(&recorder, || {
    ///     metrics::counter!(ackloop::metric_names::JOBS_DONE).increment(2);
    /// });
    /// assert!(metrics.render().contains("ackloop_jobs_done_total 2"));
    /// # Ok::<(), ackloop::MetricsError>(())
    /// ```
    pub fn unregistered() -> Result<(metrics_exporter_prometheus::PrometheusRecorder, Self), MetricsError> {
        let recorder = builder().map_err(MetricsError)?.build_recorder();
        let prometheus = recorder.handle();
        Ok((recorder, Self { prometheus }))
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        self.prometheus.run_upkeep();
        self.prometheus.render()
    }

    /// Serves `GET /metrics` (Prometheus text) and `GET /healthz` (200 when the database answers
    /// within 2s, else 503) on `listener`, until `shutdown` is cancelled.
    ///
    /// # Errors
    /// The server's I/O error.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// let metrics = ackloop::MetricsHandle::install()?;
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:9464").await?;
    /// let shutdown = tokio_util::sync::CancellationToken::new();
    /// tokio::spawn(metrics.serve(listener, pool, shutdown.clone()));
    /// # Ok(()) }
    /// ```
    pub async fn serve(
        self,
        listener: TcpListener,
        pool: PgPool,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let app = Router::new()
            .route("/metrics", get(render_metrics))
            .route("/healthz", get(health))
            .with_state((self, pool));
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .into_future()
            .await
    }
}

async fn render_metrics(State((metrics, _)): State<(MetricsHandle, PgPool)>) -> String {
    metrics.render()
}

async fn health(State((_, pool)): State<(MetricsHandle, PgPool)>) -> (StatusCode, &'static str) {
    match tokio::time::timeout(Duration::from_secs(2), store::server_version(&pool)).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n"),
    }
}

/// Samples the queue gauges (pending jobs, oldest pending age, notification queue usage) every
/// `interval` until `shutdown`; errors are skipped, the next sample tries again.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) {
/// let shutdown = tokio_util::sync::CancellationToken::new();
/// let every = std::time::Duration::from_secs(5);
/// tokio::spawn(ackloop::sample_queue_gauges(pool, every, shutdown.clone()));
/// # }
/// ```
pub async fn sample_queue_gauges(pool: PgPool, interval: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Ok(counts) = store::job_counts(&pool).await {
            ::metrics::gauge!(JOBS_PENDING).set(counts.pending as f64);
            ::metrics::gauge!(OLDEST_PENDING).set(counts.oldest_pending_secs.unwrap_or(0.0));
        }
        if let Ok(usage) = store::notification_queue_usage(&pool).await {
            ::metrics::gauge!(NOTIFICATION_QUEUE_USAGE).set(usage);
        }
    }
}

fn describe() {
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        COMMIT_TO_CLAIM,
        Unit::Seconds,
        "signup commit to a worker claiming the job"
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
        "callers confirmed, by notification or by a look at the tables"
    );
    describe_counter!(LISTENER_RECONNECTS, "listener reconnects");
    describe_counter!(
        CALLER_TIMEOUTS,
        "signups whose caller timed out (the job still completes)"
    );
    describe_counter!(PAYLOADS_IGNORED, "payloads that were not job ids");
    describe_gauge!(JOBS_PENDING, "pending jobs");
    describe_gauge!(OLDEST_PENDING, Unit::Seconds, "age of the oldest pending job");
    describe_gauge!(NOTIFICATION_QUEUE_USAGE, "share of the notification queue in use");
}
