//! The example player service (`examples/player_service.rs`): a handler of its own, with its own
//! tables, through the whole loop.

use std::sync::Arc;
use std::time::Duration;

use ackloop::{
    Created, Handler, Job, JobError, JobId, JobSource, NewUser, Player, SignupError, WorkerConfig,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};

use crate::common::*;

#[path = "../../examples/player_service.rs"]
#[allow(dead_code)]
mod example;

use example::{STARTING_COINS, StarterKit};

const NO_STARTER_ITEMS: &str = "no starter items are configured; add rows to starter_items";

/// A pool on the test's database with the player service's schema added to ackloop's.
async fn service_pool(options: PgPoolOptions, connect: PgConnectOptions) -> PgPool {
    let pool = pool(options, connect, 8).await;
    example::migrate(&pool)
        .await
        .expect("apply the player service's migrations");
    pool
}

/// The service's player row: (level, coins), if there is one.
async fn player_row(pool: &PgPool, user_id: ackloop::UserId) -> Option<(i32, i64)> {
    sqlx::query_as("select level, coins from players where user_id = $1")
        .bind(user_id.to_string())
        .fetch_optional(pool)
        .await
        .unwrap()
}

async fn inventory(pool: &PgPool, user_id: ackloop::UserId) -> Vec<(String, i32)> {
    sqlx::query_as("select item, quantity from player_inventory where user_id = $1 order by item")
        .bind(user_id.to_string())
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn job_row(pool: &PgPool, job_id: JobId) -> (String, i32, Option<String>) {
    sqlx::query_as("select status, attempts, last_error from ackloop.player_creation_jobs where id = $1")
        .bind(job_id.as_uuid())
        .fetch_one(pool)
        .await
        .unwrap()
}

fn starter_kit() -> Vec<(String, i32)> {
    vec![("health potion".to_owned(), 3), ("wooden sword".to_owned(), 1)]
}

#[sqlx::test]
async fn the_handlers_writes_commit_with_the_ack(options: PgPoolOptions, connect: PgConnectOptions) {
    let pool = service_pool(options, connect).await;
    let worker = run_in_background(example::worker(pool.clone(), worker_config()));
    let signups = Arc::new(signups(&pool).await);

    let mut calls = tokio::task::JoinSet::new();
    for n in 0..20 {
        let signups = Arc::clone(&signups);
        calls.spawn(async move { signups.create_user_and_await_player(&user(n), DEADLINE).await });
    }
    let mut players: Vec<Player> = Vec::new();
    while let Some(call) = calls.join_next().await {
        players.push(call.unwrap().expect("every signup gets its player"));
    }

    // Read right after each confirmation: the handler's rows are there with the ack.
    for player in &players {
        assert_eq!(player_row(&pool, player.user_id).await, Some((1, STARTING_COINS)));
        assert_eq!(inventory(&pool, player.user_id).await, starter_kit());
    }
    let done_without_kit: i64 = sqlx::query_scalar(
        "select count(*) from ackloop.player_creation_jobs as jobs
         where status = 'done'
           and not exists (select 1 from player_inventory where user_id = jobs.user_id)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(done_without_kit, 0);
    assert_eq!(count_jobs_with_status(&pool, "done").await, 20);
    worker.stop().await;
}

#[sqlx::test]
async fn a_handler_error_leaves_none_of_its_writes_and_the_job_retries(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = service_pool(options, connect).await;
    execute(&pool, "delete from starter_items").await;
    let config = WorkerConfig {
        max_attempts: 1_000,
        ..worker_config()
    };
    let worker = run_in_background(example::worker(pool.clone(), config));
    let signups = signups(&pool).await;

    let err = signups
        .create_user_and_await_player(&user(1), Duration::from_millis(300))
        .await
        .expect_err("no player while the handler cannot finish");
    let SignupError::TimedOut { job_id, user_id, .. } = err else {
        panic!("expected a timeout, got {err:?}");
    };
    let user_id = user_id.expect("a timed-out signup was written: its user id is known");
    // A retry's attempt is counted (the job running) before it is made: wait for one that
    // finished with the handler's reason, the job pending again.
    wait_until(
        "the job is tried three times, each ending with the handler's reason",
        || async {
            let (status, attempts, last_error) = job_row(&pool, job_id).await;
            status == "pending" && attempts >= 3 && last_error.as_deref() == Some(NO_STARTER_ITEMS)
        },
    )
    .await;
    assert_eq!(job_row(&pool, job_id).await.0, "pending");
    // The handler inserted the player before it found no kit: undone with its savepoint.
    assert_eq!(player_row(&pool, user_id).await, None);
    assert!(inventory(&pool, user_id).await.is_empty());

    execute(
        &pool,
        "insert into starter_items (item, quantity) values ('wooden sword', 1)",
    )
    .await;
    let player = signups
        .await_player(job_id, DEADLINE)
        .await
        .expect("the player once the kit exists");
    assert_eq!(player.user_id, user_id);
    assert_eq!(player_row(&pool, user_id).await, Some((1, STARTING_COINS)));
    assert_eq!(
        inventory(&pool, user_id).await,
        vec![("wooden sword".to_owned(), 1)]
    );
    worker.stop().await;
}

/// The example's handler, with a bug: it panics on one display name.
struct PanicsOnBoom;

impl Handler for PanicsOnBoom {
    const SOURCE: JobSource = JobSource::BuiltinSignup;

    async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<Created, JobError> {
        let created = StarterKit.handle(job, conn).await?;
        if job.display_name == "Boom" {
            panic!("boom: a bug in the handler");
        }
        Ok(created)
    }
}

/// Runs a worker with `handler` (two attempts a job) and signs `bad` up beside `honest` other
/// users at once; checks each honest one got its player and kit, and returns the bad one's
/// answer, the worker and the signups (to sign up more).
async fn one_bad_signup_among_honest_ones<H: Handler>(
    pool: &PgPool,
    handler: H,
    bad: NewUser,
    honest: usize,
) -> (Result<Player, SignupError>, RunningWorker, Arc<ackloop::Signups>) {
    let config = WorkerConfig {
        max_attempts: 2,
        ..worker_config()
    };
    let worker = run_in_background(ackloop::Worker::new(pool.clone(), config).with_handler(handler));
    let signups = Arc::new(signups(pool).await);
    let bad_call = {
        let signups = Arc::clone(&signups);
        tokio::spawn(async move { signups.create_user_and_await_player(&bad, DEADLINE).await })
    };
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..honest {
        let signups = Arc::clone(&signups);
        calls.spawn(async move { signups.create_user_and_await_player(&user(n), DEADLINE).await });
    }
    while let Some(call) = calls.join_next().await {
        let player = call.unwrap().expect("the other signups get their players");
        assert_eq!(inventory(pool, player.user_id).await, starter_kit());
    }
    (bad_call.await.unwrap(), worker, signups)
}

async fn user_id_of(pool: &PgPool, email: &str) -> ackloop::UserId {
    let id: i64 = sqlx::query_scalar("select id from ackloop.builtin_users as users where email = $1")
        .bind(email)
        .fetch_one(pool)
        .await
        .unwrap();
    ackloop::UserId::from(id)
}

#[sqlx::test]
async fn a_panicking_handler_fails_its_job_without_stopping_the_worker_or_other_jobs(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = service_pool(options, connect).await;
    let boom = NewUser::new("boom@example.com", "Boom").unwrap();
    let (answer, worker, signups) = one_bad_signup_among_honest_ones(&pool, PanicsOnBoom, boom, 10).await;

    let err = answer.expect_err("the panicking job fails");
    let SignupError::JobFailed { job_id, reason, .. } = &err else {
        panic!("expected JobFailed, got {err:?}");
    };
    assert!(
        reason.contains("the handler panicked") && reason.contains("boom: a bug in the handler"),
        "{reason}"
    );
    let (status, attempts, _) = job_row(&pool, *job_id).await;
    assert_eq!((status.as_str(), attempts), ("failed", 2));
    assert_eq!(
        player_row(&pool, user_id_of(&pool, "boom@example.com").await).await,
        None
    );

    // The worker is still running.
    let after = signups
        .create_user_and_await_player(&user(99), DEADLINE)
        .await
        .expect("a signup after the panics");
    assert_eq!(inventory(&pool, after.user_id).await, starter_kit());
    worker.stop().await;
}

#[sqlx::test]
async fn the_caller_hears_job_failed_with_the_handlers_reason(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = service_pool(options, connect).await;
    let config = WorkerConfig {
        max_attempts: 3,
        ..worker_config()
    };
    let worker = run_in_background(example::worker(pool.clone(), config));
    let signups = signups(&pool).await;

    // Fail now: one attempt, the handler's reason.
    let staff = NewUser::new("staff@example.com", "Admin").unwrap();
    let err = signups
        .create_user_and_await_player(&staff, DEADLINE)
        .await
        .expect_err("a reserved name fails");
    let SignupError::JobFailed { job_id, reason, .. } = &err else {
        panic!("expected JobFailed, got {err:?}");
    };
    assert_eq!(reason, "the display name is reserved for staff");
    assert_eq!(job_row(&pool, *job_id).await.1, 1);

    // Retry later, until the last attempt: the caller hears the last reason.
    execute(&pool, "delete from starter_items").await;
    let err = signups
        .create_user_and_await_player(&user(1), DEADLINE)
        .await
        .expect_err("no kit, no player");
    let SignupError::JobFailed { job_id, reason, .. } = &err else {
        panic!("expected JobFailed, got {err:?}");
    };
    assert_eq!(reason, NO_STARTER_ITEMS);
    let (status, attempts, _) = job_row(&pool, *job_id).await;
    assert_eq!((status.as_str(), attempts), ("failed", 3));
    worker.stop().await;
}

/// The example's handler, with a bug: for one display name it runs a statement that fails and
/// returns success anyway.
struct HidesAFailure;

impl Handler for HidesAFailure {
    const SOURCE: JobSource = JobSource::BuiltinSignup;

    async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<Created, JobError> {
        let created = StarterKit.handle(job, conn).await?;
        if job.display_name == "Liar" {
            let _ignored = sqlx::query("select 1 / 0").execute(&mut *conn).await;
        }
        Ok(created)
    }
}

#[sqlx::test]
async fn a_handler_that_hides_a_failed_statement_keeps_nothing(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = service_pool(options, connect).await;
    let liar = NewUser::new("liar@example.com", "Liar").unwrap();
    let (answer, worker, _signups) = one_bad_signup_among_honest_ones(&pool, HidesAFailure, liar, 5).await;

    let err = answer.expect_err("the job whose transaction was aborted fails");
    let SignupError::JobFailed { reason, .. } = &err else {
        panic!("expected JobFailed, got {err:?}");
    };
    assert!(
        reason.contains("returned success after one of its statements failed"),
        "{reason}"
    );
    let liar_user = user_id_of(&pool, "liar@example.com").await;
    assert_eq!(player_row(&pool, liar_user).await, None);
    assert!(inventory(&pool, liar_user).await.is_empty());
    worker.stop().await;
}

/// The example's handler, touching a row another session may hold locked for one display name.
struct WaitsForALock;

impl Handler for WaitsForALock {
    const SOURCE: JobSource = JobSource::BuiltinSignup;

    async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<Created, JobError> {
        let created = StarterKit.handle(job, conn).await?;
        if job.display_name == "Blocked" {
            sqlx::query("update starter_items set quantity = quantity where item = 'wooden sword'")
                .execute(&mut *conn)
                .await?;
        }
        Ok(created)
    }
}

#[sqlx::test]
async fn a_handler_waiting_on_a_lock_holds_up_neither_its_batch_nor_its_count(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    // The worker's sessions give up a lock wait after 2 s, as `ackloop worker`'s do.
    let pool = service_pool(options, ackloop::worker_session_options(connect)).await;
    let config = WorkerConfig {
        concurrency: 1,
        ..worker_config()
    };
    let worker = run_in_background(ackloop::Worker::new(pool.clone(), config).with_handler(WaitsForALock));
    let signups = signups(&pool).await;
    // Once a first job is done and nothing else is due, the loop takes batches.
    signups
        .create_user_and_await_player(&user(0), DEADLINE)
        .await
        .expect("a first signup");

    let mut holder = pool.begin().await.unwrap();
    sqlx::query("select 1 from starter_items where item = 'wooden sword' for update")
        .execute(&mut *holder)
        .await
        .unwrap();
    // One transaction: the worker meets all five in one batch.
    let mut tx = pool.begin().await.unwrap();
    let blocked = NewUser::new("blocked@example.com", "Blocked").unwrap();
    let blocked = ackloop::create_user(&mut tx, signups.channels(), &blocked)
        .await
        .unwrap();
    let mut honest = Vec::new();
    for n in 1..5 {
        honest.push(
            ackloop::create_user(&mut tx, signups.channels(), &user(n))
                .await
                .unwrap(),
        );
    }
    tx.commit().await.unwrap();

    for signup in &honest {
        signups
            .await_player(signup.job_id, DEADLINE)
            .await
            .expect("the jobs batched with a blocked one complete");
    }
    wait_until("the blocked job is put back, uncounted", || async {
        let (status, attempts, last_error) = job_row(&pool, blocked.job_id).await;
        status == "pending"
            && attempts == 0
            && last_error.is_some_and(|error| error.contains("waited too long for a lock"))
    })
    .await;
    assert_eq!(player_row(&pool, blocked.user_id).await, None);

    holder.rollback().await.unwrap();
    signups
        .await_player(blocked.job_id, DEADLINE)
        .await
        .expect("the blocked job completes once the lock is gone");
    assert_eq!(inventory(&pool, blocked.user_id).await, starter_kit());
    worker.stop().await;
}

/// A handler whose own other connection fails for one display name.
struct ItsOwnPoolIsAway;

impl Handler for ItsOwnPoolIsAway {
    const SOURCE: JobSource = JobSource::BuiltinSignup;

    async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<Created, JobError> {
        if job.display_name == "Away" {
            return Err(sqlx::Error::PoolTimedOut.into());
        }
        StarterKit.handle(job, conn).await
    }
}

#[sqlx::test]
async fn a_job_failing_for_want_of_the_handlers_own_database_says_so(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = service_pool(options, connect).await;
    let away = NewUser::new("away@example.com", "Away").unwrap();
    let (answer, worker, _signups) = one_bad_signup_among_honest_ones(&pool, ItsOwnPoolIsAway, away, 5).await;

    let err = answer.expect_err("the job fails after its attempts");
    let SignupError::JobFailed { reason, .. } = &err else {
        panic!("expected JobFailed, got {err:?}");
    };
    assert!(
        reason.contains("gave up after 2 attempts") && !reason.contains("session ended"),
        "{reason}"
    );
    worker.stop().await;
}
