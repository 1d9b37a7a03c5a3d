//! The example auth service (`examples/auth_service.rs`), served for real and driven over HTTP.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::*;

#[path = "../../examples/auth_service.rs"]
#[allow(dead_code, unused_imports)]
mod auth_service;

/// The example, served on an ephemeral port.
struct Service {
    base: String,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Service {
    async fn start(signups: ackloop::Signups, wait: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let app = auth_service::router(Arc::new(signups), wait);
        let stopping = shutdown.clone().cancelled_owned();
        let task =
            tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stopping).await });
        Self { base, shutdown, task }
    }

    /// Stops the server, releasing its `Signups` and their connections.
    async fn stop(self) {
        self.shutdown.cancel();
        within("the service to stop", self.task).await.unwrap().unwrap();
    }
}

async fn post_signup(client: &reqwest::Client, base: &str, email: &str, name: &str) -> (StatusCode, Value) {
    post_signup_as(client, base, None, email, name).await
}

/// `POST /signup`, with an `Idempotency-Key` header when `key` is given.
async fn post_signup_as(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    email: &str,
    name: &str,
) -> (StatusCode, Value) {
    let mut request = client
        .post(format!("{base}/signup"))
        .json(&json!({ "email": email, "display_name": name }));
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.expect("POST /signup");
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

#[sqlx::test]
async fn the_example_service_answers_every_case_over_http(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options, connect, 8).await;
    let client = reqwest::Client::new();
    let service = Service::start(signups(&pool).await, Duration::from_millis(500)).await;
    let base = service.base.clone();

    // No worker yet: the signup is accepted, and its status is pending.
    let (status, accepted) = post_signup(&client, &base, "ada@example.com", "Ada").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let status_url = format!("{base}{}", accepted["status_url"].as_str().unwrap());
    let pending = client.get(&status_url).send().await.unwrap();
    assert_eq!(pending.status(), StatusCode::ACCEPTED);

    // With a worker, the pending signup completes and new ones get their player at once.
    let worker = spawn_worker(&pool, worker_config());
    wait_until("the accepted signup's player exists", || async {
        client.get(&status_url).send().await.unwrap().status() == StatusCode::OK
    })
    .await;
    let done: Value = client
        .get(&status_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(done["player"]["display_name"], "Ada");
    // A service that waits as long as the test allows: a worker is running, so a signup gets its
    // player (201) however slow the machine, rather than within some fixed time.
    let patient = Service::start(signups(&pool).await, DEADLINE).await;
    let (status, created) = post_signup(&client, &patient.base, "grace@example.com", "Grace").await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["player"]["display_name"], "Grace");

    let (status, taken) = post_signup(&client, &base, "ADA@example.com", "Ada again").await;
    assert_eq!(status, StatusCode::CONFLICT, "{taken}");
    let (status, invalid) = post_signup(&client, &base, "not-an-email", "Eve").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{invalid}");
    assert_eq!(invalid["field"], "email");
    let unknown = client
        .get(format!("{base}/signups/{}", ackloop::JobId::new()))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);

    assert_eq!(
        counts(&pool).await.players,
        2,
        "invalid and duplicate signups wrote nothing"
    );
    assert_eq!(counts(&pool).await.users, 2);
    worker.stop().await;
    drop(client);
    service.stop().await;
    patient.stop().await;
}

#[sqlx::test]
async fn a_client_that_gave_up_sends_its_key_again_and_gets_its_own_signup(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 8).await;
    let client = reqwest::Client::new();
    // A service that would wait for the player as long as the test allows; no worker yet.
    let patient = Service::start(signups(&pool).await, DEADLINE).await;
    let quick = Service::start(signups(&pool).await, Duration::from_millis(300)).await;
    let key = ackloop::JobId::new().to_string();

    // The client gives up (its own timeout, a closed tab) once the signup is committed.
    let gave_up = tokio::spawn({
        let (client, base, key) = (client.clone(), patient.base.clone(), key.clone());
        async move { post_signup_as(&client, &base, Some(&key), "ada@example.com", "Ada").await }
    });
    wait_until("the first request's signup is committed", || async {
        sqlx::query_scalar::<_, i64>("select count(*) from ackloop.player_creation_jobs where id = $1::uuid")
            .bind(&key)
            .fetch_one(&pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    gave_up.abort();
    assert!(gave_up.await.unwrap_err().is_cancelled());

    // Its retry, with the same key and body, learns its signup is on its way...
    let (status, pending) = post_signup_as(&client, &quick.base, Some(&key), "ada@example.com", "Ada").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pending}");
    assert_eq!(pending["job_id"], key.as_str());
    // ...and, once a worker runs, gets its player; every retry after that gets the same one.
    let worker = spawn_worker(&pool, worker_config());
    let (status, created) =
        post_signup_as(&client, &patient.base, Some(&key), "ada@example.com", "Ada").await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["player"]["display_name"], "Ada");
    let (status, again) = post_signup_as(&client, &quick.base, Some(&key), "ada@example.com", "Ada").await;
    assert_eq!((status, &again), (StatusCode::CREATED, &created));

    // Another key, or none, for the same email: someone else's signup.
    let other = ackloop::JobId::new().to_string();
    let (status, taken) = post_signup_as(&client, &quick.base, Some(&other), "ada@example.com", "Ada").await;
    assert_eq!(status, StatusCode::CONFLICT, "{taken}");
    let (status, taken) = post_signup(&client, &quick.base, "ada@example.com", "Ada").await;
    assert_eq!(status, StatusCode::CONFLICT, "{taken}");
    // The key with another body: refused.
    let (status, reused) =
        post_signup_as(&client, &quick.base, Some(&key), "grace@example.com", "Grace").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reused}");
    assert!(
        reused["error"].as_str().unwrap().contains("idempotency key"),
        "{reused}"
    );
    // A key that is not a UUID: refused before anything is written.
    let (status, bad) = post_signup_as(
        &client,
        &quick.base,
        Some("retry-1"),
        "grace@example.com",
        "Grace",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    assert!(
        bad["error"].as_str().unwrap().contains("must be a random UUID"),
        "{bad}"
    );
    let nil = uuid::Uuid::nil().to_string();
    let (status, bad) = post_signup_as(&client, &quick.base, Some(&nil), "grace@example.com", "Grace").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");

    let counts = counts(&pool).await;
    assert_eq!((counts.users, counts.players), (1, 1), "one signup, one player");
    worker.stop().await;
    drop(client);
    quick.stop().await;
    patient.stop().await;
}
