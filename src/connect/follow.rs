//! Several hosts, as libpq takes them (`postgres://h1,h2/app?target_session_attrs=read-write`):
//! the first host whose server is what `target_session_attrs` asks for is used, and a pool stays
//! on such a server across a failover. sqlx connects to one host only, so ackloop picks it, and a
//! watch task moves the pool (its connect options, which the pool reads again for every new
//! connection) when the server it is on stops being the one asked for.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::describe::{Described, server_name};
use super::refusal::BadConnectionString;

/// libpq's `target_session_attrs`: which server of several a connection may use. ackloop writes
/// and listens, which a standby cannot do, so only the values that pick a primary are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TargetSessionAttrs {
    /// Any server that answers (libpq's default).
    #[default]
    Any,
    /// A server that is not in recovery and whose sessions are not read-only by default.
    ReadWrite,
    /// A server that is not in recovery.
    Primary,
}

impl FromStr for TargetSessionAttrs {
    type Err = BadConnectionString;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "any" => Ok(Self::Any),
            "read-write" => Ok(Self::ReadWrite),
            "primary" => Ok(Self::Primary),
            "read-only" | "standby" | "prefer-standby" => Err(BadConnectionString::new(format!(
                "target_session_attrs={text} cannot work: ackloop writes and listens, which a \
                 standby cannot do; use read-write (or primary)"
            ))),
            _ => Err(BadConnectionString::new(
                "target_session_attrs must be any, read-write or primary",
            )),
        }
    }
}

impl fmt::Display for TargetSessionAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Any => "any",
            Self::ReadWrite => "read-write",
            Self::Primary => "primary",
        })
    }
}

/// How often the watch looks at the server a pool is on, and how long that look may take: a
/// failover is noticed within about their sum.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
const WATCH_ANSWER: Duration = Duration::from_secs(2);

/// How long the watch waits between rounds of every host while none is what is asked for (a
/// standby being promoted), and how long each host may take to answer in such a round.
const SEARCH_INTERVAL: Duration = Duration::from_millis(250);
const SEARCH_CONNECT: Duration = Duration::from_secs(2);

/// Why a server is not the one asked for, in a user's words; `None` if it is.
async fn mismatch(
    conn: &mut PgConnection,
    wanted: TargetSessionAttrs,
) -> Result<Option<&'static str>, sqlx::Error> {
    if wanted == TargetSessionAttrs::Any {
        // Any server will do, but it must answer: the watch notices a dead one by this.
        crate::store::ping(conn).await?;
        return Ok(None);
    }
    let (in_recovery, read_only) = crate::store::session_state(conn).await?;
    Ok(if in_recovery {
        Some("in recovery (a standby)")
    } else if read_only && wanted == TargetSessionAttrs::ReadWrite {
        Some("read-only (default_transaction_read_only is on)")
    } else {
        None
    })
}

/// The error for a round in which no host was what is asked for: each host and why.
fn none_suitable(wanted: TargetSessionAttrs, reasons: &[String]) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::other(format!(
        "no server is {wanted}: {}",
        reasons.join("; ")
    )))
}

/// Connects to the first of `hosts` that is what `wanted` asks for, each given `connect_timeout`.
pub(super) async fn first_suitable(
    hosts: &[PgConnectOptions],
    wanted: TargetSessionAttrs,
    connect_timeout: Duration,
) -> Result<(usize, PgConnection), sqlx::Error> {
    let mut reasons = Vec::new();
    let mut last_err = None;
    // Whether every host refused this connection for good (a wrong password, an unknown
    // database): then the refusal itself is the answer, not "no server is …".
    let mut all_refused = true;
    for (index, options) in hosts.iter().enumerate() {
        let attempt = async {
            let mut conn = options.connect().await?;
            let mismatch = mismatch(&mut conn, wanted).await?;
            Ok::<_, sqlx::Error>((conn, mismatch))
        };
        match tokio::time::timeout(connect_timeout, attempt).await {
            Ok(Ok((conn, None))) => return Ok((index, conn)),
            Ok(Ok((conn, Some(why)))) => {
                all_refused = false;
                let _ = conn.close().await;
                reasons.push(format!("{} is {why}", server_name(options)));
            }
            Ok(Err(err)) => {
                all_refused &= crate::store::is_refusal(&err);
                reasons.push(format!("{}: {}", server_name(options), Described(&err)));
                last_err = Some(err);
            }
            Err(_) => {
                all_refused = false;
                reasons.push(format!(
                    "{}: no answer within {} s",
                    server_name(options),
                    connect_timeout.as_secs()
                ));
            }
        }
    }
    // One host that could not be reached: its own error, as a single-host connection reports it.
    match last_err {
        Some(err) if hosts.len() == 1 || all_refused => Err(err),
        _ => Err(none_suitable(wanted, &reasons)),
    }
}

