//! The `ackloop` binary, run for real against the test's database: output, exit codes, rows.

use std::process::{Output, Stdio};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use tokio::process::Command;

use crate::common::*;

fn ackloop(url: &str) -> Command {
    let mut command = ackloop_command(url);
    command.env("RUST_LOG", "ackloop=debug");
    command
}

/// `ackloop signup` for `email` and `display_name`, plus `extra` flags.
async fn signup(url: &str, email: &str, display_name: &str, extra: &[&str]) -> Output {
    let mut args = vec!["signup", "--email", email, "--display-name", display_name];
    args.extend_from_slice(extra);
    run_ackloop(url, &args).await
}

#[sqlx::test]
async fn worker_and_signup_commands_close_the_loop(options: PgPoolOptions, connect: PgConnectOptions) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 2).await;
    let worker = ackloop(&url)
        .args(["worker", "--concurrency", "2"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the worker");

    let output = signup(&url, "ada@example.com", "Ada", &["--timeout", "30s", "--json"]).await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let json = stdout_json(&output);
    assert_eq!(json["player"]["display_name"], "Ada");
    assert!(json["elapsed_ms"].as_f64().is_some_and(|ms| ms > 0.0));
    let player_id = sqlx::query_scalar!("select id from ackloop.builtin_players as players")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(json["player"]["id"], player_id);

    // SIGTERM: the worker drains and exits 0.
    let log = terminate_worker(worker, "the worker to exit after SIGTERM").await;
    assert!(
        !log.contains("ada@example.com"),
        "the worker must not log emails: {log}"
    );
}

#[sqlx::test]
async fn signup_command_exit_codes_tell_what_happened(options: PgPoolOptions, connect: PgConnectOptions) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 2).await;

    let invalid = signup(&url, "not-an-email", "Ada", &["--json"]).await;
    assert_eq!(invalid.status.code(), Some(3), "{}", stderr(&invalid));
    assert_eq!(stdout_json(&invalid)["error"], "invalid_input");
    assert!(stderr(&invalid).contains("invalid email"), "{}", stderr(&invalid));
    let blank = signup(&url, "a@example.com", "  ", &[]).await;
    assert_eq!(blank.status.code(), Some(3));
    assert!(
        stderr(&blank).contains("invalid display name"),
        "{}",
        stderr(&blank)
    );
    assert_eq!(counts(&pool).await.users, 0, "bad input writes nothing");

    // No worker runs: the signup commits and times out, and says the job will still complete.
    let timed_out = signup(&url, "ada@example.com", "Ada", &["--timeout", "200ms", "--json"]).await;
    assert_eq!(timed_out.status.code(), Some(5), "{}", stderr(&timed_out));
    let json = stdout_json(&timed_out);
    assert_eq!(json["error"], "timed_out");
    let job_id: uuid::Uuid =
        sqlx::query_scalar!("select id from ackloop.player_creation_jobs where status = 'pending'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(json["job_id"], job_id.to_string());

    // Waiting again from a script: the job id comes back on stdout with the timeout.
    let waited = run_ackloop(
        &url,
        &["await", &job_id.to_string(), "--timeout", "100ms", "--json"],
    )
    .await;
    assert_eq!(waited.status.code(), Some(5), "{}", stderr(&waited));
    let json = stdout_json(&waited);
    assert_eq!(
        (json["error"].as_str(), json["job_id"].as_str()),
        (Some("timed_out"), Some(&*job_id.to_string()))
    );

    let taken = signup(&url, "Ada@Example.com", "Ada", &[]).await;
    assert_eq!(taken.status.code(), Some(4));
    assert!(stderr(&taken).contains("email already registered"));

    let status = run_ackloop(&url, &["status", "--json"]).await;
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    let report = stdout_json(&status);
    assert_eq!(report["pending"], 1);
    assert_eq!(report["done"], 0);
    assert!(report["oldest_pending_secs"].as_f64().is_some());
}

