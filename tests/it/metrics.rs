//! The metrics of the acknowledgement path: scraped from a real worker's endpoint, and recorded
//! by the signup side, each checked against the rows.

use std::process::Stdio;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::common::*;

/// `GET path` over plain HTTP/1.1; returns the status line and the body.
async fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// The value of an unlabelled sample in Prometheus text.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[sqlx::test]
async fn a_worker_serves_metrics_that_match_the_rows(options: PgPoolOptions, connect: PgConnectOptions) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 4).await;
    let mut worker = ackloop_command(&url)
        .args(["worker", "--metrics-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "ackloop=info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The log names the port it bound; keep draining the log after that.
    let mut log = BufReader::new(worker.stderr.take().unwrap()).lines();
    let addr = within("the worker to say where metrics are served", async {
        loop {
            let line = log.next_line().await.unwrap().expect("the worker exited");
            if let Some(rest) = line.split("addr=").nth(1) {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
    })
    .await;
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });

    let signups = signups(&pool).await;
    for n in 0..3 {
        signups
            .create_user_and_await_player(&user(n), DEADLINE)
            .await
            .unwrap();
    }

    let (status, health) = http_get(&addr, "/healthz").await;
    assert!(status.contains("200"), "{status}: {health}");
    let done_rows = count_jobs_with_status(&pool, "done").await;
    assert_eq!(done_rows, 3);
    // The worker records a job's metrics just after its commit, which may be after its caller
    // heard of it: wait for them to match the rows.
    wait_until("the worker's metrics match the rows", || async {
        let (status, metrics) = http_get(&addr, "/metrics").await;
        assert!(status.contains("200"), "{status}");
        sample(&metrics, "ackloop_jobs_done_total") == Some(done_rows as f64)
            && sample(&metrics, "ackloop_commit_to_claim_seconds_count") == Some(3.0)
    })
    .await;
    let (_, metrics) = http_get(&addr, "/metrics").await;
    assert!(
        metrics.contains("# TYPE ackloop_claim_to_done_seconds histogram"),
        "{metrics}"
    );

    let (status, _) = http_get(&addr, "/nothing").await;
    assert!(status.contains("404"), "{status}");
    signal(&worker, "-TERM").await;
    let exited = within("the worker to exit", worker.wait()).await.unwrap();
    assert!(exited.success());
}

#[sqlx::test]
async fn the_signup_side_counts_confirmations_timeouts_and_garbage(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    // This test's runtime is one thread: a local recorder sees exactly this test's work.
    let (recorder, metrics) = ackloop::MetricsHandle::unregistered().unwrap();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let pool = pool(options, connect, 6).await;
    let worker = spawn_worker(&pool, worker_config());
    let signups = signups(&pool).await;
    for n in 0..4 {
        signups
            .create_user_and_await_player(&user(n), DEADLINE)
            .await
            .unwrap();
    }
    worker.stop().await;
    let timed_out = signups
        .create_user_and_await_player(&user(9), std::time::Duration::from_millis(100))
        .await;
    assert!(matches!(timed_out, Err(ackloop::SignupError::TimedOut { .. })));
    notify(&pool, ackloop::DEFAULT_DONE_CHANNEL, "garbage").await;
    wait_until("the garbage is counted", || async {
        metrics
            .render()
            .contains(r#"ackloop_payloads_ignored_total{channel="player_jobs_done"} 1"#)
    })
    .await;

    let text = metrics.render();
    // Each confirmation is counted once, by the way it arrived: by notification unless a
    // loaded machine let the once-a-second look at the tables get there first.
    let via = |how: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("ackloop_confirmations_total{{via=\"{how}\"}} ")))
            .map_or(0.0, |count| count.trim().parse::<f64>().unwrap())
    };
    assert_eq!(via("notification") + via("table_check"), 4.0, "{text}");
    assert!(via("notification") >= 1.0, "{text}");
    assert_eq!(
        sample(&text, "ackloop_caller_timeouts_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "ackloop_jobs_done_total"), Some(4.0), "{text}");
    assert_eq!(
        sample(&text, "ackloop_done_to_confirmed_seconds_count"),
        Some(4.0),
        "{text}"
    );
}
