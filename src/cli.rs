//! The `ackloop` command line: argument parsing, one function per subcommand, and the one place
//! where errors become exit codes.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ackloop::admin::{self, StatusReport};
use ackloop::{
    Backoff, Channels, ConnectConfig, NewUser, SignupError, Signups, SignupsConfig, Worker, WorkerConfig,
    WorkerError,
};
use clap::{ArgGroup, Args, Parser, Subcommand};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::duration_arg::parse_duration;

/// Hand work from one service to another through PostgreSQL, and know it was done.
#[derive(Debug, Parser)]
#[command(name = "ackloop", version, about)]
#[command(after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the database is, and which channels to use.
#[derive(Debug, Args)]
pub struct ConnectionArgs {
    /// PostgreSQL connection string, as libpq reads it: postgres://user:pass@host/db?sslmode=require,
    /// postgres://user@/db?host=/run/postgresql (a Unix socket), or host=db dbname=app user=app.
    /// Unset: libpq's PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, as psql uses them
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// A separate URL for the LISTEN connection, when DATABASE_URL goes through a
    /// transaction-mode pooler (pgbouncer), which cannot carry LISTEN
    #[arg(long, env = "ACKLOOP_LISTEN_URL", global = true, hide_env_values = true)]
    listen_url: Option<String>,
    /// Never LISTEN: workers find jobs by polling every --poll-interval, and signups look for
    /// their players every 100ms (for connections that cannot carry LISTEN at all)
    #[arg(long, env = "ACKLOOP_POLL_ONLY", global = true)]
    poll_only: bool,
    /// Channel that wakes workers
    #[arg(long, env = "ACKLOOP_JOBS_CHANNEL", global = true, default_value = ackloop::DEFAULT_JOBS_CHANNEL)]
    jobs_channel: String,
    /// Channel that confirms jobs to waiting callers
    #[arg(long, env = "ACKLOOP_DONE_CHANNEL", global = true, default_value = ackloop::DEFAULT_DONE_CHANNEL)]
    done_channel: String,
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
        config: crate::bench::BenchConfig,
        /// Print one JSON line
        #[arg(long)]
        json: bool,
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
    /// Show job counts by status, the oldest pending job's age, and recent failures
    ///
    /// Example: ackloop status --json
    Status {
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
}

/// With --poll-only, how often a waiting signup looks for its player: a tenth of a second added
/// to each signup, at one cheap indexed query per interval for all waiting signups together.
const POLL_ONLY_CONFIRM_INTERVAL: Duration = Duration::from_millis(100);

/// How long to wait for the database before giving up with exit code 7, unless the connection
/// string's `connect_timeout` says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  unexpected database error
  2  usage error
  3  invalid input (the message names the field)
  4  email already registered
  5  timed out: the signup is committed and its job will still complete
  6  the job failed (the message gives the recorded error)
  7  cannot reach the database, or the connection string is malformed
  8  the schema is missing or behind: run `ackloop migrate`
  9  the schema is newer than this ackloop: upgrade ackloop
  10 doctor found something that needs attention; `jobs retry` was given a job it cannot act
     on (the message says why and what to do)";

/// Everything a subcommand can fail with, each mapped to one exit code in [`Failure::exit_code`].
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("invalid {which}")]
    BadUrl {
        which: &'static str,
        #[source]
        source: ackloop::BadConnectionString,
    },
    #[error("cannot connect to the database at {target}{}", unset_hint(.from_env))]
    Connect {
        target: String,
        /// Whether DATABASE_URL was unset and libpq's defaults were tried.
        from_env: bool,
        #[source]
        source: sqlx::Error,
    },
    #[error(transparent)]
    Channel(#[from] ackloop::InvalidChannelName),
    #[error(transparent)]
    Signup(#[from] SignupError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Schema(#[from] ackloop::SchemaError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("doctor found {0} problem(s)")]
    Doctor(usize),
    #[error(transparent)]
    Metrics(ackloop::MetricsError),
    #[error("cannot serve metrics on {addr}")]
    MetricsAddr {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the queue")]
    Query(#[source] sqlx::Error),
    #[error("benchmark failed")]
    Bench(#[source] sqlx::Error),
    #[error("benchmark verification failed: not every signup got exactly one player")]
    BenchVerification,
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Signup(SignupError::Invalid(_)) | Self::Channel(_) => 3,
            Self::Signup(SignupError::EmailTaken) => 4,
            Self::Signup(SignupError::TimedOut { .. }) => 5,
            Self::Signup(SignupError::JobFailed { .. }) => 6,
            Self::BadUrl { .. }
            | Self::Connect { .. }
            | Self::Signup(SignupError::Unavailable { .. })
            | Self::Worker(WorkerError::Listen { .. }) => 7,
            Self::Schema(ackloop::SchemaError::Missing | ackloop::SchemaError::Behind { .. }) => 8,
            // sqlx refuses to migrate a database holding migrations it does not have.
            Self::Schema(ackloop::SchemaError::Newer { .. })
            | Self::Migrate(sqlx::migrate::MigrateError::VersionMissing(_)) => 9,
            Self::Worker(WorkerError::Config(_)) | Self::MetricsAddr { .. } => 2,
            Self::Admin(admin::AdminError::UnknownJob(_)) | Self::Signup(SignupError::UnknownJob(_)) => 3,
            Self::Admin(
                admin::AdminError::AlreadyDone(_)
                | admin::AdminError::DoneWithoutPlayer(_)
                | admin::AdminError::StillPending(_)
                | admin::AdminError::StillFailed(_),
            )
            | Self::Doctor(_) => 10,
            _ => 1,
        }
    }

    /// A short machine-readable name for `--json` output.
    fn kind(&self) -> &'static str {
        match self.exit_code() {
            3 => "invalid_input",
            4 => "email_taken",
            5 => "timed_out",
            6 => "job_failed",
            7 => "unavailable",
            8 => "schema_missing",
            9 => "schema_newer",
            10 => "attention",
            _ => "error",
        }
    }

    /// The error and its chain of causes, one line. A driver error ends the chain, told in a
    /// user's words (its own text and causes carry internals such as the server's source line).
    fn message(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            if let Some(db_err) = cause.downcast_ref::<sqlx::Error>() {
                let _ = write!(message, ": {}", ackloop::describe_db_error(db_err));
                break;
            }
            // Many errors already print their source in their own message; say each thing once.
            let text = cause.to_string();
            if !message.contains(&text) {
                let _ = write!(message, ": {text}");
            }
            source = cause.source();
        }
        message
    }
}

