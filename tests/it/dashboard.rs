//! The dashboard over HTTP, against a real database and worker: its figures against the tables,
//! the retry action and who may take it, the job page. (Its page in a real browser: `make
//! browser`.)

use std::process::Stdio;

use ackloop::dashboard::{DashboardConfig, router};
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::common::*;

/// The dashboard's router served on an ephemeral port; its base URL.
async fn serve(pool: &PgPool, config: DashboardConfig) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(pool.clone(), config);
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

async fn summary(client: &reqwest::Client, base: &str) -> Value {
    let response = client.get(format!("{base}/api/summary")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

async fn retry(client: &reqwest::Client, base: &str, job: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut request = client
        .post(format!("{base}/api/jobs/{job}/retry"))
        .header("X-Requested-By", "ackloop");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// Fails every job of `email`'s user for good, as a worker does after the last attempt.
async fn fail_job_of(pool: &PgPool, email: &str) -> String {
    let id: uuid::Uuid = sqlx::query_scalar(
        "update ackloop.player_creation_jobs as jobs
         set status = 'failed', attempts = 5, last_error = 'the handler gave up', completed_at = now()
         from ackloop.builtin_users as users where users.id = jobs.builtin_user_id and users.email = $1
         returning jobs.id",
    )
    .bind(email)
    .fetch_one(pool)
    .await
    .unwrap();
    id.to_string()
}

#[sqlx::test]
async fn the_dashboard_shows_what_the_tables_hold_and_retries_a_failed_job(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 6).await;
    let client = reqwest::Client::new();
    let base = serve(
        &pool,
        DashboardConfig {
            actions: true,
            job_pages: true,
            ..DashboardConfig::default()
        },
    )
    .await;
    // Three signups done, one pending then failed, one still pending (no worker yet for them).
    let worker = spawn_worker(&pool, worker_config());
    let signups = signups(&pool).await;
    for n in 0..3 {
        signups
            .create_user_and_await_player(&user(n), DEADLINE)
            .await
            .unwrap();
    }
    worker.stop().await;
    pending_signup(&pool, 3).await;
    pending_signup(&pool, 4).await;
    let failed = fail_job_of(&pool, user(3).email()).await;

    let s = summary(&client, &base).await;
    assert_eq!(s["pending"], 1, "{s}");
    assert_eq!(s["failed_total"], 1, "{s}");
    assert_eq!(s["done_last_minute"], 3, "{s}");
    assert_eq!(s["failed_jobs"][0]["job_id"], failed.as_str());
    assert_eq!(s["failed_jobs"][0]["last_error"], "the handler gave up");
    let made: i64 = s["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["signups"].as_i64().unwrap())
        .sum();
    assert_eq!(made, 5, "every signup of the last minute is in the series: {s}");
    assert!(s["commit_to_done_p50_ms"].as_f64().is_some(), "{s}");
    assert!(s["health"].is_null(), "no metrics endpoints given: {s}");
    // Emails only on a job's page.
    assert!(!s.to_string().contains("@example.com"), "{s}");
    let page = client.get(&base).send().await.unwrap().text().await.unwrap();
    assert!(page.contains(r#"id="failed-jobs""#) && !page.contains("@example.com"));

    // An action without the dashboard's header (a cross-site form post) is refused.
    let forged = client
        .post(format!("{base}/api/jobs/{failed}/retry"))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert_eq!(count_jobs_with_status(&pool, "failed").await, 1);
    // Retry, as `jobs retry`: the failed job is pending again and a worker completes it; a done
    // job is refused; an unknown one is 404.
    let (status, body) = retry(&client, &base, &failed, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("queued again"),
        "{body}"
    );
    let worker = spawn_worker(&pool, worker_config());
    wait_until("the retried job is done", || async {
        count_jobs_with_status(&pool, "done").await == 5
    })
    .await;
    worker.stop().await;
    let (status, body) = retry(&client, &base, &failed, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = retry(&client, &base, &ackloop::JobId::new().to_string(), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let s = summary(&client, &base).await;
    assert_eq!(
        (s["failed_total"].as_i64(), s["pending"].as_i64()),
        (Some(0), Some(0)),
        "{s}"
    );

    // The job's page, by id and by email.
    let job = client
        .get(format!("{base}/jobs/{failed}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(job.contains(r#"<td id="job-status">done</td>"#), "{job}");
    assert!(job.contains(user(3).email()), "{job}");
    let by_email = client
        .get(format!(
            "{base}/jobs?email={}",
            user(3).email().replace('@', "%40")
        ))
        .send()
        .await
        .unwrap();
    assert!(by_email.url().path().ends_with(&failed), "{}", by_email.url());
    let unknown = client
        .get(format!("{base}/jobs/{}", ackloop::JobId::new()))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

#[sqlx::test]
async fn actions_need_the_token_and_are_off_without_one_off_loopback(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 4).await;
    let client = reqwest::Client::new();
    pending_signup(&pool, 1).await;
    let failed = fail_job_of(&pool, user(1).email()).await;

    let guarded = serve(
        &pool,
        DashboardConfig {
            token: Some("s3cret".to_owned()),
            ..DashboardConfig::default()
        },
    )
    .await;
    for token in [None, Some("wrong")] {
        let (status, body) = retry(&client, &guarded, &failed, token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
    let read_only = serve(&pool, DashboardConfig::default()).await;
    let (status, body) = retry(&client, &read_only, &failed, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // A job's page shows an email: without the token it is not shown where job pages are
    // closed; with it (the cookie the page sets) it is.
    for base in [&guarded, &read_only] {
        let page = client.get(format!("{base}/jobs/{failed}")).send().await.unwrap();
        assert_eq!(page.status(), StatusCode::UNAUTHORIZED, "{base}");
        assert!(!page.text().await.unwrap().contains("@example.com"));
    }
    let with_cookie = client
        .get(format!("{guarded}/jobs/{failed}"))
        .header("Cookie", "ackloop_token=s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(with_cookie.status(), StatusCode::OK);
    assert!(body["error"].as_str().unwrap().contains("--token"), "{body}");
    assert_eq!(summary(&client, &read_only).await["actions"], false);
    assert_eq!(
        count_jobs_with_status(&pool, "failed").await,
        1,
        "refused actions changed nothing"
    );
    let (status, body) = retry(&client, &guarded, &failed, Some("s3cret")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(count_jobs_with_status(&pool, "pending").await, 1);
}

/// `ackloop dashboard`: says where it listens, binds loopback by default, serves the page, and
/// off loopback without a token refuses actions; it stops on SIGTERM with exit 0.
#[sqlx::test]
async fn the_dashboard_command_serves_and_stops(options: PgPoolOptions, connect: PgConnectOptions) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 2).await;
    pending_signup(&pool, 1).await;
    let failed = fail_job_of(&pool, user(1).email()).await;
    let client = reqwest::Client::new();
    for (addr, actions) in [("127.0.0.1:0", true), ("0.0.0.0:0", false)] {
        let mut dashboard = ackloop_command(&url)
            .args(["dashboard", "--addr", addr])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(dashboard.stdout.take().unwrap()).lines();
        let line = within("the dashboard to say where it listens", lines.next_line())
            .await
            .unwrap()
            .expect("a line on stdout");
        let base = line
            .strip_prefix("dashboard: ")
            .expect("dashboard: URL")
            .trim_end_matches('/')
            .replace("0.0.0.0", "127.0.0.1");
        assert_eq!(summary(&client, &base).await["actions"], actions, "{addr}");
        // On loopback it answers only to loopback names: a rebound DNS name is refused.
        let rebound = client
            .get(format!("{base}/api/summary"))
            .header("Host", "evil.example")
            .send()
            .await
            .unwrap();
        let expected = if actions {
            StatusCode::MISDIRECTED_REQUEST
        } else {
            StatusCode::OK
        };
        assert_eq!(rebound.status(), expected, "{addr}");
        if !actions {
            let (status, _) = retry(&client, &base, &failed, None).await;
            assert_eq!(status, StatusCode::FORBIDDEN);
        }
        signal(&dashboard, "-TERM").await;
        let status = within("the dashboard to stop", dashboard.wait()).await.unwrap();
        assert_eq!(status.code(), Some(0), "{addr}");
    }
}
