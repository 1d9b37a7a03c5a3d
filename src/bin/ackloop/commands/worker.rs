//! `ackloop worker`: the player worker, its signal handling (drain on the first signal, exit on
//! the second) and its metrics endpoint.

use std::time::Duration;

use ackloop::{Worker, WorkerConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::args::ConnectionArgs;
use crate::connect::{checked_schema, connect};
use crate::exit::Failure;

pub(super) async fn run(
    connection: &ConnectionArgs,
    config: WorkerConfig,
    metrics_addr: Option<std::net::SocketAddr>,
) -> Result<(), Failure> {
    let connections = u32::try_from(config.concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    // Handlers first, before the first await: a SIGTERM that arrives while the worker connects
    // must stop it cleanly, not kill it with the default action.
    let shutdown = CancellationToken::new();
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(interrupt), Ok(terminate)) => {
            tokio::spawn(cancel_on_signal(
                interrupt,
                terminate,
                shutdown.clone(),
                config.shutdown_timeout,
            ));
        }
        _ => tracing::error!("cannot install signal handlers; stop the worker with SIGKILL"),
    }
    // Start-up steps end at the first signal too (a server that does not answer, a schema check
    // behind a lock): there is nothing to drain yet.
    let started = async {
        // A worker waits for its database: one started during an outage or a failover (its
        // service deployed before the database, a restart) connects when it can. What can
        // never succeed (a refusal, a schema it cannot use) stops it at once.
        let pool = connect(
            connection,
            ackloop::worker_session_options,
            connections,
            connection.patience_until_connected()?,
        )
        .await?;
        checked_schema(&pool, connection.patience_until_connected()?).await?;
        Ok::<_, Failure>(pool)
    };
    let pool = tokio::select! {
        pool = started => pool?,
        () = shutdown.cancelled() => {
            tracing::info!("worker stopped before it started");
            return Ok(());
        }
    };
    if let Some(addr) = metrics_addr {
        serve_metrics(addr, &pool, &shutdown).await?;
    }
    Worker::new(pool, config).run(shutdown).await?;
    Ok(())
}

/// How long past `--shutdown-timeout` the process may take to exit after the first signal.
const SHUTDOWN_EXIT_MARGIN: Duration = Duration::from_secs(1);

/// How often the metrics endpoint's queue gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

async fn serve_metrics(
    addr: std::net::SocketAddr,
    pool: &PgPool,
    shutdown: &CancellationToken,
) -> Result<(), Failure> {
    let metrics = ackloop::MetricsHandle::install().map_err(Failure::Metrics)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Failure::ListenAddr { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %bound, "serving metrics at /metrics and health at /healthz");
    tokio::spawn(metrics.serve(listener, pool.clone(), shutdown.clone()));
    tokio::spawn(ackloop::sample_queue_gauges(
        pool.clone(),
        GAUGE_INTERVAL,
        shutdown.clone(),
    ));
    Ok(())
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM (the worker drains in-flight jobs), and
/// exits at once on the second (in-flight transactions roll back; their jobs stay pending).
/// Whatever the worker is doing when the first signal comes (connecting to a server that does
/// not answer, checking a schema behind a lock, draining), the process is gone within
/// `shutdown_timeout` plus a second: nothing it holds is lost by exiting, since a transaction
/// cut off rolls back and its jobs are pending again.
async fn cancel_on_signal(
    mut interrupt: tokio::signal::unix::Signal,
    mut terminate: tokio::signal::unix::Signal,
    shutdown: CancellationToken,
    shutdown_timeout: Duration,
) {
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down: finishing in-flight jobs (signal again to exit now)");
    shutdown.cancel();
    tokio::spawn(async move {
        tokio::time::sleep(shutdown_timeout + SHUTDOWN_EXIT_MARGIN).await;
        tracing::warn!("shutdown timeout passed; exiting now (unfinished transactions roll back)");
        std::process::exit(0);
    });
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    tracing::warn!("second signal: exiting now; in-flight jobs roll back and stay pending");
    std::process::exit(130);
}
