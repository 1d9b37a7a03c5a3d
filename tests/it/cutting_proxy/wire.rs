//! The cutting proxy's view of the wire protocol: messages (type, length, body), what they
//! carry, and the framing of a byte stream into them; and the untyped startup exchange.

use std::fmt;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A protocol message as framed on the wire (the length is implied by the body).
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: u8,
    pub body: Vec<u8>,
}

impl Message {
    pub(super) fn to_wire(&self) -> Vec<u8> {
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

    pub(super) fn contains(&self, marker: &str) -> bool {
        self.sql().is_some_and(|sql| sql.contains(marker))
    }

    /// Ends a batch of extended-protocol messages, or is a batch of its own: the server answers
    /// each with one ReadyForQuery.
    pub(super) fn ends_batch(&self) -> bool {
        matches!(self.kind, b'S' | b'Q')
    }

    /// An ErrorResponse's SQLSTATE, constraint and message, as `23505 users_email_key: …`.
    pub(super) fn error_summary(&self) -> String {
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

/// Splits a byte stream into protocol messages.
#[derive(Default)]
pub(super) struct Framer {
    buffer: Vec<u8>,
}

impl Framer {
    pub(super) fn push(&mut self, bytes: &[u8]) -> Vec<Message> {
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
pub(super) async fn relay_startup(client: &mut TcpStream, server: &mut TcpStream) -> std::io::Result<()> {
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