/// Runs the parsed command and returns the process's exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let json = matches!(
        cli.command,
        Command::Signup { json: true, .. } | Command::Status { json: true }
    );
    match dispatch(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            // doctor has printed its report, problems included.
            if json && !matches!(failure, Failure::Doctor(_)) {
                let mut object = json!({ "error": failure.kind(), "message": failure.message() });
                if let Failure::Signup(err) = &failure
                    && let Some(job_id) = err.job_id()
                {
                    object["job_id"] = json!(job_id);
                }
                println!("{object}");
            }
            eprintln!("error: {}", failure.message());
            ExitCode::from(failure.exit_code())
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let connection = cli.connection;
    match cli.command {
        Command::Migrate { json } => migrate(&connection, json).await,
        Command::Signup {
            email,
            display_name,
            timeout,
            json,
        } => signup(&connection, email, display_name, timeout, json).await,
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
            worker(&connection, config, metrics_addr).await
        }
        Command::Status { json } => status(&connection, json).await,
        Command::Await {
            job_id,
            email,
            timeout,
            json,
        } => await_player(&connection, job_id, email, timeout, json).await,
        Command::Jobs { command } => jobs(&connection, command).await,
        Command::Doctor { stale_after, json } => doctor(&connection, stale_after, json).await,
        Command::Bench { config, json } => {
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
    }
}

