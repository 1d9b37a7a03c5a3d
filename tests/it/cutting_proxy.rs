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

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::common::within;

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

/// A protocol message as framed on the wire (the length is implied by the body).
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: u8,
    pub body: Vec<u8>,
}

impl Message {
    fn to_wire(&self) -> Vec<u8> {
        let mut wire = Vec::with_capacity(5 + self.body.len());
        wire.push(self.kind);
        wire.extend_from_slice(&(self.body.len() as u32 + 4).to_be_bytes());
        wire.extend_from_slice(&self.body);
        wire
    }

    /// The SQL text of a Parse (statement name, then query) or Query message.
    pub fn sql(&self) -> Option<String> {
        let cstrings = |body: &[u8]| -> Vec<String> {
            body.split(|&b| b == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        };
        match self.kind {
            b'P' => cstrings(&self.body).into_iter().nth(1),
            b'Q' => cstrings(&self.body).into_iter().next(),
            _ => None,
        }
    }

    fn contains(&self, marker: &str) -> bool {
        self.sql().is_some_and(|sql| sql.contains(marker))
    }

    /// Ends a batch of extended-protocol messages, or is a batch of its own: the server answers
    /// each with one ReadyForQuery.
    fn ends_batch(&self) -> bool {
        matches!(self.kind, b'S' | b'Q')
    }

    /// An ErrorResponse's SQLSTATE, constraint and message, as `23505 users_email_key: …`.
    fn error_summary(&self) -> String {
        let mut code = "";
        let mut constraint = "";
        let mut message = "";
        for field in self.body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
            let value = std::str::from_utf8(&field[1..]).unwrap_or("?");
            match field[0] {
                b'C' => code = value,
                b'n' => constraint = value,
                b'M' => message = value,
                _ => {}
            }
        }
        format!("{code} {constraint}: {message}")
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{:?}",
            self.kind as char,
            String::from_utf8_lossy(&self.body)
        )
    }
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

/// Splits a byte stream into protocol messages.
#[derive(Default)]
struct Framer {
    buffer: Vec<u8>,
}

impl Framer {
    fn push(&mut self, bytes: &[u8]) -> Vec<Message> {
        self.buffer.extend_from_slice(bytes);
        let mut messages = Vec::new();
        while self.buffer.len() >= 5 {
            let length = u32::from_be_bytes(self.buffer[1..5].try_into().unwrap()) as usize;
            if self.buffer.len() < 1 + length {
                break;
            }
            let body = self.buffer[5..1 + length].to_vec();
            messages.push(Message {
                kind: self.buffer[0],
                body,
            });
            self.buffer.drain(..1 + length);
        }
        messages
    }
}

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// Relays the untyped startup messages: refuses encryption on the server's behalf, forwards the
/// startup message (or a cancel request).
async fn relay_startup(client: &mut TcpStream, server: &mut TcpStream) -> std::io::Result<()> {
    loop {
        let length = client.read_u32().await? as usize;
        let mut rest = vec![0; length.saturating_sub(4)];
        client.read_exact(&mut rest).await?;
        let code = rest.get(..4).map(|c| u32::from_be_bytes(c.try_into().unwrap()));
        if matches!(code, Some(SSL_REQUEST | GSSENC_REQUEST)) {
            client.write_all(b"N").await?;
            continue;
        }
        server.write_u32(length as u32).await?;
        server.write_all(&rest).await?;
        return Ok(());
    }
}

/// A connection on which a fault tripped, waiting for its statement's execution.
struct Watch {
    fault: Fault,
    marker: String,
    tripped: oneshot::Sender<Tripped>,
    /// The ReadyForQuery (counted from the connection's start) that ends the statement's
    /// transaction, once its Execute (or its Query) has been seen.
    last_ready: Option<u64>,
    /// [`Fault::Late`]: the client's messages since the last Sync, held until it is known
    /// whether they execute the statement (then stranded) or only prepare it (then forwarded).
    batch: Vec<Message>,
    /// [`Fault::DropReply`]: the server's answer to the statement, kept from the client.
    reply: Vec<Message>,
}

