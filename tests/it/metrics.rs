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

    // Status polls (a zero timeout, as the example service's GET does) are neither missed
    // notifications nor callers that gave up.
    let ids: Vec<uuid::Uuid> =
        sqlx::query_scalar("select id from ackloop.player_creation_jobs order by user_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let (done, pending) = (ackloop::JobId::from(ids[0]), ackloop::JobId::from(ids[4]));
    for _ in 0..3 {
        signups
            .await_player(done, std::time::Duration::ZERO)
            .await
            .expect("a done job's player");
        let polled = signups.await_player(pending, std::time::Duration::ZERO).await;
        assert!(
            matches!(polled, Err(ackloop::SignupError::TimedOut { .. })),
            "{polled:?}"
        );
    }
    let polls = metrics.render();
    let counted = |how: &str| {
        polls
            .lines()
            .find_map(|line| line.strip_prefix(&format!("ackloop_confirmations_total{{via=\"{how}\"}} ")))
            .map_or(0.0, |count| count.trim().parse::<f64>().unwrap())
    };
    assert_eq!(counted("table_check"), via("table_check"), "{polls}");
    assert_eq!(counted("already_finished"), 3.0, "{polls}");
    assert_eq!(
        sample(&polls, "ackloop_caller_timeouts_total"),
        Some(1.0),
        "{polls}"
    );
    // A wait that runs out is one.
    let waited = signups
        .await_player(pending, std::time::Duration::from_millis(50))
        .await;
    assert!(
        matches!(waited, Err(ackloop::SignupError::TimedOut { .. })),
        "{waited:?}"
    );
    assert_eq!(
        sample(&metrics.render(), "ackloop_caller_timeouts_total"),
        Some(2.0)
    );
}

#[sqlx::test]
async fn commit_to_claim_starts_at_the_write_not_at_the_transactions_start(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let (recorder, metrics) = ackloop::MetricsHandle::unregistered().unwrap();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let pool = pool(options, connect, 4).await;
    let worker = spawn_worker(&pool, worker_config());
    // A transaction that began long before its signup (a slow request handler, say).
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("select pg_sleep(1.5)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let job = ackloop::create_user(&mut tx, &ackloop::Channels::default(), &user(0))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    wait_until("the job is done", || async {
        count_jobs_with_status(&pool, "done").await == 1
    })
    .await;
    worker.stop().await;
    let claimed_within: f64 = sqlx::query_scalar(
        "select extract(epoch from completed_at - created_at)::float8 from ackloop.player_creation_jobs where id = $1",
    )
    .bind(job.job_id.as_uuid())
    .fetch_one(&pool)
    .await
    .unwrap();
    let text = metrics.render();
    let recorded = sample(&text, "ackloop_commit_to_claim_seconds_sum").expect("recorded");
    assert_eq!(
        sample(&text, "ackloop_commit_to_claim_seconds_count"),
        Some(1.0),
        "{text}"
    );
    // Measured from the write, it is no longer than the row says the job waited; from the
    // transaction's start it would have included the 1.5 s before the write.
    assert!(
        recorded <= claimed_within + 0.01,
        "{recorded} > {claimed_within}: {text}"
    );
    assert!(recorded < 1.5, "{recorded}");
}

#[sqlx::test]
async fn jobs_done_counts_only_what_committed(options: PgPoolOptions, connect: PgConnectOptions) {
    let (recorder, metrics) = ackloop::MetricsHandle::unregistered().unwrap();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let pool = pool(options, connect, 6).await;
    // A check that runs at commit: the player's statement succeeds, its transaction's commit fails.
    execute(
        &pool,
        "create function refuse_doomed() returns trigger language plpgsql as $$
         begin
             if new.display_name like 'Doomed%' then
                 raise exception 'doomed at commit';
             end if;
             return null;
         end $$;
         create constraint trigger doomed after insert on ackloop.builtin_players
             deferrable initially deferred for each row execute function refuse_doomed();",
    )
    .await;
    let mut conn = pool.acquire().await.unwrap();
    for n in 0..6 {
        let name = if n == 2 {
            "Doomed".to_owned()
        } else {
            format!("Player {n}")
        };
        let new_user = ackloop::NewUser::new(format!("user{n}@example.com"), name).unwrap();
        ackloop::create_user(&mut conn, &ackloop::Channels::default(), &new_user)
            .await
            .unwrap();
    }
    drop(conn);
    let config = ackloop::WorkerConfig {
        max_attempts: 2,
        backoff: ackloop::Backoff {
            base: std::time::Duration::from_millis(50),
            max: std::time::Duration::from_millis(100),
        },
        ..worker_config()
    };
    let worker = spawn_worker(&pool, config);
    wait_until("five done and the doomed one failed", || async {
        count_jobs_with_status(&pool, "done").await == 5 && count_jobs_with_status(&pool, "failed").await == 1
    })
    .await;
    worker.stop().await;
    let text = metrics.render();
    assert_eq!(sample(&text, "ackloop_jobs_done_total"), Some(5.0), "{text}");
    assert_eq!(sample(&text, "ackloop_jobs_failed_total"), Some(1.0), "{text}");
}
