//! Every SQL statement the crate runs, each behind a named function, split by who runs it:
//! `signup` (the auth side), `worker` (the player side), `admin` (operators and health
//! checks) and `dashboard` (the live page, with the `http` feature). `classify` holds what they
//! share: what a driver error means.
//!
//! Nothing here begins or commits a transaction: the callers in `signup/` and `worker/` decide
//! the transaction boundaries, because that is where the atomicity argument is made. The one
//! exception is inside the contract: its `*_then_notify` procedures, called in autocommit, commit
//! their write and then send its wake-ups, so one round trip makes two transactions.
//! `docs/protocol.md` repeats the statements another language needs to take part, and a test
//! (`tests/it/protocol.rs`) fails if it, `bench/*.sql` and this code disagree.

mod admin;
mod attempts;
mod classify;
#[cfg(feature = "http")]
mod dashboard;
mod signup;
mod worker;

pub(crate) use admin::*;
pub(crate) use attempts::*;
pub(crate) use classify::*;
pub use classify::{is_refusal, is_unavailable};
#[cfg(feature = "http")]
pub(crate) use dashboard::*;
pub(crate) use signup::*;
pub(crate) use worker::*;
