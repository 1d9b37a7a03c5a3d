//! What an auth service hands over and gets back: a new user's email and display name, checked
//! before anything is written, and the player the worker created. A leaf of the auth side: the
//! writer and the confirmations use these types without reaching back into `signup`.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::job::{BuiltinAnswer, ExternalId, JobId, PlayerId, UserId};

/// Longest email accepted (RFC 5321's limit on a forward path); the schema checks it too.
pub const MAX_EMAIL_CHARS: usize = 254;
/// Longest local part (before the `@`) accepted, per RFC 5321.
const MAX_EMAIL_LOCAL_CHARS: usize = 64;
/// Longest display name accepted; the schema checks it too.
pub const MAX_DISPLAY_NAME_CHARS: usize = 64;

/// A signup's input, validated: construct it with [`NewUser::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    email: String,
    display_name: String,
}

impl NewUser {
    /// Validates an email and a display name. Both are stored exactly as given, never trimmed or
    /// case-folded (email uniqueness ignores case in the database).
    ///
    /// # Errors
    /// [`InvalidInput`] naming the first field that breaks a rule, and the rule.
    ///
    /// ```
    /// use ackloop::{Field, NewUser};
    ///
    /// assert!(NewUser::new("ada@example.com", "Ada").is_ok());
    /// let err = NewUser::new("ada@example.com", "   ").unwrap_err();
    /// assert_eq!(err.field, Field::DisplayName);
    /// ```
    pub fn new(email: impl Into<String>, display_name: impl Into<String>) -> Result<Self, InvalidInput> {
        let email = email.into();
        let display_name = display_name.into();
        check_email(&email).map_err(|rule| InvalidInput {
            field: Field::Email,
            rule,
        })?;
        check_display_name(&display_name).map_err(|rule| InvalidInput {
            field: Field::DisplayName,
            rule,
        })?;
        Ok(Self { email, display_name })
    }

    /// The email, as given.
    pub fn email(&self) -> &str {
        &self.email
    }

    /// The display name, as given.
    pub fn display_name(&self) -> &str {
        &self.display_name
    }
}

fn check_email(email: &str) -> Result<(), Rule> {
    let chars = email.chars().count();
    if chars == 0 {
        return Err(Rule::Empty);
    }
    if chars > MAX_EMAIL_CHARS {
        return Err(Rule::TooLong { max: MAX_EMAIL_CHARS });
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Rule::WhitespaceOrControl);
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err(Rule::EmailShape("must contain one '@'"));
    };
    if domain.contains('@') {
        return Err(Rule::EmailShape("must contain only one '@'"));
    }
    if local.is_empty() || local.chars().count() > MAX_EMAIL_LOCAL_CHARS {
        return Err(Rule::EmailShape("needs 1 to 64 characters before the '@'"));
    }
    if local.chars().any(|c| "<>()[]\\,;:\"".contains(c)) {
        return Err(Rule::EmailShape("has a character not allowed before the '@'"));
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 {
        return Err(Rule::EmailShape("needs a domain with a dot, like example.com"));
    }
    // ASCII letters, digits and inner hyphens, or any character beyond ASCII (an
    // internationalised name): a rule the database's `ackloop.email_problem` applies exactly.
    let label_ok = |label: &&str| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
    };
    if !labels.iter().all(label_ok) {
        return Err(Rule::EmailShape("has an invalid domain"));
    }
    Ok(())
}

fn check_display_name(name: &str) -> Result<(), Rule> {
    let chars = name.chars().count();
    if chars == 0 {
        return Err(Rule::Empty);
    }
    if chars > MAX_DISPLAY_NAME_CHARS {
        return Err(Rule::TooLong {
            max: MAX_DISPLAY_NAME_CHARS,
        });
    }
    if name.trim().is_empty() {
        return Err(Rule::Blank);
    }
    if name.chars().any(char::is_control) {
        return Err(Rule::Control);
    }
    if name.trim() != name {
        return Err(Rule::SurroundingWhitespace);
    }
    Ok(())
}

