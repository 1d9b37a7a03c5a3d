//! Auth processes: `ackloop bench --auth-processes N` runs its signups in N child processes, as N
//! replicas of an auth service would, each with its own `Signups` (its own pool, writers and
//! LISTEN connection) and its share of the callers.
//!
//! The child is this binary re-run as the hidden `ackloop bench-auth`. It talks to the bench on
//! stdout, one JSON line per event: `ready` once it is connected and listening; then, after the
//! bench writes `go` on its stdin (to every child at once, so that all run in the same
//! wall-clock window), `finished` with its latencies as a sparse histogram. Its log goes to
//! stderr, which it shares with the bench.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::callers::{self, Measured, Misses};
use super::histogram::{Histogram, SparseHistogram};
use super::report::{CpuTicks, peak_rss_mb};
use crate::args::BenchConfig;

/// How long an auth process may take to connect and start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What the bench writes to every auth process's stdin to start the measured window.
const GO: &str = "go";

/// One line an auth process prints on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    /// Connected, listening, pool filled: waiting for `go`.
    Ready,
    /// Every signup of its share has ended.
    Finished {
        latencies: SparseHistogram,
        timeouts: usize,
        errors: usize,
        peak_rss_mb: f64,
    },
}

/// The child's side, `ackloop bench-auth`: signs up users `first..first + config.signups` from
/// `config.concurrency` callers once the bench says go.
pub async fn run_child(
    options: PgConnectOptions,
    first: usize,
    config: BenchConfig,
) -> Result<(), sqlx::Error> {
    // The writers hold one connection each while they write; two more cover confirmation reads.
    let pool_size = u32::try_from(config.writers + 2).unwrap_or(u32::MAX);
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .min_connections(pool_size)
        .test_before_acquire(config.ping_on_acquire)
        .connect_with(options)
        .await?;
    let handle = Arc::new(callers::connect(pool.clone(), &config).await?);
    print_event(&Event::Ready);
    let mut line = String::new();
    BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await
        .map_err(sqlx::Error::Io)?;
    if line.trim() != GO {
        // The bench went away before the window opened: nothing to measure.
        return Ok(());
    }
    let latencies = Arc::new(Histogram::new());
    let misses = callers::sign_up(
        handle,
        first..first + config.signups,
        config.concurrency,
        Arc::clone(&latencies),
        Arc::new(AtomicUsize::new(0)),
    )
    .await;
    print_event(&Event::Finished {
        latencies: latencies.to_sparse(),
        timeouts: misses.timeouts,
        errors: misses.errors,
        peak_rss_mb: peak_rss_mb(),
    });
    pool.close().await;
    Ok(())
}

fn print_event(event: &Event) {
    println!(
        "{}",
        serde_json::to_string(event).expect("an event always serialises")
    );
}

/// The bench's side: the auth processes, started and listening.
pub(super) struct AuthProcesses {
    children: Vec<AuthProcess>,
}

