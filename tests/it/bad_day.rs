//! The promise on a bad day: a signup returns within its timeout (plus a small margin) whatever
//! the database does, a lock held on its email holds up no other signup, once a signup may
//! have committed no error loses its job id, and a write whose answer is lost is resolved by
//! that job id: never doubled, never refused because of itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ackloop::{NewUser, SignupError};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::task::JoinSet;

use crate::common::*;
use crate::cutting_proxy::{CuttingProxy, Fault};

/// How late past its timeout a caller may be answered: the last look at the tables is bounded
/// by 100 ms; the rest is a loaded 2-core machine's scheduling.
const MARGIN: Duration = Duration::from_millis(600);

#[sqlx::test]
async fn a_lock_held_on_the_email_bounds_the_signup_and_holds_up_nobody(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 12).await;
    let worker = spawn_worker(&pool, worker_config());
    let signups = Arc::new(signups(&pool).await);
    // Two other sessions each hold an uncommitted insert of an email that signups will ask for.
    let mut blockers = Vec::new();
    for email in ["held-1@example.com", "held-2@example.com"] {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("insert into users (email, display_name) values ($1, 'Holder')")
            .bind(email)
            .execute(&mut *tx)
            .await
            .unwrap();
        blockers.push(tx);
    }

    let timeout = Duration::from_secs(2);
    let mut calls = JoinSet::new();
    for email in ["held-1@example.com", "held-2@example.com"] {
        let signups = Arc::clone(&signups);
        calls.spawn(async move {
            let started = Instant::now();
            let result = signups
                .create_user_and_await_player(&NewUser::new(email, "Blocked").unwrap(), timeout)
                .await;
            (true, result.map(|_| ()), started.elapsed())
        });
    }
    // Unrelated signups at the same moment, sharing batches with the blocked ones.
    for n in 0..40 {
        let signups = Arc::clone(&signups);
        calls.spawn(async move {
            let started = Instant::now();
            let result = signups.create_user_and_await_player(&user(n), timeout).await;
            (false, result.map(|_| ()), started.elapsed())
        });
    }
    let mut blocked = 0;
    for (is_blocked, result, took) in within("every signup to return", calls.join_all()).await {
        assert!(
            took <= timeout + MARGIN,
            "a signup returned after {took:?} (timeout {timeout:?})"
        );
        if is_blocked {
            blocked += 1;
            match result {
                // Nothing was written, and the caller is told so (no job id).
                Err(SignupError::Unavailable { job_id: None, .. }) => {}
                other => panic!("a signup blocked on a lock got {other:?}"),
            }
        } else {
            result.expect("an unrelated signup is confirmed despite the held locks");
        }
    }
    assert_eq!(blocked, 2);
    for tx in blockers {
        tx.rollback().await.unwrap();
    }
    // The blocked signups left nothing behind.
    let counts = counts(&pool).await;
    assert_eq!((counts.users, counts.jobs, counts.players), (40, 40, 40));
    worker.stop().await;
}

#[tokio::test]
async fn a_committed_signup_keeps_its_job_id_when_the_database_goes_away() {
    let (cluster, url) = OwnCluster::start("gone-after-commit").await;
    let pool = cluster_pool(&url).await;
    let signups = Arc::new(signups(&pool).await);
    // No worker: the signup commits and then waits.
    let timeout = Duration::from_secs(4);
    let caller = {
        let signups = Arc::clone(&signups);
        tokio::spawn(async move {
            let started = Instant::now();
            let result = signups.create_user_and_await_player(&user(1), timeout).await;
            (result, started.elapsed())
        })
    };
    wait_until("the signup to commit", || async {
        sqlx::query_scalar::<_, i64>("select count(*) from player_creation_jobs")
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
            == 1
    })
    .await;
    // The server goes away while the caller waits: its final look at the tables fails.
    cluster.pg("stop").await;
    let (result, took) = within("the caller to return", caller).await.unwrap();
    assert!(took <= timeout + MARGIN, "returned after {took:?}");
    let job_id = match result {
        Err(SignupError::TimedOut {
            job_id,
            user_id: Some(_),
            ..
        }) => job_id,
        other => panic!("a committed signup must come back with its job id, got {other:?}"),
    };
    // It is the job that was committed.
    cluster.pg("start").await;
    let fresh = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(url.parse::<PgConnectOptions>().unwrap())
        .await
        .unwrap();
    let exists: bool = sqlx::query_scalar("select exists (select from player_creation_jobs where id = $1)")
        .bind(job_id.as_uuid())
        .fetch_one(&fresh)
        .await
        .unwrap();
    assert!(exists, "the job id returned is the committed job's");
}