fn unset_hint(from_env: &bool) -> &'static str {
    if *from_env {
        " (DATABASE_URL is not set, so libpq's PGHOST, PGUSER, ... and defaults were used)"
    } else {
        ""
    }
}

impl ConnectionArgs {
    /// DATABASE_URL read as libpq would, or libpq's environment variables when it is unset.
    fn connect_config(&self) -> Result<ConnectConfig, Failure> {
        match self.database_url.as_deref() {
            Some(url) => parse_url(url, "DATABASE_URL"),
            None => ConnectConfig::from_libpq_env().map_err(|source| Failure::BadUrl {
                which: "PG* environment variables",
                source,
            }),
        }
    }

    fn connect_options(&self) -> Result<PgConnectOptions, Failure> {
        Ok(self.connect_config()?.into_options())
    }

    fn listen_options(&self) -> Result<Option<PgConnectOptions>, Failure> {
        self.listen_url
            .as_deref()
            .map(|url| parse_url(url, "ACKLOOP_LISTEN_URL").map(ConnectConfig::into_options))
            .transpose()
    }

    /// A pool (as [`ConnectionArgs::pool`]) on a database whose schema this version can use.
    async fn migrated_pool(&self, connections: u32) -> Result<PgPool, Failure> {
        let pool = self.pool(connections).await?;
        ackloop::check_schema(&pool).await?;
        Ok(pool)
    }

    fn channels(&self) -> Result<Channels, Failure> {
        Ok(Channels::new(&self.jobs_channel, &self.done_channel)?)
    }

    /// The signup side, with this invocation's channels, listen URL and polling.
    async fn signups(&self, pool: PgPool) -> Result<Signups, Failure> {
        let config = SignupsConfig {
            channels: self.channels()?,
            listen_options: self.listen_options()?,
            poll_only: self.poll_only.then_some(POLL_ONLY_CONFIRM_INTERVAL),
            ..SignupsConfig::default()
        };
        Ok(Signups::connect_with(pool, config).await?)
    }

    /// A pool of at most `connections` on `DATABASE_URL`.
    async fn pool(&self, connections: u32) -> Result<PgPool, Failure> {
        connect(self, |options| options, connections).await
    }
}

/// A pool of at most `connections`, with `adjust` applied to the connect options. One direct
/// connection is made first: the pool would retry a refused connection until its timeout and
/// then report only that it timed out, where a user needs the reason at once.
async fn connect(
    connection: &ConnectionArgs,
    adjust: impl FnOnce(PgConnectOptions) -> PgConnectOptions,
    connections: u32,
) -> Result<PgPool, Failure> {
    let config = connection.connect_config()?;
    let target = config.to_string();
    let timeout = config.connect_timeout().unwrap_or(CONNECT_TIMEOUT);
    let options = adjust(config.into_options());
    let failed = |source| Failure::Connect {
        target: target.clone(),
        from_env: connection.database_url.is_none(),
        source,
    };
    let probe = tokio::time::timeout(timeout, options.connect())
        .await
        .map_err(|_| failed(sqlx::Error::Io(std::io::ErrorKind::TimedOut.into())))?
        .map_err(failed)?;
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(timeout)
        // sqlx pings every connection it hands out by default: a round trip before each query.
        // A connection a restart killed fails its query instead, which the worker retries and
        // a signup reports as Unavailable.
        .test_before_acquire(false)
        .connect_lazy_with(options);
    // Hand the probe to nobody: closing it keeps the pool's connection count honest.
    let _ = probe.close().await;
    Ok(pool)
}

fn parse_url(url: &str, which: &'static str) -> Result<ConnectConfig, Failure> {
    // The parse error never repeats the URL, so no password reaches the terminal or the logs.
    ConnectConfig::parse(url).map_err(|source| Failure::BadUrl { which, source })
}

