//! `--log-format json` (and `ACKLOOP_LOG_FORMAT=json`): the real binary's stderr, every line of
//! it parsed, and every line about a job carrying that job's id as a field.

use std::collections::BTreeSet;
use std::process::Stdio;

use ackloop::{Channels, NewUser};
use serde_json::Value;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::*;

/// Every line of a log, each parsed as one JSON object with the fields a log pipeline keys on;
/// panics naming the first line that is not one.
fn json_lines(log: &str) -> Vec<Value> {
    assert!(!log.trim().is_empty(), "the log is empty");
    log.lines()
        .map(|line| {
            let parsed: Value = serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("a log line is not JSON ({err}): {line}\n{log}"));
            assert!(parsed["timestamp"].is_string(), "no timestamp: {line}");
            assert!(
                matches!(
                    parsed["level"].as_str(),
                    Some("TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR")
                ),
                "no level: {line}"
            );
            assert!(
                parsed["target"]
                    .as_str()
                    .is_some_and(|target| target.starts_with("ackloop")),
                "no target: {line}"
            );
            assert!(parsed["message"].is_string(), "no message: {line}");
            parsed
        })
        .collect()
}

fn message(line: &Value) -> &str {
    line["message"].as_str().unwrap_or_default()
}

/// The `job.id` a line carries: its own field, or one of the spans it was logged in.
fn job_id_of(line: &Value) -> Option<&str> {
    let spans = line["spans"].as_array().into_iter().flatten();
    std::iter::once(line)
        .chain(spans)
        .find_map(|fields| fields["job.id"].as_str())
}

/// Whether a message is about one job: it says "job" in the singular (the ignored-payload line
/// says "not a job id" of something that is not one).
fn concerns_one_job(message: &str) -> bool {
    let words = message.split(|c: char| !(c.is_alphanumeric() || c == '\''));
    !message.contains("not a job id") && words.into_iter().any(|word| word == "job" || word == "job's")
}

/// The lines with `text` as their message.
fn lines_saying<'a>(lines: &'a [Value], text: &str) -> Vec<&'a Value> {
    lines.iter().filter(|line| message(line) == text).collect()
}

/// Every job's id, as text.
async fn job_ids(pool: &sqlx::PgPool) -> BTreeSet<String> {
    sqlx::query_scalar!("select id from ackloop.player_creation_jobs")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|id| id.to_string())
        .collect()
}

/// Asserts that every line of `lines` about one job names a job of the table by its id.
fn assert_job_lines_name_their_job(lines: &[Value], ids: &BTreeSet<String>) {
    let about_jobs: Vec<&Value> = lines
        .iter()
        .filter(|line| concerns_one_job(message(line)))
        .collect();
    assert!(!about_jobs.is_empty(), "no line about a job: {lines:#?}");
    for line in about_jobs {
        let id = job_id_of(line).unwrap_or_else(|| panic!("a line about a job has no job.id: {line}"));
        assert!(ids.contains(id), "job.id {id} is no job of the table: {line}");
    }
}

#[sqlx::test]
async fn json_worker_log_names_the_job_on_every_line_about_one(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 3).await;
    // One job that cannot succeed, one that fails once and is retried, five that just work.
    execute(
        &pool,
        "alter table ackloop.builtin_players add constraint no_doomed_players check (display_name <> 'Doomed');
         create function flaky_players() returns trigger language plpgsql as $$
         begin
             if new.display_name = 'Flaky'
                and (select attempts from ackloop.player_creation_jobs where builtin_user_id = new.user_id) < 2 then
                 raise exception 'flaky' using errcode = '40001';
             end if;
             return new;
         end $$;
         create trigger flaky before insert on ackloop.builtin_players for each row execute function flaky_players();",
    )
    .await;
    for n in 0..3 {
        pending_signup(&pool, n).await;
    }
    let mut conn = pool.acquire().await.unwrap();
    let mut signup = async |email: &str, name: &str| {
        let user = NewUser::new(email, name).unwrap();
        let written = ackloop::create_user(&mut conn, &Channels::default(), &user).await;
        written.unwrap().job_id.to_string()
    };
    let doomed = signup("doomed@example.com", "Doomed").await;
    let flaky = signup("flaky@example.com", "Flaky").await;
    drop(conn);
    for n in 3..5 {
        pending_signup(&pool, n).await;
    }

    // One loop, taking its first two jobs alone (as after every start), then batches of two:
    // jobs go every way a job can, alone, in one statement, and in a savepoint each.
    let worker = ackloop_command(&url)
        .env("RUST_LOG", "ackloop=debug")
        .args(["--log-format", "json", "worker", "--retry-backoff", "10ms"])
        .args(["--concurrency", "1", "--batch-size", "2"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the worker");
    wait_until("six jobs are done and the doomed one failed", || async {
        count_jobs_with_status(&pool, "done").await == 6 && count_jobs_with_status(&pool, "failed").await == 1
    })
    .await;
    let log = terminate_worker(worker, "the worker to exit after SIGTERM").await;

    let lines = json_lines(&log);
    let ids = job_ids(&pool).await;
    assert_job_lines_name_their_job(&lines, &ids);
    // Each outcome is a line of its own, naming its job.
    let failed = lines_saying(&lines, "job failed");
    assert_eq!(failed.len(), 1, "{log}");
    assert_eq!(failed[0]["job.id"], doomed.as_str());
    assert_eq!(failed[0]["level"], "ERROR");
    assert!(
        failed[0]["error"]
            .as_str()
            .is_some_and(|error| error.contains("no_doomed_players")),
        "{}",
        failed[0]
    );
    let retried = lines_saying(&lines, "job attempt failed; will retry");
    assert!(
        retried
            .iter()
            .any(|line| line["job.id"] == flaky.as_str() && line["attempt"] == 1),
        "{log}"
    );
    let done: BTreeSet<&str> = lines_saying(&lines, "job done")
        .iter()
        .filter_map(|line| line["job.id"].as_str())
        .collect();
    let expected_done: BTreeSet<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| *id != doomed)
        .collect();
    assert_eq!(done, expected_done, "each done job has its line: {log}");
    // A batch's line says how big it was, and names no job.
    let batches = lines_saying(&lines, "batch done");
    assert!(!batches.is_empty(), "{log}");
    for batch in batches {
        assert!(
            batch["batch.size"].is_u64() && batch["job.id"].is_null(),
            "{batch}"
        );
    }
    assert!(
        !log.contains("@example.com"),
        "the worker must not log emails: {log}"
    );
}

