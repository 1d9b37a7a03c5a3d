//! One walk through the exit-code table (`ackloop --help`, README): each code reached by a real
//! case, and the `--json` shape of every command that takes it, on success and on failure.

use std::process::Output;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::*;

/// The command's exit code, after checking its `--json` output: on success whatever the command
/// prints, on failure exactly one object `{error, message[, job_id]}` whose `error` names the
/// code's row of the table.
fn exit_code(output: &Output) -> i32 {
    let code = output.status.code().expect("exited, not killed");
    if code != 0 {
        let json = stdout_json(output);
        let kind = match code {
            3 => "invalid_input",
            4 if json["error"] == "key_reused" => "key_reused",
            4 => "email_taken",
            5 => "timed_out",
            6 => "job_failed",
            7 => "unavailable",
            8 => "schema_missing",
            9 => "schema_newer",
            10 => "attention",
            11 => "refused",
            12 => "unknown_job",
            13 => "not_written",
            _ => "error",
        };
        assert_eq!(json["error"], kind, "{json}");
        assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()), "{json}");
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert!(
            keys.iter()
                .all(|key| ["error", "message", "job_id"].contains(&key.as_str())),
            "{json}"
        );
        assert!(stderr(output).starts_with("error: "), "{}", stderr(output));
    }
    code
}

async fn run(url: &str, args: &[&str]) -> (i32, Output) {
    let output = run_ackloop(url, args).await;
    (exit_code(&output), output)
}

