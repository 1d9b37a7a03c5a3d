//! Connection strings as libpq reads them, and database errors as a user should read them.
//!
//! sqlx reads only part of what libpq users paste: it refuses the empty-host socket form
//! (`postgres://app@/app?host=/run/postgresql`) and key=value strings, and silently ignores
//! `connect_timeout`. [`ConnectConfig::parse`] accepts both libpq forms, honours the settings a
//! libpq user relies on, and refuses anything else naming the accepted form, never echoing a
//! password.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};

mod describe;
mod follow;
mod libpq;
mod refusal;
pub use describe::describe_db_error;
pub(crate) use describe::{Described, server_name};
pub use follow::TargetSessionAttrs;
use libpq::{parse_key_values, parse_uri, percent_encode, shorten};
pub use refusal::BadConnectionString;
use refusal::KNOWN_PARAMETERS;

/// How long [`ConnectConfig::connect_pool`] gives each host when the string sets no
/// `connect_timeout` (libpq waits for ever; a service starting up should not).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// libpq's floor for `connect_timeout`: smaller values are taken as 2 seconds.
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a database is and how to reach it: a libpq connection string, read.
///
/// Both of libpq's forms are accepted: URIs (`postgres://` or `postgresql://`, the host may be
/// empty, a Unix socket directory may be given as `host=` or percent-encoded as the host) and
/// `key=value` strings (values may be single-quoted). Settings the string leaves out come from
/// libpq's environment variables (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`,
/// `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`, `PGAPPNAME`, `PGCONNECT_TIMEOUT`) and a
/// password from `~/.pgpass`, as with psql.
///
/// TLS follows libpq's `sslmode`: `disable`; `allow` and `prefer` (the default) use TLS when the
/// server offers it; `require` insists on TLS, and also checks the server's certificate against
/// `sslrootcert` when one is given; `verify-ca` checks the certificate chain and `verify-full`
/// the host name too, against `sslrootcert`, else `~/.postgresql/root.crt` when it exists, else
/// the system's trusted roots (`sslrootcert=system` asks for those explicitly). `sslcert` and
/// `sslkey` give a client certificate.
///
/// ```
/// use std::time::Duration;
/// use ackloop::ConnectConfig;
///
/// let config = ConnectConfig::parse("postgres://app:s%40cret@/app?host=/run/postgresql&connect_timeout=5")?;
/// assert_eq!(config.connect_timeout(), Some(Duration::from_secs(5)));
/// assert_eq!(config.to_string(), "app@/run/postgresql/app");
///
/// let config = ConnectConfig::parse("host=db.example.com dbname=app user=app sslmode=require")?;
/// assert_eq!(config.options().get_host(), "db.example.com");
/// # Ok::<(), ackloop::BadConnectionString>(())
/// ```
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// One per host of the string, in its order; never empty.
    hosts: Vec<PgConnectOptions>,
    target_session_attrs: TargetSessionAttrs,
    connect_timeout: Option<Duration>,
}

impl ConnectConfig {
    /// Reads a connection string in either of libpq's forms.
    ///
    /// # Errors
    /// [`BadConnectionString`] saying what is wrong and showing the accepted forms; it never
    /// repeats the string, which may hold a password.
    pub fn parse(text: &str) -> Result<Self, BadConnectionString> {
        let text = text.trim();
        let params = if let Some(rest) = text
            .strip_prefix("postgres://")
            .or_else(|| text.strip_prefix("postgresql://"))
        {
            parse_uri(rest)?
        } else if text.contains("://") {
            return Err(BadConnectionString::new(
                "the URL scheme must be postgres:// or postgresql://",
            ));
        } else if text.contains('=') {
            parse_key_values(text)?
        } else if text.is_empty() {
            return Err(BadConnectionString::new("the connection string is empty"));
        } else {
            return Err(BadConnectionString::new(
                "this is neither a postgres:// URL nor a list of key=value settings",
            ));
        };
        Self::from_params(params)
    }