#[sqlx::test]
async fn bad_database_urls_exit_7_without_leaking_the_password(_pool: sqlx::PgPool) {
    for url in [
        "not a url",
        "postgres://ackloop:hunter2@localhost:1/nowhere?connect_timeout=2",
        "postgres://ackloop:hunter2@localhost/db?host=/nonexistent/socket/dir",
    ] {
        let output = run_ackloop(url, &["status"]).await;
        assert_eq!(output.status.code(), Some(7), "{url}: {}", stderr(&output));
        assert!(!stderr(&output).contains("hunter2"), "{}", stderr(&output));
    }
    let mut no_url = ackloop("unused");
    no_url.env_remove("DATABASE_URL").arg("status");
    let output = within("ackloop to exit", no_url.output()).await.unwrap();
    assert_eq!(output.status.code(), Some(7));
    assert!(
        stderr(&output).contains("DATABASE_URL is not set"),
        "{}",
        stderr(&output)
    );
}

#[sqlx::test(migrations = false)]
async fn missing_schema_says_to_migrate_and_migrate_fixes_it(
    _options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = connect.to_url_lossy().to_string();

    let before = signup(&url, "ada@example.com", "Ada", &[]).await;
    assert_eq!(before.status.code(), Some(8), "{}", stderr(&before));
    assert!(stderr(&before).contains("ackloop migrate"), "{}", stderr(&before));

    let migrate = run_ackloop(&url, &["migrate", "--json"]).await;
    assert_eq!(migrate.status.code(), Some(0), "{}", stderr(&migrate));
    let applied = stdout_json(&migrate)["applied"].as_array().map(Vec::len);
    assert_eq!(applied, Some(ackloop::MIGRATOR.iter().count()));
    let again = run_ackloop(&url, &["migrate", "--json"]).await;
    assert_eq!(stdout_json(&again)["applied"], serde_json::json!([]));
    assert_eq!(
        again.status.code(),
        Some(0),
        "migrate is idempotent: {}",
        stderr(&again)
    );

    let status = run_ackloop(&url, &["status"]).await;
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
}

#[sqlx::test]
async fn signup_with_an_idempotency_key_can_be_run_again(options: PgPoolOptions, connect: PgConnectOptions) {
    let url = connect.to_url_lossy().to_string();
    let pool = pool(options, connect, 2).await;
    let key = ackloop::JobId::new().to_string();
    let with_key = ["--idempotency-key", key.as_str(), "--timeout", "200ms", "--json"];

    // No worker: twice the same pending job, the key being its id; the second run wrote nothing.
    for run in ["first", "again"] {
        let output = signup(&url, "ada@example.com", "Ada", &with_key).await;
        assert_eq!(output.status.code(), Some(5), "{run}: {}", stderr(&output));
        assert_eq!(stdout_json(&output)["job_id"], key.as_str(), "{run}");
    }
    assert_eq!(counts(&pool).await.users, 1);

    // The key with another email: exit 4, named apart from a taken email.
    let reused = signup(&url, "grace@example.com", "Grace", &with_key).await;
    assert_eq!(reused.status.code(), Some(4), "{}", stderr(&reused));
    assert_eq!(stdout_json(&reused)["error"], "key_reused");
    assert!(stderr(&reused).contains("send a new key"), "{}", stderr(&reused));
    // Not a UUID: a usage error from the flag's parser.
    let bad = signup(
        &url,
        "grace@example.com",
        "Grace",
        &["--idempotency-key", "retry-1"],
    )
    .await;
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert_eq!(counts(&pool).await.users, 1, "nothing else was written");
}

/// A duration without a unit (is `7` seconds or days?) or past any sensible bound is a usage
/// error naming the forms, before anything touches the database: `jobs prune --older-than 7`
/// once meant seven seconds and pruned nearly everything.
#[sqlx::test]
async fn durations_need_a_unit_and_a_sensible_size(pool: PgPool) {
    let url = pool.connect_options().to_url_lossy().to_string();
    commit_signups(&mut pool.acquire().await.unwrap(), [1]).await;
    // A failed job a month old: what a prune of "7" of any unit would delete.
    sqlx::query(
        "update ackloop.player_creation_jobs
         set status = 'failed', last_error = 'gave up', completed_at = now() - interval '30 days'",
    )
    .execute(&pool)
    .await
    .unwrap();
    for (args, says) in [
        (
            &["jobs", "prune", "--older-than", "7"][..],
            "has no unit: give a number with a unit: 500ms, 30s, 2m, 12h or 7d",
        ),
        (
            &["jobs", "prune", "--older-than", "1000000000000s"][..],
            "too long",
        ),
        (
            &[
                "signup",
                "--email",
                "b@example.com",
                "--display-name",
                "B",
                "--timeout",
                "30",
            ][..],
            "no unit",
        ),
    ] {
        let output = run_ackloop(&url, args).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(says), "{args:?}: {}", stderr(&output));
    }
    assert_eq!(
        count_of(&pool, "select count(*) from ackloop.player_creation_jobs").await,
        1,
        "nothing pruned or added"
    );
}

