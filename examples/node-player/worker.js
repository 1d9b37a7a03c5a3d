#!/usr/bin/env node
// A player worker for ackloop in Node, written from docs/protocol.md alone: it wakes on
// `player_jobs` (and polls, since notifications can be lost), claims batches with
// ackloop.claim_jobs, creates each player in a savepoint of its own, records failures with
// ackloop.record_failure, marks the rest done with ackloop.mark_done, and commits.
//
//   DATABASE_URL=postgres://… node worker.js
//
// BATCH_SIZE (32) and POLL_MS (2000) tune it. For tests: a display name starting with
// FAIL_PREFIX fails its first attempt (retryable), one starting with REJECT_PREFIX is refused
// for good, and HANG_AFTER_CLAIM=1 stops the worker for ever after it prints `claimed N`.
// stdout says `claimed N backend_pid=P` and `committed N done=D` per batch; stderr the rest
// (`listening on player_jobs` once it hears wake-ups).
'use strict';
const { Client, DatabaseError } = require('pg');

const env = process.env;
const BATCH_SIZE = Number(env.BATCH_SIZE || 32);
const POLL_MS = Number(env.POLL_MS || 2000);
const JOB_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

// A job's own failure, with whether another attempt could succeed.
class JobError extends Error {
  constructor(message, retryable) { super(message); this.retryable = retryable; }
}

// The session is gone (not one job's fault): no SQLSTATE at all, connection errors (08),
// the server shutting down (57P01-57P03), or its idle-in-transaction limit (25P03).
const lost = (err) => !(err instanceof DatabaseError) || /^(08|57P0|25P03)/.test(err.code);

// The effect: this user's player. Runs inside the job's savepoint.
async function createPlayer(db, job) {
  if (env.REJECT_PREFIX && job.display_name.startsWith(env.REJECT_PREFIX)) {
    throw new JobError(`the node worker refuses display names starting with ${env.REJECT_PREFIX}`, false);
  }
  if (env.FAIL_PREFIX && job.display_name.startsWith(env.FAIL_PREFIX) && job.attempt === 1) {
    throw new JobError(`the node worker failed attempt ${job.attempt} on purpose`, true);
  }
  await db.query(
    'insert into players (user_id, display_name) values ($1, $2) on conflict (user_id) do nothing',
    [job.user_id, job.display_name],
  );
}

// One batch in one transaction; returns how many jobs it claimed.
async function runBatch(db) {
  await db.query('begin');
  try {
    const { rows: jobs } = await db.query('select * from ackloop.claim_jobs($1)', [BATCH_SIZE]);
    if (jobs.length === 0) { await db.query('commit'); return 0; }
    console.log(`claimed ${jobs.length} backend_pid=${db.processID}`);
    if (env.HANG_AFTER_CLAIM === '1') await new Promise(() => setInterval(() => {}, 60_000));
    const done = [];
    for (const job of jobs) {
      await db.query('savepoint job');
      try {
        await createPlayer(db, job);
        await db.query('release savepoint job');
        done.push(job);
      } catch (err) {
        if (!(err instanceof JobError) && lost(err)) throw err;
        await db.query('rollback to savepoint job');
        // Data and constraint errors (classes 22, 23) would fail again; a lock wait never ran.
        const retryable = err instanceof JobError ? err.retryable : !/^2[23]/.test(err.code);
        const { rows: [outcome] } = await db.query(
          'select * from ackloop.record_failure(job_id => $1, attempt => $2, error => $3, retryable => $4, counted => $5)',
          [job.job_id, job.attempt, err.message, retryable, err.code !== '55P03'],
        );
        await db.query('release savepoint job');
        console.error(`job ${job.job_id} attempt ${job.attempt} ${outcome.status}: ${err.message}`);
      }
    }
    if (done.length > 0) {
      await db.query('select ackloop.mark_done($1::uuid[], $2::int[])',
        [done.map((job) => job.job_id), done.map((job) => job.attempt)]);
    }
    await db.query('commit');
    console.log(`committed ${jobs.length} done=${done.length}`);
    return jobs.length;
  } catch (err) {
    // A batch failure rolls back (its jobs are pending again, uncounted); a lost session
    // already took the transaction with it.
    if (!lost(err)) await db.query('rollback').catch(() => {});
    throw err;
  }
}

let stopping = false;
let woken = false; // a wake-up came while no nap was waiting: the next nap returns at once
let endNap = null;
const wake = () => { woken = true; endNap?.(); };
// Waits for a wake-up (a notification, a reconnect, a signal) or `ms`, whichever is first.
const nap = (ms) => new Promise((resolve) => {
  const finish = () => { clearTimeout(timer); endNap = null; woken = false; resolve(); };
  const timer = setTimeout(finish, ms);
  endNap = finish;
  if (woken || stopping) finish();
});

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
    if (!stopping) await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function main() {
  const stop = () => {
    if (stopping) process.exit(130); // a second signal: leave now, the transaction rolls back
    stopping = true;
    wake();
    listener?.end().catch(() => {});
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  const listening = listen();
  let db = null;
  while (!stopping) {
    try {
      db ??= await connect();
      while (!stopping && (await runBatch(db)) === BATCH_SIZE);
      await nap(POLL_MS);
    } catch (err) {
      console.error(`batch: ${err.message}`);
      if (lost(err)) { db?.end().catch(() => {}); db = null; }
      await nap(1000); // the same jobs come back: give whatever failed a moment
    }
  }
  await db?.end().catch(() => {});
  await listening;
  console.error('stopped');
}

main().catch((err) => { console.error(err); process.exit(1); });