    /// Connection settings from libpq's environment variables alone (`PGHOST`, `PGPORT`,
    /// `PGUSER`, `PGPASSWORD`, `PGDATABASE`, …), as psql uses them when given no connection
    /// string. Without `PGHOST`, the local server's Unix socket is tried.
    ///
    /// # Errors
    /// [`BadConnectionString`] when a variable holds a value that cannot be used.
    pub fn from_libpq_env() -> Result<Self, BadConnectionString> {
        Self::from_params(BTreeMap::new())
    }

    /// The options for sqlx: `PgPoolOptions::connect_with(config.options().clone())`. With
    /// several hosts, the first one's: use [`ConnectConfig::connect_pool`] to honour them all.
    pub fn options(&self) -> &PgConnectOptions {
        &self.hosts[0]
    }

    /// The options for sqlx, taken (with several hosts, the first one's).
    pub fn into_options(self) -> PgConnectOptions {
        self.hosts
            .into_iter()
            .next()
            .expect("a config has at least one host")
    }

    /// The options for each host of the string, in its order (one, unless the string lists
    /// several: `postgres://h1:5432,h2:5433/app`, `host=h1,h2 port=5432,5433`).
    pub fn hosts(&self) -> &[PgConnectOptions] {
        &self.hosts
    }

    /// What a server must be for ackloop to use it (`target_session_attrs`, default `any`).
    pub fn target_session_attrs(&self) -> TargetSessionAttrs {
        self.target_session_attrs
    }

    /// A pool on the first host that [`ConnectConfig::target_session_attrs`] accepts, tried in
    /// the string's order (each within `connect_timeout`, else 10 s), kept on such a server:
    /// libpq's multi-host connection strings, which sqlx alone does not read.
    ///
    /// Each new connection is checked (one that lands on a standby or a read-only server is
    /// closed, and the pool tries again). With several hosts, a task watches the server every
    /// second over a connection of its own; when the server goes away or stops being what is
    /// asked for (a failover: the primary died, a standby was promoted), it tries the hosts in
    /// order until one is, moves the pool's new connections there, and has the pool close the
    /// connections it made before, as they are next taken. ackloop's listeners built on the pool
    /// ([`Signups`](crate::Signups), [`Worker`](crate::Worker)) follow it. Close the pool
    /// (`pool.close().await`) to end the task. `after_connect` and `before_acquire` hooks given
    /// in `pool` are replaced.
    ///
    /// # Errors
    /// The driver's error when there is one host and it cannot be reached; otherwise an
    /// [`sqlx::Error::Io`] naming each host and why it was not used ("no server is
    /// read-write: db1:5432 is in recovery (a standby); db2:5432: connection refused").
    /// [`is_unavailable`](crate::is_unavailable) holds for both.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use ackloop::ConnectConfig;
    ///
    /// let config = ConnectConfig::parse("postgres://app@db1,db2/app?target_session_attrs=read-write")?;
    /// let pool = config.connect_pool(sqlx::postgres::PgPoolOptions::new().test_before_acquire(false)).await?;
    /// let signups = ackloop::Signups::connect(pool).await?; // its listener follows the pool
    /// # Ok(()) }
    /// ```
    pub async fn connect_pool(&self, pool: PgPoolOptions) -> Result<PgPool, sqlx::Error> {
        self.connect_pool_with(pool, |options| options).await
    }

    /// Like [`ConnectConfig::connect_pool`], with `adjust` applied to every host's options (for
    /// example [`worker_session_options`](crate::worker_session_options)).
    ///
    /// # Errors
    /// As [`ConnectConfig::connect_pool`].
    pub async fn connect_pool_with(
        &self,
        pool: PgPoolOptions,
        adjust: impl Fn(PgConnectOptions) -> PgConnectOptions,
    ) -> Result<PgPool, sqlx::Error> {
        let connect_timeout = self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        self.connect_pool_within(pool, adjust, connect_timeout).await
    }

