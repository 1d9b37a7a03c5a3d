//! Database errors as a user should read them: what failed and what to do, without the
//! driver's wrapping or the server's source position, never with a password; and which server a
//! connection reaches, named for messages.

use std::fmt;

use sqlx::postgres::PgConnectOptions;

/// A database error in words a user can act on: what failed and what to do, without the
/// driver's wrapping ("error returned from database:") or the server's source position
/// ("at line 2432").
///
/// ```
/// let err = sqlx::Error::PoolTimedOut;
/// assert_eq!(ackloop::describe_db_error(&err), "timed out waiting for a database connection");
/// ```
pub fn describe_db_error(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Database(db_err) => {
            let mut text = db_err.message().to_owned();
            let code = db_err.code();
            let pg = db_err.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
            // Details that repeat a row's values ("Failing row contains (…)", "Key
            // (lower(email))=(…) already exists.") would carry emails and names into logs and a
            // job's last_error: the message already names the constraint.
            if let Some(detail) = pg
                .and_then(|e| e.detail())
                .filter(|detail| !detail.starts_with("Failing row contains") && !detail.starts_with("Key ("))
            {
                text.push_str(&format!(" ({detail})"));
            }
            let advice = match code.as_deref() {
                Some("28P01") => Some("check the user name and password"),
                Some("28000") if text.contains("no encryption") => {
                    Some("the server requires TLS: add sslmode=require (or verify-full with sslrootcert)")
                }
                Some("28000") if text.contains("does not exist") => {
                    Some("create the role, or fix the user in the connection string")
                }
                Some("28000") => Some("the server refused this user from this address (pg_hba.conf)"),
                Some("3D000") => Some("create the database, or fix dbname in the connection string"),
                Some("57P01" | "57P02" | "57P03") => Some("the server is restarting; try again in a moment"),
                Some("53300") => {
                    Some("the server has no free connections; raise max_connections or use fewer")
                }
                Some("42501") => Some("grant the role the privileges in sql/roles.sql"),
                _ => pg.and_then(|e| e.hint()),
            };
            if let Some(advice) = advice {
                text.push_str(": ");
                text.push_str(advice);
            }
            text
        }
        sqlx::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "connection refused: is PostgreSQL running, and on this host and port?".to_owned()
            }
            std::io::ErrorKind::NotFound => {
                "no server socket there: is PostgreSQL running, and is the socket directory right?".to_owned()
            }
            // A limit of ours says which one ran out.
            std::io::ErrorKind::TimedOut => match io.get_ref() {
                Some(limit) => format!("the connection timed out: {limit}"),
                None => "the connection timed out".to_owned(),
            },
            // rustls reports a refused certificate as an I/O error.
            _ if io.to_string().contains("certificate") => describe_tls_error(&io.to_string()),
            _ => format!("connection error: {io}"),
        },
        sqlx::Error::Tls(tls) => describe_tls_error(&tls.to_string()),
        sqlx::Error::PoolTimedOut => "timed out waiting for a database connection".to_owned(),
        sqlx::Error::PoolClosed => "the connection pool was closed".to_owned(),
        sqlx::Error::WorkerCrashed => "the connection's background task crashed".to_owned(),
        sqlx::Error::Configuration(config) => format!("invalid connection settings: {config}"),
        // sqlx appends its own source position: " (sqlx_postgres::connection::tls:95)".
        sqlx::Error::Protocol(text) => format!(
            "unexpected reply from the server (is this a PostgreSQL server?): {}",
            text.split(" (sqlx_").next().unwrap_or(text)
        ),
        other => other.to_string(),
    }
}

/// Shows a driver error as [`describe_db_error`] tells it, for log fields.
pub(crate) struct Described<'a>(pub(crate) &'a sqlx::Error);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe_db_error(self.0))
    }
}

fn describe_tls_error(text: &str) -> String {
    let advice = if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        "the server's certificate is not signed by a CA you trust: give its CA with sslrootcert=/path/to/ca.crt"
    } else if text.contains("CaUsedAsEndEntity") {
        "the server's certificate is its own CA (self-signed, as `openssl req -x509` makes one), \
         which rustls does not accept as a server's certificate, though libpq does: sign the \
         server's certificate with a separate CA and give that CA as sslrootcert, or use \
         sslmode=require without sslrootcert (encrypted, not verified)"
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        "the server's certificate is not for this host name: connect by the name on the certificate, or use sslmode=verify-ca"
    } else if text.contains("does not support TLS") {
        "the server does not offer TLS: use sslmode=prefer or disable, or turn ssl on in the server"
    } else if text.contains("without TLS support") {
        "this build has no TLS support"
    } else {
        "check sslmode, sslrootcert, sslcert and sslkey"
    };
    format!("TLS failed ({text}): {advice}")
}

/// `host:port`, or the socket directory: which server these options reach.
pub(crate) fn server_name(options: &PgConnectOptions) -> String {
    match options.get_socket() {
        Some(dir) => dir.display().to_string(),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_errors_read_without_driver_internals() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(describe_db_error(&io).contains("is PostgreSQL running"));
        let tls = sqlx::Error::Tls("invalid peer certificate: UnknownIssuer".into());
        assert!(describe_db_error(&tls).contains("sslrootcert="));
    }
}
