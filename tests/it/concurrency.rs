//! Many callers, several workers, two signup "processes": everyone confirmed, one player each.

use std::sync::Arc;

use ackloop::{Signups, WorkerConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::task::JoinSet;

use crate::common::*;

const SIGNUPS: usize = 300;
const CALLERS: usize = 32;

#[sqlx::test]
async fn concurrent_signups_with_several_workers_give_every_user_exactly_one_player(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 16).await;
    let small_batches = WorkerConfig {
        batch_size: 4,
        ..worker_config()
    };
    let workers: Vec<_> = (0..3)
        .map(|_| spawn_worker(&pool, small_batches.clone()))
        .collect();
    // Two handles stand for two auth processes: each has its own listener, and each must route
    // only its own callers' confirmations.
    let handles: [Arc<Signups>; 2] = [Arc::new(signups(&pool).await), Arc::new(signups(&pool).await)];

    let mut callers = JoinSet::new();
    for caller in 0..CALLERS {
        let signups = Arc::clone(&handles[caller % 2]);
        callers.spawn(async move {
            let mut players = Vec::new();
            for n in (caller..SIGNUPS).step_by(CALLERS) {
                let player = signups
                    .create_user_and_await_player(&user(n), DEADLINE)
                    .await
                    .unwrap_or_else(|err| panic!("signup {n} not confirmed: {err}"));
                assert_eq!(
                    player.display_name,
                    format!("Player {n}"),
                    "a caller got someone else's player"
                );
                players.push(player.id);
            }
            players
        });
    }
    let mut confirmed = Vec::new();
    while let Some(players) = within("every caller to finish", callers.join_next()).await {
        confirmed.extend(players.expect("caller panicked"));
    }

    assert_eq!(confirmed.len(), SIGNUPS);
    confirmed.sort();
    confirmed.dedup();
    assert_eq!(confirmed.len(), SIGNUPS, "two callers were given the same player");
    let expected = i64::try_from(SIGNUPS).unwrap();
    assert_eq!(
        counts(&pool).await,
        Counts {
            users: expected,
            jobs: expected,
            players: expected
        }
    );
    assert_eq!(count_jobs_with_status(&pool, "done").await, expected);
    let attempts = sqlx::query_scalar!(r#"select max(attempts) as "max!" from ackloop.player_creation_jobs"#)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(attempts, 1, "no job was claimed twice");
    for worker in workers {
        worker.stop().await;
    }
}