async fn migrate(connection: &ConnectionArgs, json: bool) -> Result<(), Failure> {
    let pool = connection.pool(1).await?;
    let pending: Vec<i64> = match ackloop::check_schema(&pool).await {
        Ok(()) => Vec::new(),
        Err(ackloop::SchemaError::Behind { missing }) => missing,
        Err(_) => ackloop::MIGRATOR
            .iter()
            .map(|migration| migration.version)
            .collect(),
    };
    ackloop::run_migrations(&pool).await?;
    let latest = ackloop::MIGRATOR.iter().map(|migration| migration.version).max();
    if json {
        println!("{}", json!({ "applied": pending, "latest": latest }));
    } else if pending.is_empty() {
        println!("schema up to date (migration {})", latest.unwrap_or_default());
    } else {
        println!(
            "applied {} migration(s); schema at {}",
            pending.len(),
            latest.unwrap_or_default()
        );
    }
    Ok(())
}

async fn signup(
    connection: &ConnectionArgs,
    email: String,
    display_name: String,
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    // Validate before connecting: bad input is reported the same with or without a database.
    let new_user = NewUser::new(email, display_name).map_err(SignupError::from)?;
    let pool = connection.migrated_pool(2).await?;
    let signups = connection.signups(pool).await?;
    let started = Instant::now();
    let player = signups.create_user_and_await_player(&new_user, timeout).await?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    if json {
        println!("{}", json!({ "player": player, "elapsed_ms": elapsed_ms }));
    } else {
        println!(
            "player {} ({:?}) created for user {}, confirmed in {elapsed_ms:.1} ms",
            player.id, player.display_name, player.user_id
        );
    }
    Ok(())
}

async fn worker(
    connection: &ConnectionArgs,
    config: WorkerConfig,
    metrics_addr: Option<std::net::SocketAddr>,
) -> Result<(), Failure> {
    let connections = u32::try_from(config.concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    // Handlers first, before the first await: a SIGTERM that arrives while the worker connects
    // must stop it cleanly, not kill it with the default action.
    let shutdown = CancellationToken::new();
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(interrupt), Ok(terminate)) => {
            tokio::spawn(cancel_on_signal(
                interrupt,
                terminate,
                shutdown.clone(),
                config.shutdown_timeout,
            ));
        }
        _ => tracing::error!("cannot install signal handlers; stop the worker with SIGKILL"),
    }
    // Start-up steps end at the first signal too (a server that does not answer, a schema check
    // behind a lock): there is nothing to drain yet.
    let started = async {
        let pool = connect(connection, ackloop::worker_session_options, connections).await?;
        ackloop::check_schema(&pool).await?;
        Ok::<_, Failure>(pool)
    };
    let pool = tokio::select! {
        pool = started => pool?,
        () = shutdown.cancelled() => {
            tracing::info!("worker stopped before it started");
            return Ok(());
        }
    };
    if let Some(addr) = metrics_addr {
        serve_metrics(addr, &pool, &shutdown).await?;
    }
    Worker::new(pool, config).run(shutdown).await?;
    Ok(())
}

/// How long past `--shutdown-timeout` the process may take to exit after the first signal.
const SHUTDOWN_EXIT_MARGIN: Duration = Duration::from_secs(1);

/// How often the metrics endpoint's queue gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