#[tokio::test]
async fn a_signup_waits_out_a_server_that_is_down_when_it_starts() {
    let (cluster, url) = OwnCluster::start("down-at-signup").await;
    let pool = cluster_pool(&url).await;
    let worker_pool = cluster_worker_pool(&url).await;
    let worker = spawn_worker(&worker_pool, worker_config());
    let signups = Arc::new(signups(&pool).await);
    cluster.pg("stop").await;
    // Signups start while nothing answers; the server comes back well within their timeout.
    let mut calls = JoinSet::new();
    for n in 0..10 {
        let signups = Arc::clone(&signups);
        calls.spawn(async move { signups.create_user_and_await_player(&user(n), DEADLINE).await });
    }
    // The server takes a while to start again; meanwhile the callers meet dead pooled
    // connections and refused new ones.
    cluster.pg("start").await;
    for result in within("the callers", calls.join_all()).await {
        result.expect("a caller whose timeout outlasts the outage gets its player");
    }
    let counts = counts(&pool).await;
    assert_eq!(
        (counts.users, counts.jobs, counts.players),
        (10, 10, 10),
        "nothing doubled"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_listener_whose_connection_goes_silent_is_noticed_and_callers_are_not_held_up() {
    let (_cluster, url) = OwnCluster::start_tcp("silent-listener").await;
    let direct: PgConnectOptions = url.parse().unwrap();
    let proxy = SilentProxy::start(direct.get_port()).await;
    let through_proxy = direct
        .clone()
        .port(proxy.port)
        .application_name("ackloop_proxied_listener");
    let pool = cluster_pool(&url).await;
    let worker = spawn_worker(&pool, worker_config());
    // The auth side's listener goes through the proxy; its pool does not.
    let config = ackloop::SignupsConfig {
        listen_options: Some(through_proxy),
        ..ackloop::SignupsConfig::default()
    };
    let signups = ackloop::Signups::connect_with(pool.clone(), config)
        .await
        .unwrap();
    signups
        .create_user_and_await_player(&user(0), DEADLINE)
        .await
        .expect("a signup while the path is fine");

    proxy.silence();
    // The confirmation is lost in the silent path; the caller's job is re-read from the tables
    // every second, so it is answered long before its timeout (the old behaviour: at the
    // timeout, 30 s).
    let started = Instant::now();
    signups
        .create_user_and_await_player(&user(1), DEADLINE)
        .await
        .expect("a signup whose confirmation is lost");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    // The listener notices that its connection stopped answering (liveness check within 8 s)
    // and opens another: two LISTEN sessions by this name, the silent one and its replacement.
    wait_until("the silent listener to be replaced", || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from pg_stat_activity \
             where application_name = 'ackloop_proxied_listener' and query ilike 'listen%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
            == 2
    })
    .await;
    signups
        .create_user_and_await_player(&user(2), DEADLINE)
        .await
        .expect("a signup after the listener was replaced");
    worker.stop().await;
}

/// SIGTERM while the worker is still connecting, to a server that accepts the connection and
/// never answers: the worker exits 0 at once, not when the connection attempt gives up.
#[tokio::test]
async fn sigterm_while_the_worker_connects_to_a_silent_server_ends_it_promptly() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let url = format!("postgres://app@127.0.0.1:{port}/app?sslmode=disable&connect_timeout=60");
    let mut worker = ackloop_command(&url)
        .args(["worker", "--shutdown-timeout", "2s"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The worker has connected (and so installed its handlers): it now waits for an answer.
    let (held, _) = within("the worker to connect", silent.accept()).await.unwrap();
    let signalled = Instant::now();
    signal(&worker, "-TERM").await;
    let status = within("the worker to exit", worker.wait()).await.unwrap();
    let took = signalled.elapsed();
    drop(held);
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < Duration::from_secs(2) + MARGIN + Duration::from_secs(1),
        "exited {took:?} after SIGTERM"
    );
}

/// Makes creating the player named `Poison` kill its own session, as a crashing trigger or an
/// out-of-memory kill of the backend would, and counts the kills in a sequence (a sequence
/// does not roll back with the session).
async fn poison_the_player_named_poison(pool: &sqlx::PgPool) {
    execute(pool, "create sequence poison_kills").await;
    execute(
        pool,
        r#"
        create function kill_own_session() returns trigger language plpgsql as $$
        begin
            if new.display_name = 'Poison' then
                perform nextval('poison_kills');
                perform pg_terminate_backend(pg_backend_pid());
                -- pg_sleep checks for interrupts: the session ends here, mid-statement.
                perform pg_sleep(1);
            end if;
            return new;
        end $$
        "#,
    )
    .await;
    execute(
        pool,
        "create trigger kill_own_session before insert on players for each row execute function kill_own_session()",
    )
    .await;
}

#[sqlx::test]
async fn a_job_that_kills_its_session_is_failed_and_every_other_job_flows(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 10).await;
    poison_the_player_named_poison(&pool).await;
    let signups = Arc::new(signups(&pool).await);
    const OTHERS: usize = 200;
    let mut conn = pool.acquire().await.unwrap();
    // The poison job sits behind the first 150, beyond what a starting worker takes one at a
    // time, so the batches meet it.
    for n in 0..150 {
        ackloop::create_user(&mut conn, &ackloop::Channels::default(), &user(n))
            .await
            .unwrap();
    }
    let poisoned_caller = {
        let signups = Arc::clone(&signups);
        tokio::spawn(async move {
            let poison = NewUser::new("poison@example.com", "Poison").unwrap();
            signups.create_user_and_await_player(&poison, DEADLINE).await
        })
    };
    wait_until("the poison signup commits", || async {
        counts(&pool).await.users == 151
    })
    .await;
    for n in 150..OTHERS {
        ackloop::create_user(&mut conn, &ackloop::Channels::default(), &user(n))
            .await
            .unwrap();
    }
    drop(conn);

    let config = ackloop::WorkerConfig {
        max_attempts: 3,
        ..worker_config()
    };
    let worker = spawn_worker(&pool, config.clone());
    let failure = within("the poison job's caller to hear", poisoned_caller)
        .await
        .unwrap();
    match failure {
        Err(SignupError::JobFailed { reason, .. }) => assert!(
            reason.contains("gave up after 3 attempts") && reason.contains("session ended"),
            "the reason says the job ended its session: {reason}"
        ),
        other => panic!("expected JobFailed, got {other:?}"),
    }
    wait_until("every other job is done", || async {
        count_jobs_with_status(&pool, "done").await == OTHERS as i64
    })
    .await;
    let poison = sqlx::query!(
        r#"
        select jobs.status, jobs.attempts
        from player_creation_jobs as jobs
        join users on users.id = jobs.user_id
        where users.display_name = 'Poison'
        "#
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((poison.status.as_str(), poison.attempts), ("failed", 3));
    // The sequence is the test's own, so not known to the query macros.
    let kills: i64 = sqlx::query_scalar("select last_value from poison_kills")
        .fetch_one(&pool)
        .await
        .unwrap();
    // Each counted attempt kills once; before the first is counted, each processing loop may
    // have met the job in a batch once.
    let most = i64::from(config.max_attempts) + config.concurrency as i64;
    assert!(
        kills <= most,
        "the poison job killed {kills} sessions, at most {most} expected"
    );
    assert_eq!(counts(&pool).await.players, OTHERS as i64);
    worker.stop().await;
}

/// Every connection of a worker goes silent at once (its pool's and its listener's), as when a
/// NAT or load balancer between it and the server drops its state: the worker gives the dead
/// connections up (a pass within 10 s, the listener within 8 s), opens new ones and completes
/// the jobs committed meanwhile, without a signal or a restart.
#[tokio::test]
async fn a_worker_whose_connections_go_silent_opens_new_ones_and_carries_on() {
    let (_cluster, url) = OwnCluster::start_tcp("silent-worker").await;
    let direct: PgConnectOptions = url.parse().unwrap();
    let proxy = SilentProxy::start(direct.get_port()).await;
    let pool = cluster_pool(&url).await;
    let proxied_worker_pool = PgPoolOptions::new()
        .max_connections(3)
        .test_before_acquire(false)
        .connect_with(ackloop::worker_session_options(direct.clone().port(proxy.port)))
        .await
        .unwrap();
    let worker = spawn_worker(&proxied_worker_pool, worker_config());
    let signups = signups(&pool).await;
    signups
        .create_user_and_await_player(&user(0), DEADLINE)
        .await
        .expect("a signup while the path is fine");

    proxy.silence();
    let mut conn = pool.acquire().await.unwrap();
    for n in 1..=10 {
        ackloop::create_user(&mut conn, &ackloop::Channels::default(), &user(n))
            .await
            .unwrap();
    }
    drop(conn);
    let started = Instant::now();
    wait_until(
        "the worker completes the jobs committed after the silence",
        || async { count_jobs_with_status(&pool, "done").await == 11 },
    )
    .await;
    // The listener's liveness check (5 s idle + 3 s for an answer), then a pass given up after
    // 10 s on a dead pooled connection it meets.
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "took {:?}",
        started.elapsed()
    );
    worker.stop().await;
}

