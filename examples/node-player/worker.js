#!/usr/bin/env node
// A player service for ackloop in Node, written from docs/protocol.md alone. Its players live in
// its own table, `node_players` (made at start if missing), keyed by the auth service's user id
// that each job carries (text: a number, a UUID or a string). It wakes on `player_jobs` (and
// polls, since notifications can be lost), claims batches of first attempts with
// ackloop.claim_jobs, creates each player in a savepoint of its own, records failures with
// ackloop.record_failure, marks the rest done with ackloop.mark_done (its own player id, as text,
// and a small JSON result per job: what the waiting caller is told), and commits. When a batch
// comes back short it takes jobs tried before, one at a time (ackloop.start_attempt, then
// ackloop.lock_attempt); it takes jobs that way too when it starts and after its session died,
// since a job may have killed it.
//
//   DATABASE_URL=postgres://… node worker.js
//
// BATCH_SIZE (32), POLL_MS (2000), MAX_ATTEMPTS (5), BACKOFF_BASE_MS (1000) and BACKOFF_MAX_MS
// (300000) tune it. For tests: a display name starting with FAIL_PREFIX fails its first attempt
// (retryable), one starting with REJECT_PREFIX is refused for good, one starting with
// KILL_PREFIX terminates the worker's session on every attempt, and HANG_AFTER_CLAIM=1 stops
// the worker for ever after it prints `claimed N` (and skips the jobs taken alone on start, so
// that it claims a batch). stdout says `claimed N backend_pid=P` and `committed N done=D` per
// batch, `started JOB attempt=A backend_pid=P` and `committed 1 done=D job=JOB attempt=A` per
// job taken alone; stderr the rest (`listening on player_jobs` once it hears wake-ups).
'use strict';
const { Client, DatabaseError } = require('pg');

const env = process.env;
const BATCH_SIZE = Number(env.BATCH_SIZE || 32);
const POLL_MS = Number(env.POLL_MS || 2000);
// Given to start_attempt and record_failure alike: max_attempts, backoff_base_ms, backoff_max_ms.
const RETRIES = [env.MAX_ATTEMPTS || 5, env.BACKOFF_BASE_MS || 1000, env.BACKOFF_MAX_MS || 300000].map(Number);
const JOB_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

// A job's own failure, with whether another attempt could succeed.
const jobError = (message, retryable = false) => Object.assign(new Error(message), { retryable });

// The session is gone (not one job's fault): no SQLSTATE at all, connection errors (08), the
// server shutting down or the backend terminated (57P01-57P03), or its idle-in-transaction
// limit (25P03).
const lost = (err) => !(err instanceof DatabaseError) || /^(08|57P0|25P03)/.test(err.code);

// This service's own players: one per user of the auth service, whatever its id looks like.
const CREATE_PLAYERS = `
  create table if not exists node_players (
    id bigserial primary key,
    user_id text not null unique,
    display_name text not null,
    created_at timestamptz not null default now()
  )`;

// node_players, unless it exists; one process at a time (concurrent `create table if not
// exists` can collide in the catalog).
async function makePlayersTable(db) {
  await db.query('begin');
  try {
    await db.query("select pg_advisory_xact_lock(hashtext('node_players'))");
    await db.query(CREATE_PLAYERS);
    await db.query('commit');
  } catch (err) {
    await db.query('rollback').catch(() => {});
    throw err;
  }
}

// The effect: this user's player, and the answer for mark_done. Runs inside the job's savepoint.
// A player made by an earlier attempt whose answer was lost is the player: the same row is
// returned, never a second one.
async function createPlayer(db, job) {
  const named = (prefix) => prefix && job.display_name.startsWith(prefix);
  if (named(env.REJECT_PREFIX)) throw jobError(`the node worker refuses display names starting with ${env.REJECT_PREFIX}`);
  if (named(env.FAIL_PREFIX) && job.attempt === 1) throw jobError('the node worker failed attempt 1 on purpose', true);
  if (named(env.KILL_PREFIX)) await db.query('select pg_terminate_backend(pg_backend_pid())');
  const { rows: [player] } = await db.query(
    `insert into node_players (user_id, display_name) values ($1, $2)
     on conflict (user_id) do update set user_id = excluded.user_id
     returning id::text as id, display_name`,
    [job.user_id, job.display_name]);
  return { playerId: player.id, result: { display_name: player.display_name } };
}

