//! What each subcommand does, one file per group of commands. This module only routes: the
//! parsed command to its group, and the outcome to `exit`.

use std::process::ExitCode;

use ackloop::{Backoff, WorkerConfig};

use crate::args::{Cli, Command, LogFormat};
use crate::exit::{self, Failure};

mod dashboard;
mod doctor;
mod jobs;
mod migrate;
mod signup;
mod status;
mod worker;

/// Runs the parsed command and returns the process's exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let json = cli.command.reports_failure_as_json();
    let json_logs = cli.log_format == LogFormat::Json;
    exit::report(dispatch(cli).await, json, json_logs)
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let connection = cli.connection;
    let log_format = cli.log_format;
    match cli.command {
        Command::Migrate { json } => migrate::run(&connection, json).await,
        Command::Signup {
            email,
            display_name,
            timeout,
            idempotency_key,
            json,
        } => signup::signup(&connection, email, display_name, timeout, idempotency_key, json).await,
        Command::Worker {
            concurrency,
            batch_size,
            poll_interval,
            max_attempts,
            retry_backoff,
            shutdown_timeout,
            metrics_addr,
        } => {
            let config = WorkerConfig {
                concurrency,
                batch_size,
                poll_interval,
                max_attempts,
                backoff: Backoff {
                    base: retry_backoff,
                    ..Backoff::default()
                },
                channels: connection.channels()?,
                listen_options: connection.listen_options()?,
                poll_only: connection.poll_only,
                shutdown_timeout,
            };
            worker::run(&connection, config, metrics_addr).await
        }
        Command::Status { json } => status::run(&connection, json).await,
        Command::Dashboard {
            addr,
            token,
            metrics_from,
        } => dashboard::run(&connection, addr, token, metrics_from).await,
        Command::Await {
            job_id,
            email,
            timeout,
            json,
        } => signup::await_player(&connection, job_id, email, timeout, json).await,
        Command::Jobs { command } => jobs::run(&connection, command).await,
        Command::Doctor { stale_after, json } => doctor::run(&connection, stale_after, json).await,
        Command::Bench { mut config, json } => {
            config.log_format = log_format;
            crate::bench::check(&config).map_err(Failure::BenchFlags)?;
            let report = crate::bench::run(connection.connect_options()?, config)
                .await
                .map_err(Failure::Bench)?;
            report.print(json);
            if report.ok() {
                Ok(())
            } else {
                Err(Failure::BenchVerification)
            }
        }
        Command::BenchAuth { first, config } => {
            crate::bench::run_auth_process(connection.connect_options()?, first, config)
                .await
                .map_err(Failure::Bench)
        }
    }
}
