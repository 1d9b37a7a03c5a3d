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

/// A row's id in a service's own table, a user's or a player's: a number, a UUID or a string,
/// kept as text (`player_creation_jobs.user_id` and `.player_id`), so that ackloop fits whatever
/// key type a service already has. Made from an `i64` or a [`Uuid`] directly, or from text with
/// [`ExternalId::new`], which applies the rules `ackloop.user_id_problem` applies.
///
/// ```
/// use ackloop::ExternalId;
///
/// assert_eq!(ExternalId::from(42_i64).as_str(), "42");
/// assert_eq!(ExternalId::from(42_i64).to_i64(), Some(42));
/// assert!(ExternalId::new(" padded ").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type)]
#[sqlx(transparent)]
#[serde(try_from = "String", into = "String")]
pub struct ExternalId(String);

/// Longest [`ExternalId`] accepted, in characters; the schema checks it too.
pub const MAX_EXTERNAL_ID_CHARS: usize = 128;

/// Why a text is not an [`ExternalId`]: the rule it breaks, in the words the schema uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidExternalId(pub &'static str);

impl ExternalId {
    /// An id given as text: not empty, at most [`MAX_EXTERNAL_ID_CHARS`] characters, no control
    /// characters, no whitespace at either end. Kept exactly as given.
    ///
    /// # Errors
    /// [`InvalidExternalId`] with the rule broken.
    pub fn new(text: impl Into<String>) -> Result<Self, InvalidExternalId> {
        let text = text.into();
        if text.is_empty() {
            return Err(InvalidExternalId("must not be empty"));
        }
        if text.chars().count() > MAX_EXTERNAL_ID_CHARS {
            return Err(InvalidExternalId("must be at most 128 characters"));
        }
        if text.chars().any(char::is_control) {
            return Err(InvalidExternalId("must not contain control characters"));
        }
        if text.trim() != text {
            return Err(InvalidExternalId("must not start or end with whitespace"));
        }
        Ok(Self(text))
    }

    /// The id as text, as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as a number, when it is one (a `bigint` key).
    pub fn to_i64(&self) -> Option<i64> {
        self.0.parse().ok()
    }

    /// The id as a UUID, when it is one (a `uuid` key).
    pub fn to_uuid(&self) -> Option<Uuid> {
        Uuid::try_parse(&self.0).ok()
    }
}

impl From<i64> for ExternalId {
    fn from(id: i64) -> Self {
        Self(id.to_string())
    }
}

impl From<Uuid> for ExternalId {
    fn from(id: Uuid) -> Self {
        // Postgres' `uuid::text`: a service that casts its key to text gets the same id.
        Self(id.hyphenated().to_string())
    }
}

impl From<UserId> for ExternalId {
    fn from(id: UserId) -> Self {
        Self::from(id.get())
    }
}

impl From<PlayerId> for ExternalId {
    fn from(id: PlayerId) -> Self {
        Self::from(id.get())
    }
}

impl TryFrom<String> for ExternalId {
    type Error = InvalidExternalId;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::new(text)
    }
}

impl From<ExternalId> for String {
    fn from(id: ExternalId) -> Self {
        id.0
    }
}

impl fmt::Display for ExternalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The largest JSON object a job carries (extra data, or a result), in bytes of JSON text; the
/// schema checks it too (`ackloop.json_object_problem`).
pub const MAX_JSON_BYTES: usize = 8192;

/// Why a JSON value cannot be a job's extra data or result, in the schema's words.
pub(crate) fn json_object_problem(value: &serde_json::Value) -> Option<&'static str> {
    if !value.is_object() {
        return Some("must be a JSON object");
    }
    if has_nul(value) {
        // PostgreSQL's jsonb cannot hold one.
        return Some("must not contain NUL characters (\\u0000)");
    }
    // As PostgreSQL prints jsonb: a space after each ':' and ',' (serde_json's compact text has
    // none), and numbers in full (1e300 has 301 digits there).
    let printed = value.to_string().len() + extra_printed_bytes(value);
    (printed > MAX_JSON_BYTES).then_some("must be at most 8192 bytes as JSON text")
}

/// Whether a key or string anywhere in `value` holds a NUL character.
fn has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(text) => text.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(has_nul),
        serde_json::Value::Object(map) => map
            .iter()
            .any(|(key, value)| key.contains('\0') || has_nul(value)),
        _ => false,
    }
}

