//! A queued signup's turn, which its caller and the writers both change, and how the writers
//! tell a busy moment from a database that does not answer.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use tokio::time::Instant;

/// Why a signup was never sent by its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unsent {
    /// Its turn did not come: the database answered others' statements meanwhile (a burst larger
    /// than the writers can take in time), or the caller gave no time at all.
    Busy,
    /// The database answered no statement of these writers while the signup waited: it could not
    /// be reached (a connection that hangs, a server away).
    NoAnswer,
}

/// Where a queued signup is. Shared by its caller and the writers, so that exactly one of them
/// decides its fate at the deadline: a writer sends it, or its caller withdraws it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Turn {
    /// Waiting for a writer.
    Queued = 0,
    /// A writer took it and is getting a connection for it: still unsent.
    Taken = 1,
    /// In a statement on its way to the server: it may commit, whatever the caller does now.
    Sent = 2,
    /// Its caller gave up on it before it was sent: it is never written.
    Withdrawn = 3,
}

/// A [`Turn`] both sides change, each change one atomic step.
pub(super) struct SharedTurn(AtomicU8);

impl SharedTurn {
    pub(super) fn new() -> Self {
        Self(AtomicU8::new(Turn::Queued as u8))
    }

    pub(super) fn now(&self) -> Turn {
        match self.0.load(Ordering::Acquire) {
            0 => Turn::Queued,
            1 => Turn::Taken,
            2 => Turn::Sent,
            _ => Turn::Withdrawn,
        }
    }

    fn advance(&self, from: Turn, to: Turn) -> bool {
        self.0
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// A writer takes the queued signup; false if its caller withdrew it.
    pub(super) fn take(&self) -> bool {
        self.advance(Turn::Queued, Turn::Taken)
    }

    /// A writer is about to send the signup; false if its caller withdrew it meanwhile.
    pub(super) fn send(&self) -> bool {
        self.advance(Turn::Taken, Turn::Sent)
    }

    /// Its caller gives up on the signup; false if it was sent already (and may commit).
    pub(super) fn withdraw(&self) -> bool {
        self.advance(Turn::Queued, Turn::Withdrawn) || self.advance(Turn::Taken, Turn::Withdrawn)
    }
}

/// When the database last answered one of the writers' statements (with rows or with an
/// error): what tells a busy writer from an unreachable database.
pub(super) struct LastAnswer {
    epoch: Instant,
    /// Microseconds after `epoch`; 0 until the first answer.
    micros: AtomicU64,
}

impl LastAnswer {
    pub(super) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            micros: AtomicU64::new(0),
        }
    }

    /// Records a statement's answer if the database gave it: rows, or an error of the statement
    /// itself (not a lost connection, nor a server shutting down or refusing sessions).
    pub(super) fn record_if_reached<T>(&self, answer: &Result<T, sqlx::Error>) {
        match answer {
            Ok(_) => self.record(),
            Err(err @ sqlx::Error::Database(_)) if !crate::store::is_unavailable(err) => self.record(),
            Err(_) => {}
        }
    }

    fn record(&self) {
        let micros = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.micros.fetch_max(micros.max(1), Ordering::Relaxed);
    }

    /// Why a signup that waited since `since` was never sent.
    pub(super) fn unsent_since(&self, since: Instant) -> Unsent {
        let answered = self.micros.load(Ordering::Relaxed);
        let since = since.saturating_duration_since(self.epoch).as_micros();
        if answered > 0 && u128::from(answered) >= since {
            Unsent::Busy
        } else {
            Unsent::NoAnswer
        }
    }
}
