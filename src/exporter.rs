//! The Prometheus endpoint for ackloop's metrics (`ackloop worker --metrics-addr`, or
//! [`MetricsHandle::serve`] in your service). Behind the `http` feature: a library user who
//! exports metrics another way does not pay for axum or the Prometheus exporter.

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
use crate::telemetry::describe_metrics;

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
        describe_metrics();
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