/// The auth side's own connections go silent mid-load, as behind a NAT that dropped its state:
/// every caller still returns within its timeout (plus the margin), each error after a possible
/// commit carries its job id and that job completes, and the pool is whole again afterwards (no
/// slot kept by a connection that will never answer).
#[tokio::test]
async fn signups_whose_connections_go_silent_return_in_time_and_the_pool_recovers() {
    let (_cluster, url) = OwnCluster::start_tcp("silent-signups").await;
    let direct: PgConnectOptions = url.parse().unwrap();
    let proxy = SilentProxy::start(direct.get_port()).await;
    let pool = cluster_pool(&url).await;
    let worker = spawn_worker(&cluster_worker_pool(&url).await, worker_config());
    // The signups' pool and listener both go through the proxy.
    let proxied_pool = PgPoolOptions::new()
        .max_connections(4)
        .test_before_acquire(false)
        .connect_with(direct.clone().port(proxy.port))
        .await
        .unwrap();
    let signups = Arc::new(signups(&proxied_pool).await);
    for n in 0..4 {
        signups
            .create_user_and_await_player(&user(n), DEADLINE)
            .await
            .expect("a signup while the path is fine");
    }
    // The path goes silent while the connections sit idle in the pool, as a NAT drops idle
    // ones. (One going silent while sqlx hands it back keeps its slot: sqlx's ping on release
    // has no time limit. See docs/guarantees.md, "Not covered".)
    wait_until("the pooled connections are idle", || async {
        proxied_pool.num_idle() == proxied_pool.size() as usize
    })
    .await;
    proxy.silence();
    let timeout = Duration::from_secs(2);
    let mut calls = JoinSet::new();
    for n in 100..116 {
        let signups = Arc::clone(&signups);
        calls.spawn(async move {
            let started = Instant::now();
            let result = signups.create_user_and_await_player(&user(n), timeout).await;
            (n, result, started.elapsed())
        });
    }
    for (n, result, took) in within("every signup to return", calls.join_all()).await {
        assert!(took <= timeout + MARGIN, "signup {n} took {took:?}");
        match result {
            Ok(player) => assert_eq!(player.display_name, format!("Player {n}")),
            Err(err) => match err.job_id() {
                // It may have committed: the job must complete.
                Some(job_id) => {
                    let job = job_id.to_string();
                    wait_until(&format!("job {job} of signup {n} completes"), || async {
                        sqlx::query_scalar::<_, String>(
                            "select status from player_creation_jobs where id = $1::uuid",
                        )
                        .bind(&job)
                        .fetch_optional(&pool)
                        .await
                        .unwrap()
                        .is_none_or(|status| status == "done")
                    })
                    .await;
                }
                // Certainly not committed: no such user.
                None => {
                    let email = format!("user{n}@example.com");
                    let users: i64 = sqlx::query_scalar("select count(*) from users where email = $1")
                        .bind(&email)
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                    assert_eq!(users, 0, "signup {n} said not written: {err}");
                }
            },
        }
    }

    // More signups than the pool has slots, one after another: each needs a slot back.
    for n in 200..212 {
        signups
            .create_user_and_await_player(&user(n), DEADLINE)
            .await
            .unwrap_or_else(|err| panic!("signup {n} after the silence: {err}"));
    }
    let counts = counts(&pool).await;
    assert_eq!(
        counts.users, counts.players,
        "every committed signup has its player"
    );
    // Nothing is in use now: every connection the pool holds is back in it, none stuck handing
    // a silent connection back.
    wait_until("every pooled connection is idle", || async {
        proxied_pool.num_idle() == proxied_pool.size() as usize
    })
    .await;
    worker.stop().await;
}

