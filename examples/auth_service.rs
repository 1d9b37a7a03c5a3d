//! A small auth service: `POST /signup` signs a user up and answers once the player exists.
//!
//! ```text
//! POST /signup {"email": "...", "display_name": "..."}   [Idempotency-Key: <UUID>]
//!   201 {"player": {...}}                                  the player exists
//!   202 {"job_id": "...", "status_url": "/signups/..."}    accepted; the player is on its way
//!   409 {"error": "email already registered"}
//!   422 {"field": "email", "error": "invalid email: ..."}  nothing was written
//!   422 {"error": "idempotency key ... was used ..."}      the key is another signup's
//!   400 {"error": "Idempotency-Key must be a UUID ..."}    nothing was written
//!   502 {"job_id": "...", "error": "job ... failed: ..."}  the player could not be created
//!   503 {"error": "database unavailable", "job_id": ...}   retry later (check job_id if given)
//! GET /signups/{job_id}
//!   200 {"player": {...}} | 202 {"job_id": ...} | 404 | 502
//! ```
//!
//! With an `Idempotency-Key` header (a UUID the client makes and sends again with the same body
//! when it retries), a retried request gets the first request's outcome, its player, its pending
//! job (202) or its failure, instead of 409 for its own signup; the key becomes the job id.
//!
//! Run it beside a worker (`ackloop worker`), on a migrated database:
//!
//! ```sh
//! DATABASE_URL=postgres://… cargo run --example auth_service
//! curl -s localhost:3000/signup -H 'content-type: application/json' \
//!      -d '{"email": "ada@example.com", "display_name": "Ada"}'
//! ```

use std::sync::Arc;
use std::time::Duration;

use ackloop::{JobId, NewUser, SignupError, Signups};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

/// How long `POST /signup` waits for the player before answering 202.
pub const SIGNUP_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Deserialize)]
pub struct SignupRequest {
    pub email: String,
    pub display_name: String,
}

/// The service's routes, around one shared `Signups` (one LISTEN connection for all requests).
pub fn router(signups: Arc<Signups>, wait: Duration) -> Router {
    Router::new()
        .route("/signup", post(signup))
        .route("/signups/{job_id}", get(signup_status))
        .with_state((signups, wait))
}

async fn signup(
    State((signups, wait)): State<(Arc<Signups>, Duration)>,
    headers: HeaderMap,
    Json(request): Json<SignupRequest>,
) -> Response {
    let key = match idempotency_key(&headers) {
        Ok(key) => key,
        Err(message) => {
            return (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response();
        }
    };
    let new_user = match NewUser::new(request.email, request.display_name) {
        Ok(new_user) => new_user,
        Err(invalid) => {
            let body = json!({ "field": invalid.field, "error": invalid.to_string() });
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response();
        }
    };
    let signed_up = match key {
        Some(key) => {
            signups
                .create_user_and_await_player_with_key(&new_user, key, wait)
                .await
        }
        None => signups.create_user_and_await_player(&new_user, wait).await,
    };
    match signed_up {
        Ok(player) => (StatusCode::CREATED, Json(json!({ "player": player }))).into_response(),
        Err(err) => error_response(err),
    }
}

/// The request's `Idempotency-Key`, if it has one: a UUID, which becomes the job id.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<JobId>, &'static str> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("send one Idempotency-Key header, not several");
    }
    value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<JobId>().ok())
        // Keys are shared by every client of the database: the nil UUID is nobody's own.
        .filter(|key| !key.as_uuid().is_nil())
        .map(Some)
        .ok_or("Idempotency-Key must be a random UUID (uuidgen makes one), sent again unchanged on a retry")
}

async fn signup_status(
    State((signups, _)): State<(Arc<Signups>, Duration)>,
    Path(job_id): Path<JobId>,
) -> Response {
    // A zero wait is one look at the tables.
    match signups.await_player(job_id, Duration::ZERO).await {
        Ok(player) => (StatusCode::OK, Json(json!({ "player": player }))).into_response(),
        Err(err) => error_response(err),
    }
}

fn error_response(err: SignupError) -> Response {
    let (status, body) = match &err {
        SignupError::TimedOut { job_id, .. } => (
            StatusCode::ACCEPTED,
            json!({ "job_id": job_id, "status_url": format!("/signups/{job_id}") }),
        ),
        SignupError::EmailTaken => (StatusCode::CONFLICT, json!({ "error": err.to_string() })),
        SignupError::KeyReused(_) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "error": err.to_string() }),
        ),
        SignupError::UnknownJob(_) => (StatusCode::NOT_FOUND, json!({ "error": err.to_string() })),
        SignupError::JobFailed { job_id, .. } => (
            StatusCode::BAD_GATEWAY,
            json!({ "job_id": job_id, "error": err.to_string() }),
        ),
        SignupError::Unavailable { job_id, .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "job_id": job_id, "error": err.to_string() }),
        ),
        // Nothing was written and the database is fine: busy, so try again shortly.
        SignupError::NotWritten { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": err.to_string(), "retry": true }),
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({ "error": err.to_string() }),
        ),
    };
    (status, Json(body)).into_response()
}

#[allow(dead_code)] // The tests mount `router` and never call this.
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .test_before_acquire(false)
        .connect_with(options)
        .await?;
    ackloop::check_schema(&pool).await?;
    let signups = Arc::new(Signups::connect(pool).await?);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr}");
    axum::serve(listener, router(signups, SIGNUP_WAIT)).await?;
    Ok(())
}
