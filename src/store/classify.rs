//! What a driver error means: the database unreachable, a lock wait given up, or data that
//! cannot succeed as it is.

/// Whether `err` means the database could not be reached (as opposed to refusing a statement):
/// worth retrying later, and reported to callers as "unavailable". The CLI exits 7 for these.
///
/// ```
/// assert!(ackloop::is_unavailable(&sqlx::Error::PoolTimedOut));
/// assert!(!ackloop::is_unavailable(&sqlx::Error::RowNotFound));
/// ```
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        // Protocol: the stream broke off mid-message, e.g. a proxy or load balancer that accepted
        // the connection and closed it (no server behind it, a restart): sqlx reports the
        // empty answer to its TLS request as "unexpected response from SSLRequest: 0x00".
        sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db_err) => db_err.code().is_some_and(|code| {
            // 08: connection exceptions; 57P01-03: the server is shutting down, crashed or
            // starting; 53300: too many connections; 25006: a write on a server that takes none
            // now (a primary demoted to a standby, or fenced, before the pool moved on).
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300" | "25006")
        }),
        _ => false,
    }
}

/// Whether `err` means the server refused this connection for a reason that waiting will not
/// change: a wrong password or unknown role (SQLSTATE class 28), an unknown database (3D000), no
/// permission to connect (42501), a TLS handshake refused (a certificate that does not verify),
/// or settings the driver cannot use. Start-up gives up at once on these, with the reason,
/// where it keeps trying an unreachable or restarting server until its deadline.
///
/// ```
/// assert!(!ackloop::is_refusal(&sqlx::Error::PoolTimedOut));
/// ```
pub fn is_refusal(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Tls(_) | sqlx::Error::Configuration(_) => true,
        // rustls refuses a certificate during the handshake as an I/O error holding its error.
        sqlx::Error::Io(io) => io
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()),
        sqlx::Error::Database(db_err) => db_err
            .code()
            .is_some_and(|code| code.starts_with("28") || matches!(&*code, "3D000" | "42501")),
        _ => false,
    }
}

/// Whether `err` is worth trying again at start-up: the server unreachable, restarting or
/// failing over, and not refusing this connection for good ([`is_refusal`]).
pub(crate) fn is_worth_waiting_for(err: &sqlx::Error) -> bool {
    is_unavailable(err) && !is_refusal(err)
}

/// Whether a transaction was rolled back to resolve a conflict with another (a serialization
/// failure under REPEATABLE READ or SERIALIZABLE, 40001, or a deadlock, 40P01): it certainly did
/// not commit, and the same transaction tried again will usually succeed.
pub(crate) fn is_transaction_conflict(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|db_err| db_err.code())
        .is_some_and(|code| code == "40001" || code == "40P01")
}

/// Whether a statement gave up waiting for a row lock (`lock_timeout`, SQLSTATE 55P03).
pub(crate) fn is_lock_timeout(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|db_err| db_err.code())
        .is_some_and(|code| code == "55P03")
}

/// Whether a failed attempt cannot succeed by being tried again as it is: the data breaks a
/// constraint or a type (SQLSTATE classes 22 and 23).
pub(crate) fn is_permanent(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|db_err| db_err.code())
        .is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
}

/// Whether a server's error from one of the contract's procedures that commit a signup and then
/// send its wake-up (`ackloop.sign_up_then_notify`, `sign_up_many_then_notify`) certainly came
/// before the commit, so nothing was written: refused input or data (classes 22, 23), a call
/// the server would not run at all (class 42: a missing grant or routine; 2D000 inside a
/// transaction block), a conflict rolled back (40001, 40P01) or a lock wait given up (55P03: the
/// wake-up's own lock wait has no limit). Any other error may come after the commit (the session
/// ended, a cancel, the server out of resources while it notified): the write may stand.
pub(crate) fn came_before_the_commit(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|db_err| db_err.code())
        .is_some_and(|code| {
            code.starts_with("22")
                || code.starts_with("23")
                || code.starts_with("42")
                || matches!(&*code, "2D000" | "40001" | "40P01" | "55P03")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server's error with SQLSTATE `code`, as sqlx hands it over.
    #[derive(Debug)]
    struct ServerError(String);

    impl std::fmt::Display for ServerError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error {}", self.0)
        }
    }

    impl std::error::Error for ServerError {}

    impl sqlx::error::DatabaseError for ServerError {
        fn message(&self) -> &str {
            "test"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.as_str().into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn db_error(code: &str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(ServerError(code.to_owned())))
    }

    #[test]
    fn only_errors_raised_before_the_commit_count_as_nothing_written() {
        for code in [
            "23505", "23514", "22023", "42501", "42883", "2D000", "40001", "40P01", "55P03",
        ] {
            assert!(came_before_the_commit(&db_error(code)), "{code}");
        }
        // The session ended (in-band FATAL), a cancel, out of resources, an internal error, and
        // anything that is not the server's answer at all.
        for code in ["57P01", "57014", "53100", "54000", "58030", "XX000"] {
            assert!(!came_before_the_commit(&db_error(code)), "{code}");
        }
        assert!(!came_before_the_commit(&sqlx::Error::PoolTimedOut));
    }
}