/// Each command's `--help` shows its own options first, then the connection and logging options
/// every command takes, once, under their own heading.
#[test]
fn help_shows_the_commands_own_options_first_and_the_shared_ones_once() {
    for (command, own) in [
        ("signup", "--email"),
        ("worker", "--batch-size"),
        ("jobs", "--help"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_ackloop"))
            .args([command, "--help"])
            .env("DATABASE_URL", "postgres://app@localhost/app")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&output.stdout);
        let own_at = help.find("Options:").expect("an Options section");
        let shared_at = help
            .find("Connection and logging (every command):")
            .unwrap_or_else(|| panic!("{command}: no shared heading in {help}"));
        assert!(own_at < shared_at, "{command}: own options come first: {help}");
        assert!(help[own_at..shared_at].contains(own), "{command}: {help}");
        assert!(
            !help[own_at..shared_at].contains("--database-url"),
            "{command}: {help}"
        );
        assert_eq!(help.matches("--database-url <").count(), 1, "{command}: {help}");
        assert!(!help.contains("required"), "{command}: {help}");
    }
}

/// A migration that fails is reported once, in the server's words, without the driver's
/// wrapping ("error returned from database") or the script's line number.
#[sqlx::test(migrations = false)]
async fn a_failed_migration_is_told_once_without_internals(pool: PgPool) {
    for statement in [
        "create schema ackloop",
        // Not ackloop's record: the migrations' own insert into it fails.
        "create table ackloop.applied_migrations (bogus int)",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let url = pool.connect_options().to_url_lossy().to_string();
    let output = run_ackloop(&url, &["migrate"]).await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert_eq!(
        text.matches("column \"version\" does not exist").count(),
        1,
        "{text}"
    );
    assert!(text.contains("rolled back"), "{text}");
    for internal in ["error returned from database", "at line", "while executing"] {
        assert!(!text.contains(internal), "{internal:?} in {text}");
    }
}

/// Start-up inside a short deadline: `--timeout 0s` on a healthy server still connects and says
/// how the job stands (exit 5, pending), and a server that never answers, behind a multi-host
/// string, ends the call near its timeout, not after the connect timeout.
#[sqlx::test]
async fn start_up_keeps_within_the_commands_timeout(pool: PgPool) {
    let url = pool.connect_options().to_url_lossy().to_string();
    commit_signups(&mut pool.acquire().await.unwrap(), [1]).await;
    let job_id: uuid::Uuid = sqlx::query_scalar("select id from ackloop.player_creation_jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    let job_id = job_id.to_string();
    let now = run_ackloop(&url, &["await", &job_id, "--timeout", "0s"]).await;
    assert_eq!(now.status.code(), Some(5), "{}", stderr(&now));

    let (port, held) = silent_server().await;
    let silent_url = format!(
        "postgres://app@127.0.0.1:{port},127.0.0.1:{port}/app?target_session_attrs=read-write&sslmode=disable"
    );
    let started = std::time::Instant::now();
    let output = run_ackloop(
        &silent_url,
        &[
            "signup",
            "--email",
            "b@example.com",
            "--display-name",
            "B",
            "--timeout",
            "2s",
        ],
    )
    .await;
    let took = started.elapsed();
    held.abort();
    assert_eq!(output.status.code(), Some(7), "{}", stderr(&output));
    assert!(took < Duration::from_secs(4), "a 2 s timeout took {took:?}");
}