/// How many more bytes PostgreSQL's jsonb text of `value` has than serde_json's compact text:
/// its separators' spaces, and its numbers written out in full.
fn extra_printed_bytes(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Number(number) if !number.is_i64() && !number.is_u64() => {
            let compact = number.to_string().len();
            // Rust prints an f64 in full, without an exponent, as PostgreSQL's numeric does.
            let full = number.as_f64().map_or(compact, |float| float.to_string().len());
            full.saturating_sub(compact)
        }
        serde_json::Value::Array(items) => {
            items.len().saturating_sub(1) + items.iter().map(extra_printed_bytes).sum::<usize>()
        }
        serde_json::Value::Object(map) => {
            map.len() * 2 - usize::from(!map.is_empty())
                + map.values().map(extra_printed_bytes).sum::<usize>()
        }
        _ => 0,
    }
}

/// What a handler answers for a built-in signup, beside the player's id: the caller of
/// [`Signups::await_player`](crate::Signups::await_player) reads it back as a
/// [`Player`](crate::Player). `ackloop.complete_jobs` stores the same shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BuiltinAnswer {
    pub(crate) display_name: String,
    pub(crate) created_at: chrono::DateTime<chrono::Utc>,
}

/// Where a job came from, which decides the worker that takes it: a worker claims only the jobs
/// its [`Handler`](crate::Handler) serves ([`Handler::SOURCE`](crate::Handler::SOURCE)), so a
/// service's own worker and the built-in one can share a database without taking each other's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobSource {
    /// Jobs a service added for a user of its own tables ([`add_job`](crate::add_job),
    /// `ackloop.add_job`): what a handler serves unless it says otherwise.
    AddJob,
    /// Signups on the built-in tables ([`Signups::create_user_and_await_player`](crate::Signups),
    /// `ackloop.sign_up`): the built-in [`InsertPlayer`](crate::InsertPlayer) serves these.
    BuiltinSignup,
}

/// Where a job is in its life: `pending` (or `running`, an attempt of a job taken alone) until a
/// worker finishes it, then `done` or `failed`. docs/protocol.md draws the transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting to be claimed, or waiting for its next attempt.
    Pending,
    /// An attempt counted and committed before it is made, as a worker does for a job it takes
    /// alone (a retry, or any job after a session died): until the attempt ends, or its lease
    /// does (then the attempt is taken as ended with its session). A batch's jobs are never
    /// `running`: their claim is a row lock inside one transaction.
    Running,
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
            Self::Running => "running",
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
            "running" => Ok(Self::Running),
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

/// How long past its timeout a signup or a wait may be answered, at most: the last look at the
/// tables (a confirmation whose notification was lost still counts) and the answer of a statement
/// sent just before the deadline take up to this much. A wait whose look takes longer is answered
/// as timed out, with its job id.
pub const ANSWER_MARGIN: Duration = Duration::from_millis(100);

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
    fn json_objects_are_measured_as_postgres_prints_them() {
        assert_eq!(
            json_object_problem(&serde_json::json!([1])),
            Some("must be a JSON object")
        );
        assert_eq!(
            json_object_problem(&serde_json::json!({"a": [1, 2], "b": {"c": null}})),
            None
        );
        let value = serde_json::json!({"a": [1, 2], "b": {"c": null}});
        // {"a": [1, 2], "b": {"c": null}}
        assert_eq!(value.to_string().len() + extra_printed_bytes(&value), 31);
        // PostgreSQL prints 1e300 with its 301 digits.
        assert_eq!(
            serde_json::json!({"a": 1e300}).to_string().len()
                + extra_printed_bytes(&serde_json::json!({"a": 1e300})),
            308
        );
        assert!(json_object_problem(&serde_json::json!({"a": "nul\u{0}"})).is_some());
        let big = serde_json::json!({ "k": "x".repeat(MAX_JSON_BYTES) });
        assert!(json_object_problem(&big).is_some());
    }

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
        for status in [
            JobStatus::Pending,
            JobStatus::Running,
            JobStatus::Done,
            JobStatus::Failed,
        ] {
            assert_eq!(status.as_str().parse::<JobStatus>().unwrap(), status);
        }
        assert!("claimed".parse::<JobStatus>().is_err());
    }
}
