//! A TCP proxy to PostgreSQL that cuts a connection at a chosen point of one statement: before
//! the server gets it, after the server has answered it (the answer never reaching the client),
//! or late (the statement reaches the server after the client gave up on it).
//!
//! It reads the wire protocol (message type, length, body) in both directions, which a byte
//! proxy cannot do safely: that is how it knows where a statement's transaction ends. In the
//! extended protocol a client sends Parse (the SQL), then Bind, Execute and Sync; an autocommit
//! statement commits at Sync, and the server sends ReadyForQuery only after that, one per Sync
//! or simple Query. So the ReadyForQuery that answers the Sync after the statement's Execute
//! marks the end of its transaction, whatever the server flushed earlier.
//!
//! A statement is recognised by a marker in its SQL, which travels in a Parse or Query message:
//! sqlx sends Parse only the first time a connection uses a statement, so the client side of a
//! test needs connections that have not run the marked statement yet (a fresh pool).
//!
//! The proxy answers SSLRequest and GSSENCRequest with "no" itself, so that it can read the
//! protocol: clients must allow a cleartext connection (sqlx's default `prefer` does).
//!
//! Here: the faults and the proxy a test drives. In `wire`: the protocol's messages and their
//! framing. In `relay`: one connection's relay, where the faults are applied.

mod relay;
mod wire;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::common::within;
use relay::relay;
use wire::Message;

/// Where to cut the connection that sends the marked statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The statement never reaches the server: the proxy keeps the message carrying it (and
    /// anything after it) and closes its socket to the server, as if the link died as the client
    /// sent it.
    DropRequest,
    /// The server gets the statement and runs it to the end of its transaction (the
    /// ReadyForQuery answering the Sync after its Execute); then the proxy keeps that whole
    /// answer and closes its socket to the server, as a network cut at the worst moment would.
    DropReply,
    /// The statement is prepared normally, but its execution (Bind through Sync) is held back
    /// and the client's socket closed at once. The held messages reach the server later, just
    /// before the next statement carrying the same marker on any connection (a retry), and the
    /// proxy waits for their answer (which the client never gets) before forwarding the retry.
    Late,
}

/// What the proxy did when a fault tripped. For [`Fault::DropRequest`] and [`Fault::DropReply`],
/// the client's socket stays open (the client still waiting for its answer) until this is
/// dropped, so a test can look at the server before the client learns anything.
#[derive(Debug)]
pub struct Tripped {
    /// The client's messages the server never got ([`Fault::DropRequest`]), or got late
    /// ([`Fault::Late`]).
    pub request: Vec<Message>,
    /// The server's messages the client never got: the statement's whole answer, through the
    /// ReadyForQuery that ended its transaction ([`Fault::DropReply`], [`Fault::Late`]).
    pub reply: Vec<Message>,
    _client_held: Option<oneshot::Sender<()>>,
}

impl Tripped {
    /// Whether the server committed the statement: its answer holds no ErrorResponse and ends
    /// with ReadyForQuery reporting an idle session (status `I`), so the implicit transaction is
    /// over and did not fail.
    pub fn committed(&self) -> bool {
        let ended_idle = self
            .reply
            .last()
            .is_some_and(|m| m.kind == b'Z' && m.body == b"I");
        ended_idle && !self.reply.iter().any(|m| m.kind == b'E')
    }
}

/// A fault waiting for its statement; await it with [`Armed::tripped`].
pub struct Armed(oneshot::Receiver<Tripped>);

impl Armed {
    /// Waits until the fault has tripped (for [`Fault::Late`]: until the held statement has been
    /// delivered and answered).
    pub async fn tripped(self) -> Tripped {
        within("the proxy's fault to trip", self.0)
            .await
            .expect("the proxy dropped the fault")
    }
}

struct Rule {
    marker: String,
    fault: Fault,
    tripped: oneshot::Sender<Tripped>,
}

/// A statement held back by [`Fault::Late`], delivered when its marker is seen again.
struct Stranded {
    marker: String,
    /// Asks its connection to deliver it, passing what to signal once it is answered.
    deliver: oneshot::Sender<oneshot::Sender<()>>,
}

#[derive(Default)]
struct Shared {
    rules: Mutex<VecDeque<Rule>>,
    stranded: Mutex<Vec<Stranded>>,
    statements: Mutex<Vec<String>>,
    server_errors: Mutex<Vec<String>>,
}

/// The proxy; connections made to `127.0.0.1:port` reach the target. Dropping it closes every
/// connection through it.
pub struct CuttingProxy {
    pub port: u16,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl CuttingProxy {
    pub async fn start(target_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let accepting = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            // Owned here, so aborting this task closes every connection.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                    continue;
                };
                connections.spawn(relay(client, server, Arc::clone(&accepting)));
                while connections.try_join_next().is_some() {}
            }
        });
        Self { port, shared, task }
    }

    /// Applies `fault` to the next statement whose SQL contains `marker`, on any connection.
    /// Faults armed one after another apply to successive such statements.
    pub fn arm(&self, marker: &str, fault: Fault) -> Armed {
        let (tripped, armed) = oneshot::channel();
        self.shared.rules.lock().unwrap().push_back(Rule {
            marker: marker.to_owned(),
            fault,
            tripped,
        });
        Armed(armed)
    }

    /// The SQL of every Parse and Query message the server received, in order, that contains
    /// `marker`.
    pub fn statements_containing(&self, marker: &str) -> Vec<String> {
        let statements = self.shared.statements.lock().unwrap();
        statements
            .iter()
            .filter(|s| s.contains(marker))
            .cloned()
            .collect()
    }

    /// Every ErrorResponse the server sent (delivered or not), as `SQLSTATE constraint: message`.
    pub fn server_errors(&self) -> Vec<String> {
        self.shared.server_errors.lock().unwrap().clone()
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