/// One connection's bookkeeping.
struct Relay {
    shared: Arc<Shared>,
    /// ReadyForQuery messages the server owes in all: one for the startup, one per Sync or
    /// Query forwarded.
    ready_owed: u64,
    /// ReadyForQuery messages the server has sent.
    ready_seen: u64,
    watch: Option<Watch>,
}

/// What a client message comes to.
enum Next {
    Continue,
    /// Close the server's socket; keep the client's until the test lets go.
    CutServer(Option<oneshot::Receiver<()>>),
    /// Close the client's socket; deliver `held` to the server when asked.
    Strand(Vec<Message>),
}

async fn relay(mut client: TcpStream, mut server: TcpStream, shared: Arc<Shared>) {
    if relay_startup(&mut client, &mut server).await.is_err() {
        return;
    }
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut relay = Relay {
        shared,
        ready_owed: 1,
        ready_seen: 0,
        watch: None,
    };
    let mut from_client = Framer::default();
    let mut from_server = Framer::default();
    let mut up = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = client_read.read(&mut up) => {
                let Ok(read @ 1..) = read else { return };
                for message in from_client.push(&up[..read]) {
                    match relay.on_client_message(message, &mut server_write).await {
                        Next::Continue => {}
                        Next::CutServer(client_held) => {
                            drop((server_read, server_write));
                            if let Some(client_held) = client_held {
                                let _ = client_held.await;
                            }
                            return;
                        }
                        Next::Strand(held) => {
                            drop((client_read, client_write));
                            let watch = relay.watch.take().expect("a stranded statement is watched");
                            relay.deliver_late(watch, held, server_read, server_write).await;
                            return;
                        }
                    }
                }
            }
            read = server_read.read(&mut down) => {
                let Ok(read @ 1..) = read else { return };
                for message in from_server.push(&down[..read]) {
                    if let Some(client_held) = relay.on_server_message(message, &mut client_write).await {
                        drop((server_read, server_write));
                        let _ = client_held.await;
                        return;
                    }
                }
            }
        }
    }
}

impl Relay {
    async fn on_client_message(&mut self, message: Message, server: &mut OwnedWriteHalf) -> Next {
        if let Some(sql) = message.sql() {
            self.deliver_stranded_before(&sql).await;
            if self.watch.is_none() {
                let rule = {
                    let mut rules = self.shared.rules.lock().unwrap();
                    let matches = rules.front().is_some_and(|r| message.contains(&r.marker));
                    if matches { rules.pop_front() } else { None }
                };
                if let Some(rule) = rule {
                    if rule.fault == Fault::DropRequest {
                        let (held, client_held) = oneshot::channel();
                        let _ = rule.tripped.send(Tripped {
                            request: vec![message],
                            reply: Vec::new(),
                            _client_held: Some(held),
                        });
                        return Next::CutServer(Some(client_held));
                    }
                    self.watch = Some(Watch {
                        fault: rule.fault,
                        marker: rule.marker,
                        tripped: rule.tripped,
                        last_ready: None,
                        batch: Vec::new(),
                        reply: Vec::new(),
                    });
                }
            }
        }
        let Some(watch) = &mut self.watch else {
            return self.forward(server, vec![message]).await;
        };
        if (message.kind == b'E' || message.kind == b'Q') && watch.last_ready.is_none() {
            // Its transaction ends with the answer to the next Sync (a Query is its own).
            watch.last_ready = Some(self.ready_owed + 1);
        }
        if watch.fault != Fault::Late {
            return self.forward(server, vec![message]).await;
        }
        let ends_batch = message.ends_batch();
        watch.batch.push(message);
        if !ends_batch {
            return Next::Continue;
        }
        let batch = std::mem::take(&mut watch.batch);
        if watch.last_ready.is_some() {
            Next::Strand(batch)
        } else {
            // Only the preparation: let it through.
            self.forward(server, batch).await
        }
    }