/// A job for a user of the auth service's own tables, validated: construct it with
/// [`NewJob::new`] and add it with [`add_job`](crate::add_job) inside the transaction that
/// writes the user.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    user_id: ExternalId,
    display_name: String,
    extra: Option<serde_json::Value>,
    key: Option<JobId>,
}

impl NewJob {
    /// A job creating the player of `user_id` (the service's own id: an `i64`, a `Uuid`, or an
    /// [`ExternalId`] made from text) named `display_name`.
    ///
    /// # Errors
    /// [`InvalidInput`] for the display name, under the same rules as [`NewUser::new`].
    ///
    /// ```
    /// use ackloop::NewJob;
    ///
    /// let job = NewJob::new(uuid::Uuid::now_v7(), "Ada")?
    ///     .with_extra(serde_json::json!({"referrer": "spring-campaign"}))?;
    /// # Ok::<(), ackloop::InvalidInput>(())
    /// ```
    pub fn new(
        user_id: impl Into<ExternalId>,
        display_name: impl Into<String>,
    ) -> Result<Self, InvalidInput> {
        let display_name = display_name.into();
        check_display_name(&display_name).map_err(|rule| InvalidInput {
            field: Field::DisplayName,
            rule,
        })?;
        Ok(Self {
            user_id: user_id.into(),
            display_name,
            extra: None,
            key: None,
        })
    }

    /// The same job carrying `extra` data for the player service (its handler reads
    /// [`Job::extra`](crate::Job::extra)).
    ///
    /// # Errors
    /// [`InvalidInput`] on [`Field::Extra`]: not a JSON object, or over 8 KiB as text.
    pub fn with_extra(mut self, extra: serde_json::Value) -> Result<Self, InvalidInput> {
        if let Some(problem) = crate::job::json_object_problem(&extra) {
            return Err(InvalidInput {
                field: Field::Extra,
                rule: Rule::Json(problem),
            });
        }
        self.extra = Some(extra);
        Ok(self)
    }

    /// The same job with the caller's idempotency key as its id: added again with the same key
    /// and data, it is the same job (nothing written twice); with other data,
    /// [`SignupError::KeyReused`](crate::SignupError::KeyReused).
    pub fn with_key(mut self, key: JobId) -> Self {
        self.key = Some(key);
        self
    }

    /// The user's id, as given.
    pub fn user_id(&self) -> &ExternalId {
        &self.user_id
    }

    /// The display name, as given.
    pub fn display_name(&self) -> &str {
        &self.display_name
    }

    /// The extra data, if any.
    pub fn extra(&self) -> Option<&serde_json::Value> {
        self.extra.as_ref()
    }

    /// The idempotency key, if one was given.
    pub fn key(&self) -> Option<JobId> {
        self.key
    }
}

/// The input field a signup was refused for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// The user's email.
    Email,
    /// The user's (and player's) display name.
    DisplayName,
    /// A job's extra data for the player service.
    Extra,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Email => "email",
            Self::DisplayName => "display name",
            Self::Extra => "extra data",
        })
    }
}

/// The rule an input broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rule {
    /// Nothing was given.
    #[error("must not be empty")]
    Empty,
    /// Only whitespace was given.
    #[error("must not be only whitespace")]
    Blank,
    /// More characters than allowed.
    #[error("must be at most {max} characters")]
    TooLong {
        /// The limit, in characters (Unicode scalar values).
        max: usize,
    },
    /// Leading or trailing whitespace, which would be stored and shown as given.
    #[error("must not start or end with whitespace")]
    SurroundingWhitespace,
    /// Whitespace or control characters inside an email.
    #[error("must not contain spaces or control characters")]
    WhitespaceOrControl,
    /// Control characters (newlines, NUL, escapes) in a name.
    #[error("must not contain control characters")]
    Control,
    /// Not shaped like an address.
    #[error("{0}")]
    EmailShape(&'static str),
    /// Not a JSON object, or too large.
    #[error("{0}")]
    Json(&'static str),
}

/// A signup refused before anything was written: which field, and which rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {rule}")]
pub struct InvalidInput {
    /// The field that was refused.
    pub field: Field,
    /// The rule it broke.
    pub rule: Rule,
}

/// What the player service answered for a finished job, read from ackloop's job table: the
/// player's id in the service's own table and the handler's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Confirmed {
    /// The job.
    pub job_id: JobId,
    /// The user it was for, as the auth service gave it.
    pub user_id: ExternalId,
    /// The player, as the player service's handler returned it.
    pub player_id: ExternalId,
    /// The handler's result: a JSON object (`{}` when it gave none).
    pub result: serde_json::Value,
}

