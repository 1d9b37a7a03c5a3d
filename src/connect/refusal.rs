//! Refusing a connection string: the error, the accepted forms it shows, the settings it knows.

/// The forms a connection string may take, shown in every refusal.
const ACCEPTED_FORMS: &str = "use postgres://user:password@host:5432/dbname?sslmode=require, \
     postgres://user@/dbname?host=/run/postgresql (a Unix socket), \
     or host=db.example.com port=5432 dbname=app user=app";

/// The settings ackloop understands (libpq's, and sqlx's statement-cache-capacity), listed in
/// refusals of any other.
pub(super) const KNOWN_PARAMETERS: [&str; 16] = [
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "connect_timeout",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "options",
    "channel_binding",
    "target_session_attrs",
    "statement-cache-capacity",
];

/// A connection string ackloop cannot use: what is wrong, and the forms it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem}; {ACCEPTED_FORMS}")]
pub struct BadConnectionString {
    problem: String,
}

impl BadConnectionString {
    /// A refusal for a `problem` found by the caller (a string that reads well but cannot be
    /// used where it was given); the accepted forms follow it.
    pub fn from_problem(problem: impl Into<String>) -> Self {
        Self::new(problem)
    }

    pub(super) fn new(problem: impl Into<String>) -> Self {
        Self {
            problem: problem.into(),
        }
    }
}
