//! `ackloop doctor`: one look at everything the loop needs, each problem with its fix.

use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use super::schema::{SchemaError, check_schema};
use crate::{MIGRATOR, store};

/// Above this share of the notification queue in use, a listener is stuck.
const QUEUE_USAGE_LIMIT: f64 = 0.1;
/// How long the LISTEN round trip may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Whether it is fine.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do, when it is not fine.
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn problem(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Checks the database, the schema, LISTEN on `listen_options` (where the listeners connect),
/// the notification queue, jobs pending longer than `stale_after`, failed jobs, and done jobs
/// whose player is missing. Never fails: what cannot be checked is itself a finding.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) {
/// let options = (*pool.connect_options()).clone();
/// for check in ackloop::admin::diagnose(&pool, options, std::time::Duration::from_secs(60)).await {
///     println!("{} {}: {}", if check.ok { "ok" } else { "!!" }, check.name, check.detail);
/// }
/// # }
/// ```
pub async fn diagnose(pool: &PgPool, listen_options: PgConnectOptions, stale_after: Duration) -> Vec<Check> {
    let mut checks = Vec::new();
    match store::server_version(pool).await {
        Ok(version) => checks.push(Check::ok("database", version)),
        Err(err) => {
            checks.push(Check::problem(
                "database",
                format!("cannot query the database: {err}"),
                "check DATABASE_URL, that the server runs, and that it accepts this role",
            ));
            return checks;
        }
    }
    let schema_ok = match check_schema(pool).await {
        Ok(()) => {
            checks.push(Check::ok(
                "schema",
                format!("all {} migrations applied", MIGRATOR.iter().count()),
            ));
            true
        }
        Err(err @ (SchemaError::Missing | SchemaError::Behind { .. })) => {
            checks.push(Check::problem("schema", err.to_string(), "run `ackloop migrate`"));
            false
        }
        Err(err @ SchemaError::Newer { .. }) => {
            checks.push(Check::problem("schema", err.to_string(), "upgrade ackloop"));
            false
        }
        Err(err) => {
            checks.push(Check::problem(
                "schema",
                format!("{err}"),
                "check the role has usage on schema ackloop and may read ackloop.applied_migrations \
                 (re-run sql/roles.sql after an upgrade)",
            ));
            false
        }
    };
    checks.push(check_listen(pool, &listen_options).await);
    checks.push(match store::notification_queue_usage(pool).await {
        Ok(usage) if usage <= QUEUE_USAGE_LIMIT => {
            Check::ok("notification queue", format!("{:.2}% in use", usage * 100.0))
        }
        Ok(usage) => Check::problem(
            "notification queue",
            format!("{:.1}% in use: a listening session is not reading", usage * 100.0),
            "find the session listening but idle in a transaction in pg_stat_activity and end it; NOTIFY fails when the queue is full",
        ),
        Err(err) => Check::problem("notification queue", crate::describe_db_error(&err), "check the role's privileges"),
    });
    if schema_ok {
        checks.push(
            match store::stale_pending_jobs(pool, stale_after.as_secs_f64()).await {
                Ok((0, _)) => Check::ok(
                    "pending jobs",
                    format!("none waiting longer than {stale_after:?}"),
                ),
                Ok((stale, oldest)) => Check::problem(
                    "pending jobs",
                    format!(
                        "{stale} waiting longer than {stale_after:?}, the oldest {:.1}s",
                        oldest.unwrap_or_default()
                    ),
                    "start a worker (`ackloop worker`) or more of them; `ackloop status` shows the queue",
                ),
                Err(err) => Check::problem(
                    "pending jobs",
                    crate::describe_db_error(&err),
                    "check the role's privileges",
                ),
            },
        );
        checks.push(match store::job_counts(pool).await {
            Ok(counts) if counts.failed == 0 => Check::ok("failed jobs", "none"),
            Ok(counts) => Check::problem(
                "failed jobs",
                format!("{} failed (their users have no player)", counts.failed),
                "see why with `ackloop status` and `ackloop jobs show ID`; after fixing the cause, `ackloop jobs retry --failed`",
            ),
            Err(err) => Check::problem("failed jobs", crate::describe_db_error(&err), "check the role's privileges"),
        });
        // A full scan of the done jobs (see the store function): acceptable here, where an
        // operator asks, once.
        checks.push(missing_players_check(
            store::count_done_jobs_without_player(pool).await,
        ));
    }
    checks
}

/// The finding about done jobs whose player is missing, from their count.
fn missing_players_check(count: Result<i64, sqlx::Error>) -> Check {
    const NAME: &str = "done jobs without a player";
    match count {
        Ok(0) => Check::ok(NAME, "none"),
        Ok(missing) => Check::problem(
            NAME,
            format!(
                "{missing} done job(s) have no player (deleted or restored without it); their users were told the player exists"
            ),
            "run `ackloop jobs retry --repair --all-missing`; a worker then creates the players",
        ),
        Err(err) => Check::problem(
            NAME,
            crate::describe_db_error(&err),
            "check the role's privileges",
        ),
    }
}

/// LISTEN in one transaction, then look in the next: behind a transaction-mode pooler the next
/// transaction runs on another server session, which is not listening. Then a real round trip.
async fn check_listen(pool: &PgPool, listen_options: &PgConnectOptions) -> Check {
    const NAME: &str = "listen";
    const POOLER_FIX: &str =
        "give the listeners a direct or session-mode connection: set ACKLOOP_LISTEN_URL (--listen-url)";
    let mut conn = match listen_options.connect().await {
        Ok(conn) => conn,
        Err(err) => return Check::problem(NAME, format!("cannot connect to listen: {err}"), POOLER_FIX),
    };
    let persisted = async {
        let mut tx = conn.begin().await?;
        store::listen_for_probe(&mut tx).await?;
        tx.commit().await?;
        store::is_listening_for_probe(&mut conn).await
    }
    .await;
    let _ = conn.close().await;
    match persisted {
        Ok(true) => {}
        Ok(false) => {
            return Check::problem(
                NAME,
                "LISTEN did not last into the next transaction: a transaction-mode pooler (pgbouncer) is in the way",
                POOLER_FIX,
            );
        }
        Err(err) => return Check::problem(NAME, format!("LISTEN failed: {err}"), POOLER_FIX),
    }
    // A notification sent through the pool must reach a listener on the listen connection.
    let round_trip = async {
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(listen_options.clone())
            .await?;
        let mut listener = PgListener::connect_with(&listen_pool).await?;
        listener.listen("ackloop_doctor").await?;
        let payload = crate::JobId::new().to_string();
        store::notify_probe(pool, &payload).await?;
        loop {
            let notification = listener.recv().await?;
            if notification.payload() == payload {
                return Ok::<(), sqlx::Error>(());
            }
        }
    };
    match tokio::time::timeout(PROBE_TIMEOUT, round_trip).await {
        Ok(Ok(())) => Check::ok(
            NAME,
            "LISTEN persists across transactions and a notification arrived",
        ),
        Ok(Err(err)) => Check::problem(NAME, format!("notification round trip failed: {err}"), POOLER_FIX),
        Err(_) => Check::problem(
            NAME,
            format!(
                "no notification arrived within {PROBE_TIMEOUT:?}: the pool and the listener reach different servers"
            ),
            "point DATABASE_URL and ACKLOOP_LISTEN_URL at the same database",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_players_are_a_problem_with_the_repair_as_fix() {
        let none = missing_players_check(Ok(0));
        assert!(none.ok);
        assert_eq!(none.fix, None);

        let some = missing_players_check(Ok(3));
        assert!(!some.ok);
        assert!(
            some.detail.starts_with("3 done job(s) have no player"),
            "{}",
            some.detail
        );
        assert!(
            some.fix
                .as_deref()
                .is_some_and(|fix| fix.contains("ackloop jobs retry --repair --all-missing")),
            "{:?}",
            some.fix
        );

        let unreadable = missing_players_check(Err(sqlx::Error::PoolTimedOut));
        assert!(!unreadable.ok);
    }
}
