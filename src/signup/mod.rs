//! The auth side: validate a signup, write the user and its job in one transaction, and wait for
//! the worker's confirmation.
//!
//! This file is the side's public face ([`Signups`], [`create_user`], [`SignupsConfig`],
//! [`Signup`], and the re-exported error and input types) and the write-and-wait flow. How one
//! signup's write is retried, and resolved when its answer is lost, is argued in `attempts/`. Its
//! children, with the arrows pointing down only:
//!
//! ```text
//! signup/mod.rs ─┬─▶ error.rs    SignupError, the classifier  ─▶ input, job, store
//!                ├─▶ attempts/   one signup's write, retried  ─▶ error, input, grouping, job, store
//!                ├─▶ grouping/   grouped commits, each signup's turn ─▶ input, job, store, channel
//!                ├─▶ confirm/    waiters, the LISTEN on done, the last looks ─▶ input, job, store,
//!                │                                               channel, listen, connect, telemetry
//!                └─▶ input.rs    NewUser, Player, the rules   ─▶ job (the side's leaf)
//! ```
//!
//! No child imports `signup` itself; the siblings children use (`input`, `error`, `grouping`) use
//! no sibling but `input`.

mod attempts;
mod confirm;
mod error;
mod grouping;
mod input;

use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{PgConnection, PgPool};
use tokio::time::Instant;

use self::attempts::{Key, Written, write};
use self::confirm::{Checked, Confirmations, Outcome, Source};
pub use self::error::SignupError;
use self::error::classify;
use self::grouping::Writers;
pub use self::input::{
    Confirmed, Field, InvalidInput, MAX_DISPLAY_NAME_CHARS, MAX_EMAIL_CHARS, NewJob, NewUser, Player, Rule,
};
use crate::channel::Channels;
use crate::job::{ANSWER_MARGIN, JobId, UserId};
use crate::listen::ListenTarget;
use crate::store;

/// A committed signup: the user and the job that will create its player.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Signup {
    /// The new user.
    pub user_id: UserId,
    /// The job creating the user's player; wait on it with [`Signups::await_player`].
    pub job_id: JobId,
}

/// Writes a validated signup on `conn`: the user, its job, and the wake-up for the workers.
///
/// On a plain connection this is its own transaction. Inside your own transaction (pass
/// `&mut *tx`), everything, the wake-up included, happens when you commit, and nothing if you
/// roll back. Then wait for the player with [`Signups::await_player`].
///
/// # Errors
/// [`SignupError::EmailTaken`], [`SignupError::Unavailable`] or [`SignupError::Database`]; the
/// statement is atomic, so on any error nothing was written. Inside a `REPEATABLE READ` or
/// `SERIALIZABLE` transaction, an email taken by a transaction that committed after yours
/// began is a serialization failure (SQLSTATE 40001, [`SignupError::Database`]): retry your
/// transaction, which then sees the email taken.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use ackloop::{Channels, NewUser, create_user};
///
/// let mut tx = pool.begin().await?;
/// // ... the auth service's own writes ...
/// let signup = create_user(&mut *tx, &Channels::default(), &NewUser::new("ada@example.com", "Ada")?).await?;
/// tx.commit().await?;
/// println!("job {} will create the player of user {}", signup.job_id, signup.user_id);
/// # Ok(()) }
/// ```
pub async fn create_user(
    conn: &mut PgConnection,
    channels: &Channels,
    new_user: &NewUser,
) -> Result<Signup, SignupError> {
    let job_id = JobId::new();
    let user_id = store::insert_user_and_job(
        conn,
        new_user.email(),
        new_user.display_name(),
        job_id,
        &channels.jobs,
        None,
    )
    .await
    .map_err(|err| classify(err, Some(job_id)))?;
    Ok(Signup { user_id, job_id })
}

