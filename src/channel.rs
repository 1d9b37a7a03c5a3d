//! Notification channels: validated names and untrusted payloads. The listener that survives
//! reconnects is `listen.rs`.
//!
//! A notification is only ever a hint. Its payload is one job id, which is checked against the
//! tables before anything acts on it; a lost notification costs latency (the table sweeps find
//! the job), never correctness.

use std::fmt;
use std::time::Duration;

use crate::job::JobId;

/// The default channel that wakes workers: payload = the new job's id.
pub const DEFAULT_JOBS_CHANNEL: &str = "player_jobs";
/// The default channel that confirms jobs to waiting callers: payload = the finished job's id.
pub const DEFAULT_DONE_CHANNEL: &str = "player_jobs_done";

/// A Postgres channel name that is safe to `LISTEN` on: `^[a-z_][a-z0-9_]{0,62}$`.
///
/// `LISTEN` cannot take a bind parameter, so the name is validated once, here, and every other
/// part of the crate handles only `ChannelName`s.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelName(String);

impl ChannelName {
    /// Validates `name` as a channel name.
    ///
    /// # Errors
    /// [`InvalidChannelName`] when `name` is empty, longer than 63 bytes, or holds anything but
    /// lower-case ASCII letters, digits and underscores (a digit may not come first).
    ///
    /// ```
    /// assert!(ackloop::ChannelName::new("signup_jobs").is_ok());
    /// assert!(ackloop::ChannelName::new("jobs; drop table users").is_err());
    /// ```
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidChannelName> {
        let name = name.into();
        let mut bytes = name.bytes();
        let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
        let rest_ok = bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if first_ok && rest_ok && name.len() <= 63 {
            Ok(Self(name))
        } else {
            Err(InvalidChannelName(name))
        }
    }

    /// The name as text, for `pg_notify` and `LISTEN`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A channel name that [`ChannelName::new`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid channel name {0:?}: use 1 to 63 lower-case letters, digits and underscores, not starting with a digit"
)]
pub struct InvalidChannelName(pub String);

/// The pair of channels one deployment uses. Both sides must agree on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channels {
    /// Wakes workers when a job is committed.
    pub jobs: ChannelName,
    /// Tells waiting callers that a job finished (done or failed).
    pub done: ChannelName,
}

impl Default for Channels {
    fn default() -> Self {
        Self {
            jobs: ChannelName(DEFAULT_JOBS_CHANNEL.to_owned()),
            done: ChannelName(DEFAULT_DONE_CHANNEL.to_owned()),
        }
    }
}

impl Channels {
    /// Both channel names, validated.
    ///
    /// # Errors
    /// [`InvalidChannelName`] for the first name that is not a valid channel name, or when both
    /// names are the same (workers would take confirmations for wake-ups and the reverse).
    ///
    /// ```
    /// let channels = ackloop::Channels::new("signup_jobs", "signup_jobs_done")?;
    /// assert_eq!(channels.jobs.as_str(), "signup_jobs");
    /// # Ok::<(), ackloop::InvalidChannelName>(())
    /// ```
    pub fn new(jobs: &str, done: &str) -> Result<Self, InvalidChannelName> {
        let channels = Self {
            jobs: ChannelName::new(jobs)?,
            done: ChannelName::new(done)?,
        };
        if channels.jobs == channels.done {
            return Err(InvalidChannelName(done.to_owned()));
        }
        Ok(channels)
    }
}

/// Reads a notification payload as a job id. Payloads are untrusted: anyone who can connect can
/// `NOTIFY` any channel, so only the exact text Postgres prints for a uuid is accepted.
///
/// # Errors
/// [`BadPayload`] with a shortened copy of the payload for the log line.
///
/// ```
/// let id = ackloop::JobId::new();
/// assert_eq!(ackloop::parse_job_id(&id.to_string()), Ok(id));
/// assert!(ackloop::parse_job_id("{\"job\": 1}").is_err());
/// ```
pub fn parse_job_id(payload: &str) -> Result<JobId, BadPayload> {
    const HYPHENATED_UUID_LEN: usize = 36;
    if payload.len() == HYPHENATED_UUID_LEN
        && let Ok(id) = payload.parse()
    {
        return Ok(id);
    }
    Err(BadPayload::of(payload))
}

/// A payload that is not a job id. Holds at most the first 64 characters, so that a log line
/// about a flood of 8 kB payloads stays short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payload is not a job id: {shown:?} ({len} bytes)")]
pub struct BadPayload {
    shown: String,
    len: usize,
}

impl BadPayload {
    fn of(payload: &str) -> Self {
        Self {
            shown: payload.chars().take(64).collect(),
            len: payload.len(),
        }
    }
}

/// How often to log about ignored payloads during a flood of them.
const IGNORED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Logs payloads that are not job ids without flooding the log: the first at once, then one line
/// per [`IGNORED_LOG_INTERVAL`] counting those not shown.
pub(crate) struct IgnoredPayloads {
    channel: ChannelName,
    last_logged: Option<tokio::time::Instant>,
    not_logged: u64,
}

impl IgnoredPayloads {
    pub(crate) fn new(channel: ChannelName) -> Self {
        Self {
            channel,
            last_logged: None,
            not_logged: 0,
        }
    }

    pub(crate) fn record(&mut self, err: &BadPayload) {
        ::metrics::counter!(crate::telemetry::PAYLOADS_IGNORED, "channel" => self.channel.to_string())
            .increment(1);
        let now = tokio::time::Instant::now();
        if self
            .last_logged
            .is_some_and(|last| now.duration_since(last) < IGNORED_LOG_INTERVAL)
        {
            self.not_logged += 1;
            return;
        }
        tracing::warn!(
            channel = %self.channel,
            error = %err,
            ignored_since_last_line = self.not_logged,
            "ignored a payload that is not a job id"
        );
        self.last_logged = Some(now);
        self.not_logged = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_follow_postgres_identifier_rules() {
        for good in ["player_jobs", "_x", "a", "jobs_2", &"a".repeat(63)] {
            assert!(ChannelName::new(good).is_ok(), "{good:?} should be accepted");
        }
        for bad in [
            "",
            "2jobs",
            "Player_jobs",
            "jobs;drop table users",
            "jobs\"",
            "jobs-done",
            "jöbs",
            &"a".repeat(64),
        ] {
            assert!(ChannelName::new(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn channels_must_differ() {
        assert!(Channels::new("same", "same").is_err());
        assert!(Channels::new("a", "b").is_ok());
    }

    #[test]
    fn payload_must_be_exactly_a_hyphenated_uuid() {
        let id = JobId::new();
        assert_eq!(parse_job_id(&id.to_string()).unwrap(), id);
        let simple = id.as_uuid().simple().to_string();
        let braced = format!("{{{id}}}");
        let padded = format!(" {id}");
        for bad in [
            "",
            "hello",
            simple.as_str(),
            braced.as_str(),
            padded.as_str(),
            "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz",
        ] {
            assert!(parse_job_id(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn bad_payload_message_is_short_for_huge_payloads() {
        let err = parse_job_id(&"x".repeat(7999)).unwrap_err();
        let message = err.to_string();
        assert!(message.len() < 120, "{message}");
        assert!(message.contains("7999 bytes"));
    }
}
