//! The loop's latencies and listener health, read from the Prometheus endpoints of the processes
//! that run it (`ackloop worker --metrics-addr`, a service's `MetricsHandle::serve`): the
//! database knows when a job was made and finished, not when it was claimed or confirmed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::telemetry::{
    CLAIM_TO_DONE, COMMIT_TO_CLAIM, CONFIRMATIONS, DONE_TO_CONFIRMED, LISTENER_RECONNECTS,
};

/// The most of an endpoint's answer read: ackloop's own are a few kB.
const MAX_RESPONSE: u64 = 4 << 20;

/// The longest one endpoint may take to answer; a slow one is reported, not waited for.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The cumulative samples of every endpoint, summed: histogram buckets by `le`, and counters.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sample {
    /// Histogram name → (upper bound → cumulative count).
    buckets: BTreeMap<&'static str, Vec<(f64, f64)>>,
    reconnects: f64,
    by_notification: f64,
    by_table_check: f64,
}

/// One stage's latency over the time between two samples.
#[derive(Debug, Clone, Serialize)]
pub struct StageLatency {
    /// How many were measured in that time.
    pub count: f64,
    /// Median, in milliseconds (bucket-interpolated, as Prometheus' histogram_quantile).
    pub p50_ms: Option<f64>,
    /// 99th percentile, in milliseconds.
    pub p99_ms: Option<f64>,
}

/// What the endpoints said between two samples.
#[derive(Debug, Clone, Serialize)]
pub struct LoopHealth {
    /// Signup insert → a worker claims the job.
    pub commit_to_claim: StageLatency,
    /// Claim → the job is done (its transaction committed).
    pub claim_to_done: StageLatency,
    /// Done → the waiting caller is confirmed.
    pub done_to_confirmed: StageLatency,
    /// Listener reconnects, in total.
    pub listener_reconnects: f64,
    /// Of the confirmations between the samples, the share found by a look at the tables
    /// rather than by a notification (a rising share: notifications are being lost).
    pub table_check_share: Option<f64>,
    /// Endpoints that could not be read, with why.
    pub unreachable: Vec<String>,
}

const HISTOGRAMS: [&str; 3] = [COMMIT_TO_CLAIM, CLAIM_TO_DONE, DONE_TO_CONFIRMED];

/// Reads every endpoint (`host:port`, or an `http://host:port/path` URL) and sums them.
pub(crate) async fn sample(endpoints: &[String]) -> (Sample, Vec<String>) {
    let mut sum = Sample::default();
    let mut unreachable = Vec::new();
    for endpoint in endpoints {
        match tokio::time::timeout(SCRAPE_TIMEOUT, fetch(endpoint)).await {
            Ok(Ok(text)) => add(&mut sum, &text),
            Ok(Err(err)) => unreachable.push(format!("{endpoint}: {err}")),
            Err(_) => unreachable.push(format!("{endpoint}: no answer within 2 s")),
        }
    }
    (sum, unreachable)
}

/// A plain HTTP/1.0 GET (the answer whole, never chunked): the endpoints are the loop's own.
async fn fetch(endpoint: &str) -> std::io::Result<String> {
    let rest = endpoint.strip_prefix("http://").unwrap_or(endpoint);
    let (addr, path) = match rest.split_once('/') {
        Some((addr, path)) => (addr, format!("/{path}")),
        None => (rest, "/metrics".to_owned()),
    };
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    // An endpoint is a few kB; one that sends without end must not fill this process's memory.
    let mut response = String::new();
    stream.take(MAX_RESPONSE).read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        let status = head.lines().next().unwrap_or_default();
        return Err(std::io::Error::other(format!("answered {status}")));
    }
    Ok(body.to_owned())
}

