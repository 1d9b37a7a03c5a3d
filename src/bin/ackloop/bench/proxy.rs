//! A TCP proxy that delays every byte by a fixed time each way, for `ackloop bench --rtt`: the
//! database as if across a data-centre network. `tc netem` would do this in the kernel, but these
//! machines lack its module, so it is done here.
//!
//! Plain threads, not tokio: a tokio timer has millisecond granularity, and a round trip of 1 ms
//! needs each half delayed by 0.5 ms; `std::thread::sleep` is accurate to tens of microseconds.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Where the proxy forwards to.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// A Unix socket file, such as `/run/postgresql/.s.PGSQL.5432`.
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

/// Starts the proxy on an ephemeral port of 127.0.0.1 and returns the port. It runs until the
/// process exits.
pub fn start(upstream: Upstream, one_way: Duration) -> io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let upstream = upstream.clone();
            thread::spawn(move || {
                if let Err(err) = relay(client, &upstream, one_way) {
                    tracing::warn!(error = %err, "latency proxy lost a connection");
                }
            });
        }
    });
    Ok(port)
}

/// A byte stream the proxy can read from and write to on separate threads.
trait Duplex: Read + Write + Send + 'static {
    fn split(&self) -> io::Result<Box<dyn Duplex>>;
    fn close(&self);
}

impl Duplex for TcpStream {
    fn split(&self) -> io::Result<Box<dyn Duplex>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn close(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Duplex for UnixStream {
    fn split(&self) -> io::Result<Box<dyn Duplex>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn close(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

fn relay(client: TcpStream, upstream: &Upstream, one_way: Duration) -> io::Result<()> {
    client.set_nodelay(true)?;
    let server: Box<dyn Duplex> = match upstream {
        Upstream::Unix(path) => Box::new(UnixStream::connect(path)?),
        Upstream::Tcp(address) => {
            let stream = TcpStream::connect(address)?;
            stream.set_nodelay(true)?;
            Box::new(stream)
        }
    };
    let client: Box<dyn Duplex> = Box::new(client);
    let (client_in, server_out) = (client.split()?, server.split()?);
    thread::spawn(move || delay_copy(client_in, server_out, one_way));
    delay_copy(server, client, one_way);
    Ok(())
}

/// Copies `from` to `to`, each chunk written `delay` after it was read; closes both at the end.
fn delay_copy(mut from: Box<dyn Duplex>, to: Box<dyn Duplex>, delay: Duration) {
    let (chunks, delayed) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = thread::spawn(move || {
        let mut to = to;
        for (due, chunk) in delayed {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        to.close();
    });
    let mut buffer = vec![0; 64 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if chunks
                    .send((Instant::now() + delay, buffer[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(chunks);
    let _ = writer.join();
    from.close();
}
