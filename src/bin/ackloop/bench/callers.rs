//! The bench's callers: tasks that sign users up through one `Signups` and time each wait for
//! the player. The bench process runs them, or each auth process runs its share.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ackloop::{NewUser, SignupError, Signups, SignupsConfig};
use sqlx::PgPool;
use tokio::task::JoinSet;

use super::histogram::Histogram;
use crate::args::BenchConfig;

/// How long one signup may wait before it counts as timed out (and the run as failed).
const SIGNUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Signups that did not end with a player.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Misses {
    pub(super) timeouts: usize,
    pub(super) errors: usize,
}

/// What one run of the callers measured, in this process or over all auth processes.
pub(super) struct Measured {
    pub(super) latencies: Arc<Histogram>,
    pub(super) misses: Misses,
    /// The wall-clock window, from the first signup's start to the last one's end.
    pub(super) secs: f64,
    /// The largest peak RSS of the processes that ran callers, in MiB.
    pub(super) peak_rss_mb: f64,
    /// How busy the machine was over the window, in percent.
    pub(super) cpu_busy_pct: f64,
}

/// The signup side the bench's flags ask for, on `pool`.
pub(super) async fn connect(pool: PgPool, config: &BenchConfig) -> Result<Signups, sqlx::Error> {
    let signups_config = SignupsConfig {
        writers: config.writers,
        max_batch: config.max_batch,
        poll_only: config.poll_every,
        ..SignupsConfig::default()
    };
    Signups::connect_with(pool, signups_config)
        .await
        .map_err(into_sqlx)
}

/// Signs up users numbered `numbers` (emails `bench-N@example.com`, unique across processes)
/// from `callers` concurrent tasks, recording each confirmed signup's latency and counting every
/// finished one in `finished`.
pub(super) async fn sign_up(
    handle: Arc<Signups>,
    numbers: Range<usize>,
    callers: usize,
    latencies: Arc<Histogram>,
    finished: Arc<AtomicUsize>,
) -> Misses {
    let next = Arc::new(AtomicUsize::new(numbers.start));
    let mut tasks = JoinSet::new();
    for _ in 0..callers {
        let (handle, next, finished, latencies) = (
            Arc::clone(&handle),
            Arc::clone(&next),
            Arc::clone(&finished),
            Arc::clone(&latencies),
        );
        let end = numbers.end;
        tasks.spawn(async move {
            let mut misses = Misses::default();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= end {
                    break;
                }
                let user = NewUser::new(format!("bench-{n}@example.com"), format!("Bench {n}"))
                    .expect("bench users are valid");
                let begun = Instant::now();
                match handle.create_user_and_await_player(&user, SIGNUP_TIMEOUT).await {
                    Ok(_) => latencies.record(begun.elapsed()),
                    Err(SignupError::TimedOut { .. }) => misses.timeouts += 1,
                    Err(err) => {
                        misses.errors += 1;
                        let job_id = err.job_id().map(tracing::field::display);
                        tracing::error!(job.id = job_id, error = %err, "bench signup failed");
                    }
                }
                finished.fetch_add(1, Ordering::Relaxed);
            }
            misses
        });
    }
    let mut total = Misses::default();
    while let Some(task) = tasks.join_next().await {
        let misses = task.expect("bench caller panicked");
        total.timeouts += misses.timeouts;
        total.errors += misses.errors;
    }
    total
}

/// The bench fails with `sqlx::Error`s; a signup error that wraps none keeps its message.
pub(super) fn into_sqlx(err: SignupError) -> sqlx::Error {
    match err {
        SignupError::Unavailable { source, .. } | SignupError::Database(source) => source,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}