    async fn forward(&mut self, server: &mut OwnedWriteHalf, messages: Vec<Message>) -> Next {
        let mut wire = Vec::new();
        for message in &messages {
            if let Some(sql) = message.sql() {
                self.shared.statements.lock().unwrap().push(sql);
            }
            if message.ends_batch() {
                self.ready_owed += 1;
            }
            wire.extend(message.to_wire());
        }
        if server.write_all(&wire).await.is_err() {
            return Next::CutServer(None);
        }
        Next::Continue
    }

    /// Returns what holds the client's socket open if the connection is to be cut here.
    async fn on_server_message(
        &mut self,
        message: Message,
        client: &mut OwnedWriteHalf,
    ) -> Option<oneshot::Receiver<()>> {
        if message.kind == b'E' {
            self.shared
                .server_errors
                .lock()
                .unwrap()
                .push(message.error_summary());
        }
        let is_ready = message.kind == b'Z';
        let withheld = match &mut self.watch {
            Some(Watch {
                fault: Fault::DropReply,
                last_ready: Some(last_ready),
                reply,
                ..
            }) if self.ready_seen + 1 >= *last_ready => {
                // After the answer to the Sync before the statement's: its own answer.
                reply.push(message.clone());
                true
            }
            _ => false,
        };
        if is_ready {
            self.ready_seen += 1;
        }
        if !withheld {
            // A client that went away is the client's business; the test sees its error.
            let _ = client.write_all(&message.to_wire()).await;
            return None;
        }
        let watch = self.watch.as_ref().expect("watched");
        if Some(self.ready_seen) != watch.last_ready {
            return None;
        }
        let watch = self.watch.take().expect("watched");
        let (held, client_held) = oneshot::channel();
        let _ = watch.tripped.send(Tripped {
            request: Vec::new(),
            reply: watch.reply,
            _client_held: Some(held),
        });
        Some(client_held)
    }

    /// Waits until a retry carrying the marker asks for it, then sends the stranded messages,
    /// reads their answer through the ReadyForQuery that ends their transaction, and reports.
    async fn deliver_late(
        mut self,
        watch: Watch,
        held: Vec<Message>,
        mut server_read: OwnedReadHalf,
        mut server_write: OwnedWriteHalf,
    ) {
        let (deliver, asked) = oneshot::channel();
        self.shared.stranded.lock().unwrap().push(Stranded {
            marker: watch.marker.clone(),
            deliver,
        });
        let Ok(answered) = asked.await else { return };
        let last_ready = watch.last_ready.expect("a stranded statement executes");
        if let Next::CutServer(_) = self.forward(&mut server_write, held.clone()).await {
            return;
        }
        let mut from_server = Framer::default();
        let mut reply = Vec::new();
        let mut down = vec![0u8; 16 * 1024];
        while self.ready_seen < last_ready {
            let Ok(read @ 1..) = server_read.read(&mut down).await else {
                return;
            };
            for message in from_server.push(&down[..read]) {
                if message.kind == b'E' {
                    self.shared
                        .server_errors
                        .lock()
                        .unwrap()
                        .push(message.error_summary());
                }
                if message.kind == b'Z' {
                    self.ready_seen += 1;
                }
                reply.push(message);
            }
        }
        let _ = watch.tripped.send(Tripped {
            request: held,
            reply,
            _client_held: None,
        });
        let _ = answered.send(());
    }

    /// Before a statement with a stranded statement's marker goes on, delivers the stranded one
    /// and waits until the server has answered it.
    async fn deliver_stranded_before(&self, sql: &str) {
        let stranded = {
            let mut all = self.shared.stranded.lock().unwrap();
            let found = all.iter().position(|s| sql.contains(&s.marker));
            found.map(|i| all.remove(i))
        };
        if let Some(stranded) = stranded {
            let (answered, delivered) = oneshot::channel();
            if stranded.deliver.send(answered).is_ok() {
                let _ = delivered.await;
            }
        }
    }
}