#[sqlx::test]
async fn log_format_can_come_from_the_environment(options: PgPoolOptions, connect: PgConnectOptions) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 2).await;
    let json_logs = |args: &[&str]| {
        let mut command = ackloop_command(&url);
        command
            .env("ACKLOOP_LOG_FORMAT", "json")
            .env("RUST_LOG", "ackloop=debug")
            .args(args)
            .stderr(Stdio::piped());
        command
    };
    let worker = json_logs(&["worker"]).spawn().expect("start the worker");

    let signup = json_logs(&[
        "signup",
        "--email",
        "ada@example.com",
        "--display-name",
        "Ada",
        "--timeout",
        "30s",
    ])
    .output();
    let signup = within("the signup to finish", signup).await.unwrap();
    assert_eq!(signup.status.code(), Some(0), "{}", stderr(&signup));
    let log = terminate_worker(worker, "the worker to exit after SIGTERM").await;

    let ids = job_ids(&pool).await;
    assert_eq!(ids.len(), 1);
    let signup_lines = json_lines(&stderr(&signup));
    let finished = lines_saying(&signup_lines, "signup finished");
    assert_eq!(finished.len(), 1, "{}", stderr(&signup));
    assert!(ids.contains(job_id_of(finished[0]).unwrap()));
    assert!(finished[0]["user.id"].is_string(), "{}", finished[0]);
    let worker_lines = json_lines(&log);
    assert_job_lines_name_their_job(&worker_lines, &ids);
    assert_eq!(lines_saying(&worker_lines, "worker stopped").len(), 1, "{log}");
    for text in [stderr(&signup), log] {
        assert!(
            !text.contains("ada@example.com"),
            "emails are never logged: {text}"
        );
    }
}

#[sqlx::test]
async fn a_failed_command_reports_as_a_json_line_with_its_job_id(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 2).await;
    let job_id = pending_signup(&pool, 1).await.to_string();

    let output = run_ackloop(
        &url,
        &["--log-format", "json", "await", &job_id, "--timeout", "100ms"],
    )
    .await;

    assert_eq!(output.status.code(), Some(5), "{}", stderr(&output));
    let lines = json_lines(&stderr(&output));
    let last = lines.last().expect("a line");
    assert_eq!(last["level"], "ERROR", "{last}");
    assert_eq!(last["exit_code"], 5, "{last}");
    assert_eq!(last["error.kind"], "timed_out", "{last}");
    assert_eq!(last["job.id"], job_id.as_str(), "{last}");
    assert!(message(last).contains("still pending"), "{last}");
}

#[tokio::test]
async fn an_unknown_log_format_is_a_usage_error() {
    let flag = run_ackloop("unused", &["--log-format", "yaml", "status"]).await;
    assert_eq!(flag.status.code(), Some(2), "{}", stderr(&flag));
    assert!(
        stderr(&flag).contains("[possible values: text, json]"),
        "{}",
        stderr(&flag)
    );

    let mut from_env = ackloop_command("unused");
    from_env.env("ACKLOOP_LOG_FORMAT", "yaml").arg("status");
    let from_env = within("ackloop to exit", from_env.output()).await.unwrap();
    assert_eq!(from_env.status.code(), Some(2), "{}", stderr(&from_env));
}
