//! The `ackloop` binary: parse arguments, set up logging, run the command, exit with its code.
//!
//! Imports point one way, down the layers: `commands` (one file per group of subcommands), then
//! `bench` and `connect` (pools), then `args` (the clap types), then `exit` (the exit-code table)
//! and `duration_arg`; below them, only the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

mod args;
mod bench;
mod commands;
mod connect;
mod duration_arg;
mod exit;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    init_logging(cli.log_format);
    // The worker runs many loops at once; the one-shot commands need only one thread.
    let runtime = match cli.command {
        args::Command::Worker { .. } | args::Command::Bench { .. } | args::Command::BenchAuth { .. } => {
            tokio::runtime::Builder::new_multi_thread().enable_all().build()
        }
        _ => tokio::runtime::Builder::new_current_thread().enable_all().build(),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(commands::run(cli)),
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `ackloop=info`). In JSON, one object per line
/// with the event's fields at the top level beside `timestamp`, `level`, `target` and `message`,
/// where log pipelines look for them without unpacking a nested object; `span` holds the
/// innermost span's fields and `spans` every enclosing span's, root first, so that a field
/// recorded on a span (a `process_job` span's `job.id`) stays with the lines logged inside it.
fn init_logging(format: args::LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("ackloop=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        args::LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        args::LogFormat::Json => builder
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}
