//! The worked example of adopting ackloop where both services already exist
//! (examples/existing_services/README.md): the accounts service's own `users` and the game
//! service's own `players`, each with its own migrations, run the whole loop through ackloop's
//! schema, and nothing lands in ackloop's built-in tables.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::*;

#[path = "../../examples/accounts_service.rs"]
#[allow(dead_code)]
mod accounts;
#[path = "../../examples/game_service.rs"]
#[allow(dead_code)]
mod game;

#[sqlx::test(migrations = false)]
async fn the_existing_services_run_the_whole_loop_on_their_own_tables(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect.clone(), 6).await;
    accounts::migrate(&pool)
        .await
        .expect("ackloop's migrations, then the accounts service's");
    game::migrate(&pool)
        .await
        .expect("the game service's (ackloop's are applied already)");

    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = game::worker(connect).await.unwrap();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    let signups = signups(&pool).await;

    let mut signed_up = Vec::new();
    for n in 0..10 {
        let done = accounts::sign_up(
            &pool,
            &signups,
            &format!("player{n}@example.com"),
            "argon2id:…",
            &format!("Player {n}"),
            DEADLINE,
        )
        .await
        .expect("a signup in the accounts service's own transaction");
        signed_up.push(done);
    }
    for done in &signed_up {
        let player = done.player.as_ref().expect("answered within the wait");
        let (id, nickname, level): (i64, String, i32) =
            sqlx::query_as("select id, nickname, level from players where account_id = $1")
                .bind(done.account_id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            player.player_id.to_i64(),
            Some(id),
            "the caller gets the game's own id"
        );
        assert_eq!(player.user_id.to_uuid(), Some(done.account_id));
        assert_eq!(player.result["level"], level);
        assert!(nickname.starts_with("Player "), "{nickname}");
    }

    // A taken email is the accounts service's own error, and adds no job.
    let taken = accounts::sign_up(
        &pool,
        &signups,
        "player0@example.com",
        "argon2id:…",
        "Again",
        Duration::from_secs(1),
    )
    .await
    .unwrap_err();
    assert!(matches!(taken, accounts::SignupFailed::EmailTaken), "{taken:?}");
    // A nickname ackloop refuses writes no account either.
    let refused = accounts::sign_up(&pool, &signups, "new@example.com", "argon2id:…", " ", DEADLINE)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, accounts::SignupFailed::Invalid(_)),
        "{refused:?}"
    );

    let tallies = (
        count_of(&pool, "select count(*) from users").await,
        count_of(&pool, "select count(*) from players").await,
        count_of(
            &pool,
            "select count(*) from ackloop.player_creation_jobs where status = 'done'",
        )
        .await,
        count_of(&pool, "select count(*) from ackloop.builtin_users").await,
        count_of(&pool, "select count(*) from ackloop.builtin_players").await,
    );
    assert_eq!(
        tallies,
        (10, 10, 10, 0, 0),
        "users, players, jobs done, built-in users, built-in players"
    );
    shutdown.cancel();
    within("the game service's worker stops", running)
        .await
        .unwrap()
        .expect("the worker ran to its stop");
}
