//! Bad day, a write whose answer is lost (a connection cut by a [`CuttingProxy`] at a chosen
//! point of the signup's write): resolved by its job id, never doubled, never refused because
//! of itself.

use std::sync::Arc;

use ackloop::{NewUser, SignupError};
use sqlx::postgres::PgConnectOptions;

use crate::common::*;
use crate::cutting_proxy::{CuttingProxy, Fault};

/// Text of the signup's write statement (alone or batched), by which the proxy finds it.
const SIGNUP_WRITE: &str = "ackloop.sign_up";

/// A lost-answer scene on a cluster of its own: the signup side's pool goes through a
/// [`CuttingProxy`]; its listener, the worker and the test's own queries reach the server
/// directly, so only the signup's writes and lookups cross the proxy.
struct LostAnswer {
    _cluster: OwnCluster,
    direct: sqlx::PgPool,
    proxy: CuttingProxy,
    signups: Arc<ackloop::Signups>,
    worker: RunningWorker,
}

impl LostAnswer {
    async fn start(name: &str) -> Self {
        let (cluster, url) = OwnCluster::start_tcp(name).await;
        let direct = cluster_pool(&url).await;
        let direct_options: PgConnectOptions = url.parse().unwrap();
        let proxy = CuttingProxy::start(direct_options.get_port()).await;
        // Fresh connections, which have never prepared the write: its SQL crosses the proxy.
        let through_proxy = unpinged_pool(direct_options.clone().port(proxy.port), 4).await;
        let config = ackloop::SignupsConfig {
            listen_options: Some(direct_options),
            ..ackloop::SignupsConfig::default()
        };
        let signups = ackloop::Signups::connect_with(through_proxy, config)
            .await
            .expect("start the signup listener");
        let worker = spawn_worker(&cluster_worker_pool(&url).await, worker_config());
        Self {
            _cluster: cluster,
            direct,
            proxy,
            signups: Arc::new(signups),
            worker,
        }
    }

    /// Signs `new_user` up in a task of its own, with the test's whole deadline.
    fn sign_up(&self, new_user: NewUser) -> tokio::task::JoinHandle<Result<ackloop::Player, SignupError>> {
        let signups = Arc::clone(&self.signups);
        tokio::spawn(async move { signups.create_user_and_await_player(&new_user, DEADLINE).await })
    }

    /// The user and job committed for `email`, read directly.
    async fn committed(&self, email: &str) -> Option<(ackloop::UserId, ackloop::JobId)> {
        sqlx::query_as(
            "select users.id, jobs.id from ackloop.builtin_users as users \
             join ackloop.player_creation_jobs as jobs on jobs.builtin_user_id = users.id \
             where users.email = $1",
        )
        .bind(email)
        .fetch_optional(&self.direct)
        .await
        .unwrap()
    }

    /// Asserts that `player` is `new_user`'s and that exactly one user, job and player exist.
    async fn assert_one_signup(&self, player: &ackloop::Player, new_user: &NewUser) {
        let (email, display_name): (String, String) = sqlx::query_as(
            "select users.email, players.display_name from ackloop.builtin_players as players \
             join ackloop.builtin_users as users on users.id = players.user_id where players.id = $1",
        )
        .bind(player.id)
        .fetch_one(&self.direct)
        .await
        .unwrap();
        assert_eq!(
            (email.as_str(), display_name.as_str()),
            (new_user.email(), new_user.display_name()),
            "the player is this signup's"
        );
        assert_eq!(player.display_name, new_user.display_name());
        let counts = counts(&self.direct).await;
        assert_eq!(
            (counts.users, counts.jobs, counts.players),
            (1, 1, 1),
            "one user, one job, one player"
        );
    }
}

