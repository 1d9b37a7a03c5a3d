//! The signup latencies of one bench run, in fixed buckets that any number of callers record
//! into at once without a lock, and that an auth process hands to the bench as its non-empty
//! buckets, to be merged with the others'.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Latencies in 10µs buckets up to 1s (and one bucket beyond): a fixed 400 KiB however many
/// signups run, so the peak RSS reported is the loop's, not the bench's bookkeeping.
pub(super) struct Histogram {
    buckets: Vec<AtomicU32>,
    max_us: AtomicU64,
}

impl Histogram {
    const BUCKET_US: u64 = 10;
    const BUCKETS: usize = 100_001;

    pub(super) fn new() -> Self {
        Self {
            buckets: (0..Self::BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            max_us: AtomicU64::new(0),
        }
    }

    pub(super) fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let index =
            usize::try_from(us / Self::BUCKET_US).map_or(Self::BUCKETS - 1, |i| i.min(Self::BUCKETS - 1));
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// The non-empty buckets as (index, count), with the largest latency in µs: what an auth
    /// process reports, and [`Histogram::merge`] adds up.
    pub(super) fn to_sparse(&self) -> SparseHistogram {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .filter_map(|(index, bucket)| {
                let count = bucket.load(Ordering::Relaxed);
                (count > 0).then_some((index, count))
            })
            .collect();
        SparseHistogram {
            buckets,
            max_us: self.max_us.load(Ordering::Relaxed),
        }
    }

    /// Adds another process's latencies to these.
    pub(super) fn merge(&self, other: &SparseHistogram) {
        for &(index, count) in &other.buckets {
            self.buckets[index.min(Self::BUCKETS - 1)].fetch_add(count, Ordering::Relaxed);
        }
        self.max_us.fetch_max(other.max_us, Ordering::Relaxed);
    }

    pub(super) fn count(&self) -> u64 {
        self.buckets
            .iter()
            .map(|b| u64::from(b.load(Ordering::Relaxed)))
            .sum()
    }

    /// The upper edge of the bucket holding the `p` quantile, in ms.
    pub(super) fn percentile_ms(&self, p: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let rank = ((total as f64 * p).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, bucket) in self.buckets.iter().enumerate() {
            seen += u64::from(bucket.load(Ordering::Relaxed));
            if seen >= rank {
                return ((index as u64 + 1) * Self::BUCKET_US) as f64 / 1000.0;
            }
        }
        self.max_ms()
    }

    pub(super) fn max_ms(&self) -> f64 {
        self.max_us.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

/// A histogram's non-empty buckets: a few thousand pairs where the full one has 100,001.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct SparseHistogram {
    buckets: Vec<(usize, u32)>,
    max_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_histograms_give_the_percentiles_of_all_latencies_together() {
        let (fast, slow) = (Histogram::new(), Histogram::new());
        for _ in 0..90 {
            fast.record(Duration::from_micros(995));
        }
        for _ in 0..10 {
            slow.record(Duration::from_millis(20));
        }
        let all = Histogram::new();
        let wire =
            |h: &Histogram| serde_json::from_str(&serde_json::to_string(&h.to_sparse()).unwrap()).unwrap();
        all.merge(&wire(&fast));
        all.merge(&wire(&slow));
        assert_eq!(all.count(), 100);
        assert_eq!(all.percentile_ms(0.50), 1.0);
        assert_eq!(all.percentile_ms(0.90), 1.0);
        assert_eq!(all.percentile_ms(0.99), 20.01);
        assert_eq!(all.max_ms(), 20.0);
    }
}