async fn serve_metrics(
    addr: std::net::SocketAddr,
    pool: &PgPool,
    shutdown: &CancellationToken,
) -> Result<(), Failure> {
    let metrics = ackloop::MetricsHandle::install().map_err(Failure::Metrics)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Failure::MetricsAddr { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %bound, "serving metrics at /metrics and health at /healthz");
    tokio::spawn(metrics.serve(listener, pool.clone(), shutdown.clone()));
    tokio::spawn(ackloop::sample_queue_gauges(
        pool.clone(),
        GAUGE_INTERVAL,
        shutdown.clone(),
    ));
    Ok(())
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM (the worker drains in-flight jobs), and
/// exits at once on the second (in-flight transactions roll back; their jobs stay pending).
/// Whatever the worker is doing when the first signal comes (connecting to a server that does
/// not answer, checking a schema behind a lock, draining), the process is gone within
/// `shutdown_timeout` plus a second: nothing it holds is lost by exiting, since a transaction
/// cut off rolls back and its jobs are pending again.
async fn cancel_on_signal(
    mut interrupt: tokio::signal::unix::Signal,
    mut terminate: tokio::signal::unix::Signal,
    shutdown: CancellationToken,
    shutdown_timeout: Duration,
) {
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down: finishing in-flight jobs (signal again to exit now)");
    shutdown.cancel();
    tokio::spawn(async move {
        tokio::time::sleep(shutdown_timeout + SHUTDOWN_EXIT_MARGIN).await;
        tracing::warn!("shutdown timeout passed; exiting now (unfinished transactions roll back)");
        std::process::exit(0);
    });
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    tracing::warn!("second signal: exiting now; in-flight jobs roll back and stay pending");
    std::process::exit(130);
}

async fn status(connection: &ConnectionArgs, json: bool) -> Result<(), Failure> {
    let pool = connection.migrated_pool(1).await?;
    let report = StatusReport::read(&pool).await.map_err(Failure::Query)?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("a status report always serialises")
        );
        return Ok(());
    }
    println!("{:<8} {:>10}", "pending", report.pending);
    println!("{:<8} {:>10}", "done", report.done);
    println!("{:<8} {:>10}", "failed", report.failed);
    match report.oldest_pending_secs {
        Some(secs) => println!("oldest pending job: {secs:.1}s old"),
        None => println!("oldest pending job: none"),
    }
    if !report.recent_failures.is_empty() {
        println!("\nrecent failures:");
        for failure in &report.recent_failures {
            println!(
                "  {}  user {}  {} attempts  {}",
                failure.job_id,
                failure.user_id,
                failure.attempts,
                failure.last_error.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(())
}

async fn await_player(
    connection: &ConnectionArgs,
    job_id: Option<ackloop::JobId>,
    email: Option<String>,
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let pool = connection.migrated_pool(2).await?;
    let job_id = match (job_id, email) {
        (Some(job_id), _) => job_id,
        (None, Some(email)) => admin::find_job_by_email(&pool, &email).await?,
        (None, None) => unreachable!("clap requires a job id or --email"),
    };
    let signups = connection.signups(pool).await?;
    let started = Instant::now();
    let player = signups.await_player(job_id, timeout).await?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    if json {
        println!(
            "{}",
            json!({ "player": player, "job_id": job_id, "elapsed_ms": elapsed_ms })
        );
    } else {
        println!(
            "player {} ({:?}) of user {} exists (job {job_id}), confirmed in {elapsed_ms:.1} ms",
            player.id, player.display_name, player.user_id
        );
    }
    Ok(())
}

async fn jobs(connection: &ConnectionArgs, command: JobsCommand) -> Result<(), Failure> {
    let pool = connection.migrated_pool(1).await?;
    match command {
        JobsCommand::Show { job_id, json } => {
            let job = admin::job_details(&pool, job_id).await?;
            if json {
                println!("{}", serde_json::to_string(&job).expect("job details serialise"));
                return Ok(());
            }
            for (name, value) in job_rows(&job) {
                println!("{name:<11} {value}");
            }
        }
        JobsCommand::Retry {
            job_id, repair, json, ..
        } => {
            let channels = connection.channels()?;
            let jobs = match (repair, job_id) {
                (false, Some(job_id)) => {
                    admin::retry_failed_job(&pool, &channels, job_id).await?;
                    vec![job_id]
                }
                (false, None) => admin::retry_all_failed_jobs(&pool, &channels).await?,
                (true, Some(job_id)) => {
                    admin::repair_job(&pool, &channels, job_id).await?;
                    vec![job_id]
                }
                (true, None) => admin::repair_all_missing_players(&pool, &channels).await?,
            };
            let (key, what) = if repair {
                ("repaired", "done job(s) without a player")
            } else {
                ("retried", "failed job(s)")
            };
            if json {
                println!("{}", json!({ key: jobs }));
            } else {
                println!("{} {what} put back to pending", jobs.len());
                for job_id in &jobs {
                    println!("  {job_id}");
                }
            }
        }
        JobsCommand::Prune {
            older_than,
            dry_run,
            json,
        } => {
            let (count, verb) = if dry_run {
                let count = admin::count_prunable_jobs(&pool, older_than).await?;
                (u64::try_from(count).unwrap_or_default(), "would delete")
            } else {
                (admin::prune_finished_jobs(&pool, older_than).await?, "deleted")
            };
            if json {
                println!("{}", json!({ "dry_run": dry_run, "jobs": count }));
            } else {
                println!("{verb} {count} finished job(s) older than {older_than:?}");
            }
        }
    }
    Ok(())
}

/// `jobs show`'s lines: a name and a value each, with a "problem" line when the job is done but
/// its player is missing.
fn job_rows(job: &admin::JobDetails) -> Vec<(&'static str, String)> {
    let time = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut rows = vec![
        ("job", job.job_id.to_string()),
        ("status", job.status.to_string()),
        ("user", format!("{} ({})", job.user_id, job.email)),
        (
            "player",
            job.player_id
                .map_or_else(|| "none".to_owned(), |id| id.to_string()),
        ),
    ];
    if job.player_missing {
        rows.push((
            "problem",
            format!(
                "done but its player is missing (deleted or restored without it); repair with: ackloop jobs retry --repair {}",
                job.job_id
            ),
        ));
    }
    rows.extend([
        ("attempts", job.attempts.to_string()),
        (
            "last error",
            job.last_error.clone().unwrap_or_else(|| "-".to_owned()),
        ),
        ("created", time(job.created_at)),
        ("updated", time(job.updated_at)),
        ("run after", time(job.run_after)),
        ("completed", job.completed_at.map_or_else(|| "-".to_owned(), time)),
    ]);
    rows
}

async fn doctor(connection: &ConnectionArgs, stale_after: Duration, json: bool) -> Result<(), Failure> {
    let pool = connection.pool(2).await?;
    let listen_options = match connection.listen_options()? {
        Some(options) => options,
        None => connection.connect_options()?,
    };
    let checks = admin::diagnose(&pool, listen_options, stale_after).await;
    let problems = checks.iter().filter(|check| !check.ok).count();
    if json {
        println!("{}", json!({ "ok": problems == 0, "checks": checks }));
    } else {
        let width = checks
            .iter()
            .map(|check| check.name.len())
            .max()
            .unwrap_or_default();
        for check in &checks {
            println!(
                "{:<4} {:<width$} {}",
                if check.ok { "ok" } else { "FAIL" },
                check.name,
                check.detail
            );
            if let Some(fix) = &check.fix {
                println!("{:<4} {:<width$} fix: {fix}", "", "");
            }
        }
    }
    if problems == 0 {
        Ok(())
    } else {
        Err(Failure::Doctor(problems))
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

    fn done_job(player_id: Option<ackloop::PlayerId>) -> admin::JobDetails {
        let now = chrono::Utc::now();
        admin::JobDetails {
            job_id: ackloop::JobId::new(),
            user_id: ackloop::UserId::from(1),
            email: "ada@example.com".to_owned(),
            status: ackloop::JobStatus::Done,
            attempts: 1,
            last_error: None,
            run_after: now,
            created_at: now,
            updated_at: now,
            completed_at: Some(now),
            player_id,
            player_missing: player_id.is_none(),
        }
    }

    #[test]
    fn jobs_show_names_a_missing_player_as_a_problem_with_its_repair() {
        let healthy = job_rows(&done_job(Some(ackloop::PlayerId::from(9))));
        assert!(healthy.iter().all(|(name, _)| *name != "problem"), "{healthy:?}");

        let job = done_job(None);
        let rows = job_rows(&job);
        let problem = rows
            .iter()
            .find(|(name, _)| *name == "problem")
            .map(|(_, value)| value.as_str());
        let repair = format!("ackloop jobs retry --repair {}", job.job_id);
        assert!(
            problem.is_some_and(|text| text.contains("player is missing") && text.ends_with(&repair)),
            "{rows:?}"
        );
    }
}