    /// Like [`ConnectConfig::connect_pool_with`], each host given `host_timeout` to connect.
    pub async fn connect_pool_within(
        &self,
        pool: PgPoolOptions,
        adjust: impl Fn(PgConnectOptions) -> PgConnectOptions,
        host_timeout: Duration,
    ) -> Result<PgPool, sqlx::Error> {
        let hosts = self.hosts.iter().cloned().map(adjust).collect();
        let connect_timeout = host_timeout;
        follow::connect_pool(hosts, self.target_session_attrs, connect_timeout, pool).await
    }

    /// `connect_timeout`, when the string (or `PGCONNECT_TIMEOUT`) sets one: the longest a
    /// connection attempt may take. libpq's rules: `0` means no limit, less than 2 means 2.
    pub fn connect_timeout(&self) -> Option<Duration> {
        self.connect_timeout
    }

    fn from_params(params: BTreeMap<String, String>) -> Result<Self, BadConnectionString> {
        // sqlx's own spellings, which its URLs (`to_url_lossy`) carry, mean the libpq settings.
        let mut params: BTreeMap<String, String> = params
            .into_iter()
            .map(|(key, value)| {
                let key = match key.as_str() {
                    "ssl-mode" => "sslmode".to_owned(),
                    "ssl-root-cert" | "ssl-ca" => "sslrootcert".to_owned(),
                    "ssl-cert" => "sslcert".to_owned(),
                    "ssl-key" => "sslkey".to_owned(),
                    _ => key,
                };
                (key, value)
            })
            .collect();
        // Anything the string leaves out comes from libpq's variables, as sqlx's defaults do;
        // sqlx does not know this one.
        if !params.contains_key("connect_timeout")
            && let Ok(value) = std::env::var("PGCONNECT_TIMEOUT")
        {
            params.insert("connect_timeout".to_owned(), value);
        }
        // Nor these, when they list several hosts (sqlx would read "db1,db2" as one host name).
        if !params.contains_key("host")
            && !params.contains_key("hostaddr")
            && let Ok(value) = std::env::var("PGHOST")
        {
            params.insert("host".to_owned(), value);
        }
        if !params.contains_key("port")
            && let Ok(value) = std::env::var("PGPORT")
        {
            params.insert("port".to_owned(), value);
        }
        if !params.contains_key("target_session_attrs")
            && let Ok(value) = std::env::var("PGTARGETSESSIONATTRS")
        {
            params.insert("target_session_attrs".to_owned(), value);
        }
        // What sqlx reads itself goes to it as one URL of query settings (its parser also looks
        // the password up in ~/.pgpass for the final host, port, user and database); what it
        // does not know, or reads differently from libpq, is handled here.
        let mut settings: Vec<(&str, String)> = Vec::new();
        let mut connect_timeout = None;
        let mut sslmode = None;
        let mut root_cert = None;
        let mut target_session_attrs = TargetSessionAttrs::Any;
        for (key, value) in &params {
            match key.as_str() {
                // Hosts and ports are paired up below.
                "host" | "hostaddr" | "port" => {}
                "dbname"
                | "user"
                | "password"
                | "application_name"
                | "options"
                | "statement-cache-capacity" => {
                    settings.push((key_name(key), value.clone()));
                }
                "sslcert" | "sslkey" => {
                    let path = existing_file(key, value)?;
                    settings.push((key_name(key), path.display().to_string()));
                }
                "connect_timeout" => connect_timeout = parse_connect_timeout(value)?,
                "sslmode" => sslmode = Some(parse_sslmode(value)?),
                "sslrootcert" => root_cert = Some(value.as_str()),
                "channel_binding" => match value.as_str() {
                    "disable" | "prefer" => {}
                    "require" => {
                        return Err(BadConnectionString::new(
                            "channel_binding=require is not supported: use channel_binding=prefer \
                             (with sslmode=verify-full, TLS already authenticates the server)",
                        ));
                    }
                    _ => {
                        return Err(BadConnectionString::new(
                            "channel_binding must be disable, prefer or require",
                        ));
                    }
                },
                "target_session_attrs" => target_session_attrs = value.parse()?,
                _ => {
                    return Err(BadConnectionString::new(format!(
                        "unknown setting {:?}: ackloop understands {}",
                        shorten(key),
                        KNOWN_PARAMETERS.join(", ")
                    )));
                }
            }
        }
        if params.contains_key("sslkey") != params.contains_key("sslcert") {
            return Err(BadConnectionString::new(
                "a client certificate needs both sslcert and sslkey",
            ));
        }
        let mut hosts = Vec::new();
        for (host, port) in hosts_and_ports(&params)? {
            let host = ("host", host);
            let mut url = String::from("postgres://?");
            for (key, value) in settings.iter().chain([&host]).chain(port.as_ref()) {
                url.push_str(&format!("{key}={}&", percent_encode(value)));
            }
            let options = url
                .trim_end_matches('&')
                .parse::<PgConnectOptions>()
                .map_err(|_| BadConnectionString::new("the settings could not be read"))?;
            hosts.push(apply_tls(options, sslmode, root_cert)?);
        }
        Ok(Self {
            hosts,
            target_session_attrs,
            connect_timeout,
        })
    }
}

