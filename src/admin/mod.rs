//! Operator calls: what `ackloop jobs`, `status`, `doctor` and `migrate` run, for a service or a
//! script that wants them without the binary.
//!
//! None of these is on the loop's path: a signup and a worker never call them. They read the same
//! three tables through the same SQL seam (`store`), and a change they make (a retry, a repair)
//! wakes the workers, as a signup does.
//!
//! - Look a job up: [`job_details`] (a [`JobDetails`]), [`find_job_by_email`].
//! - Put jobs back to pending: [`retry_failed_job`], [`retry_all_failed_jobs`] (failed jobs,
//!   fresh attempts); [`repair_job`], [`repair_all_missing_players`] (done jobs whose player is
//!   missing). Refusals are [`AdminError`] variants; nothing is changed then.
//! - Delete finished jobs: [`prune_finished_jobs`], [`count_prunable_jobs`], [`PRUNE_BATCH`].
//! - The queue at a glance: [`StatusReport`], [`FailedJob`].
//! - Everything at once, each problem with its fix: [`diagnose`], a list of [`Check`]s.
//! - The schema version: [`check_schema`], [`SchemaError`]. A service calls it at start-up too,
//!   so it is also at the crate root, beside [`MIGRATOR`](crate::MIGRATOR).
//!
//! The children, with the arrows pointing down only (none imports `admin` itself):
//!
//! ```text
//! admin/mod.rs ─┬─▶ jobs.rs     look up, retry, repair, prune ─▶ store, job, channel
//!               ├─▶ status.rs   the queue at a glance, gauges ─▶ store, job, telemetry
//!               ├─▶ doctor.rs   every check, with its fix     ─▶ schema, store, job, connect, MIGRATOR
//!               └─▶ schema.rs   the schema version            ─▶ store, MIGRATOR
//! ```

mod doctor;
mod jobs;
pub(crate) mod schema;
// Visible to the crate root, which exports `sample_queue_gauges` beside the other metrics items.
pub(crate) mod status;

pub use doctor::{Check, diagnose};
pub use jobs::{
    AdminError, JobDetails, PRUNE_BATCH, count_prunable_jobs, find_job_by_email, job_details,
    prune_finished_jobs, repair_all_missing_players, repair_job, retry_all_failed_jobs, retry_failed_job,
};
pub use schema::{AppliedByAnotherTool, SchemaError, check_schema};
pub use status::{FailedJob, StatusReport};