#[sqlx::test]
async fn every_exit_code_and_json_shape(options: PgPoolOptions, connect: PgConnectOptions) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect.clone(), 3).await;
    // Creating the player for anyone named "Refused…" fails for good (a constraint).
    execute(
        &pool,
        "alter table ackloop.builtin_players add constraint no_refused check (display_name not like 'Refused%')",
    )
    .await;

    // 0, and each command's success shape.
    let (code, out) = run(&url, &["migrate", "--json"]).await;
    assert_eq!(code, 0, "{}", stderr(&out));
    assert!(stdout_json(&out)["latest"].is_i64());
    // 5: no worker yet; the signup is committed and says so with its job id.
    let (code, out) = run(
        &url,
        &[
            "signup",
            "--email",
            "ada@example.com",
            "--display-name",
            "Ada",
            "--timeout",
            "100ms",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 5, "{}", stderr(&out));
    let pending_job = stdout_json(&out)["job_id"].as_str().expect("a job id").to_owned();
    let (code, out) = run(&url, &["status", "--json"]).await;
    assert_eq!(code, 0, "{}", stderr(&out));
    assert_eq!(stdout_json(&out)["pending"], 1, "{}", stdout_json(&out));
    let (code, out) = run(&url, &["jobs", "show", &pending_job, "--json"]).await;
    assert_eq!(code, 0, "{}", stderr(&out));
    assert_eq!(stdout_json(&out)["status"], "pending");
    // 10: doctor finds the job nobody takes (no worker runs); a pending job cannot be retried.
    // (doctor's failure is its report, problems included, not an error object)
    let doctor = run_ackloop(&url, &["doctor", "--stale-after", "1ms", "--json"]).await;
    assert_eq!(doctor.status.code(), Some(10), "{}", stderr(&doctor));
    assert_eq!(stdout_json(&doctor)["ok"], false);
    let (code, _) = run(&url, &["jobs", "retry", &pending_job, "--json"]).await;
    assert_eq!(code, 10);

    let worker = spawn_worker(&pool, worker_config());
    let (code, out) = run(&url, &["await", &pending_job, "--timeout", "30s", "--json"]).await;
    assert_eq!(code, 0, "{}", stderr(&out));
    assert_eq!(stdout_json(&out)["player"]["display_name"], "Ada");
    let (code, out) = run(
        &url,
        &[
            "signup",
            "--email",
            "bo@example.com",
            "--display-name",
            "Bo",
            "--timeout",
            "30s",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{}", stderr(&out));
    assert_eq!(stdout_json(&out)["player"]["display_name"], "Bo");
    // 3, 4, 6.
    let (code, _) = run(
        &url,
        &[
            "signup",
            "--email",
            "not-an-email",
            "--display-name",
            "X",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 3);
    let (code, _) = run(
        &url,
        &[
            "signup",
            "--email",
            "ADA@example.com",
            "--display-name",
            "Ada",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 4);
    let (code, out) = run(
        &url,
        &[
            "signup",
            "--email",
            "cy@example.com",
            "--display-name",
            "Refused Cy",
            "--timeout",
            "30s",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 6, "{}", stderr(&out));
    let failed_job = stdout_json(&out)["job_id"].as_str().expect("a job id").to_owned();
    let (code, _) = run(&url, &["await", &failed_job, "--timeout", "1s", "--json"]).await;
    assert_eq!(code, 6);
    worker.stop().await;
    // 0 for the operator commands; 10 for a done job given to retry.
    let (code, out) = run(&url, &["jobs", "prune", "--older-than", "7d", "--json"]).await;
    assert_eq!(code, 0, "{}", stderr(&out));
    assert!(stdout_json(&out).is_object());
    let (code, _) = run(&url, &["jobs", "retry", &pending_job, "--json"]).await;
    assert_eq!(code, 10, "a done job cannot be retried");
    execute(
        &pool,
        "alter table ackloop.builtin_players drop constraint no_refused",
    )
    .await;
    let (code, out) = run(&url, &["jobs", "retry", "--failed", "--json"]).await;
    assert_eq!(code, 0, "{}", stderr(&out));
    // 12 for an unknown job; 7 for a server that is not there or a malformed string.
    let (code, _) = run(
        &url,
        &["jobs", "show", &ackloop::JobId::new().to_string(), "--json"],
    )
    .await;
    assert_eq!(code, 12);
    // 13 for a signup given no time to be written (a healthy database, not an outage).
    let (code, out) = run(
        &url,
        &[
            "signup",
            "--email",
            "no-time@example.com",
            "--display-name",
            "No Time",
            "--timeout",
            "0s",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 13, "{}", stderr(&out));
    let (code, _) = run(
        "postgres://app@127.0.0.1:1/app?connect_timeout=2",
        &["status", "--json"],
    )
    .await;
    assert_eq!(code, 7);
    let (code, _) = run("postgres://app:secret@[oops/app", &["status", "--json"]).await;
    assert_eq!(code, 7);
    // 11: the server refuses the connection (here, a database that does not exist): answered at
    // once, where an unreachable server is tried again until the timeout.
    let unknown_database = sqlx::ConnectOptions::to_url_lossy(
        &url.parse::<sqlx::postgres::PgConnectOptions>()
            .unwrap()
            .database("ackloop_no_such_database"),
    )
    .to_string();
    let started = std::time::Instant::now();
    let (code, _) = run(&unknown_database, &["status", "--json"]).await;
    assert_eq!(code, 11);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "a refusal took {:?}",
        started.elapsed()
    );
    // 2: a usage error (clap's, before any --json applies).
    let usage = run_ackloop(&url, &["signup", "--email", "x@example.com"]).await;
    assert_eq!(usage.status.code(), Some(2));

    // 8: a database with no schema; 9: one a newer ackloop migrated.
    let empty = format!("ackloop_exit_codes_{}", std::process::id());
    execute_owned(&pool, format!("create database {empty}")).await;
    let empty_url = connect.clone().database(&empty).to_url_lossy().to_string();
    let (code, _) = run(&empty_url, &["status", "--json"]).await;
    assert_eq!(code, 8);
    execute_owned(&pool, format!("drop database {empty} with (force)")).await;
    execute(
        &pool,
        "insert into ackloop.applied_migrations (version, description) values (20991231000001, 'future')",
    )
    .await;
    let (code, _) = run(&url, &["status", "--json"]).await;
    assert_eq!(code, 9);
}

/// The table the walk above follows is the one `--help` prints.
#[test]
fn the_walk_covers_the_printed_table() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_ackloop"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    let walked = [
        "0", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13",
    ];
    for code in walked {
        assert!(
            text.lines()
                .any(|line| line.trim_start().starts_with(&format!("{code} "))),
            "--help lists no exit code {code}: {text}"
        );
    }
}
