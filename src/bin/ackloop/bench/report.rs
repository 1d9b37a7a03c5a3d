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
    pub(super) p: usize,
    pub(super) rtt_ms: f64,
    pub(super) secs: f64,
    pub(super) throughput: f64,
    pub(super) p50_ms: f64,
    pub(super) p95_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
    pub(super) connections: i64,
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
        if self.variant != "drain" {
            println!(
                "latency ms: p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
                self.p50_ms, self.p95_ms, self.p99_ms, self.max_ms
            );
        }
        println!(
            "connections used: {}   peak RSS: {:.1} MiB",
            self.connections, self.peak_rss_mb
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
