//! A handler's batch form (`Handler::handle_batch`): a whole claimed batch in one call and one
//! statement, and when that fails (an error, a panic, an answer that does not fit), the same
//! locked jobs one savepoint each, so one bad job fails alone and the rest complete.

use std::sync::{Arc, Mutex};

use ackloop::{BatchForm, Created, Handler, Job, JobError, NewJob, add_job};
use sqlx::PgConnection;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::*;

const GAME: &str = "create schema game;
    create table game.players (
        user_id text primary key,
        name text not null,
        -- A name the game refuses: the batch's one statement fails with it.
        constraint players_name_allowed check (name <> 'Bad')
    );";

/// How the handler's batch form misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Misbehaviour {
    None,
    /// Answers for one job fewer than it was given.
    ShortAnswer,
    Panics,
}

/// A player service's handler with a batch form; counts what the worker called.
#[derive(Clone)]
struct Players {
    misbehaviour: Misbehaviour,
    /// The size of each batch handed to `handle_batch`.
    batches: Arc<Mutex<Vec<usize>>>,
    /// Jobs handed to `handle`.
    one_by_one: Arc<Mutex<usize>>,
}

impl Players {
    fn new(misbehaviour: Misbehaviour) -> Self {
        Self {
            misbehaviour,
            batches: Arc::default(),
            one_by_one: Arc::default(),
        }
    }
}

impl Handler for Players {
    const BATCH_FORM: BatchForm = BatchForm::Together;

    async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<Created, JobError> {
        *self.one_by_one.lock().unwrap() += 1;
        sqlx::query("insert into game.players (user_id, name) values ($1, $2)")
            .bind(job.user_id.as_str())
            .bind(&job.display_name)
            .execute(&mut *conn)
            .await?;
        Ok(Created::new(job.user_id.clone()))
    }

    async fn handle_batch(&self, jobs: &[Job], conn: &mut PgConnection) -> Result<Vec<Created>, JobError> {
        self.batches.lock().unwrap().push(jobs.len());
        let users: Vec<&str> = jobs.iter().map(|job| job.user_id.as_str()).collect();
        let names: Vec<&str> = jobs.iter().map(|job| job.display_name.as_str()).collect();
        sqlx::query("insert into game.players (user_id, name) select * from unnest($1::text[], $2::text[])")
            .bind(&users)
            .bind(&names)
            .execute(&mut *conn)
            .await?;
        let mut created: Vec<Created> = jobs.iter().map(|job| Created::new(job.user_id.clone())).collect();
        match self.misbehaviour {
            Misbehaviour::None => {}
            Misbehaviour::ShortAnswer => {
                created.pop();
            }
            Misbehaviour::Panics => panic!("the batch form broke"),
        }
        Ok(created)
    }
}

/// Starts a worker with `handler` on an empty queue, and adds jobs one by one until one has gone
/// through the batch form: the worker is past its start (where it takes jobs alone) and claims
/// batches. The handler's counts start from there; the jobs added are counted in the return.
async fn started_worker(pool: &PgPool, handler: Players) -> (RunningWorker, i64) {
    let counts = handler.clone();
    // One processing loop: two would split a batch between them now and then.
    let config = ackloop::WorkerConfig {
        concurrency: 1,
        ..worker_config()
    };
    let worker = run_in_background(ackloop::Worker::new(pool.clone(), config).with_handler(handler));
    let mut added = 0;
    while counts.batches.lock().unwrap().is_empty() {
        add_jobs(pool, 100 + added, &["Early"]).await;
        added += 1;
        wait_until("the early job is done", || async {
            count_jobs_with_status(pool, "done").await == added
        })
        .await;
        assert!(added < 50, "the worker never took a batch");
    }
    counts.batches.lock().unwrap().clear();
    *counts.one_by_one.lock().unwrap() = 0;
    (worker, added)
}

