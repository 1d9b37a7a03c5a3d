//! The command line's shape: every flag, subcommand and help text, as clap reads them. Nothing
//! here acts; `commands` does what these types ask for.

use std::time::Duration;

use ackloop::{SignupsConfig, WorkerConfig};
use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::duration_arg::parse_duration;
use crate::exit::EXIT_CODES;

/// The heading of the options every command takes (the connection, the channels, the logs):
/// listed once, after each command's own options.
const GLOBAL_OPTIONS: &str = "Connection and logging (every command)";

/// Hand work from one service to another through PostgreSQL, and know it was done.
#[derive(Debug, Parser)]
#[command(name = "ackloop", version, about)]
#[command(after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// How log lines are written to stderr: text for people, or json for log pipelines (one
    /// object per line, each line about a job with its job.id field)
    #[arg(long, env = "ACKLOOP_LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text, help_heading = GLOBAL_OPTIONS)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The shape of the log lines on stderr (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event, coloured on a terminal
    #[default]
    Text,
    /// One JSON object per event: timestamp, level, target, message, the event's fields, and
    /// the spans it happened in
    Json,
}

impl LogFormat {
    /// The value `--log-format` takes for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// Where the database is, and which channels to use.
#[derive(Debug, Args)]
#[command(next_help_heading = GLOBAL_OPTIONS)]
pub struct ConnectionArgs {
    /// PostgreSQL connection string, as libpq reads it: postgres://user:pass@host/db?sslmode=require,
    /// postgres://user@/db?host=/run/postgresql (a Unix socket), or host=db dbname=app user=app.
    /// Unset: libpq's PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, as psql uses them
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// A separate URL for the LISTEN connection, when DATABASE_URL goes through a
    /// transaction-mode pooler (pgbouncer), which cannot carry LISTEN
    #[arg(long, env = "ACKLOOP_LISTEN_URL", global = true, hide_env_values = true)]
    pub listen_url: Option<String>,
    /// Never LISTEN: workers find jobs by polling every --poll-interval, and signups look for
    /// their players every 100ms (for connections that cannot carry LISTEN at all)
    #[arg(long, env = "ACKLOOP_POLL_ONLY", global = true)]
    pub poll_only: bool,
    /// Channel that wakes workers
    #[arg(long, env = "ACKLOOP_JOBS_CHANNEL", global = true, default_value = ackloop::DEFAULT_JOBS_CHANNEL)]
    pub jobs_channel: String,
    /// Channel that confirms jobs to waiting callers
    #[arg(long, env = "ACKLOOP_DONE_CHANNEL", global = true, default_value = ackloop::DEFAULT_DONE_CHANNEL)]
    pub done_channel: String,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the embedded schema migrations that the database does not have yet
    ///
    /// Example: DATABASE_URL=postgres://app@db/app ackloop migrate
    Migrate {
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Sign a user up and wait for their player
    ///
    /// Example: ackloop signup --email ada@example.com --display-name Ada --timeout 5s
    Signup {
        /// The user's email (unique, compared without case)
        #[arg(long)]
        email: String,
        /// The user's and player's display name (1 to 64 characters)
        #[arg(long)]
        display_name: String,
        /// How long to wait for the player: 500ms, 5s, 2m. On timeout the job still completes
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
        /// A UUID of your choosing (uuidgen makes one), which becomes the job id: running the
        /// command again with the same key, email and display name writes nothing and reports
        /// the first run's outcome, instead of exit 4
        #[arg(long, value_name = "UUID", value_parser = parse_idempotency_key)]
        idempotency_key: Option<ackloop::JobId>,
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Run the player worker until SIGINT or SIGTERM, then finish in-flight jobs and exit 0
    ///
    /// A second signal exits at once; jobs in flight roll back and stay pending.
    ///
    /// Example: ackloop worker --concurrency 2 --metrics-addr 127.0.0.1:9464
    Worker {
        /// Processing loops (each with at most one transaction open)
        #[arg(long, default_value_t = WorkerConfig::default().concurrency)]
        concurrency: usize,
        /// Jobs claimed and completed per transaction
        #[arg(long, default_value_t = WorkerConfig::default().batch_size)]
        batch_size: u16,
        /// How often to look for jobs when no notification arrives
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        poll_interval: Duration,
        /// Attempts before a job is marked failed
        #[arg(long, default_value_t = WorkerConfig::default().max_attempts)]
        max_attempts: u32,
        /// Wait after the first failed attempt; doubles each time, up to 5m
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        retry_backoff: Duration,
        /// On shutdown, how long in-flight batches may take before they are abandoned
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        shutdown_timeout: Duration,
        /// Serve Prometheus metrics at http://ADDR/metrics and a health check at /healthz,
        /// e.g. 127.0.0.1:9464 (port 0 picks one; the log says which)
        #[arg(long, env = "ACKLOOP_METRICS_ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Measure the whole loop on a scratch database (created next to DATABASE_URL's, then dropped)
    ///
    /// Prints acknowledged signups per second, latency from signup start to confirmation, the
    /// connections used, peak RSS, and a verification line. Example:
    /// ackloop bench --signups 20000 --concurrency 64 --workers 2
    Bench {
        #[command(flatten)]
        config: BenchConfig,
        /// Print one JSON line
        #[arg(long)]
        json: bool,
    },
    /// One auth process of `ackloop bench --auth-processes`, started by the bench itself
    #[command(hide = true)]
    BenchAuth {
        /// The number of this process's first signup, so that emails differ across processes
        #[arg(long)]
        first: usize,
        #[command(flatten)]
        config: BenchConfig,
    },
    /// Wait for the player of a signup already committed (one whose first wait timed out)
    ///
    /// Example: ackloop await 0193a5c2-…  or  ackloop await --email ada@example.com --timeout 30s
    Await {
        /// The job id (printed by a signup that timed out)
        #[arg(required_unless_present = "email", conflicts_with = "email")]
        job_id: Option<ackloop::JobId>,
        /// Find the job by its user's email instead
        #[arg(long)]
        email: Option<String>,
        /// How long to wait: 500ms, 5s, 2m
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Inspect, retry and prune jobs
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Check everything the loop needs and say how to fix what is wrong (exit 10 if anything is)
    ///
    /// Example: ACKLOOP_LISTEN_URL=postgres://app@db-direct/app ackloop doctor --stale-after 2m
    Doctor {
        /// Pending jobs older than this count as stuck
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        stale_after: Duration,
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Serve a live page of the loop (rates, latencies, pending and failed jobs, retry) until
    /// SIGINT or SIGTERM
    ///
    /// Prints `dashboard: http://ADDR/` once listening. Example:
    /// ackloop dashboard --metrics-from 127.0.0.1:9464
    Dashboard {
        /// Where to listen (port 0 picks one). Off the loopback address, retry needs --token
        #[arg(long, env = "ACKLOOP_DASHBOARD_ADDR", default_value = "127.0.0.1:9465")]
        addr: std::net::SocketAddr,
        /// A secret that actions (retry) must carry as `Authorization: Bearer …`; the page asks
        /// for it once
        #[arg(long, env = "ACKLOOP_DASHBOARD_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A worker's or service's metrics endpoint (host:port or http://host:port/metrics), for
        /// claim and confirmation latencies and listener health; repeat for each process
        #[arg(long, value_name = "ENDPOINT")]
        metrics_from: Vec<String>,
    },
    /// Show job counts by status, the oldest pending job's age, and recent failures
    ///
    /// Example: ackloop status --json
    Status {
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
}

impl Command {
    /// Whether a failure is also printed as one JSON object on stdout, `{error, message}` (with
    /// the job id when there is one, which a script needs to wait again): every command that
    /// takes `--json` (doctor's failure is its report, which says what is wrong).
    pub fn reports_failure_as_json(&self) -> bool {
        match self {
            Command::Migrate { json }
            | Command::Signup { json, .. }
            | Command::Await { json, .. }
            | Command::Status { json }
            | Command::Doctor { json, .. } => *json,
            Command::Jobs { command } => match command {
                JobsCommand::Show { json, .. }
                | JobsCommand::Retry { json, .. }
                | JobsCommand::Prune { json, .. } => *json,
            },
            Command::Worker { .. }
            | Command::Bench { .. }
            | Command::BenchAuth { .. }
            | Command::Dashboard { .. } => false,
        }
    }
}

/// `ackloop jobs …`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Show one job: its user, attempts, last error, timestamps, and whether a player exists
    ///
    /// A done job whose player is missing (deleted, or left out of a restore) is shown with a
    /// "problem" line (in JSON, "player_missing": true) and the command that repairs it.
    ///
    /// Example: ackloop jobs show 0193a5c2-…
    Show {
        /// The job id
        job_id: ackloop::JobId,
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Put a failed job (or every failed job) back to pending, with fresh attempts; with
    /// --repair, a done job whose player is missing
    ///
    /// A done job whose player was deleted, or left out of a restore, is refused without
    /// --repair (`jobs show` and `doctor` point such jobs out). --repair puts it back to pending,
    /// with fresh attempts, and a worker creates the player again; a job whose player exists is
    /// never touched.
    ///
    /// Examples: ackloop jobs retry 0193a5c2-…   ackloop jobs retry --failed   ackloop jobs retry
    /// --repair 0193a5c2-…   ackloop jobs retry --repair --all-missing
    #[command(group(ArgGroup::new("which").required(true).args(["job_id", "failed", "all_missing"])))]
    #[command(override_usage = "ackloop jobs retry <JOB_ID|--failed> [--json]\n       \
                                ackloop jobs retry --repair <JOB_ID|--all-missing> [--json]")]
    Retry {
        /// The job: a failed one, or with --repair a done one whose player is missing
        job_id: Option<ackloop::JobId>,
        /// Retry every failed job
        #[arg(long, conflicts_with = "repair")]
        failed: bool,
        /// Repair, not retry: the job is done but its player is missing; put it back to pending
        /// so a worker creates the player again
        #[arg(long)]
        repair: bool,
        /// With --repair: every done job whose player is missing
        #[arg(long, requires = "repair")]
        all_missing: bool,
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Delete done and failed jobs that finished longer ago than --older-than (users and players stay)
    ///
    /// Example: ackloop jobs prune --older-than 7d --dry-run
    Prune {
        /// Retention: 7d, 12h, 30m
        #[arg(long, value_parser = parse_duration)]
        older_than: Duration,
        /// Only count what would be deleted
        #[arg(long)]
        dry_run: bool,
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
}

/// What to run: the flags of `ackloop bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchConfig {
    /// Signups to run (or jobs to drain)
    #[arg(long, default_value_t = 10_000)]
    pub signups: usize,
    /// Concurrent callers of create_user_and_await_player, in all
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Worker processing loops in all
    #[arg(long, default_value_t = WorkerConfig::default().concurrency)]
    pub workers: usize,
    /// Run the workers as this many `ackloop worker` processes instead of in this process, each
    /// with its own pool and LISTEN connection and --workers / N loops (rounded up)
    #[arg(long, default_value_t = 0)]
    pub worker_processes: usize,
    /// Run the callers in this many processes instead of in this process, each with its own
    /// `Signups` (pool, --writers writers, LISTEN connection) and its share of --concurrency and
    /// --signups, all measured over the same wall-clock window
    #[arg(long, default_value_t = 0)]
    pub auth_processes: usize,
    /// Jobs claimed and completed per worker transaction
    #[arg(long, default_value_t = WorkerConfig::default().batch_size)]
    pub batch_size: u16,
    /// Signup writer tasks per `Signups` (concurrent signups share their transactions)
    #[arg(long, default_value_t = SignupsConfig::default().writers)]
    pub writers: usize,
    /// Most signups per transaction (1 writes each signup alone)
    #[arg(long, default_value_t = SignupsConfig::default().max_batch)]
    pub max_batch: usize,
    /// Enqueue every job first, then time the workers alone
    #[arg(long)]
    pub drain: bool,
    /// Flood both channels with garbage payloads from one connection during the run
    #[arg(long)]
    pub garbage: bool,
    /// Reach the database through a proxy adding this round-trip time (1ms: a data centre)
    #[arg(long, value_parser = parse_duration)]
    pub rtt: Option<Duration>,
    /// Let the pool ping each connection before handing it out (sqlx's default; one more
    /// round trip per query)
    #[arg(long)]
    pub ping_on_acquire: bool,
    /// Never LISTEN: workers and waiting signups poll the tables at this interval (what the
    /// global --poll-only does, with the interval measured)
    #[arg(long, value_parser = parse_duration)]
    pub poll_every: Option<Duration>,
    /// Keep the scratch database for inspection
    #[arg(long)]
    pub keep: bool,
    /// What the workers run for each job: the built-in player insert (one statement per batch),
    /// or a trivial custom handler doing the same insert through the handler API (its batch
    /// form: one statement per claimed batch, in a savepoint); in-process workers only
    #[arg(long, value_enum, default_value_t = BenchHandler::BuiltIn)]
    pub handler: BenchHandler,
    /// The --log-format of the `ackloop worker` processes (--worker-processes): this
    /// process's own, so that their lines on the shared stderr parse alike
    #[arg(skip)]
    pub log_format: LogFormat,
}

/// The handler `ackloop bench --handler` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchHandler {
    /// `Worker::new`: the built-in insert
    BuiltIn,
    /// `Worker::with_handler`: the same insert as a handler of the user's own
    Custom,
}

impl BenchHandler {
    /// The name the report prints.
    pub fn name(self) -> &'static str {
        match self {
            Self::BuiltIn => "built-in",
            Self::Custom => "custom",
        }
    }
}

/// An idempotency key: any UUID but the nil one, which every careless client would share.
fn parse_idempotency_key(text: &str) -> Result<ackloop::JobId, String> {
    match text.parse::<ackloop::JobId>() {
        Ok(key) if !key.as_uuid().is_nil() => Ok(key),
        _ => Err("expected a random UUID (uuidgen makes one), the same on every retry".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn log_format_is_text_unless_asked_and_goes_anywhere_on_the_line() {
        let parse = |args: &[&str]| {
            let argv = ["ackloop"].iter().chain(args);
            Cli::try_parse_from(argv)
                .map(|cli| cli.log_format)
                .map_err(|err| err.kind())
        };
        assert_eq!(parse(&["status"]), Ok(LogFormat::Text));
        assert_eq!(parse(&["--log-format", "json", "worker"]), Ok(LogFormat::Json));
        assert_eq!(parse(&["worker", "--log-format=json"]), Ok(LogFormat::Json));
        assert_eq!(
            parse(&["--log-format", "yaml", "worker"]),
            Err(clap::error::ErrorKind::InvalidValue)
        );
    }

    /// The `jobs retry` arguments `args` parse to, or clap's error kind.
    fn parse_retry(
        args: &[&str],
    ) -> Result<(Option<ackloop::JobId>, bool, bool, bool), clap::error::ErrorKind> {
        let argv = ["ackloop", "jobs", "retry"].iter().chain(args);
        match Cli::try_parse_from(argv).map_err(|err| err.kind())?.command {
            Command::Jobs {
                command:
                    JobsCommand::Retry {
                        job_id,
                        failed,
                        repair,
                        all_missing,
                        ..
                    },
            } => Ok((job_id, failed, repair, all_missing)),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn jobs_retry_takes_one_target_and_repair_only_with_done_jobs() {
        use clap::error::ErrorKind;
        let id = ackloop::JobId::new();
        let text = id.to_string();
        assert_eq!(parse_retry(&[&text]), Ok((Some(id), false, false, false)));
        assert_eq!(parse_retry(&["--failed"]), Ok((None, true, false, false)));
        assert_eq!(
            parse_retry(&["--repair", &text]),
            Ok((Some(id), false, true, false))
        );
        assert_eq!(
            parse_retry(&["--repair", "--all-missing"]),
            Ok((None, false, true, true))
        );
        // Nothing to act on, or two things at once.
        assert_eq!(parse_retry(&[]), Err(ErrorKind::MissingRequiredArgument));
        assert_eq!(
            parse_retry(&["--repair"]),
            Err(ErrorKind::MissingRequiredArgument)
        );
        assert_eq!(
            parse_retry(&[&text, "--failed"]),
            Err(ErrorKind::ArgumentConflict)
        );
        assert_eq!(
            parse_retry(&["--repair", "--all-missing", &text]),
            Err(ErrorKind::ArgumentConflict)
        );
        // --failed retries failed jobs, --all-missing repairs done ones: never mixed up.
        assert_eq!(
            parse_retry(&["--repair", "--failed"]),
            Err(ErrorKind::ArgumentConflict)
        );
        assert_eq!(
            parse_retry(&["--all-missing"]),
            Err(ErrorKind::MissingRequiredArgument)
        );
    }
}
