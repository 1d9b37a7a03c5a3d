//! Idempotency keys and lost answers: a keyed signup's write cut by a
//! [`CuttingProxy`](crate::cutting_proxy::CuttingProxy), once or again and again.

use std::sync::Arc;
use std::time::Duration;

use ackloop::{JobId, SignupError, Signups, SignupsConfig};
use sqlx::postgres::PgConnectOptions;

use crate::common::*;

/// A signup's write cut `cuts` times in a row before the server got it (a link that keeps
/// dropping): returns when each cut tripped, and the caller's result.
async fn cut_repeatedly(
    keyed: bool,
    cuts: usize,
    n: usize,
) -> (Vec<tokio::time::Instant>, Result<ackloop::Player, SignupError>) {
    use crate::cutting_proxy::{CuttingProxy, Fault};
    let name = if keyed {
        "idempotent-cut-keyed"
    } else {
        "idempotent-cut-unkeyed"
    };
    let (cluster, url) = OwnCluster::start_tcp(name).await;
    let _direct = cluster_pool(&url).await;
    let direct_options: PgConnectOptions = url.parse().unwrap();
    let proxy = CuttingProxy::start(direct_options.get_port()).await;
    let through_proxy = unpinged_pool(direct_options.clone().port(proxy.port), 4).await;
    let config = SignupsConfig {
        listen_options: Some(direct_options),
        ..SignupsConfig::default()
    };
    let signups = Signups::connect_with(through_proxy, config).await.unwrap();
    let worker = spawn_worker(&cluster_worker_pool(&url).await, worker_config());
    let armed: Vec<_> = (0..cuts)
        .map(|_| proxy.arm("ackloop.sign_up", Fault::DropRequest))
        .collect();
    let trips = tokio::spawn(async move {
        let mut at = Vec::new();
        for fault in armed {
            let tripped = fault.tripped().await;
            at.push(tokio::time::Instant::now());
            drop(tripped);
        }
        at
    });
    let new_user = user(n);
    let result = if keyed {
        signups
            .create_user_and_await_player_with_key(&new_user, JobId::new(), DEADLINE)
            .await
    } else {
        signups.create_user_and_await_player(&new_user, DEADLINE).await
    };
    let at = within("every cut", trips).await.unwrap();
    worker.stop().await;
    drop(signups);
    drop(cluster);
    (at, result)
}

/// The attempts at `at` were spaced by the write backoff (50 ms doubling; an attempt's own
/// connect and write take some of that, never less), and the signup got its player.
fn assert_backed_off(at: &[tokio::time::Instant], result: Result<ackloop::Player, SignupError>) {
    result.expect("the player, after the cuts");
    let gaps: Vec<_> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, gap) in gaps.iter().enumerate() {
        assert!(
            *gap >= Duration::from_millis(50 << i),
            "attempts spaced by the backoff, 50 ms doubling: {gaps:?}"
        );
    }
}

/// guarantees.md: "tried again with backoff (50 ms doubling to 1 s) until the deadline". An
/// unkeyed signup whose write keeps being cut: its lookup by job id backs off between attempts.
#[tokio::test]
async fn an_unkeyed_signup_cut_again_and_again_backs_off() {
    let (at, result) = cut_repeatedly(false, 5, 1).await;
    assert_backed_off(&at, result);
}

/// The same for a keyed signup, which is resolved by writing it again alone (no lookup): each
/// write after a lost answer waits its backoff too.
#[tokio::test]
async fn a_keyed_signup_cut_again_and_again_backs_off() {
    let (at, result) = cut_repeatedly(true, 5, 2).await;
    assert_backed_off(&at, result);
}

/// A keyed signup whose answer is lost (committed, answer dropped) or whose write reaches
/// the server late (after the caller gave up on it, just before its retry): one signup, the
/// caller's player, no error on the server.
#[tokio::test]
async fn a_keyed_signup_whose_answer_is_lost_or_late_gets_its_own_player() {
    use crate::cutting_proxy::{CuttingProxy, Fault};
    let (cluster, url) = OwnCluster::start_tcp("idempotent-keyed-lost").await;
    let direct = cluster_pool(&url).await;
    let direct_options: PgConnectOptions = url.parse().unwrap();
    let proxy = CuttingProxy::start(direct_options.get_port()).await;
    let worker = spawn_worker(&cluster_worker_pool(&url).await, worker_config());
    for (n, fault) in [(1, Fault::DropReply), (2, Fault::Late)] {
        // Fresh connections, which have never prepared the write: its SQL crosses the proxy.
        let through_proxy = unpinged_pool(direct_options.clone().port(proxy.port), 4).await;
        let config = SignupsConfig {
            listen_options: Some(direct_options.clone()),
            ..SignupsConfig::default()
        };
        let signups = Arc::new(Signups::connect_with(through_proxy, config).await.unwrap());
        let armed = proxy.arm("ackloop.sign_up", fault);
        let key = JobId::new();
        let new_user = user(n);
        let caller = {
            let (signups, new_user) = (Arc::clone(&signups), new_user.clone());
            tokio::spawn(async move {
                signups
                    .create_user_and_await_player_with_key(&new_user, key, DEADLINE)
                    .await
            })
        };
        let tripped = armed.tripped().await;
        assert!(tripped.committed(), "{fault:?}: {:?}", tripped.reply);
        drop(tripped);
        let player = within("the caller", caller).await.unwrap().expect("its player");
        let (email, job): (String, uuid::Uuid) = sqlx::query_as(
            "select users.email, jobs.id from ackloop.builtin_players as players join ackloop.builtin_users as users on users.id = players.user_id
             join ackloop.player_creation_jobs jobs on jobs.builtin_user_id = users.id where players.id = $1",
        )
        .bind(player.id)
        .fetch_one(&direct)
        .await
        .unwrap();
        assert_eq!(
            (email.as_str(), job),
            (new_user.email(), key.as_uuid()),
            "{fault:?}"
        );
    }
    let c = counts(&direct).await;
    assert_eq!((c.users, c.jobs, c.players), (2, 2, 2));
    assert_eq!(proxy.server_errors(), Vec::<String>::new());
    worker.stop().await;
    drop(cluster);
}