// One attempt of a job, in a savepoint of its own: the answer if the effect succeeded (the
// player's id and result), else null, its writes undone and the failure recorded (failed for
// good, or pending until its backoff).
async function attempt(db, job) {
  await db.query('savepoint job');
  try {
    const answer = await createPlayer(db, job);
    await db.query('release savepoint job');
    return answer;
  } catch (err) {
    if (err.retryable === undefined && lost(err)) throw err;
    await db.query('rollback to savepoint job');
    // Data and constraint errors (classes 22, 23) would fail again; a lock wait never ran.
    const { rows: [outcome] } = await db.query(
      `select * from ackloop.record_failure(job_id => $1, attempt => $2, error => $3, retryable => $4,
         counted => $5, max_attempts => $6, backoff_base_ms => $7, backoff_max_ms => $8)`,
      [job.job_id, job.attempt, err.message, err.retryable ?? !/^2[23]/.test(err.code), err.code !== '55P03',
        ...RETRIES],
    );
    await db.query('release savepoint job');
    console.error(`job ${job.job_id} attempt ${job.attempt} ${outcome?.status ?? 'finished elsewhere'}: ${err.message}`);
    return null;
  }
}

// One transaction: the jobs `take` locks, an attempt of each, the good ones marked done, commit.
// Returns [jobs taken, jobs done]. On an error the main loop rolls back.
async function attemptAll(db, take) {
  await db.query('begin');
  const jobs = await take();
  const done = [];
  for (const job of jobs) {
    const answer = await attempt(db, job);
    if (answer !== null) done.push({ job, answer });
  }
  if (done.length > 0) await db.query(
    `select ackloop.mark_done(job_ids => $1::uuid[], attempts => $2::int[], player_ids => $3::text[],
       results => $4::jsonb[])`,
    [done.map(({ job }) => job.job_id), done.map(({ job }) => job.attempt),
      done.map(({ answer }) => answer.playerId), done.map(({ answer }) => JSON.stringify(answer.result))]);
  await db.query('commit');
  return [jobs.length, done.length];
}

// One batch of first attempts; returns how many jobs it claimed.
async function runBatch(db) {
  const [claimed, done] = await attemptAll(db, async () => {
    const { rows: jobs } = await db.query('select * from ackloop.claim_jobs($1)', [BATCH_SIZE]);
    if (jobs.length > 0) console.log(`claimed ${jobs.length} backend_pid=${db.processID}`);
    if (jobs.length > 0 && env.HANG_AFTER_CLAIM === '1') await new Promise(() => setInterval(() => {}, 60_000));
    return jobs;
  });
  if (claimed > 0) console.log(`committed ${claimed} done=${done}`);
  return claimed;
}

// One job alone (a job tried before; with `anyJob`, any due job): its attempt counted and
// committed first, so that a job that kills the session still runs out of attempts, then made
// in a transaction of its own. Returns false when no such job is due.
async function runAlone(db, anyJob) {
  const { rows: [job] } = await db.query(
    `select * from ackloop.start_attempt(max_attempts => $1, backoff_base_ms => $2,
       backoff_max_ms => $3, any_job => $4)`, [...RETRIES, anyJob]);
  if (job?.status === 'gave_up') console.error(`job ${job.job_id} failed: ${job.last_error}`);
  if (job?.status !== 'started') return job !== undefined;
  console.log(`started ${job.job_id} attempt=${job.attempt} backend_pid=${db.processID}`);
  const [locked, done] = await attemptAll(db, async () => {
    const { rows: [{ locked }] } = await db.query('select ackloop.lock_attempt($1, $2) as locked',
      [job.job_id, job.attempt]);
    return locked ? [job] : []; // not locked: the job changed meanwhile (an operator, or its lease ran out)
  });
  if (locked) console.log(`committed 1 done=${done} job=${job.job_id} attempt=${job.attempt}`);
  else console.error(`job ${job.job_id} attempt ${job.attempt} not made: the job changed meanwhile`);
  return true;
}