/// What the watch and the pool's hooks share.
struct Watched {
    /// The hosts, each with the caller's adjustments applied.
    hosts: Vec<PgConnectOptions>,
    wanted: TargetSessionAttrs,
    /// When the pool last moved to another server: connections older than that are closed
    /// when next taken from the pool, rather than used on a server that is no longer the one.
    moved_at: Mutex<Option<Instant>>,
    /// Set by a new connection that found its server was not the one asked for.
    look_now: Notify,
}

/// A pool on the first of `hosts` that is what `wanted` asks for, kept on such a server: every
/// new connection is checked (one that is not is refused, and the pool, which retries, reads
/// its connect options again), and with several hosts a task watches the server and moves the
/// pool when it stops being the one (a failover). The task ends when the pool is closed.
pub(super) async fn connect_pool(
    hosts: Vec<PgConnectOptions>,
    wanted: TargetSessionAttrs,
    connect_timeout: Duration,
    pool: PgPoolOptions,
) -> Result<PgPool, sqlx::Error> {
    let (index, first) = first_suitable(&hosts, wanted, connect_timeout).await?;
    let watched = Arc::new(Watched {
        hosts,
        wanted,
        moved_at: Mutex::new(None),
        look_now: Notify::new(),
    });
    let checks = Arc::clone(&watched);
    let mut pool = if wanted == TargetSessionAttrs::Any {
        pool
    } else {
        pool.after_connect(move |conn, _| {
            let checks = Arc::clone(&checks);
            Box::pin(async move {
                match mismatch(conn, checks.wanted).await? {
                    None => Ok(()),
                    Some(why) => {
                        checks.look_now.notify_one();
                        Err(sqlx::Error::Io(std::io::Error::other(format!(
                            "the server is {why}, not {}",
                            checks.wanted
                        ))))
                    }
                }
            })
        })
    };
    if watched.hosts.len() > 1 {
        let ages = Arc::clone(&watched);
        pool = pool.before_acquire(move |_, meta| {
            let moved = ages.moved_at.lock().unwrap_or_else(|p| p.into_inner());
            let current = moved.is_none_or(|moved_at| meta.age <= moved_at.elapsed());
            Box::pin(async move { Ok(current) })
        });
    }
    let pool = pool.connect_lazy_with(watched.hosts[index].clone());
    if watched.hosts.len() > 1 {
        tokio::spawn(watch(pool.clone(), watched, index, first));
    } else {
        let _ = first.close().await;
    }
    Ok(pool)
}

/// Looks at the server the pool is on every [`WATCH_INTERVAL`] (or at once when a new connection
/// found it wrong), over a connection of its own; when it is gone or no longer what is asked
/// for, tries every host in order until one is, and moves the pool there.
async fn watch(pool: PgPool, watched: Arc<Watched>, mut current: usize, first: PgConnection) {
    let mut monitor = Some(first);
    loop {
        let nudged = tokio::select! {
            () = tokio::time::sleep(WATCH_INTERVAL) => false,
            () = watched.look_now.notified() => true,
        };
        if pool.is_closed() {
            return;
        }
        if nudged {
            // A new connection found the server unsuitable: the monitor's older session may not
            // see what new ones do (a role's or database's default_transaction_read_only), so
            // search with new connections.
            monitor = None;
            tracing::warn!(
                server = %server_name(&watched.hosts[current]),
                "a new connection found the server not {}; looking for one that is", watched.wanted
            );
        }
        if let Some(mut conn) = monitor.take() {
            match tokio::time::timeout(WATCH_ANSWER, mismatch(&mut conn, watched.wanted)).await {
                Ok(Ok(None)) => {
                    monitor = Some(conn);
                    continue;
                }
                Ok(Ok(Some(why))) => tracing::warn!(
                    server = %server_name(&watched.hosts[current]),
                    "the server is {why}, not {}; looking for one that is", watched.wanted
                ),
                Ok(Err(err)) => tracing::warn!(
                    server = %server_name(&watched.hosts[current]),
                    error = %Described(&err),
                    "lost the server; looking for one that is {}", watched.wanted
                ),
                Err(_) => tracing::warn!(
                    server = %server_name(&watched.hosts[current]),
                    "the server did not answer within {} s; looking for one that is {}",
                    WATCH_ANSWER.as_secs(), watched.wanted
                ),
            }
        }
        let mut rounds = 0u32;
        let found = loop {
            if pool.is_closed() {
                return;
            }
            match first_suitable(&watched.hosts, watched.wanted, SEARCH_CONNECT).await {
                Ok(found) => break found,
                Err(err) => {
                    rounds += 1;
                    // A line now and then, not one per round.
                    if rounds % 20 == 1 {
                        tracing::warn!(error = %Described(&err), "no server to move to yet");
                    }
                    tokio::time::sleep(SEARCH_INTERVAL).await;
                }
            }
        };
        let (index, conn) = found;
        monitor = Some(conn);
        if index != current {
            pool.set_connect_options(watched.hosts[index].clone());
            *watched.moved_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            tracing::info!(
                from = %server_name(&watched.hosts[current]),
                to = %server_name(&watched.hosts[index]),
                "moved to another server"
            );
            current = index;
        }
    }
}