impl Confirmed {
    /// The result as the handler's own type.
    ///
    /// # Errors
    /// The result does not have `T`'s shape.
    pub fn result_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.result)
    }
}

/// A player of the built-in tables, as the built-in worker created it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Player {
    /// The player's id.
    pub id: PlayerId,
    /// The user it belongs to.
    pub user_id: UserId,
    /// Copied from the user at creation.
    pub display_name: String,
    /// When the worker created it.
    pub created_at: DateTime<Utc>,
}

impl Player {
    /// The built-in player a confirmation describes; `None` when it is not one (a job a service
    /// added, answered by its own handler).
    pub(crate) fn from_builtin(confirmed: &Confirmed) -> Option<Self> {
        let result: BuiltinAnswer = confirmed.result_as().ok()?;
        Some(Self {
            id: PlayerId::from(confirmed.player_id.to_i64()?),
            user_id: UserId::from(confirmed.user_id.to_i64()?),
            display_name: result.display_name,
            created_at: result.created_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email_rule(email: &str) -> Option<Rule> {
        check_email(email).err()
    }

    #[test]
    fn accepts_ordinary_and_international_addresses() {
        for email in [
            "ada@example.com",
            "Ada.Lovelace+tag@mail.example.co.uk",
            "o'brien@example.ie",
            "用户@例子.广告",
            "a@b.co",
        ] {
            assert_eq!(email_rule(email), None, "{email}");
        }
    }

    #[test]
    fn refuses_malformed_addresses_with_a_reason() {
        for email in [
            "",
            "plain",
            "a@b",
            "@example.com",
            "a@@example.com",
            "a@b@example.com",
            "a b@example.com",
            " ada@example.com",
            "ada@example.com\n",
            "a\0@example.com",
            "a@-example.com",
            "a@example..com",
            "a@exa_mple.com",
            "a;drop@example.com",
        ] {
            assert!(email_rule(email).is_some(), "{email:?} should be refused");
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert!(email_rule(&long_local).is_some());
        let too_long = format!("a@{}.com", "b".repeat(MAX_EMAIL_CHARS));
        assert_eq!(
            email_rule(&too_long),
            Some(Rule::TooLong { max: MAX_EMAIL_CHARS })
        );
    }

    #[test]
    fn display_names_are_kept_as_given_or_refused() {
        for ok in [
            "Ada",
            "Ada Lovelace",
            "ǅemal 🎮",
            "'; drop table users; --",
            &"é".repeat(64),
        ] {
            assert_eq!(check_display_name(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(check_display_name(""), Err(Rule::Empty));
        assert_eq!(check_display_name("   "), Err(Rule::Blank));
        assert_eq!(check_display_name("\u{3000}"), Err(Rule::Blank));
        assert_eq!(check_display_name(" Ada"), Err(Rule::SurroundingWhitespace));
        assert_eq!(check_display_name("Ada\nLovelace"), Err(Rule::Control));
        assert_eq!(check_display_name("a\0b"), Err(Rule::Control));
        assert_eq!(
            check_display_name(&"é".repeat(65)),
            Err(Rule::TooLong {
                max: MAX_DISPLAY_NAME_CHARS
            })
        );
    }

    #[test]
    fn invalid_input_names_field_and_rule() {
        let err = NewUser::new("ada@example.com", "").unwrap_err();
        assert_eq!(err.to_string(), "invalid display name: must not be empty");
        let err = NewUser::new("nope", "Ada").unwrap_err();
        assert_eq!(err.field, Field::Email);
    }
}
