//! `ackloop bench`, run for real on a scratch database beside the test's: the figures it prints
//! are not checked (it asserts nothing about speed), what it verifies and counts is.

use serde_json::Value;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::*;

/// `ackloop bench --json` with `extra` flags; its report, after checking it passed.
async fn bench(url: &str, extra: &[&str]) -> Value {
    let mut args = vec!["bench", "--signups", "200", "--concurrency", "8", "--json"];
    args.extend_from_slice(extra);
    let output = run_ackloop(url, &args).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let report = stdout_json(&output);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        report["verification"],
        "users 200, players 200, jobs done 200, not done 0, doubled 0"
    );
    assert_eq!(
        (report["timeouts"].as_u64(), report["errors"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(report["throughput"].as_f64().is_some_and(|t| t > 0.0), "{report}");
    assert!(report["p50_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{report}");
    report
}

#[sqlx::test]
async fn bench_runs_callers_and_workers_in_processes_of_their_own(
    _options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();

    let single = bench(&url, &[]).await;
    assert_eq!(
        (single["auth_processes"].as_u64(), single["p"].as_u64()),
        (Some(0), Some(0))
    );

    let spread = bench(&url, &["--auth-processes", "2", "--worker-processes", "2"]).await;
    assert_eq!(
        (spread["auth_processes"].as_u64(), spread["p"].as_u64()),
        (Some(2), Some(2))
    );
    // Every latency of both auth processes is in the merged figures.
    assert!(spread["max_ms"].as_f64() >= spread["p99_ms"].as_f64());
    // Two processes cannot share a transaction: each one committed its own signups.
    assert!(
        spread["signup_commits"].as_i64().is_some_and(|n| n >= 2),
        "{spread}"
    );
    assert!(
        spread["worker_commits"].as_i64().is_some_and(|n| n >= 1),
        "{spread}"
    );
    // Each process has its own pool and its own LISTEN connection: two of each per side.
    let (one, four) = (
        single["connections"].as_i64().unwrap(),
        spread["connections"].as_i64().unwrap(),
    );
    assert!(four > one + 3, "{four} connections in 4 processes, {one} in one");
}

#[sqlx::test]
async fn bench_refuses_auth_processes_it_cannot_use(_options: PgPoolOptions, connect: PgConnectOptions) {
    let url = connect.to_url_lossy().to_string();
    for (flags, says) in [
        (
            &["--auth-processes", "2", "--drain"][..],
            "--drain times the workers alone",
        ),
        (
            &["--auth-processes", "9", "--concurrency", "8"][..],
            "every auth process needs a caller",
        ),
    ] {
        let mut args = vec!["bench", "--signups", "10"];
        args.extend_from_slice(flags);
        let output = run_ackloop(&url, &args).await;
        assert_eq!(output.status.code(), Some(2), "{flags:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(says), "{flags:?}: {}", stderr(&output));
    }
}
