//! The live dashboard: one page showing the loop as it runs, refreshed every second, with a job
//! page and a retry action. Behind the `http` feature; `ackloop dashboard` serves it, and a
//! service can mount [`router`] in its own axum app.
//!
//! ```text
//! dashboard/mod.rs ─┬─▶ summary.rs  the figures, from the tables and the metrics endpoints
//!                   ├─▶ scrape.rs   the endpoints read and subtracted
//!                   └─▶ page.rs     the HTML (one page, one small script, no CDN)
//! ```
//!
//! Safe by default: the CLI binds 127.0.0.1; with [`DashboardConfig::token`] set, an action needs
//! it (`Authorization: Bearer …`), and without one actions are allowed only when
//! [`DashboardConfig::actions`] says so (the CLI allows them on a loopback address only). Emails
//! appear only on a job's own page; every action is logged.

mod page;
mod scrape;
mod summary;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use tokio::time::Instant;

pub use self::scrape::{LoopHealth, StageLatency};
pub use self::summary::{Summary, SummarySecond};
use crate::admin::{AdminError, find_job_by_email, job_details, retry_failed_job};
use crate::channel::Channels;
use crate::exporter::MetricsHandle;
use crate::job::JobId;

/// What the dashboard shows and allows.
#[derive(Clone, Default)]
pub struct DashboardConfig {
    /// The channels the workers listen on (a retry wakes them).
    pub channels: Channels,
    /// Required, as `Authorization: Bearer <token>`, for every action, when set.
    pub token: Option<String>,
    /// Whether actions (retry) are allowed without a token. `ackloop dashboard` allows them
    /// only on a loopback address.
    pub actions: bool,
    /// Prometheus endpoints of the loop's processes (`host:port` or `http://host:port/metrics`),
    /// for the stages the tables cannot show: claim, confirmation, listener health.
    pub metrics_from: Vec<String>,
    /// This process's own metrics, when the loop runs in it.
    pub metrics: Option<MetricsHandle>,
    /// The host names (the `Host` header, without its port) the dashboard answers to; empty:
    /// any. `ackloop dashboard` on a loopback address answers only to `localhost`, `127.0.0.1`
    /// and `::1`, so a site whose name someone points at 127.0.0.1 (DNS rebinding) cannot use
    /// an operator's browser to act or read emails.
    pub allowed_hosts: Vec<String>,
    /// Whether a job's page (its email) is shown without the token: `ackloop dashboard` shows
    /// it on a loopback address only.
    pub job_pages: bool,
}

impl std::fmt::Debug for DashboardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DashboardConfig")
            .field("channels", &self.channels)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("actions", &self.actions)
            .field("metrics_from", &self.metrics_from)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("job_pages", &self.job_pages)
            .finish_non_exhaustive()
    }
}

/// The header every action must carry (any value): a guard against cross-site requests.
const ACTION_HEADER: &str = "x-requested-by";

struct Shared {
    pool: PgPool,
    config: DashboardConfig,
    /// Recent metrics samples, oldest first: the latencies shown are those between the oldest
    /// and a new one.
    samples: Mutex<VecDeque<(Instant, scrape::Sample)>>,
}

/// The dashboard's routes: `GET /` (the page), `GET /api/summary` (its figures, JSON),
/// `POST /api/jobs/{id}/retry`, `GET /jobs/{id}` and `GET /jobs?email=…` (a job's page).
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use ackloop::dashboard::{DashboardConfig, router};
///
/// let app = router(pool, DashboardConfig { actions: true, ..DashboardConfig::default() });
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:9465").await?;
/// axum::serve(listener, app).await?;
/// # Ok(()) }
/// ```
pub fn router(pool: PgPool, config: DashboardConfig) -> Router {
    let shared = Arc::new(Shared {
        pool,
        config,
        samples: Mutex::new(VecDeque::new()),
    });
    Router::new()
        .route("/", get(index))
        .route("/api/summary", get(api_summary))
        .route("/api/jobs/{job_id}/retry", post(retry))
        .route("/jobs/{job_id}", get(job_page))
        .route("/jobs", get(job_by_email))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&shared),
            guard_host,
        ))
        .with_state(shared)
}

/// Refuses a request whose `Host` is not one the dashboard answers to.
async fn guard_host(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let allowed = &shared.config.allowed_hosts;
    if !allowed.is_empty() {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .map(host_name)
            .unwrap_or_default();
        if !allowed.iter().any(|name| name.eq_ignore_ascii_case(host)) {
            tracing::warn!(host, "dashboard request refused: an unexpected Host");
            return refusal(
                StatusCode::MISDIRECTED_REQUEST,
                "this dashboard does not answer to that host name",
            );
        }
    }
    next.run(request).await
}

/// `host` of `host:port`, `[v6]:port` or `host`, without brackets.
fn host_name(header: &str) -> &str {
    if let Some(rest) = header.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    header.split(':').next().unwrap_or_default()
}

/// Whether the request carries the dashboard's token (`Authorization: Bearer`, or the cookie
/// the page sets once it has been given the token, which a job page's link carries).
fn has_token(config: &DashboardConfig, headers: &HeaderMap) -> bool {
    let Some(token) = config.token.as_deref().filter(|token| !token.is_empty()) else {
        return false;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| pair.trim().strip_prefix("ackloop_token="));
    [bearer, cookie]
        .into_iter()
        .flatten()
        .any(|given| same(given, token))
}

/// Compares without stopping at the first difference, so the time taken says nothing of how
/// much of a guess was right.
fn same(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0, |diff, (a, b)| diff | (a ^ b))
            == 0
}

