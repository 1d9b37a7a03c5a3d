//! One connection through the cutting proxy: relays messages both ways, counts the
//! ReadyForQuery that ends a marked statement's transaction, and cuts, withholds or strands
//! there as its fault says.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

use super::wire::{Framer, Message, relay_startup};
use super::{Fault, Shared, Stranded, Tripped};

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

pub(super) async fn relay(mut client: TcpStream, mut server: TcpStream, shared: Arc<Shared>) {
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
    /// Records the server's ErrorResponse for [`CuttingProxy::server_errors`](super::CuttingProxy::server_errors).
    fn note_error(&self, message: &Message) {
        if message.kind == b'E' {
            self.shared
                .server_errors
                .lock()
                .unwrap()
                .push(message.error_summary());
        }
    }

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
        self.note_error(&message);
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
                self.note_error(&message);
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
