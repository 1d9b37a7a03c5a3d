//! `ackloop dashboard`: the live page, served until SIGINT or SIGTERM.

use std::io::Write as _;
use std::net::SocketAddr;

use ackloop::dashboard::{DashboardConfig, router};
use tokio::signal::unix::{SignalKind, signal};

use crate::args::ConnectionArgs;
use crate::exit::Failure;

/// Connections the page's refreshes use: a handful of short reads each second.
const CONNECTIONS: u32 = 4;

pub(super) async fn run(
    connection: &ConnectionArgs,
    addr: SocketAddr,
    token: Option<String>,
    metrics_from: Vec<String>,
) -> Result<(), Failure> {
    // Before the first await: a signal while connecting stops the command cleanly.
    let (Ok(mut interrupt), Ok(mut terminate)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        return Err(Failure::ListenAddr {
            addr,
            source: std::io::Error::other("cannot install signal handlers"),
        });
    };
    let pool = tokio::select! {
        pool = connection.migrated_pool(CONNECTIONS, connection.default_patience()?) => pool?,
        _ = interrupt.recv() => return Ok(()),
        _ = terminate.recv() => return Ok(()),
    };
    let token = token.filter(|token| !token.is_empty());
    // Off the loopback address anyone who reaches the port could act: actions need the token.
    let actions = addr.ip().is_loopback();
    if !actions && token.is_none() {
        tracing::warn!(%addr, "not on a loopback address and no --token: the page is read-only");
    }
    let config = DashboardConfig {
        channels: connection.channels()?,
        token,
        actions,
        metrics_from,
        metrics: None,
        // On loopback: only loopback names (no DNS rebinding), and job pages open.
        allowed_hosts: if actions {
            ["localhost", "127.0.0.1", "::1"].map(str::to_owned).to_vec()
        } else {
            Vec::new()
        },
        job_pages: actions,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Failure::ListenAddr { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    println!("dashboard: http://{bound}/");
    let _ = std::io::stdout().flush();
    tracing::info!(addr = %bound, "dashboard listening");
    let stopped = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("dashboard stopping");
    };
    axum::serve(listener, router(pool, config))
        .with_graceful_shutdown(stopped)
        .await
        .map_err(|source| Failure::ListenAddr { addr, source })?;
    Ok(())
}