/// Text of the signup's write statement (alone or batched), by which the proxy finds it.
const SIGNUP_WRITE: &str = "insert into users";

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
        let through_proxy = PgPoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(direct_options.clone().port(proxy.port))
            .await
            .expect("connect through the proxy");
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
            "select users.id, jobs.id from users \
             join player_creation_jobs as jobs on jobs.user_id = users.id \
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
            "select users.email, players.display_name from players \
             join users on users.id = players.user_id where players.id = $1",
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
/// server late; it commits just before the second attempt, which is refused with the email
/// taken — by this very signup, as the job id shows: the caller gets its player, not
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
    // The second attempt reached the server after the late commit and was refused for the email.
    assert_eq!(scene.proxy.statements_containing(SIGNUP_WRITE).len(), 2);
    let errors = scene.proxy.server_errors();
    assert!(
        errors.len() == 1 && errors[0].starts_with("23505 users_email_key"),
        "the second attempt met the email taken, and nothing else failed: {errors:?}"
    );
    scene.worker.stop().await;
}

/// Another session holds a lock the worker needs (a `CREATE INDEX`, `LOCK TABLE`) for longer
/// than any single wait: the worker gives each wait up at its `lock_timeout`, backs off, and
/// counts no attempt, so even with one attempt allowed no job fails; once the lock is gone
/// every job is done.
#[sqlx::test]
async fn a_long_lock_on_players_costs_jobs_no_attempts(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = pool(options.clone(), connect.clone(), 4).await;
    let worker_pool = options
        .max_connections(3)
        .connect_with(ackloop::worker_session_options(connect))
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    for n in 0..3 {
        ackloop::create_user(&mut conn, &ackloop::Channels::default(), &user(n))
            .await
            .unwrap();
    }
    drop(conn);
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("lock table players in share mode")
        .execute(&mut *holder)
        .await
        .unwrap();
    let config = ackloop::WorkerConfig {
        max_attempts: 1,
        poll_interval: Duration::from_millis(200),
        ..worker_config()
    };
    // A starting worker takes its first jobs alone: each of those attempts meets the lock.
    let worker = spawn_worker(&worker_pool, config);
    wait_until(
        "every job has waited for the lock and been given its attempt back",
        || async {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from player_creation_jobs \
             where status = 'pending' and attempts = 0 and last_error like '%waited over 2s for a lock%'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
                == 3
        },
    )
    .await;
    holder.commit().await.unwrap();
    wait_until("every job is done once the lock is gone", || async {
        count_jobs_with_status(&pool, "done").await == 3
    })
    .await;
    assert_eq!(count_jobs_with_status(&pool, "failed").await, 0);
    assert_eq!(counts(&pool).await.players, 3);
    worker.stop().await;
}