let stopping = false;
let wake; // ends the current nap, or the next one at once if the loop is busy
let woken = new Promise((resolve) => { wake = resolve; });
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
// Waits for a wake-up (a notification, a reconnect, a signal) or `ms`, whichever is first.
async function nap(ms) {
  let timer;
  await Promise.race([woken, new Promise((resolve) => { timer = setTimeout(resolve, ms); })]);
  clearTimeout(timer);
  woken = new Promise((resolve) => { wake = resolve; });
}

async function connect() {
  const db = new Client({ connectionString: env.DATABASE_URL, application_name: 'ackloop-node-player' });
  db.on('error', (err) => console.error(`connection lost: ${err.message}${err.code ? ` (${err.code})` : ''}`));
  await db.connect();
  return db;
}

// The wake-up connection. After each (re)connect it wakes the loop: notifications sent while
// it was away are lost, so the table is looked at instead.
let listener = null;
async function listen() {
  while (!stopping) {
    try {
      listener = await connect();
      if (stopping) { await listener.end(); break; }
      const ended = new Promise((resolve) => { listener.once('end', resolve); listener.once('error', resolve); });
      listener.on('notification', (msg) => {
        if (JOB_ID.test(msg.payload)) wake();
        else console.error(`ignoring a payload that is not a job id on ${msg.channel}`);
      });
      await listener.query('listen player_jobs');
      console.error('listening on player_jobs');
      wake();
      await ended;
    } catch (err) {
      console.error(`listener: ${err.message}`);
    }
    if (!stopping) await pause(1000);
  }
}

async function main() {
  const stop = () => {
    if (stopping) process.exit(130); // a second signal: leave now, the transaction rolls back
    stopping = true;
    wake();
    listener?.end().catch(() => {});
  };
  for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, stop);
  const listening = listen();
  let db = null;
  // Jobs to take alone before the next batch: on start (the last process may have died of a
  // job) and after a lost session (a job may have killed it), so that such a job has its
  // attempts counted and fails in the end, instead of taking its batch down with it for ever.
  let alone = env.HANG_AFTER_CLAIM === '1' ? 0 : BATCH_SIZE;
  let tableMade = false;
  while (!stopping) {
    try {
      db ??= await connect();
      if (!tableMade) {
        await makePlayersTable(db);
        tableMade = true;
      }
      while (!stopping && alone > 0 && (await runAlone(db, true))) alone -= 1;
      alone = 0;
      while (!stopping && (await runBatch(db)) === BATCH_SIZE);
      while (!stopping && (await runAlone(db, false)));
      await nap(POLL_MS);
    } catch (err) {
      console.error(`jobs: ${err.message}`);
      // A lost session took its transaction with it; any other failure is rolled back. Either
      // way the jobs it held are pending again, their attempts uncounted, except a job
      // start_attempt counted: it stays running until its lease ends, then is tried again.
      if (!lost(err)) await db.query('rollback').catch(() => {});
      else {
        db?.end().catch(() => {});
        [db, alone] = [null, BATCH_SIZE];
      }
      // The same jobs come back: give whatever failed a moment. A pause, not a nap that a
      // wake-up ends: a job that killed the session stays locked by the dying backend for a
      // moment, and would be skipped by the jobs taken alone, then met again in a batch.
      await pause(1000);
    }
  }
  await db?.end().catch(() => {});
  await listening;
  console.error('stopped');
}

main().catch((err) => { console.error(err); process.exit(1); });
