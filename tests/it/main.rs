//! Integration tests, in one binary to keep link time down. Each test gets its own freshly
//! migrated database from `#[sqlx::test]`, so they run in parallel without interfering, and
//! notifications (which are per database) cannot cross between them.

mod bad_day;
mod batch_handler;
mod bench;
mod channels;
mod cli;
mod common;
mod concurrency;
mod connecting;
mod contract;
mod cutting_proxy;
mod dashboard;
mod example_service;
mod existing_services;
mod exit_codes;
mod faults;
mod grouped_signups;
mod hostile_input;
mod idempotency;
mod idempotency_cuts;
mod idempotency_races;
mod job_lifecycle;
mod json_logs;
mod last_looks;
mod layout;
mod metrics;
mod operations;
mod own_schema;
mod player_service;
mod pooler;
mod protocol;
mod scans;
mod schema_dump;
mod several_hosts;
mod signup;
#[path = "../support/silent_proxy.rs"]
mod silent_proxy;
mod wake_ups;
mod worker;