/// A host, and its `port` setting when it has one.
type HostAndPort = (String, Option<(&'static str, String)>);

/// The hosts to try, in order, each with its port (`None`: the default). libpq's rules: `hostaddr`
/// (IP addresses) wins over `host` for where to connect; `port` is one port for every host, or
/// one per host; an empty entry means the default (PGHOST, else the local socket, else
/// localhost; PGPORT, else 5432).
fn hosts_and_ports(params: &BTreeMap<String, String>) -> Result<Vec<HostAndPort>, BadConnectionString> {
    let default_host = || PgConnectOptions::new_without_pgpass().get_host().to_owned();
    let list = |key: &str| {
        params.get(key).map(|list| {
            list.split(',')
                .map(|entry| entry.trim().to_owned())
                .collect::<Vec<_>>()
        })
    };
    // Where to connect: each hostaddr entry, or its host when the entry is empty.
    let entries = match (list("host"), list("hostaddr")) {
        (Some(names), Some(addrs)) if names.len() != addrs.len() => {
            return Err(BadConnectionString::new(format!(
                "could not match {} host names to {} hostaddr values: give as many of each",
                names.len(),
                addrs.len()
            )));
        }
        (Some(names), Some(addrs)) => addrs
            .into_iter()
            .zip(names)
            .map(|(addr, name)| if addr.is_empty() { name } else { addr })
            .collect(),
        (None, Some(addrs)) => addrs,
        (Some(names), None) => names,
        (None, None) => vec![String::new()],
    };
    let hosts: Vec<String> = entries
        .into_iter()
        .map(|host| if host.is_empty() { default_host() } else { host })
        .collect();
    let ports: Vec<Option<String>> = match params.get("port") {
        Some(list) => list
            .split(',')
            .map(|port| match port.trim() {
                "" => Ok(None),
                port => port
                    .parse::<u16>()
                    .ok()
                    .filter(|port| *port != 0)
                    .map(|_| Some(port.to_owned()))
                    .ok_or(())
                    .map_err(|_| BadConnectionString::new("the port is not a number from 1 to 65535")),
            })
            .collect::<Result<_, _>>()?,
        None => vec![None],
    };
    let ports = match ports.len() {
        1 => vec![ports[0].clone(); hosts.len()],
        n if n == hosts.len() => ports,
        _ => {
            return Err(BadConnectionString::new(format!(
                "{} hosts and {} ports: give one port for every host, or one port per host",
                hosts.len(),
                ports.len()
            )));
        }
    };
    Ok(hosts
        .into_iter()
        .zip(ports)
        .map(|(host, port)| (host, port.map(|port| ("port", port))))
        .collect())
}

/// The `'static` name of a setting passed on to sqlx.
fn key_name(key: &str) -> &'static str {
    match key {
        "dbname" => "dbname",
        "user" => "user",
        "password" => "password",
        "application_name" => "application_name",
        "options" => "options",
        "statement-cache-capacity" => "statement-cache-capacity",
        "sslcert" => "sslcert",
        "sslkey" => "sslkey",
        _ => unreachable!("only settings matched above are passed on"),
    }
}

impl FromStr for ConnectConfig {
    type Err = BadConnectionString;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// `user@host:port/dbname` (or `user@/socket/dir/dbname`, or `user@h1:5432,h2:5433/dbname`), for
/// messages: never the password.
impl fmt::Display for ConnectConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options = self.options();
        let database = options.get_database().unwrap_or(options.get_username());
        let hosts: Vec<String> = self.hosts.iter().map(server_name).collect();
        write!(f, "{}@{}/{database}", options.get_username(), hosts.join(","))
    }
}

