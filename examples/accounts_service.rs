//! The accounts (auth) service of a pair that existed before ackloop: it owns `users (id uuid,
//! email, password_hash, …)`, and signing up now also hands "create this account's player" to
//! the game service, and waits for the answer. See `examples/existing_services/README.md`.
//!
//! ```sh
//! DATABASE_URL=postgres://… cargo run --example accounts_service -- ada@example.com Ada
//! ```
//! (with `cargo run --example game_service` running beside it).

use std::time::Duration;

use ackloop::{Confirmed, JobId, NewJob, SignupError, Signups};
use sqlx::PgPool;

/// What a signup returns: the account, and the game service's answer (or the job still on its
/// way, when the wait ran out: the player will exist; ask again with `Signups::await_job`).
#[derive(Debug)]
pub struct SignedUp {
    /// The new account's id.
    pub account_id: uuid::Uuid,
    /// The player-creation job.
    pub job_id: JobId,
    /// The game service's answer: its player id and result. `None` when the wait timed out.
    pub player: Option<Confirmed>,
}

/// Why a signup wrote nothing, or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum SignupFailed {
    /// The email is taken (the service's own unique constraint); nothing was written.
    #[error("email already registered")]
    EmailTaken,
    /// The input broke one of ackloop's rules for the job (the nickname); nothing was written.
    #[error(transparent)]
    Invalid(#[from] ackloop::InvalidInput),
    /// The account was created but its player could not be (the game service said why).
    #[error(transparent)]
    Player(SignupError),
    /// The database failed; nothing was written.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// ackloop refused the job (the database is unreachable, say); nothing was written.
    #[error(transparent)]
    Job(SignupError),
}

/// Signs an account up: the account row and its player-creation job in ONE transaction of this
/// service's own, so the job exists exactly when the account does; then waits up to `timeout`
/// for the game service's answer.
pub async fn sign_up(
    pool: &PgPool,
    signups: &Signups,
    email: &str,
    password_hash: &str,
    nickname: &str,
    timeout: Duration,
) -> Result<SignedUp, SignupFailed> {
    // Checked before anything is written.
    let account_id = uuid::Uuid::now_v7();
    let job = NewJob::new(account_id, nickname)?;

    let mut tx = pool.begin().await?;
    let inserted = sqlx::query("insert into users (id, email, password_hash) values ($1, $2, $3)")
        .bind(account_id)
        .bind(email)
        .bind(password_hash)
        .execute(&mut *tx)
        .await;
    match inserted {
        Err(err)
            if err
                .as_database_error()
                .is_some_and(|db| db.constraint() == Some("users_email_key")) =>
        {
            return Err(SignupFailed::EmailTaken);
        }
        other => other?,
    };
    let job_id = ackloop::add_job(&mut tx, signups.channels(), &job)
        .await
        .map_err(SignupFailed::Job)?;
    tx.commit().await?;

    // Committed: from here on the caller always gets the account and the job id.
    match signups.await_job(job_id, timeout).await {
        Ok(player) => Ok(SignedUp {
            account_id,
            job_id,
            player: Some(player),
        }),
        Err(SignupError::TimedOut { .. }) => Ok(SignedUp {
            account_id,
            job_id,
            player: None,
        }),
        Err(err) => Err(SignupFailed::Player(err)),
    }
}

/// Applies ackloop's migrations (its own schema, `ackloop`), then this service's own.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    ackloop::run_migrations(pool).await?;
    let mut own = sqlx::migrate!("examples/existing_services/accounts_migrations");
    // Its own record: `migrate!` takes ackloop's sqlx.toml settings in this crate.
    own.dangerous_set_table_name("accounts_migrations");
    own.create_schemas = std::borrow::Cow::Borrowed(&[]);
    own.run(pool).await
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(email), Some(nickname)) = (args.next(), args.next()) else {
        return Err("usage: accounts_service EMAIL NICKNAME".into());
    };
    let pool = PgPool::connect(&std::env::var("DATABASE_URL")?).await?;
    migrate(&pool).await?;
    let signups = Signups::connect(pool.clone()).await?;
    let signed_up = sign_up(
        &pool,
        &signups,
        &email,
        "argon2id:…",
        &nickname,
        Duration::from_secs(10),
    )
    .await?;
    match signed_up.player {
        Some(player) => println!(
            "account {} has player {} ({})",
            signed_up.account_id, player.player_id, player.result
        ),
        None => println!(
            "account {} created; its player is on its way (job {})",
            signed_up.account_id, signed_up.job_id
        ),
    }
    Ok(())
}
