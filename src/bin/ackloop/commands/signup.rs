//! `ackloop signup` and `ackloop await`: sign a user up, or wait for a committed signup, until
//! its player exists.

use std::time::{Duration, Instant};

use ackloop::{NewUser, SignupError};
use serde_json::json;

use crate::args::ConnectionArgs;
use crate::exit::Failure;

pub(super) async fn signup(
    connection: &ConnectionArgs,
    email: String,
    display_name: String,
    timeout: Duration,
    idempotency_key: Option<ackloop::JobId>,
    json: bool,
) -> Result<(), Failure> {
    // Validate before connecting: bad input is reported the same with or without a database.
    let new_user = NewUser::new(email, display_name).map_err(SignupError::from)?;
    // The timeout bounds the whole call: a server that is down or restarting while this starts
    // is tried again until then, and the signup gets what is left.
    let started = Instant::now();
    let pool = connection
        .migrated_pool(2, connection.patience_for(timeout)?)
        .await?;
    let signups = connection.signups(pool).await?;
    let left = timeout.saturating_sub(started.elapsed());
    // Start-up (a server away or slow to answer) took all the time: not a busy writer.
    if left.is_zero() && !timeout.is_zero() {
        return Err(SignupError::Unavailable {
            job_id: None,
            source: sqlx::Error::PoolTimedOut,
        }
        .into());
    }
    let player = match idempotency_key {
        Some(key) => {
            signups
                .create_user_and_await_player_with_key(&new_user, key, left)
                .await?
        }
        None => signups.create_user_and_await_player(&new_user, left).await?,
    };
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

pub(super) async fn await_player(
    connection: &ConnectionArgs,
    job_id: Option<ackloop::JobId>,
    email: Option<String>,
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let started = Instant::now();
    let pool = connection
        .migrated_pool(2, connection.patience_for(timeout)?)
        .await?;
    let job_id = match (job_id, email) {
        (Some(job_id), _) => job_id,
        // Within the command's timeout too (at least a second, as start-up's first try).
        (None, Some(email)) => {
            let left = timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_secs(1));
            tokio::time::timeout(left, ackloop::admin::find_job_by_email(&pool, &email))
                .await
                .map_err(|_| Failure::Query(sqlx::Error::PoolTimedOut))??
        }
        (None, None) => unreachable!("clap requires a job id or --email"),
    };
    let signups = connection.signups(pool).await?;
    let player = signups
        .await_player(job_id, timeout.saturating_sub(started.elapsed()))
        .await?;
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