/// Adds the player-creation job of a user of your own service on `conn`, with the wake-up for
/// the workers: call it inside the transaction that writes your user, so the job exists exactly
/// when the user does. Returns the job id (the job's key, or a new one); after your commit, wait
/// for the player service's answer with [`Signups::await_job`].
///
/// On a plain connection this is its own transaction. Inside your own transaction (pass
/// `&mut *tx`), the job and its wake-up happen when you commit, and nothing if you roll back.
///
/// # Errors
/// [`SignupError::UserHasJob`] (this user has a job already), [`SignupError::KeyReused`] (the
/// key was given with other data), [`SignupError::Unavailable`] or [`SignupError::Database`];
/// on any error this call wrote nothing (and your transaction is aborted: roll it back).
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, signups: ackloop::Signups) -> Result<(), Box<dyn std::error::Error>> {
/// use ackloop::{Channels, NewJob, add_job};
///
/// let account = uuid::Uuid::now_v7();
/// let mut tx = pool.begin().await?;
/// sqlx::query("insert into accounts (id, email) values ($1, $2)")
///     .bind(account)
///     .bind("ada@example.com")
///     .execute(&mut *tx)
///     .await?;
/// let job_id = add_job(&mut *tx, &Channels::default(), &NewJob::new(account, "Ada")?).await?;
/// tx.commit().await?;
/// let confirmed = signups.await_job(job_id, std::time::Duration::from_secs(5)).await?;
/// println!("player {} for account {account}", confirmed.player_id);
/// # Ok(()) }
/// ```
pub async fn add_job(
    conn: &mut PgConnection,
    channels: &Channels,
    job: &NewJob,
) -> Result<JobId, SignupError> {
    let job_id = job.key().unwrap_or_default();
    store::add_job(
        conn,
        job.user_id(),
        job.display_name(),
        job.extra(),
        job_id,
        &channels.jobs,
        None,
    )
    .await
    .map_err(|err| classify(err, Some(job_id)))
}

/// Options for [`Signups::connect_with`].
#[derive(Debug, Clone)]
pub struct SignupsConfig {
    /// The channels shared with the workers.
    pub channels: Channels,
    /// Where the confirmation listener connects, when the pool's server is not right for LISTEN
    /// (a transaction-mode pgbouncer, say). Defaults to the pool's own connect options.
    pub listen_options: Option<PgConnectOptions>,
    /// Tasks writing signups, each with at most one statement in flight (and so one pool
    /// connection). Concurrent signups queued at the same moment share one transaction: fewer
    /// commits, which is what bounds throughput. Two let one batch form while another commits:
    /// while a statement is in flight, the next writer keeps gathering signups (up to 2 ms, and
    /// never closer than 1 ms to a deadline) until it ends; with none in flight (or one writer),
    /// a signup is written at once.
    pub writers: usize,
    /// The most signups written in one transaction.
    pub max_batch: usize,
    /// `Some(interval)`: do not LISTEN at all (for a connection that cannot carry it, such as a
    /// transaction-mode pgbouncer with no direct route); instead look at every waiting signup's
    /// job in the tables at this interval. Each signup then waits up to one interval longer.
    pub poll_only: Option<std::time::Duration>,
}

impl Default for SignupsConfig {
    fn default() -> Self {
        Self {
            channels: Channels::default(),
            listen_options: None,
            writers: 2,
            max_batch: 64,
            poll_only: None,
        }
    }
}

/// The auth side's handle: signs users up and waits for their players.
///
/// Make one per process and share it (it is cheap to borrow from many tasks): it holds the one
/// LISTEN connection through which every caller in the process is confirmed.
pub struct Signups {
    pool: PgPool,
    channels: Channels,
    writers: Writers,
    confirmations: Confirmations,
}

impl Signups {
    /// Starts listening for confirmations on the default channels, through a connection of its
    /// own made with the pool's connect options.
    ///
    /// Build the pool with `test_before_acquire(false)`: sqlx otherwise pings each connection
    /// before handing it out, a round trip before every query (a lone signup takes 1.06 ms
    /// instead of 1.27 ms on a local socket, 5 ms instead of 9 ms across a 1 ms network). The
    /// price: after a server restart, a dead pooled connection fails one signup with
    /// [`SignupError::Unavailable`] instead of being replaced unseen.
    ///
    /// A server that cannot be reached yet (down, restarting, failing over while the service
    /// starts) is no error: the listener keeps trying in the background, waiting callers check
    /// the tables meanwhile, and each call retries its writes until its own timeout.
    ///
    /// # Errors
    /// [`SignupError::Database`] (or [`SignupError::Unavailable`] for TLS) when the server
    /// refuses the listener's connection for good
    /// (a wrong password, an unknown database, TLS refused: see [`crate::is_refusal`]).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use ackloop::{NewUser, Signups};
    ///
    /// let pool = sqlx::PgPool::connect("postgres://localhost/app").await?;
    /// let signups = Signups::connect(pool).await?;
    /// let user = NewUser::new("ada@example.com", "Ada")?;
    /// let player = signups.create_user_and_await_player(&user, Duration::from_secs(5)).await?;
    /// println!("player {} is ready", player.id);
    /// # Ok(()) }
    /// ```
    pub async fn connect(pool: PgPool) -> Result<Self, SignupError> {
        Self::connect_with(pool, SignupsConfig::default()).await
    }

    /// Like [`Signups::connect`], with channels and a listener connection of your choosing.
    ///
    /// # Errors
    /// As [`Signups::connect`].
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool, direct: sqlx::postgres::PgConnectOptions) -> Result<(), ackloop::SignupError> {
    /// use ackloop::{Signups, SignupsConfig};
    ///
    /// // The pool goes through pgbouncer; the listener connects to the server directly.
    /// let config = SignupsConfig { listen_options: Some(direct), ..SignupsConfig::default() };
    /// let signups = Signups::connect_with(pool, config).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_with(pool: PgPool, config: SignupsConfig) -> Result<Self, SignupError> {
        let source = match config.poll_only {
            Some(interval) => Source::Poll(interval),
            None => Source::Listen(Box::new(match config.listen_options {
                Some(options) => ListenTarget::Fixed(Box::new(options)),
                // Wherever the pool goes, across a failover too.
                None => ListenTarget::Pool(pool.clone()),
            })),
        };
        let confirmations = Confirmations::start(pool.clone(), config.channels.done.clone(), source)
            .await
            .map_err(|err| classify(err, None))?;
        let writers = Writers::start(
            pool.clone(),
            config.channels.clone(),
            config.writers,
            config.max_batch,
        );
        Ok(Self {
            pool,
            channels: config.channels,
            writers,
            confirmations,
        })
    }

    /// The pool this handle writes through.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The channels this handle uses.
    pub fn channels(&self) -> &Channels {
        &self.channels
    }

    /// Signs a user up and returns their player once a worker has created it.
    ///
    /// The user and the job commit together or not at all (in one transaction, which
    /// concurrent signups from this handle may share; see [`SignupsConfig::writers`]), and the
    /// workers' wake-up follows the commit, in the same round trip. Then the call waits, up to `timeout`, for the worker's
    /// confirmation, which it checks against the tables.
    ///
    /// # Errors
    /// - [`SignupError::Invalid`] is not returned here: [`NewUser::new`] validated the input.
    /// - [`SignupError::EmailTaken`]: nothing was written.
    /// - [`SignupError::TimedOut`]: the user and job are committed and the job will complete;
    ///   wait again with [`Signups::await_player`].
    /// - [`SignupError::JobFailed`]: the worker gave up on the job; the user exists.
    /// - [`SignupError::Unavailable`], [`SignupError::Database`].
    ///
    /// ```no_run
    /// # async fn demo(signups: ackloop::Signups) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use ackloop::{NewUser, SignupError};
    ///
    /// let user = NewUser::new("ada@example.com", "Ada")?;
    /// match signups.create_user_and_await_player(&user, Duration::from_secs(5)).await {
    ///     Ok(player) => println!("player {}", player.id),
    ///     Err(SignupError::TimedOut { job_id, .. }) => println!("accepted; job {job_id} pending"),
    ///     Err(err) => return Err(err.into()),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn create_user_and_await_player(
        &self,
        new_user: &NewUser,
        timeout: Duration,
    ) -> Result<Player, SignupError> {
        self.sign_up_and_wait(new_user, JobId::new(), Key::None, timeout)
            .await
    }

    /// Like [`Signups::create_user_and_await_player`], made safe to repeat: `key`, an
    /// idempotency key the caller chose (a UUID, such as an HTTP request's `Idempotency-Key`),
    /// becomes the job's id. Sent again with the same email and display name, after a timeout, a
    /// cancelled call or a crash, it writes nothing and answers with the first signup's outcome:
    /// its player, its pending job or its failure, instead of [`SignupError::EmailTaken`].
    ///
    /// A key is remembered as long as its job's row is kept (`ackloop jobs prune` deletes finished
    /// jobs past their retention); keys are shared by every caller of the database, so make them
    /// random (UUIDv4 or v7), never derived from the input.
    ///
    /// # Errors
    /// As [`Signups::create_user_and_await_player`], and [`SignupError::KeyReused`] when the key
    /// belongs to a signup with another email or display name (nothing was written).
    ///
    /// ```no_run
    /// # async fn demo(signups: ackloop::Signups) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use ackloop::{JobId, NewUser};
    ///
    /// let user = NewUser::new("ada@example.com", "Ada")?;
    /// let key = JobId::new(); // kept by the client, and sent again on a retry
    /// let first = signups.create_user_and_await_player_with_key(&user, key, Duration::from_secs(5)).await;
    /// let again = signups.create_user_and_await_player_with_key(&user, key, Duration::from_secs(5)).await?;
    /// assert_eq!(first?.id, again.id);
    /// # Ok(()) }
    /// ```
    pub async fn create_user_and_await_player_with_key(
        &self,
        new_user: &NewUser,
        key: JobId,
        timeout: Duration,
    ) -> Result<Player, SignupError> {
        self.sign_up_and_wait(new_user, key, Key::Caller, timeout).await
    }

    async fn sign_up_and_wait(
        &self,
        new_user: &NewUser,
        job_id: JobId,
        key: Key,
        timeout: Duration,
    ) -> Result<Player, SignupError> {
        let started = Instant::now();
        let deadline = started + timeout;
        // Registered before the commit, so the confirmation cannot arrive before anyone waits.
        let waiter = self.confirmations.register(job_id);
        let (user_id, written) = write(&self.writers, &self.pool, new_user, job_id, key, deadline).await?;
        let committed = started.elapsed();
        // Committed: from here on, whatever happens, the caller gets the job id.
        let checked = match written {
            Written::Now => waiter.outcome(deadline).await,
            // Written by an earlier call, whose confirmation this waiter may have missed: the
            // tables first, as `await_player` does.
            Written::Earlier => match Box::pin(waiter.check(deadline + ANSWER_MARGIN)).await {
                Ok(Checked::Pending) => waiter.outcome(deadline).await,
                Ok(checked) => checked,
                // Out of time, or the look failed: the waiter's own final look decides.
                Err(_) => waiter.outcome(deadline).await,
            },
        };
        tracing::debug!(
            job.id = %job_id,
            user.id = %user_id,
            commit_us = committed.as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64,
            "signup finished"
        );
        finish(job_id, Some(user_id), checked, started).and_then(builtin_player)
    }

    /// Waits, up to `timeout`, for the player of a signup that is already committed: one whose
    /// first wait timed out, or one written with [`create_user`] inside your own transaction.
    ///
    /// # Errors
    /// [`SignupError::UnknownJob`], [`SignupError::TimedOut`], [`SignupError::JobFailed`],
    /// [`SignupError::Unavailable`], [`SignupError::Database`].
    ///
    /// ```no_run
    /// # async fn demo(signups: ackloop::Signups, job_id: ackloop::JobId) -> Result<(), ackloop::SignupError> {
    /// let player = signups.await_player(job_id, std::time::Duration::from_secs(30)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn await_player(&self, job_id: JobId, timeout: Duration) -> Result<Player, SignupError> {
        self.await_job(job_id, timeout).await.and_then(builtin_player)
    }

    /// Waits, up to `timeout`, for the player service's answer to a committed job: one added with
    /// [`add_job`] in your own transaction, or one whose first wait timed out. The answer is read
    /// from ackloop's job table: the player's id in the service's table and its handler's result.
    ///
    /// # Errors
    /// [`SignupError::UnknownJob`], [`SignupError::TimedOut`], [`SignupError::JobFailed`],
    /// [`SignupError::Unavailable`], [`SignupError::Database`].
    ///
    /// ```no_run
    /// # async fn demo(signups: ackloop::Signups, job_id: ackloop::JobId) -> Result<(), ackloop::SignupError> {
    /// let confirmed = signups.await_job(job_id, std::time::Duration::from_secs(30)).await?;
    /// println!("player {}: {}", confirmed.player_id, confirmed.result);
    /// # Ok(()) }
    /// ```
    pub async fn await_job(&self, job_id: JobId, timeout: Duration) -> Result<Confirmed, SignupError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let waiter = self.confirmations.register(job_id);
        // Registered first, then checked: a job finished before registration is seen here, one
        // finished after it is delivered to the waiter.
        match Box::pin(waiter.check(deadline + ANSWER_MARGIN)).await {
            // A zero timeout asks how the job stands, not for a wait: a pending job is the
            // answer, not a caller that gave up.
            Ok(Checked::Pending) if timeout.is_zero() => {
                return Err(SignupError::TimedOut {
                    job_id,
                    user_id: None,
                    waited: started.elapsed(),
                });
            }
            Ok(Checked::Pending) => {}
            Ok(checked) => return finish(job_id, None, checked, started),
            // Out of time: the job may well be there, and still complete.
            Err(_) if Instant::now() >= deadline => {
                return finish(job_id, None, Checked::Pending, started);
            }
            // The job may well exist: whatever went wrong, the caller keeps its id.
            Err(source) => {
                return Err(SignupError::Unavailable {
                    job_id: Some(job_id),
                    source,
                });
            }
        }
        let checked = waiter.outcome(deadline).await;
        finish(job_id, None, checked, started)
    }
}

/// The built-in player a signup on the built-in tables was answered with.
fn builtin_player(confirmed: Confirmed) -> Result<Player, SignupError> {
    Player::from_builtin(&confirmed).ok_or_else(|| SignupError::JobFailed {
        job_id: confirmed.job_id,
        reason: "the job was answered by a player service's own handler, not with a built-in \
                 player: wait on it with Signups::await_job"
            .to_owned(),
    })
}

fn finish(
    job_id: JobId,
    user_id: Option<UserId>,
    checked: Checked,
    started: Instant,
) -> Result<Confirmed, SignupError> {
    match checked {
        Checked::Finished(Outcome::Done(confirmed)) => Ok(confirmed),
        Checked::Finished(Outcome::Failed(reason)) => Err(SignupError::JobFailed { job_id, reason }),
        Checked::Pending => {
            ::metrics::counter!(crate::telemetry::CALLER_TIMEOUTS).increment(1);
            Err(SignupError::TimedOut {
                job_id,
                user_id,
                waited: started.elapsed(),
            })
        }
        Checked::Missing => Err(SignupError::UnknownJob(job_id)),
    }
}