struct AuthProcess {
    index: usize,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl AuthProcesses {
    /// Starts `config.auth_processes` children, each with its share of the signups and callers
    /// (the first ones take the remainders), and returns once every one is ready.
    pub(super) async fn start(options: &PgConnectOptions, config: &BenchConfig) -> Result<Self, sqlx::Error> {
        let exe = std::env::current_exe().map_err(sqlx::Error::Io)?;
        let url = options.to_url_lossy().to_string();
        let processes = config.auth_processes;
        let mut children = Vec::with_capacity(processes);
        let mut first = 0;
        for index in 0..processes {
            let signups = share(config.signups, processes, index);
            let mut command = tokio::process::Command::new(&exe);
            command
                .arg("bench-auth")
                .args(["--first", &first.to_string()])
                .args(["--signups", &signups.to_string()])
                .args([
                    "--concurrency",
                    &share(config.concurrency, processes, index).to_string(),
                ])
                .args(["--writers", &config.writers.to_string()])
                .args(["--max-batch", &config.max_batch.to_string()]);
            if let Some(every) = config.poll_every {
                command.args(["--poll-every", &format!("{}ms", every.as_millis())]);
            }
            if config.ping_on_acquire {
                command.arg("--ping-on-acquire");
            }
            let mut child = command
                .env("DATABASE_URL", &url)
                .env("RUST_LOG", "ackloop=warn")
                .env("ACKLOOP_LOG_FORMAT", config.log_format.name())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(sqlx::Error::Io)?;
            let stdin = child.stdin.take().expect("stdin is piped");
            let stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
            children.push(AuthProcess {
                index,
                child,
                stdin,
                stdout,
            });
            first += signups;
        }
        for child in &mut children {
            match tokio::time::timeout(START_TIMEOUT, child.next_event()).await {
                Ok(Ok(Event::Ready)) => {}
                Ok(Ok(other)) => return Err(child.unexpected(&other)),
                Ok(Err(err)) => return Err(err),
                Err(_) => {
                    return Err(sqlx::Error::Protocol(format!(
                        "auth process {} was not ready within {}s",
                        child.index,
                        START_TIMEOUT.as_secs()
                    )));
                }
            }
        }
        Ok(Self { children })
    }

    /// Opens the window: tells every child to go, and closes it when the last one has
    /// finished. The latencies are all the children's together.
    pub(super) async fn run(mut self) -> Result<Measured, sqlx::Error> {
        let cpu = CpuTicks::now();
        let started = Instant::now();
        for child in &mut self.children {
            let go = format!("{GO}\n");
            child
                .stdin
                .write_all(go.as_bytes())
                .await
                .map_err(sqlx::Error::Io)?;
            child.stdin.flush().await.map_err(sqlx::Error::Io)?;
        }
        let latencies = Histogram::new();
        let mut misses = Misses::default();
        let mut peak_rss = peak_rss_mb();
        for child in &mut self.children {
            // Each signup's own wait is bounded, so a child that is alive always finishes.
            match child.next_event().await? {
                Event::Finished {
                    latencies: theirs,
                    timeouts,
                    errors,
                    peak_rss_mb,
                } => {
                    latencies.merge(&theirs);
                    misses.timeouts += timeouts;
                    misses.errors += errors;
                    peak_rss = peak_rss.max(peak_rss_mb);
                }
                other => return Err(child.unexpected(&other)),
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu_busy_pct = cpu.busy_pct_since();
        for child in &mut self.children {
            let status = child.child.wait().await.map_err(sqlx::Error::Io)?;
            if !status.success() {
                return Err(sqlx::Error::Protocol(format!(
                    "auth process {} ended with {status} after it finished",
                    child.index
                )));
            }
        }
        Ok(Measured {
            latencies: Arc::new(latencies),
            misses,
            secs,
            peak_rss_mb: peak_rss,
            cpu_busy_pct,
        })
    }
}

impl AuthProcess {
    async fn next_event(&mut self) -> Result<Event, sqlx::Error> {
        let index = self.index;
        match self.stdout.next_line().await.map_err(sqlx::Error::Io)? {
            Some(line) => serde_json::from_str(&line).map_err(|err| {
                sqlx::Error::Protocol(format!("auth process {index} printed {line:?}: {err}"))
            }),
            None => Err(sqlx::Error::Protocol(format!(
                "auth process {index} exited early (its error is above)"
            ))),
        }
    }

    fn unexpected(&self, event: &Event) -> sqlx::Error {
        sqlx::Error::Protocol(format!("auth process {} sent {event:?} out of turn", self.index))
    }
}

/// Process `index`'s share of `total` split over `parts`: equal, the first ones taking one more
/// until the remainder is used up.
fn share(total: usize, parts: usize, index: usize) -> usize {
    total / parts + usize::from(index < total % parts)
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_add_up_to_the_total_and_differ_by_at_most_one() {
        for (total, parts) in [(64, 4), (200, 3), (5, 5), (10_000, 7)] {
            let shares: Vec<usize> = (0..parts).map(|i| share(total, parts, i)).collect();
            assert_eq!(shares.iter().sum::<usize>(), total, "{total} over {parts}");
            let (least, most) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
            assert!(most - least <= 1, "{shares:?}");
        }
    }
}