fn parse_connect_timeout(value: &str) -> Result<Option<Duration>, BadConnectionString> {
    let secs = value.trim().parse::<i64>().map_err(|_| {
        BadConnectionString::new(format!(
            "connect_timeout {value:?} is not a whole number of seconds"
        ))
    })?;
    Ok(match secs {
        ..=0 => None,
        secs => Some(Duration::from_secs(secs.unsigned_abs()).max(MIN_CONNECT_TIMEOUT)),
    })
}

fn parse_sslmode(value: &str) -> Result<PgSslMode, BadConnectionString> {
    Ok(match value {
        "disable" => PgSslMode::Disable,
        // sqlx has no `allow` (try without TLS, then with it); `prefer` connects to the same
        // servers, trying TLS first.
        "allow" | "prefer" => PgSslMode::Prefer,
        "require" => PgSslMode::Require,
        "verify-ca" => PgSslMode::VerifyCa,
        "verify-full" => PgSslMode::VerifyFull,
        _ => {
            return Err(BadConnectionString::new(
                "sslmode must be disable, allow, prefer, require, verify-ca or verify-full",
            ));
        }
    })
}

/// libpq's rules for which certificates a TLS connection checks the server's against.
fn apply_tls(
    options: PgConnectOptions,
    sslmode: Option<PgSslMode>,
    root_cert: Option<&str>,
) -> Result<PgConnectOptions, BadConnectionString> {
    // PGSSLMODE and PGSSLROOTCERT were applied already by sqlx's defaults; the string wins.
    let mut options = match sslmode {
        Some(mode) => options.ssl_mode(mode),
        None => options,
    };
    let root_cert = match root_cert {
        // The system's roots: what sqlx uses when given no root certificate.
        Some("system") => None,
        Some(path) => Some(existing_file("sslrootcert", path)?),
        None => default_root_cert(),
    };
    if let Some(path) = root_cert {
        // libpq checks the server's certificate under `require` too when a root certificate is
        // there to check it against.
        if matches!(options.get_ssl_mode(), PgSslMode::Require) {
            options = options.ssl_mode(PgSslMode::VerifyCa);
        }
        options = options.ssl_root_cert(path);
    }
    Ok(options)
}

/// `~/.postgresql/root.crt`, libpq's default root certificate, when it exists.
fn default_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".postgresql/root.crt");
    path.is_file().then_some(path)
}

fn existing_file(setting: &str, path: &str) -> Result<PathBuf, BadConnectionString> {
    let path = PathBuf::from(path);
    if path.is_file() {
        Ok(path)
    } else {
        Err(BadConnectionString::new(format!(
            "{setting} file {} does not exist or is not a file",
            path.display()
        )))
    }
}

#[cfg(test)]
mod tests;
