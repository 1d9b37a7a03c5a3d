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