/// The server commits the write, then the connection is cut before its answer reaches the
/// client: the caller looks its job up, finds it committed, and gets its player, without
/// writing again.
#[tokio::test]
async fn a_signup_whose_commit_answer_is_lost_gets_its_player_without_writing_again() {
    let scene = LostAnswer::start("answer-lost").await;
    let cut = scene.proxy.arm(SIGNUP_WRITE, Fault::DropReply);
    let new_user = user(1);
    let caller = scene.sign_up(new_user.clone());

    let cut = cut.tripped().await;
    // The cut came after the commit: the server's withheld answer ends its transaction without
    // an error, and the rows are there while the client still waits on its open socket.
    assert!(cut.committed(), "the write's answer: {:?}", cut.reply);
    let (user_id, job_id) = scene
        .committed(new_user.email())
        .await
        .expect("the write committed before its answer was lost");
    assert!(!caller.is_finished(), "the caller heard nothing yet");
    drop(cut);

    let player = within("the caller to return", caller)
        .await
        .unwrap()
        .expect("a signup whose commit answer was lost gets its player");
    assert_eq!(player.user_id, user_id, "the player is the committed user's");
    scene.assert_one_signup(&player, &new_user).await;
    assert_eq!(
        scene.committed(new_user.email()).await,
        Some((user_id, job_id)),
        "the job is the one committed before the cut"
    );
    // Resolved by its job id: the server got the write once, and refused nothing.
    assert_eq!(scene.proxy.statements_containing(SIGNUP_WRITE).len(), 1);
    assert_eq!(scene.proxy.server_errors(), Vec::<String>::new());
    scene.worker.stop().await;
}

/// The connection is cut as the client sends the write, before the server gets it: the
/// caller's lookup finds nothing, so it writes again and gets its player.
#[tokio::test]
async fn a_signup_cut_before_the_server_got_it_is_written_again() {
    let scene = LostAnswer::start("request-lost").await;
    let cut = scene.proxy.arm(SIGNUP_WRITE, Fault::DropRequest);
    let new_user = user(1);
    let caller = scene.sign_up(new_user.clone());

    let cut = cut.tripped().await;
    assert!(
        cut.request[0].sql().is_some_and(|sql| sql.contains(SIGNUP_WRITE)),
        "the proxy kept the write from the server: {:?}",
        cut.request
    );
    assert_eq!(counts(&scene.direct).await, NOTHING, "nothing reached the server");
    assert!(scene.proxy.statements_containing(SIGNUP_WRITE).is_empty());
    drop(cut);

    let player = within("the caller to return", caller)
        .await
        .unwrap()
        .expect("a signup cut before the server got it gets its player");
    scene.assert_one_signup(&player, &new_user).await;
    // Written again: the one write the server got is the second attempt.
    assert_eq!(scene.proxy.statements_containing(SIGNUP_WRITE).len(), 1);
    assert_eq!(scene.proxy.server_errors(), Vec::<String>::new());
    scene.worker.stop().await;
}

/// The write's answer is lost and the lookup finds nothing, because the statement reaches the
/// server late; it commits just before the second attempt, which finds the email taken — by this
/// very signup, as the job id shows (`sign_up` answers with it): the caller gets its player, not
/// `EmailTaken`.
#[tokio::test]
async fn a_signup_whose_lost_write_commits_late_is_not_refused_as_a_taken_email() {
    let scene = LostAnswer::start("write-late").await;
    let late = scene.proxy.arm(SIGNUP_WRITE, Fault::Late);
    let new_user = user(1);
    let mut caller = scene.sign_up(new_user.clone());

    // Tripped once the second attempt arrived and the held first one was delivered before it.
    let late = tokio::select! {
        late = late.tripped() => late,
        result = &mut caller => panic!("the caller returned without a second attempt: {result:?}"),
    };
    assert!(late.committed(), "the late write committed: {:?}", late.reply);
    let player = within("the caller to return", caller)
        .await
        .unwrap()
        .expect("a signup whose own late write took its email gets its player");
    scene.assert_one_signup(&player, &new_user).await;
    // The second attempt reached the server after the late commit, and was answered with the
    // signup it had written, not refused.
    assert_eq!(scene.proxy.statements_containing(SIGNUP_WRITE).len(), 2);
    assert_eq!(scene.proxy.server_errors(), Vec::<String>::new());
    scene.worker.stop().await;
}
