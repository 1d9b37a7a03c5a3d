//! A TCP proxy that can go silent, shared by the integration tests and the soak (each includes
//! this file with `#[path]`).

use tokio::task::JoinHandle;

/// A TCP proxy to a server that can go silent: after [`SilentProxy::silence`], the connections
/// open at that moment stop carrying bytes either way but stay open, as behind a NAT that
/// dropped its state; connections made afterwards work.
pub struct SilentProxy {
    pub port: u16,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: JoinHandle<()>,
}

impl SilentProxy {
    pub async fn start(target_port: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let current = std::sync::Arc::clone(&generation);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await else {
                    continue;
                };
                let born = current.load(Ordering::SeqCst);
                let current = std::sync::Arc::clone(&current);
                tokio::spawn(async move {
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let alive = move || current.load(Ordering::SeqCst) == born;
                    let up = pump(client_read, server_write, alive.clone());
                    let down = pump(server_read, client_write, alive);
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Self {
            port,
            generation,
            task,
        }
    }

    /// Connections open now go silent for good (they are never closed).
    pub fn silence(&self) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies bytes while `alive()`; once it is not, holds both ends open and copies nothing.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    alive: impl Fn() -> bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let Ok(read) = from.read(&mut buffer).await else {
            return;
        };
        if read == 0 {
            return;
        }
        if !alive() {
            // Swallow this and everything after it, keeping the sockets open.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