async fn index(State(shared): State<Arc<Shared>>) -> Html<String> {
    Html(page::index(actions_allowed(&shared.config)))
}

/// Whether the page offers actions at all.
fn actions_allowed(config: &DashboardConfig) -> bool {
    config.actions || config.token.is_some()
}

async fn api_summary(State(shared): State<Arc<Shared>>) -> Response {
    let health = health(&shared).await;
    match summary::read(&shared.pool, health, actions_allowed(&shared.config)).await {
        Ok(summary) => axum::Json(summary).into_response(),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": crate::describe_db_error(&err) })),
        )
            .into_response(),
    }
}

/// The metrics endpoints' latencies since a sample about ten seconds old.
async fn health(shared: &Shared) -> Option<LoopHealth> {
    let config = &shared.config;
    if config.metrics_from.is_empty() && config.metrics.is_none() {
        return None;
    }
    let (mut sample, unreachable) = scrape::sample(&config.metrics_from).await;
    if let Some(metrics) = &config.metrics {
        scrape::add(&mut sample, &metrics.render());
    }
    let now = Instant::now();
    let mut samples = shared.samples.lock().unwrap_or_else(|p| p.into_inner());
    // The latencies shown are those since the oldest sample still inside the window (none: all
    // the endpoints have counted so far, as when a page opens).
    samples.retain(|(at, _)| now.duration_since(*at) <= summary::HEALTH_WINDOW);
    let health = match samples.front() {
        Some((_, oldest)) => scrape::between(oldest, &sample, unreachable),
        None => scrape::between(&scrape::Sample::default(), &sample, unreachable),
    };
    // About one sample a second is enough to keep the window about HEALTH_WINDOW long.
    if samples
        .back()
        .is_none_or(|(at, _)| now.duration_since(*at) >= std::time::Duration::from_secs(1))
    {
        samples.push_back((now, sample));
    }
    Some(health)
}

async fn retry(State(shared): State<Arc<Shared>>, Path(job_id): Path<JobId>, headers: HeaderMap) -> Response {
    let config = &shared.config;
    if config.token.is_some() {
        if !has_token(config, &headers) {
            tracing::warn!(job.id = %job_id, action = "retry", "dashboard action refused: no valid token");
            return refusal(
                StatusCode::UNAUTHORIZED,
                "this dashboard needs its token for actions",
            );
        }
    } else if !config.actions {
        tracing::warn!(job.id = %job_id, action = "retry", "dashboard action refused: actions are off");
        return refusal(
            StatusCode::FORBIDDEN,
            "actions are off on this address: start the dashboard with --token (or ACKLOOP_DASHBOARD_TOKEN)",
        );
    }
    // A page on another site can make the operator's browser POST here (a form, or a fetch
    // without CORS), but not with a header of its own: that needs a preflight this server never
    // answers. So an action must carry one; the dashboard's own page sends it.
    if headers.get(ACTION_HEADER).is_none() {
        tracing::warn!(job.id = %job_id, action = "retry", "dashboard action refused: no {ACTION_HEADER} header");
        return refusal(
            StatusCode::FORBIDDEN,
            "actions must carry the header X-Requested-By: ackloop (cross-site requests are refused)",
        );
    }
    match retry_failed_job(&shared.pool, &config.channels, job_id).await {
        Ok(()) => {
            tracing::info!(job.id = %job_id, action = "retry", "dashboard action: job queued again");
            axum::Json(json!({ "job_id": job_id, "message": format!("job {job_id} queued again") }))
                .into_response()
        }
        Err(err) => {
            tracing::info!(job.id = %job_id, action = "retry", error = %err, "dashboard action refused");
            let status = match err {
                AdminError::UnknownJob(_) => StatusCode::NOT_FOUND,
                AdminError::Database(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::CONFLICT,
            };
            refusal(status, &err.to_string())
        }
    }
}

fn refusal(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

/// A job's page shows an email: without [`DashboardConfig::job_pages`], only to a request with
/// the token.
fn may_see_emails(config: &DashboardConfig, headers: &HeaderMap) -> bool {
    config.job_pages || has_token(config, headers)
}

async fn job_page(
    State(shared): State<Arc<Shared>>,
    Path(job_id): Path<JobId>,
    headers: HeaderMap,
) -> Response {
    if !may_see_emails(&shared.config, &headers) {
        return (StatusCode::UNAUTHORIZED, Html(page::token_needed())).into_response();
    }
    match job_details(&shared.pool, job_id).await {
        Ok(details) => Html(page::job(&details)).into_response(),
        Err(AdminError::UnknownJob(_)) => {
            (StatusCode::NOT_FOUND, Html(page::not_found(&job_id.to_string()))).into_response()
        }
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Html(page::error(&err.to_string())),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct EmailQuery {
    email: String,
}

async fn job_by_email(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<EmailQuery>,
    headers: HeaderMap,
) -> Response {
    if !may_see_emails(&shared.config, &headers) {
        return (StatusCode::UNAUTHORIZED, Html(page::token_needed())).into_response();
    }
    match find_job_by_email(&shared.pool, &query.email).await {
        Ok(job_id) => Redirect::to(&format!("/jobs/{job_id}")).into_response(),
        Err(AdminError::UnknownJob(_)) => {
            (StatusCode::NOT_FOUND, Html(page::not_found("that email"))).into_response()
        }
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Html(page::error(&err.to_string())),
        )
            .into_response(),
    }
}
