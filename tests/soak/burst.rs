//! The burst: after the faults, on a database of its own with no worker, many callers at once
//! (SOAK_BURST, 50,000) with one timeout (SOAK_BURST_TIMEOUT_MS, 2,000): every caller answered
//! within its timeout plus the documented margin, each told honestly (written and timed out with
//! its job id, or not written), none told the database was unavailable; and the memory each
//! waiting caller costs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ackloop::{NewUser, SignupError, Signups};
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinSet;

use crate::cluster::fresh_database;
use crate::setting;

/// How late past the timeout plus [`ackloop::ANSWER_MARGIN`] a caller may be answered here: the
/// scheduling of 50,000 tasks waking at once on two cores.
const SCHEDULING_SLACK: Duration = Duration::from_millis(100);

/// What the burst came to.
pub struct Burst {
    pub callers: usize,
    pub timeout: Duration,
    pub timed_out: usize,
    pub not_written: usize,
    /// Anything else, with its message (none expected).
    pub others: Vec<String>,
    /// The latest answer past the timeout.
    pub latest_past_timeout: Duration,
    /// Answers later than the timeout + the margin + the slack.
    pub late: usize,
    /// Users in the tables, against `timed_out`.
    pub users: i64,
    /// Users whose caller was told its signup was not written.
    pub not_written_with_user: i64,
    /// The process's peak memory growth during the burst, per caller.
    pub bytes_per_caller: u64,
}

impl Burst {
    pub fn checks(&self) -> Vec<(String, bool)> {
        let bound = self.timeout + ackloop::ANSWER_MARGIN + SCHEDULING_SLACK;
        vec![
            (
                format!(
                    "burst: every caller answered within timeout + {:?}",
                    bound - self.timeout
                ),
                self.late == 0,
            ),
            (
                "burst: every answer timed out (written) or not written, none unavailable".to_owned(),
                self.others.is_empty() && self.timed_out + self.not_written == self.callers,
            ),
            (
                "burst: users = signups answered as written; none for those not written".to_owned(),
                self.users == self.timed_out as i64 && self.not_written_with_user == 0,
            ),
            (
                "burst: a waiting caller costs at most 4 KiB".to_owned(),
                self.bytes_per_caller <= 4 * 1024,
            ),
        ]
    }

    pub fn print(&self) {
        println!(
            "burst: {} callers at once, {:?} timeout, no worker: {} written and timed out, {} not written, {} other; latest answer {:?} past the timeout, {} later than the bound; {} bytes of memory per caller at the peak",
            self.callers,
            self.timeout,
            self.timed_out,
            self.not_written,
            self.others.len(),
            self.latest_past_timeout,
            self.late,
            self.bytes_per_caller
        );
        for other in self.others.iter().take(5) {
            println!("  burst: {other}");
        }
    }
}

/// Runs the burst on a fresh database `soak_burst` of the cluster at `admin_url`.
pub async fn burst(admin_url: &str) -> Burst {
    let callers = usize::try_from(setting("SOAK_BURST", 50_000)).unwrap();
    let timeout = Duration::from_millis(setting("SOAK_BURST_TIMEOUT_MS", 2000));
    let options = fresh_database(admin_url, "soak_burst").await;
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .unwrap();
    ackloop::run_migrations(&pool).await.unwrap();
    let signups = Arc::new(Signups::connect(pool.clone()).await.unwrap());
    let users: Vec<NewUser> = (0..callers)
        .map(|n| NewUser::new(format!("burst-{n}@example.com"), format!("Burst {n}")).unwrap())
        .collect();
    let rss_before = memory_kib("VmRSS");
    let mut calls = JoinSet::new();
    for (n, user) in users.into_iter().enumerate() {
        let signups = Arc::clone(&signups);
        calls.spawn(async move {
            let started = Instant::now();
            let result = signups.create_user_and_await_player(&user, timeout).await;
            (n, result, started.elapsed())
        });
    }
    let answers = calls.join_all().await;
    let peak = memory_kib("VmHWM");
    let bound = timeout + ackloop::ANSWER_MARGIN + SCHEDULING_SLACK;
    let mut burst = Burst {
        callers,
        timeout,
        timed_out: 0,
        not_written: 0,
        others: Vec::new(),
        latest_past_timeout: Duration::ZERO,
        late: 0,
        users: 0,
        not_written_with_user: 0,
        bytes_per_caller: peak.saturating_sub(rss_before) * 1024 / callers.max(1) as u64,
    };
    let mut not_written_emails = Vec::new();
    for (n, result, took) in answers {
        burst.latest_past_timeout = burst.latest_past_timeout.max(took.saturating_sub(timeout));
        burst.late += usize::from(took > bound);
        match result {
            Err(SignupError::TimedOut { .. }) => burst.timed_out += 1,
            Err(SignupError::NotWritten { .. }) => {
                burst.not_written += 1;
                not_written_emails.push(format!("burst-{n}@example.com"));
            }
            other => burst.others.push(format!("signup {n}: {other:?}")),
        }
    }
    burst.users = sqlx::query_scalar("select count(*) from ackloop.builtin_users")
        .fetch_one(&pool)
        .await
        .unwrap();
    burst.not_written_with_user =
        sqlx::query_scalar("select count(*) from ackloop.builtin_users where email = any($1)")
            .bind(&not_written_emails)
            .fetch_one(&pool)
            .await
            .unwrap();
    drop(signups);
    pool.close().await;
    burst
}

/// A memory figure of this process from /proc/self/status, in KiB.
fn memory_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}
