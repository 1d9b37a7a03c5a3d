//! Typed ids, the job's status, and the retry policy.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The id of a `player_creation_jobs` row.
///
/// A UUIDv7 made by the client before the signup commits, so a caller can start waiting for
/// the job before it exists, and a timed-out caller can hand the id to someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type)]
#[sqlx(transparent)]
#[serde(transparent)]
pub struct JobId(Uuid);

impl JobId {
    /// A new, time-ordered id (UUIDv7), so jobs created together sit together in the index.
    ///
    /// ```
    /// let (first, second) = (ackloop::JobId::new(), ackloop::JobId::new());
    /// assert!(first < second, "time-ordered");
    /// ```
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id as a UUID, for callers that store it elsewhere.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for JobId {
    fn from(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(text).map(Self)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hyphenated lower case: the same text as Postgres' `uuid::text`, which is what
        // other-language peers put on the channels.
        self.0.hyphenated().fmt(f)
    }
}

/// The id of a `users` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type)]
#[sqlx(transparent)]
#[serde(transparent)]
pub struct UserId(i64);

impl UserId {
    /// The raw database id.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl From<i64> for UserId {
    fn from(id: i64) -> Self {
        Self(id)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The id of a `players` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type)]
#[sqlx(transparent)]
#[serde(transparent)]
pub struct PlayerId(i64);

impl PlayerId {
    /// The raw database id.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl From<i64> for PlayerId {
    fn from(id: i64) -> Self {
        Self(id)
    }
}

impl fmt::Display for PlayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a job is in its life: `pending` until a worker finishes it, then `done` or `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting to be claimed, or waiting for its next attempt.
    Pending,
    /// The worker created the player (unless someone deleted it since: `JobDetails::player_missing`).
    Done,
    /// Every attempt failed; `last_error` says why.
    Failed,
}

impl JobStatus {
    /// The text stored in `player_creation_jobs.status`.
    ///
    /// ```
    /// assert_eq!(ackloop::JobStatus::Done.as_str(), "done");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }
}

impl FromStr for JobStatus {
    type Err = UnknownStatus;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "pending" => Ok(Self::Pending),
            "done" => Ok(Self::Done),
            "failed" => Ok(Self::Failed),
            other => Err(UnknownStatus(other.to_owned())),
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status text that this version does not know (a newer schema, or a hand-edited row).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job status {0:?}")]
pub struct UnknownStatus(pub String);

/// When a failed attempt is tried again: exponential backoff from `base`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failed attempt.
    pub base: Duration,
    /// The longest wait between attempts, however many have failed.
    pub max: Duration,
}

impl Default for Backoff {
    /// 1s, 2s, 4s, … up to 5 minutes: long enough for a restarted database or a released lock,
    /// short enough that a waiting caller may still see the job done.
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The wait before the next attempt, after `failed_attempts` attempts have failed (1 or more).
    ///
    /// ```
    /// use std::time::Duration;
    /// let backoff = ackloop::Backoff { base: Duration::from_secs(1), max: Duration::from_secs(5) };
    /// assert_eq!(backoff.delay(1), Duration::from_secs(1));
    /// assert_eq!(backoff.delay(3), Duration::from_secs(4));
    /// assert_eq!(backoff.delay(10), Duration::from_secs(5));
    /// ```
    pub fn delay(&self, failed_attempts: u32) -> Duration {
        let doublings = failed_attempts.saturating_sub(1).min(31);
        self.base
            .checked_mul(1 << doublings)
            .map_or(self.max, |delay| delay.min(self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_base_and_stops_at_max() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let delays: Vec<_> = (1..=6).map(|n| backoff.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn backoff_never_overflows() {
        let backoff = Backoff::default();
        assert_eq!(backoff.delay(u32::MAX), backoff.max);
        assert_eq!(backoff.delay(0), backoff.base);
    }

    #[test]
    fn job_id_text_round_trips_as_postgres_prints_it() {
        let id = JobId::new();
        let text = id.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<JobId>().unwrap(), id);
    }

    #[test]
    fn status_text_round_trips() {
        for status in [JobStatus::Pending, JobStatus::Done, JobStatus::Failed] {
            assert_eq!(status.as_str().parse::<JobStatus>().unwrap(), status);
        }
        assert!("running".parse::<JobStatus>().is_err());
    }
}