pub(crate) fn add(sum: &mut Sample, text: &str) {
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        if let Some(name) = HISTOGRAMS
            .iter()
            .find(|name| series.starts_with(&format!("{name}_bucket{{")))
        {
            let Some(le) = label(series, "le") else { continue };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            let buckets = sum.buckets.entry(name).or_default();
            match buckets.iter_mut().find(|(bound, _)| *bound == le) {
                Some((_, count)) => *count += value,
                None => buckets.push((le, value)),
            }
        } else if series.starts_with(LISTENER_RECONNECTS) {
            sum.reconnects += value;
        } else if series.starts_with(CONFIRMATIONS) {
            match label(series, "via") {
                Some("notification") => sum.by_notification += value,
                Some("table_check") => sum.by_table_check += value,
                _ => {}
            }
        }
    }
    for buckets in sum.buckets.values_mut() {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
}

/// The value of `name="…"` in a series' labels.
fn label<'a>(series: &'a str, name: &str) -> Option<&'a str> {
    let start = series.find(&format!("{name}=\""))? + name.len() + 2;
    let end = series[start..].find('"')? + start;
    Some(&series[start..end])
}

/// What happened between `before` and `now`.
pub(crate) fn between(before: &Sample, now: &Sample, unreachable: Vec<String>) -> LoopHealth {
    let stage = |name: &'static str| {
        let now = now.buckets.get(name).cloned().unwrap_or_default();
        let before = before.buckets.get(name);
        // A process restarted since (its counts fell): its new counts are the window's.
        let delta: Vec<(f64, f64)> = now
            .iter()
            .map(|(le, count)| {
                let earlier = before
                    .and_then(|b| b.iter().find(|(bound, _)| bound == le))
                    .map_or(0.0, |(_, c)| *c);
                (
                    *le,
                    if count >= &earlier {
                        count - earlier
                    } else {
                        *count
                    },
                )
            })
            .collect();
        let count = delta.last().map_or(0.0, |(_, c)| *c);
        StageLatency {
            count,
            p50_ms: quantile(&delta, 0.5).map(|s| s * 1000.0),
            p99_ms: quantile(&delta, 0.99).map(|s| s * 1000.0),
        }
    };
    let notified = (now.by_notification - before.by_notification).max(0.0);
    let checked = (now.by_table_check - before.by_table_check).max(0.0);
    LoopHealth {
        commit_to_claim: stage(COMMIT_TO_CLAIM),
        claim_to_done: stage(CLAIM_TO_DONE),
        done_to_confirmed: stage(DONE_TO_CONFIRMED),
        listener_reconnects: now.reconnects,
        table_check_share: (notified + checked > 0.0).then(|| checked / (notified + checked)),
        unreachable,
    }
}

/// `q` of cumulative buckets, interpolated within the bucket it falls in.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let share = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * share);
        }
        lower = (le, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_give_quantiles_between_two_samples() {
        let before = "ackloop_commit_to_claim_seconds_bucket{le=\"0.001\"} 10\n\
                      ackloop_commit_to_claim_seconds_bucket{le=\"0.01\"} 10\n\
                      ackloop_commit_to_claim_seconds_bucket{le=\"+Inf\"} 10\n";
        let now = "ackloop_commit_to_claim_seconds_bucket{le=\"0.001\"} 10\n\
                   ackloop_commit_to_claim_seconds_bucket{le=\"0.01\"} 110\n\
                   ackloop_commit_to_claim_seconds_bucket{le=\"+Inf\"} 110\n\
                   ackloop_confirmations_total{via=\"notification\"} 9\n\
                   ackloop_confirmations_total{via=\"table_check\"} 1\n";
        let (mut a, mut b) = (Sample::default(), Sample::default());
        add(&mut a, before);
        add(&mut b, now);
        let health = between(&a, &b, Vec::new());
        let stage = health.commit_to_claim;
        assert_eq!(stage.count, 100.0);
        // All 100 new ones are in (1 ms, 10 ms]: the median is halfway, at 5.5 ms.
        assert!((stage.p50_ms.unwrap() - 5.5).abs() < 1e-9, "{stage:?}");
        assert_eq!(health.table_check_share, Some(0.1));
        assert_eq!(health.claim_to_done.p50_ms, None);
    }
}
