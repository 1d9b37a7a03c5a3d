//! The signer process (this binary re-run as `soak signer …`): signs users up and reports each
//! outcome as a JSON line; and the soak's side of it, which starts the signers and collects
//! their lines.

use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ackloop::{JobId, NewUser, SignupError, Signups};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::Settings;
use crate::cluster::Cluster;

/// What one signup ended as, reported by a signer process, one JSON line each.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reported {
    pub n: u64,
    pub outcome: String,
    pub job_id: Option<JobId>,
    pub player_id: Option<i64>,
    /// From the call to its answer.
    pub elapsed_ms: u64,
    /// The error, as the caller would print it.
    pub error: Option<String>,
    /// When the call started, in ms since the signer started.
    pub started_ms: u64,
    /// When the call started, in ms since the Unix epoch (to compare with fault times).
    pub started_at_ms: u64,
}

pub fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A signer's last line: how its confirmed callers heard of their players.
#[derive(Debug, Serialize, Deserialize)]
pub struct Confirmations {
    pub by_notification: u64,
    pub by_table_check: u64,
}

/// The email and display name of signup `n`.
fn soak_user(n: u64) -> NewUser {
    NewUser::new(soak_email(n), format!("Soak {n}")).unwrap()
}

pub fn soak_email(n: u64) -> String {
    format!("soak-{n}@example.com")
}

/// A signer process: signs up users `from..from+count`, 8 at a time, and reports each outcome.
pub async fn signer(args: &[String]) -> ExitCode {
    let [url, from, count, timeout_ms, pause_ms] = args else {
        eprintln!("usage: soak signer URL FROM COUNT TIMEOUT_MS PAUSE_MS");
        return ExitCode::from(2);
    };
    let (from, count, timeout, pause): (u64, u64, u64, u64) = (
        from.parse().expect("FROM"),
        count.parse().expect("COUNT"),
        timeout_ms.parse().expect("TIMEOUT_MS"),
        pause_ms.parse().expect("PAUSE_MS"),
    );
    let metrics = ackloop::MetricsHandle::install().expect("install the metrics recorder");
    let options: PgConnectOptions = url.parse().expect("URL");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options);
    // The server may be restarting right now: keep trying to start listening.
    let signups = loop {
        match Signups::connect(pool.clone()).await {
            Ok(signups) => break Arc::new(signups),
            Err(err) => {
                eprintln!("signer: cannot listen yet: {err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let next = Arc::new(std::sync::atomic::AtomicU64::new(from));
    let signer_started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (signups, next) = (Arc::clone(&signups), Arc::clone(&next));
        callers.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= from + count {
                    return;
                }
                let started = Instant::now();
                let started_ms = u64::try_from(signer_started.elapsed().as_millis()).unwrap();
                let started_at_ms = now_ms();
                let result = signups
                    .create_user_and_await_player(&soak_user(n), Duration::from_millis(timeout))
                    .await;
                let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap();
                let (outcome, job_id, player_id) = match &result {
                    Ok(player) => ("confirmed", None, Some(player.id.get())),
                    Err(err @ SignupError::TimedOut { .. }) => ("timed_out", err.job_id(), None),
                    Err(err @ SignupError::JobFailed { .. }) => ("failed", err.job_id(), None),
                    Err(err @ SignupError::Unavailable { .. }) => ("unavailable", err.job_id(), None),
                    Err(SignupError::EmailTaken) => ("email_taken", None, None),
                    Err(SignupError::NotWritten { .. }) => ("not_written", None, None),
                    Err(err) => ("error", err.job_id(), None),
                };
                let line = Reported {
                    n,
                    outcome: outcome.to_owned(),
                    job_id,
                    player_id,
                    elapsed_ms,
                    error: result.as_ref().err().map(|err| {
                        let mut text = err.to_string();
                        let mut source = std::error::Error::source(err);
                        while let Some(cause) = source {
                            text.push_str(&format!(": {cause}"));
                            source = cause.source();
                        }
                        text
                    }),
                    started_ms,
                    started_at_ms,
                };
                println!("{}", serde_json::to_string(&line).unwrap());
                // Pacing, so the run lasts long enough for faults to land in the middle of it.
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        });
    }
    callers.join_all().await;
    let rendered = metrics.render();
    let confirmations = |via: &str| {
        let prefix = format!("ackloop_confirmations_total{{via=\"{via}\"}} ");
        rendered
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0, |count| count.trim().parse().unwrap_or(0))
    };
    let summary = Confirmations {
        by_notification: confirmations("notification"),
        by_table_check: confirmations("table_check"),
    };
    println!("{}", serde_json::to_string(&summary).unwrap());
    ExitCode::SUCCESS
}

/// Starts the signer processes, each on its share of the signups (signer 0 through the proxy
/// that can go silent), and collects their lines into `reported` and `confirmations`. Each
/// task ends with its process's exit status.
pub fn spawn_signers(
    settings: &Settings,
    cluster: &Cluster,
    reported: &Arc<Mutex<Vec<Reported>>>,
    confirmations: &Arc<Mutex<Vec<Confirmations>>>,
) -> Vec<JoinHandle<ExitStatus>> {
    let Settings {
        signups,
        signers,
        timeout_ms,
        pause_ms,
        per_signer,
        ..
    } = *settings;
    let mut signer_tasks = Vec::new();
    for index in 0..signers {
        let from = index * per_signer;
        let count = per_signer.min(signups.saturating_sub(from));
        let url = cluster.url_for(index);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "signer",
                url,
                &from.to_string(),
                &count.to_string(),
                &timeout_ms.to_string(),
                &pause_ms.to_string(),
            ])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start a signer");
        let stdout = child.stdout.take().unwrap();
        let (reported, confirmations) = (Arc::clone(reported), Arc::clone(confirmations));
        signer_tasks.push(tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(entry) = serde_json::from_str::<Reported>(&line) {
                    reported.lock().await.push(entry);
                } else if let Ok(summary) = serde_json::from_str::<Confirmations>(&line) {
                    confirmations.lock().await.push(summary);
                } else {
                    eprintln!("soak: unreadable signer line {line:?}");
                }
            }
            child.wait().await.expect("signer exit")
        }));
    }
    signer_tasks
}
