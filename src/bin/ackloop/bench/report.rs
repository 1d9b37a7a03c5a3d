//! What the bench shows: the figures of a run (text or one JSON line), the progress bar while it
//! runs, and the process's peak memory.

use std::io::{IsTerminal, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;

/// The figures, also the `--json` line.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub(super) system: &'static str,
    pub(super) variant: &'static str,
    /// The handler the workers ran: "built-in" or "custom".
    pub(super) handler: &'static str,
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) w: usize,
    /// Worker processes (0: the worker loops ran in the bench process).
    pub(super) p: usize,
    /// Auth processes, each with its own `Signups` (0: the callers ran in the bench process).
    pub(super) auth_processes: usize,
    pub(super) rtt_ms: f64,
    pub(super) secs: f64,
    pub(super) throughput: f64,
    pub(super) p50_ms: f64,
    pub(super) p95_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
    /// The most backends the scratch database had at once, the bench's sampler left out.
    pub(super) connections: i64,
    /// The transactions that wrote users (several signups share one).
    pub(super) signup_commits: i64,
    /// The transactions that wrote players (a worker completes a batch in one).
    pub(super) worker_commits: i64,
    /// How busy the machine's CPUs were over the measured window, every process on it included
    /// (the database's, other tenants'), in percent; 0 where /proc is not available.
    pub(super) cpu_busy_pct: f64,
    /// The largest peak RSS among the processes that ran callers (the bench or its auth
    /// processes), in-process workers included.
    pub(super) peak_rss_mb: f64,
    pub(super) garbage_sent: u64,
    pub(super) timeouts: usize,
    pub(super) errors: usize,
    pub(super) ok: bool,
    pub(super) verification: String,
}

impl BenchReport {
    pub fn ok(&self) -> bool {
        self.ok
    }

    pub fn print(&self, json: bool) {
        if json {
            println!(
                "{}",
                serde_json::to_string(self).expect("a report always serialises")
            );
            return;
        }
        let what = if self.variant == "drain" {
            "jobs"
        } else {
            "acknowledged signups"
        };
        println!(
            "{} {what} in {:.2}s: {:.0}/s  (c={} w={} p={} rtt={}ms handler={})",
            self.n, self.secs, self.throughput, self.c, self.w, self.p, self.rtt_ms, self.handler
        );
        if self.auth_processes > 0 || self.p > 0 {
            println!(
                "processes: {} auth × {} worker (0: in the bench process)",
                self.auth_processes, self.p
            );
        }
        if self.variant != "drain" {
            println!(
                "latency ms: p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
                self.p50_ms, self.p95_ms, self.p99_ms, self.max_ms
            );
        }
        println!(
            "connections used: {}   peak RSS: {:.1} MiB   machine CPU busy: {:.0}%",
            self.connections, self.peak_rss_mb, self.cpu_busy_pct
        );
        println!(
            "commits: {} writing users ({:.1} each), {} writing players ({:.1} each)",
            self.signup_commits,
            self.n as f64 / self.signup_commits.max(1) as f64,
            self.worker_commits,
            self.n as f64 / self.worker_commits.max(1) as f64,
        );
        if self.garbage_sent > 0 {
            println!("garbage notifications sent meanwhile: {}", self.garbage_sent);
        }
        println!(
            "verification: {} ({})",
            if self.ok { "ok" } else { "FAILED" },
            self.verification
        );
    }
}

pub(super) async fn show_progress(finished: Arc<AtomicUsize>, total: usize) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    loop {
        let done = finished.load(Ordering::Relaxed);
        let width = 40;
        let filled = done * width / total.max(1);
        eprint!(
            "\r[{}{}] {done}/{total}",
            "#".repeat(filled),
            " ".repeat(width - filled)
        );
        let _ = std::io::stderr().flush();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(super) fn clear_progress() {
    if std::io::stderr().is_terminal() {
        eprint!("\r{}\r", " ".repeat(70));
    }
}

/// This process's peak resident set (VmHWM), in MiB; 0 where /proc is not available.
pub(super) fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The machine's CPU time so far, from /proc/stat, to measure how busy a window was.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CpuTicks {
    busy: u64,
    total: u64,
}

impl CpuTicks {
    /// Now; zero where /proc is not available.
    pub(super) fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // cpu  user nice system idle iowait irq softirq steal ...: idle and iowait are idle.
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|field| field.parse().ok())
            .collect();
        let total: u64 = ticks.iter().sum();
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        Self {
            busy: total - idle.min(total),
            total,
        }
    }

    /// The share of CPU time spent busy since `self`, in percent.
    pub(super) fn busy_pct_since(self) -> f64 {
        let now = Self::now();
        let total = now.total.saturating_sub(self.total);
        if total == 0 {
            return 0.0;
        }
        now.busy.saturating_sub(self.busy) as f64 * 100.0 / total as f64
    }
}
