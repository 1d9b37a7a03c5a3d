//! The promise on a bad day: a signup returns within its timeout (plus a small margin) whatever
//! the database does, a lock held on its email holds up no other signup, once a signup may
//! have committed no error loses its job id, and a write whose answer is lost is resolved by
//! that job id: never doubled, never refused because of itself.
//!
//! Here: locks, outages, a worker stopped while it connects, a job that kills its session. In
//! `silent`: connections that go silent without closing. In `lost_answer`: a write whose answer
//! is lost.

mod burst;
mod lost_answer;
mod silent;
mod start_up;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ackloop::{NewUser, SignupError};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::task::JoinSet;

use crate::common::*;

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
        sqlx::query("insert into ackloop.builtin_users (email, display_name) values ($1, 'Holder')")
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
                // Nothing was written, and the caller is told so: not an outage.
                Err(SignupError::NotWritten { .. }) => {}
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
        sqlx::query_scalar::<_, i64>("select count(*) from ackloop.player_creation_jobs")
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
    let exists: bool =
        sqlx::query_scalar("select exists (select from ackloop.player_creation_jobs where id = $1)")
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
                perform nextval('public.poison_kills');
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
        "create trigger kill_own_session before insert on ackloop.builtin_players for each row execute function kill_own_session()",
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
    commit_signups(&mut conn, 0..150).await;
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
    commit_signups(&mut conn, 150..OTHERS).await;
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
        from ackloop.player_creation_jobs as jobs
        where jobs.display_name = 'Poison'
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
    commit_signups(&mut conn, 0..3).await;
    drop(conn);
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("lock table ackloop.builtin_players in share mode")
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
    // Each job goes back and forth between an attempt under way (counted while it runs) and
    // given back; seen given back once, each has met the lock.
    let given_back = std::sync::Mutex::new(std::collections::BTreeSet::new());
    wait_until(
        "every job has waited for the lock and been given its attempt back",
        || async {
            let ids = sqlx::query_scalar::<_, uuid::Uuid>(
                "select id from ackloop.player_creation_jobs \
                 where status = 'pending' and attempts = 0 and last_error like '%waited too long for a lock%'",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            let mut given_back = given_back.lock().unwrap();
            given_back.extend(ids);
            given_back.len() == 3
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