/// Adds a job for each name (its user the name's place after `first`), all in one transaction,
/// so that one batch claims them together.
async fn add_jobs(pool: &PgPool, first: i64, names: &[&str]) {
    let mut tx = pool.begin().await.unwrap();
    for (user, name) in (first..).zip(names) {
        let job = NewJob::new(user, *name).unwrap();
        add_job(&mut tx, &ackloop::Channels::default(), &job)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

const TEN: [&str; 10] = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J"];

/// Runs ten jobs committed together through a worker with a handler that misbehaves as asked,
/// until all ten are done; returns the handler (what it saw) and the jobs done before the ten.
async fn ten_jobs_through(pool: &PgPool, misbehaviour: Misbehaviour) -> (Players, i64) {
    let handler = Players::new(misbehaviour);
    let (worker, early) = started_worker(pool, handler.clone()).await;
    add_jobs(pool, 1, &TEN).await;
    wait_until("every job is done", || async {
        count_jobs_with_status(pool, "done").await == early + 10
    })
    .await;
    worker.stop().await;
    (handler, early)
}

#[sqlx::test]
async fn a_batch_handler_completes_a_whole_batch_in_one_call(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 6).await;
    execute(&pool, GAME).await;
    let (handler, early) = ten_jobs_through(&pool, Misbehaviour::None).await;
    assert!(
        handler.batches.lock().unwrap().contains(&10),
        "the ten jobs committed together went to the batch form together: {:?}",
        handler.batches.lock().unwrap()
    );
    assert_eq!(
        *handler.one_by_one.lock().unwrap(),
        0,
        "no job went one at a time"
    );
    assert_eq!(
        count_of(&pool, "select count(*) from game.players").await,
        early + 10
    );
    // Each job's answer is its own player.
    assert_eq!(
        count_of(
            &pool,
            "select count(*) from ackloop.player_creation_jobs where player_id <> user_id"
        )
        .await,
        0
    );
}

#[sqlx::test]
async fn one_bad_job_fails_alone_and_the_rest_of_its_batch_completes(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool(options, connect, 6).await;
    execute(&pool, GAME).await;
    let handler = Players::new(Misbehaviour::None);
    let (worker, early) = started_worker(&pool, handler.clone()).await;
    let mut names = TEN.to_vec();
    names[4] = "Bad";
    add_jobs(&pool, 1, &names).await;
    wait_until("the good jobs are done and the bad one failed", || async {
        count_jobs_with_status(&pool, "done").await == early + 9
            && count_jobs_with_status(&pool, "failed").await == 1
    })
    .await;
    worker.stop().await;
    assert!(
        handler.batches.lock().unwrap().contains(&10),
        "the ten went to the batch form first: {:?}",
        handler.batches.lock().unwrap()
    );
    let error: String =
        sqlx::query_scalar("select last_error from ackloop.player_creation_jobs where status = 'failed'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(error.contains("players_name_allowed"), "{error}");
    // The batch's statement was undone; each good job's player was made once, by `handle`.
    assert_eq!(
        count_of(&pool, "select count(*) from game.players").await,
        early + 9
    );
    assert_eq!(
        count_of(&pool, "select count(*) from game.players where name = 'Bad'").await,
        0
    );
    assert_eq!(
        *handler.one_by_one.lock().unwrap(),
        10,
        "the batch's ten jobs, one at a time"
    );
}

#[sqlx::test]
async fn a_batch_form_that_panics_or_answers_short_is_undone_and_its_jobs_go_one_at_a_time(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    for misbehaviour in [Misbehaviour::ShortAnswer, Misbehaviour::Panics] {
        let pool = pool(options.clone(), connect.clone(), 6).await;
        execute(&pool, "drop schema if exists game cascade").await;
        execute(&pool, "delete from ackloop.player_creation_jobs").await;
        execute(&pool, GAME).await;
        let (handler, early) = ten_jobs_through(&pool, misbehaviour).await;
        assert!(
            handler.batches.lock().unwrap().contains(&10),
            "{misbehaviour:?}: the ten went to the batch form: {:?}",
            handler.batches.lock().unwrap()
        );
        // Nothing the batch form wrote was kept: one player each, made by `handle`.
        assert_eq!(
            count_of(&pool, "select count(*) from game.players").await,
            early + 10,
            "{misbehaviour:?}"
        );
        assert_eq!(
            *handler.one_by_one.lock().unwrap(),
            10,
            "{misbehaviour:?}: every job one at a time after the batch form failed"
        );
        assert_eq!(
            count_of(
                &pool,
                "select count(*) from ackloop.player_creation_jobs where attempts <> 1"
            )
            .await,
            0,
            "{misbehaviour:?}: the failed batch form cost no attempt"
        );
        pool.close().await;
    }
}

/// The built-in player service's batch form (`ackloop.insert_builtin_players`): one row per job in
/// the order given, a player that exists kept; a job that is not a built-in signup refuses the
/// whole call (22023) and writes nothing.
#[sqlx::test]
async fn the_built_in_batch_form_answers_in_order_and_refuses_a_services_job(pool: PgPool) {
    for n in 1..=3 {
        execute_owned(
            &pool,
            format!("select * from ackloop.sign_up('u{n}@example.com', 'User {n}')"),
        )
        .await;
    }
    execute(&pool, "insert into ackloop.builtin_players (user_id, display_name) select id, 'Made by hand' from ackloop.builtin_users where email = 'u2@example.com'").await;
    let service_job: uuid::Uuid = sqlx::query_scalar("select ackloop.add_job('svc-1', 'Svc')")
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut jobs: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "select jobs.id, users.email from ackloop.player_creation_jobs as jobs
         join ackloop.builtin_users as users on users.id = jobs.builtin_user_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    jobs.sort_by(|a, b| b.1.cmp(&a.1));
    let ids: Vec<uuid::Uuid> = jobs.iter().map(|(id, _)| *id).collect();

    let refused = sqlx::query("select * from ackloop.insert_builtin_players($1)")
        .bind([ids.clone(), vec![service_job]].concat())
        .execute(&pool)
        .await
        .expect_err("a service's job is not the built-in player's");
    assert_eq!(
        refused.as_database_error().and_then(|err| err.code()).as_deref(),
        Some("22023")
    );
    assert_eq!(
        count_of(&pool, "select count(*) from ackloop.builtin_players").await,
        1,
        "nothing written"
    );

    let answered: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("select job_id, display_name from ackloop.insert_builtin_players($1)")
            .bind(&ids)
            .fetch_all(&pool)
            .await
            .unwrap();
    let expected: Vec<(uuid::Uuid, String)> = jobs
        .iter()
        .map(|(id, email)| {
            let name = match email.as_str() {
                "u2@example.com" => "Made by hand".to_owned(),
                other => format!("User {}", &other[1..2]),
            };
            (*id, name)
        })
        .collect();
    assert_eq!(
        answered, expected,
        "one row per job, in the order given, the existing player kept"
    );
    assert_eq!(
        count_of(&pool, "select count(*) from ackloop.builtin_players").await,
        3
    );
}
