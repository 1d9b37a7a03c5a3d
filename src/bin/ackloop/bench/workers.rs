//! The bench's workers: loops in this process, or `ackloop worker` processes, each with its own
//! pool and its one LISTEN connection, as a player service deploys them.

use std::process::Stdio;
use std::time::Duration;

use ackloop::{Worker, WorkerConfig};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgPool};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::handler::InsertPlayerAsUser;
use crate::args::{BenchConfig, BenchHandler};

/// How long a worker process may take to connect and start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What a worker process logs once its loops run and its LISTEN is in effect (`Worker::run`).
const STARTED_LINE: &str = "worker started";

/// Runs the workers: in this process, or as `ackloop worker` child processes.
pub(super) struct Workers {
    shutdown: CancellationToken,
    in_process: Vec<tokio::task::JoinHandle<Result<(), ackloop::WorkerError>>>,
    children: Vec<tokio::process::Child>,
    /// One per child: fires when the child logs that it started.
    started: Vec<oneshot::Receiver<()>>,
}

impl Workers {
    pub(super) fn start(
        pool: &PgPool,
        options: &PgConnectOptions,
        config: &BenchConfig,
        per_process: usize,
    ) -> Result<Self, sqlx::Error> {
        let shutdown = CancellationToken::new();
        let mut workers = Self {
            shutdown: shutdown.clone(),
            in_process: Vec::new(),
            children: Vec::new(),
            started: Vec::new(),
        };
        if config.worker_processes == 0 {
            let worker_config = WorkerConfig {
                concurrency: per_process,
                batch_size: config.batch_size,
                poll_only: config.poll_every.is_some(),
                poll_interval: config.poll_every.unwrap_or(WorkerConfig::default().poll_interval),
                ..WorkerConfig::default()
            };
            let worker = Worker::new(pool.clone(), worker_config);
            let task = match config.handler {
                BenchHandler::BuiltIn => tokio::spawn(worker.run(shutdown)),
                BenchHandler::Custom => tokio::spawn(worker.with_handler(InsertPlayerAsUser).run(shutdown)),
            };
            workers.in_process.push(task);
            return Ok(workers);
        }
        let exe = std::env::current_exe().map_err(sqlx::Error::Io)?;
        let url = options.to_url_lossy().to_string();
        for _ in 0..config.worker_processes {
            let mut command = tokio::process::Command::new(&exe);
            if config.poll_every.is_some() {
                command.arg("--poll-only");
            }
            command
                .args(["worker", "--concurrency", &per_process.to_string()])
                .args(["--batch-size", &config.batch_size.to_string()]);
            if let Some(every) = config.poll_every {
                command.args(["--poll-interval", &format!("{}ms", every.as_millis())]);
            }
            let mut child = command
                .env("DATABASE_URL", &url)
                // Warnings, and the worker's own start line, which says it is ready.
                .env("RUST_LOG", "ackloop=warn,ackloop::worker=info")
                .env("ACKLOOP_LOG_FORMAT", config.log_format.name())
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(sqlx::Error::Io)?;
            let stderr = child.stderr.take().expect("stderr is piped");
            workers.started.push(watch_start(stderr));
            workers.children.push(child);
        }
        Ok(workers)
    }

    /// Waits until every worker process listens and runs its loops, so that a measurement
    /// does not include their start-up. In-process workers start before the signup side does.
    pub(super) async fn ready(&mut self) -> Result<(), sqlx::Error> {
        for (index, started) in self.started.drain(..).enumerate() {
            match tokio::time::timeout(START_TIMEOUT, started).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(sqlx::Error::Protocol(format!(
                        "worker process {index} exited before it started (its log is above)"
                    )));
                }
                Err(_) => {
                    return Err(sqlx::Error::Protocol(format!(
                        "worker process {index} did not start within {}s",
                        START_TIMEOUT.as_secs()
                    )));
                }
            }
        }
        Ok(())
    }

    pub(super) async fn stop(self) {
        self.shutdown.cancel();
        for task in self.in_process {
            let _ = task.await;
        }
        for mut child in self.children {
            if let Some(pid) = child.id() {
                let _ = tokio::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            let _ = child.wait().await;
        }
    }
}

/// Passes a worker process's log on to this process's stderr, and fires once it says it
/// started.
fn watch_start(stderr: tokio::process::ChildStderr) -> oneshot::Receiver<()> {
    let (started, receiver) = oneshot::channel();
    tokio::spawn(async move {
        let mut started = Some(started);
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(STARTED_LINE) {
                if let Some(started) = started.take() {
                    let _ = started.send(());
                }
            } else if !line.contains("worker stopped") {
                eprintln!("{line}");
            }
        }
    });
    receiver
}
