// The dashboard in a real browser (issue 13). Run by scripts/browser (`make browser`), which
// passes ACKLOOP_BIN, CHROMIUM, BROWSER_ARTIFACTS and DATABASE_URL.
//
// On a scratch database made beside DATABASE_URL's (or BROWSER_DATABASE_URL's, used as it is):
//   1. `ackloop dashboard --token T` starts, before any worker; headless Chromium opens its page,
//      which shows what the tables hold, refreshes itself, and asks for nothing off the machine.
//   2. A signup that times out leaves a pending job: the page shows it pending, and its age.
//   3. `ackloop worker` starts; more signups go through, and one fails at once (a trigger on
//      ackloop.builtin_players refuses the display name 'Fail Me' with a check_violation, which
//      the worker does not retry). The page's numbers come to equal the tables', the failed
//      job's row shows its last error. Screenshot.
//   4. The trigger is dropped; retry is clicked on the failed row: the server says 401, the page
//      asks for the token, and the job is queued again, completed, and gone from the table;
//      `ackloop jobs show` says done, and the numbers count it. Screenshot.
//   5. The job's own page says done. Screenshot. The dashboard and the worker exit 0 on SIGTERM.
//
// Every wait is on the page, a row or a process, with a deadline; no fixed sleeps. Every check
// prints what it checked; the last line is `browser: N passed, M failed`. Exit 1 on a failure.
import { spawn } from "node:child_process";
import { once } from "node:events";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import pg from "pg";
import { TimeoutError } from "puppeteer-core";
import { launchChromium } from "./browser.mjs";

const bin = need("ACKLOOP_BIN");
const artifacts = need("BROWSER_ARTIFACTS");
const adminUrl = need("DATABASE_URL");
const givenUrl = process.env.BROWSER_DATABASE_URL || "";
const token = `browser-test-${process.pid}`;
const tag = `${process.pid}-${Date.now()}`;
const failName = "Fail Me";

const t0 = Date.now();
const logs = fs.mkdtempSync(path.join(os.tmpdir(), "ackloop-browser."));
const children = [];
let passed = 0;
let scratchDb = null;
let url = givenUrl;
let db = null;
let browser = null;
let page = null;
let dashboardUrl = null;
const offMachine = [];
const pageErrors = [];
const dialogs = [];

function need(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`dashboard.mjs: ${name} is not set (run scripts/browser)`);
    process.exit(2);
  }
  return value;
}
class Failure extends Error {}
function fail(message) {
  throw new Failure(message);
}
function elapsed() {
  return ((Date.now() - t0) / 1000).toFixed(1).padStart(5);
}
function ok(what) {
  passed += 1;
  console.log(`  ok ${String(passed).padStart(2)} ${elapsed()} s  ${what}`);
}
function check(condition, what, otherwise) {
  if (!condition) fail(`${what}: ${otherwise}`);
  ok(what);
}
function step(what) {
  console.log(`-- ${elapsed()} s  ${what}`);
}

// Waits until `probe` returns a truthy value, polling every 50 ms, or fails saying `what`.
async function until(seconds, what, probe) {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) fail(`${what} (waited ${seconds} s)`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

// ---- the database ---------------------------------------------------------------------------

// DATABASE_URL with another database name, as scripts/interop makes its scratch databases.
function withDatabase(connectionString, name) {
  const q = connectionString.indexOf("?");
  const base = q < 0 ? connectionString : connectionString.slice(0, q);
  const query = q < 0 ? "" : connectionString.slice(q);
  const slash = base.lastIndexOf("/");
  if (slash < base.indexOf("//") + 2) fail(`cannot put a database name into DATABASE_URL (${base})`);
  return `${base.slice(0, slash)}/${name}${query}`;
}

async function sql(text, params = []) {
  return (await db.query(text, params)).rows;
}

// The rates for a page refreshed during the second `s` (Unix seconds): signups, and jobs
// finished (done or failed), per second over the ten whole seconds before `s` (the second under
// way is still filling, so the dashboard leaves it out).
const RATES_SQL = `
  select s::float8 as second,
    (select count(*) from ackloop.player_creation_jobs
      where floor(extract(epoch from created_at)) between s - 10 and s - 1) / 10.0 as signups,
    (select count(*) from ackloop.player_creation_jobs where status <> 'pending'
      and floor(extract(epoch from completed_at)) between s - 10 and s - 1) / 10.0 as completions`;

// What the dashboard's numbers mean, read from the tables (the contract in issue 13). The page
// shown may have been read a second before this or be refreshed a few seconds after it: the rates
// are given for each second from one before now to three after, and the page must show one pair.
async function tableNumbers() {
  const [row] = await sql(`
    select
      (select count(*) from ackloop.player_creation_jobs where status = 'pending')::int as pending,
      (select count(*) from ackloop.player_creation_jobs where status = 'failed')::int as failed,
      (select count(*) from ackloop.player_creation_jobs
        where status = 'done' and completed_at >= now() - interval '60 seconds')::int as done_recent,
      (select extract(epoch from now() - min(created_at))::float8
         from ackloop.player_creation_jobs where status = 'pending') as oldest_pending,
      pg_notification_queue_usage() * 100 as queue_usage,
      (select json_agg(json_build_array(rates.signups, rates.completions) order by rates.second)
         from generate_series(floor(extract(epoch from now()))::bigint - 1,
                              floor(extract(epoch from now()))::bigint + 3) as s,
              lateral (${RATES_SQL}) as rates) as rates`);
  return {
    pending: row.pending,
    failed: row.failed,
    "done-recent": row.done_recent,
    rates: row.rates.map(([signups, completions]) => [Number(signups), Number(completions)]),
    "oldest-pending": row.oldest_pending === null ? null : Number(row.oldest_pending),
    "queue-usage": Number(row.queue_usage),
  };
}

// The rates for a page refreshed during the second `second`.
async function ratesAt(second) {
  const [row] = await sql(`select * from (select $1::bigint as s) as given, lateral (${RATES_SQL}) as rates`, [second]);
  return [Number(row.signups), Number(row.completions)];
}

async function job(id) {
  const [row] = await sql(
    `select j.status, j.attempts, j.last_error, u.email
       from ackloop.player_creation_jobs j join ackloop.builtin_users u on u.id = j.builtin_user_id
      where j.id = $1`,
    [id],
  );
  return row;
}

// ---- processes ------------------------------------------------------------------------------

function start(name, args, { stdout = "file" } = {}) {
  const err = fs.openSync(path.join(logs, `${name}.err`), "w");
  const out = stdout === "file" ? fs.openSync(path.join(logs, `${name}.out`), "w") : "pipe";
  const child = spawn(bin, args, { env: { ...process.env, DATABASE_URL: url }, stdio: ["ignore", out, err] });
  child.exited = once(child, "exit").then(([code, signal]) => ({ code, signal }));
  child.label = name;
  children.push(child);
  return child;
}

function logOf(name, suffix = "err") {
  try {
    return fs.readFileSync(path.join(logs, `${name}.${suffix}`), "utf8");
  } catch {
    return "";
  }
}

async function run(name, args) {
  const child = spawn(bin, args, { env: { ...process.env, DATABASE_URL: url }, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (d) => (stdout += d));
  child.stderr.on("data", (d) => (stderr += d));
  const [code] = await once(child, "exit");
  fs.writeFileSync(path.join(logs, `${name}.out`), stdout);
  fs.writeFileSync(path.join(logs, `${name}.err`), stderr);
  return { code, stdout, stderr };
}

async function signup(n, displayName, timeout = "5s") {
  const email = `browser-${n}-${tag}@example.com`;
  const result = await run(`signup-${n}`, [
    "signup", "--email", email, "--display-name", displayName, "--timeout", timeout, "--json",
  ]);
  return { email, ...result };
}

// SIGTERM, and the process must exit 0 within 15 s.
async function stop(child) {
  child.kill("SIGTERM");
  const timer = new Promise((resolve) => setTimeout(() => resolve(null), 15_000));
  const result = await Promise.race([child.exited, timer]);
  check(result !== null, `${child.label} exited within 15 s of SIGTERM`, "it is still running");
  check(
    result.code === 0,
    `${child.label} exited 0 after SIGTERM`,
    `it exited ${result.code ?? result.signal}: ${logOf(child.label).trim().split("\n").slice(-3).join(" | ")}`,
  );
}

// ---- the page -------------------------------------------------------------------------------

const NUMBER_IDS = ["pending", "failed", "done-recent", "signups-rate", "completions-rate", "oldest-pending", "queue-usage"];

async function pageNumbers() {
  return page.evaluate((ids) => {
    const shown = {};
    for (const id of ids) shown[id] = document.getElementById(id)?.textContent.trim() ?? null;
    shown.rows = document.querySelectorAll("table#failed-jobs tr[data-job-id]").length;
    return shown;
  }, NUMBER_IDS);
}

// In the page: whether what it shows equals `expected` (counts exactly; the rates as one of the
// candidate pairs, to the tenth that the page shows; the oldest pending job's age to 1.5 s; the
// queue usage to a hundredth of a percent).
function differences(expected) {
  const text = (id) => document.getElementById(id)?.textContent.trim() ?? null;
  const num = (id) => {
    const t = text(id);
    return t !== null && /^-?[0-9]+(\.[0-9]+)?$/.test(t) ? Number(t) : NaN;
  };
  const diff = [];
  for (const id of ["pending", "failed", "done-recent"]) {
    if (text(id) !== String(expected[id])) diff.push(id);
  }
  const [signups, completions] = [num("signups-rate"), num("completions-rate")];
  if (!expected.rates.some(([s, c]) => Math.abs(signups - s) < 0.001 && Math.abs(completions - c) < 0.001)) {
    diff.push("signups-rate", "completions-rate");
  }
  if (expected["oldest-pending"] === null) {
    if (text("oldest-pending") !== "-") diff.push("oldest-pending");
  } else if (!(Math.abs(num("oldest-pending") - expected["oldest-pending"]) <= 1.5)) {
    diff.push("oldest-pending");
  }
  if (!(Math.abs(num("queue-usage") - expected["queue-usage"]) < 0.01)) diff.push("queue-usage");
  // #failed counts every failed job; the table lists the newest 20 of them.
  if (document.querySelectorAll("table#failed-jobs tr[data-job-id]").length !== Math.min(expected.failed, 20)) {
    diff.push("rows");
  }
  return diff.length === 0;
}

// Until the page's numbers equal the tables' read at about the same moment (the tables are read
// again while they differ: the page refreshes every second, and the windows slide).
async function pageMatchesTables(what, seconds = 15) {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    const expected = await tableNumbers();
    try {
      await page.waitForFunction(differences, { timeout: 2500, polling: 100 }, expected);
      const shown = await pageNumbers();
      ok(`${what}: the page shows the tables' numbers ${JSON.stringify(shown)}`);
      return shown;
    } catch (e) {
      if (!(e instanceof TimeoutError)) throw e;
      if (Date.now() > deadline) {
        fail(`${what}: after ${seconds} s the page shows ${JSON.stringify(await pageNumbers())}, ` +
          `the tables say ${JSON.stringify(expected)}`);
      }
    }
  }
}

async function waitInPage(seconds, what, fn, ...args) {
  try {
    return await page.waitForFunction(fn, { timeout: seconds * 1000, polling: 100 }, ...args);
  } catch (e) {
    if (e instanceof TimeoutError) fail(`${what} (waited ${seconds} s)`);
    throw e;
  }
}

async function screenshot(name) {
  const file = path.join(artifacts, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`   screenshot: ${file}`);
}

// ---- the test -------------------------------------------------------------------------------

async function main() {
  // The screenshots of an earlier run go, so that the directory holds this run's alone.
  for (const name of ["dashboard-pending", "dashboard-before-retry", "dashboard-after-retry", "job-page", "failure"]) {
    fs.rmSync(path.join(artifacts, `${name}.png`), { force: true });
  }
  console.log(`browser: the dashboard in headless Chromium (${process.env.CHROMIUM}), ${bin}`);
  console.log(`browser: logs in ${logs}, screenshots in ${artifacts}`);

  if (!givenUrl) {
    scratchDb = `ackloop_browser_${process.pid}`;
    const admin = new pg.Client({ connectionString: adminUrl });
    await admin.connect();
    try {
      await admin.query(`drop database if exists ${scratchDb} with (force)`);
      await admin.query(`create database ${scratchDb}`);
    } finally {
      await admin.end();
    }
    url = withDatabase(adminUrl, scratchDb);
  }
  const migrate = await run("migrate", ["migrate"]);
  check(migrate.code === 0, "ackloop migrate exited 0", `it exited ${migrate.code}: ${migrate.stderr.trim()}`);
  db = new pg.Client({ connectionString: url });
  await db.connect();
  // The cause of the one failure: a check_violation (SQLSTATE class 23), which the worker fails
  // at once, without retries. Dropping the trigger removes it. The function lives in public and
  // is named with its schema: the trigger fires inside ackloop's functions, whose search_path is
  // pinned to pg_catalog, ackloop, pg_temp (the body names nothing, so needs no path of its own).
  await sql(`
    create or replace function public.browser_test_refuse() returns trigger language plpgsql as $$
    begin
      if new.display_name = '${failName}' then
        raise exception 'the browser test refuses the display name %', new.display_name
          using errcode = 'check_violation';
      end if;
      return new;
    end $$`);
  await sql(`create or replace trigger browser_test_refuse before insert on ackloop.builtin_players
               for each row execute function public.browser_test_refuse()`);

  step("the dashboard, with a token, before any worker");
  // The worker's metrics endpoint, which the dashboard reads for the stages the tables do not
  // hold (claim, confirmation): a port free now, for the worker started later.
  const metricsPort = await new Promise((resolve) => {
    const probe = net.createServer();
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
  const dashboard = start("dashboard",
    ["dashboard", "--addr", "127.0.0.1:0", "--token", token, "--metrics-from", `127.0.0.1:${metricsPort}`],
    { stdout: "pipe" });
  const outLog = fs.createWriteStream(path.join(logs, "dashboard.out"));
  const lines = readline.createInterface({ input: dashboard.stdout });
  const firstLine = new Promise((resolve) => {
    let first = null;
    lines.on("line", (line) => {
      outLog.write(`${line}\n`);
      if (first === null) resolve((first = line));
    });
  });
  const said = await Promise.race([
    firstLine,
    dashboard.exited.then(({ code, signal }) =>
      fail(`ackloop dashboard exited ${code ?? signal} before it listened: ${logOf("dashboard").trim()}`)),
    new Promise((resolve) => setTimeout(() => resolve(null), 30_000)),
  ]);
  check(said !== null, "ackloop dashboard printed a line within 30 s", `nothing (stderr: ${logOf("dashboard").trim()})`);
  const listening = /^dashboard: (http:\/\/127\.0\.0\.1:[0-9]+\/)$/.exec(said);
  check(listening, "its first line on stdout is `dashboard: http://127.0.0.1:PORT/`", `it is ${JSON.stringify(said)}`);
  dashboardUrl = listening[1];
  const origin = new URL(dashboardUrl).origin;

  browser = await launchChromium();
  page = await browser.newPage();
  page.on("request", (request) => {
    const u = request.url();
    if (!u.startsWith(`${origin}/`) && !u.startsWith("data:") && !u.startsWith("about:")) offMachine.push(u);
  });
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  page.on("dialog", async (dialog) => {
    dialogs.push({ type: dialog.type(), message: dialog.message() });
    await (dialog.type() === "prompt" ? dialog.accept(token) : dialog.dismiss());
  });
  const response = await page.goto(dashboardUrl, { waitUntil: "load", timeout: 30_000 });
  check(response.status() === 200, `GET ${dashboardUrl} is 200 in Chromium (${await browser.version()})`,
    `it is ${response.status()}`);
  await waitInPage(10, "the page filled #updated", () => document.getElementById("updated")?.textContent.trim());
  const updated = await page.$eval("#updated", (e) => e.textContent.trim());
  await waitInPage(5, "#updated did not change: the page does not refresh itself",
    (before) => document.getElementById("updated").textContent.trim() !== before, updated);
  ok(`the page refreshes itself: #updated changed from ${JSON.stringify(updated)}`);
  await pageMatchesTables("empty tables");

  step("a signup that times out, with no worker: its job waits");
  const early = await signup(1, "Early Player", "1s");
  check(early.code === 5, "ackloop signup with no worker timed out (exit 5)", `it exited ${early.code}: ${early.stdout}${early.stderr}`);
  const pendingShown = await pageMatchesTables("one pending job");
  check(pendingShown.pending === "1" && /^[0-9]+(\.[0-9]+)?$/.test(pendingShown["oldest-pending"]),
    `#pending is 1 and #oldest-pending a number of seconds (${pendingShown["oldest-pending"]})`,
    JSON.stringify(pendingShown));
  await screenshot("dashboard-pending");

  step("the worker; signups, one of them failing");
  const worker = start("worker", ["worker", "--metrics-addr", `127.0.0.1:${metricsPort}`]);
  await until(30, "ackloop worker did not start", async () => {
    if (worker.exitCode !== null) fail(`ackloop worker exited ${worker.exitCode}: ${logOf("worker").trim()}`);
    return logOf("worker").includes("worker started");
  });
  ok("ackloop worker started");
  await until(15, "the timed-out signup's job was not done", async () => {
    const [row] = await sql(`select count(*)::int as n from ackloop.player_creation_jobs where status = 'pending'`);
    return row.n === 0;
  });
  ok("the worker did the job that waited");
  const good = await Promise.all([signup(2, "Player Two"), signup(3, "Player Three"), signup(4, "Player Four")]);
  for (const [i, s] of good.entries()) {
    check(s.code === 0 && s.stdout.includes('"player"'), `signup ${i + 2} confirmed its player (exit 0)`,
      `it exited ${s.code}: ${s.stdout}${s.stderr}`);
  }
  const failing = await signup(5, failName);
  check(failing.code === 6, `the signup of '${failName}' heard its job failed (exit 6)`,
    `it exited ${failing.code}: ${failing.stdout}${failing.stderr}`);
  const failedId = /"job_id":\s*"([0-9a-f-]{36})"/.exec(failing.stdout)?.[1];
  check(failedId, `the failed signup named its job (${failedId})`, `no job_id in ${failing.stdout}`);
  const failedJob = await job(failedId);
  check(failedJob.status === "failed" && failedJob.attempts === 1 && failedJob.last_error?.includes("refuses the display name"),
    `the tables: job ${failedId} failed after 1 attempt with the trigger's error`, JSON.stringify(failedJob));

  step("the acknowledgement path, from the worker's metrics endpoint");
  // The page shows the stages over about the last ten seconds: the signups above are in them.
  await waitInPage(10, "the page shows no claim → done latency from the worker's metrics endpoint",
    () => Number(document.querySelector("#stage-claim_to_done td:nth-child(2)").textContent) > 0);
  const stage = await page.$eval("#stage-claim_to_done", (e) => [...e.querySelectorAll("td")].map((td) => td.textContent));
  check(Number(stage[2]) > 0, `#stage-claim_to_done: ${stage[1]} jobs, p50 ${stage[2]} ms, p99 ${stage[3]} ms`,
    JSON.stringify(stage));
  const drawn = await page.$eval("#chart-claim_to_done polyline", (e) => e.getAttribute("points") ?? "");
  check(drawn.split(" ").length > 1, "svg#chart-claim_to_done draws the stage's medians", `points: ${drawn}`);
  const health = await page.$eval("#listener-health", (e) => e.textContent);
  check(health.includes("Listener reconnects: 0") && !health.includes("Unreachable"),
    `#listener-health: ${JSON.stringify(health)}`, "it names no reconnect count, or an unreachable endpoint");

  step("the page against the tables");
  // From the second after the last of them, the page's rates count every signup and every
  // finished job so far (until the first of them is more than ten seconds old).
  const [last] = await sql(`select floor(extract(epoch from greatest(max(created_at), max(completed_at))))::bigint + 1 as s
                              from ackloop.player_creation_jobs`);
  const [signupRate, completionRate] = await ratesAt(last.s);
  check(signupRate > 0 && completionRate > 0, `the tables: ${signupRate} signups/s, ${completionRate} completions/s ` +
    `(done or failed) over the ten seconds before the one after the last signup`, "they are 0");
  await waitInPage(5, `the page did not show ${signupRate} signups/s and ${completionRate} completions/s`,
    (signups, completions) =>
      Math.abs(Number(document.getElementById("signups-rate").textContent) - signups) < 0.001 &&
      Math.abs(Number(document.getElementById("completions-rate").textContent) - completions) < 0.001,
    signupRate, completionRate);
  ok(`and the page shows them: #signups-rate ${signupRate}, #completions-rate ${completionRate}`);
  const shown = await pageMatchesTables("4 done, 1 failed");
  check(shown.failed === "1" && shown["done-recent"] === "4" && shown.pending === "0" && shown["oldest-pending"] === "-",
    "#failed 1, #done-recent 4, #pending 0, #oldest-pending -", JSON.stringify(shown));
  const row = await page.$(`table#failed-jobs tr[data-job-id="${failedId}"]`);
  check(row, `table#failed-jobs has the row tr[data-job-id="${failedId}"]`, "it does not");
  const shownError = await row.$eval("td.last-error", (e) => e.textContent.trim());
  check(shownError === failedJob.last_error, `its td.last-error is the job's last_error (${JSON.stringify(shownError)})`,
    `it is ${JSON.stringify(shownError)}, the table says ${JSON.stringify(failedJob.last_error)}`);
  check(await row.$("button.retry"), "the row has a button.retry", "it has none");
  await screenshot("dashboard-before-retry");

  step("retry in the page, with the cause removed");
  const unauthenticated = await fetch(`${origin}/api/jobs/${failedId}/retry`, { method: "POST" });
  check(unauthenticated.status === 401, "POST /api/jobs/{id}/retry without the token is 401",
    `it is ${unauthenticated.status}`);
  check((await job(failedId)).status === "failed", "and the job is still failed", "it changed");
  await sql("drop trigger browser_test_refuse on ackloop.builtin_players");
  ok("dropped the trigger that failed the job");
  await page.click(`table#failed-jobs tr[data-job-id="${failedId}"] button.retry`);
  await waitInPage(10, "#action-result does not say `queued again` after the retry click",
    () => (document.getElementById("action-result")?.textContent ?? "").includes("queued again"));
  ok(`#action-result says ${JSON.stringify(await page.$eval("#action-result", (e) => e.textContent.trim()))}`);
  check(dialogs.length === 1 && dialogs[0].type === "prompt",
    `the page asked for the token with window.prompt after the 401 (${JSON.stringify(dialogs[0]?.message)})`,
    `dialogs: ${JSON.stringify(dialogs)}`);
  const doneJob = await until(15, `job ${failedId} was not done after its retry`, async () => {
    const j = await job(failedId);
    return j.status === "done" ? j : null;
  });
  check(doneJob.last_error === null, `the tables: job ${failedId} is done (attempts ${doneJob.attempts})`,
    `last_error is still ${JSON.stringify(doneJob.last_error)}`);
  const shownJob = await run("jobs-show", ["jobs", "show", failedId, "--json"]);
  const shownJson = shownJob.code === 0 ? JSON.parse(shownJob.stdout) : null;
  check(shownJson?.status === "done" && shownJson.player_missing === false, "ackloop jobs show says done, with its player",
    `exit ${shownJob.code}: ${shownJob.stdout}${shownJob.stderr}`);
  await waitInPage(10, "the failed row did not leave the table",
    (id) => !document.querySelector(`table#failed-jobs tr[data-job-id="${id}"]`), failedId);
  ok("its row left table#failed-jobs");
  const after = await pageMatchesTables("after the retry");
  check(after.failed === "0" && after["done-recent"] === "5", "#failed 0, #done-recent 5 (the retried job counted)",
    JSON.stringify(after));
  await screenshot("dashboard-after-retry");

  step("the job's own page");
  const jobResponse = await page.goto(`${origin}/jobs/${failedId}`, { waitUntil: "load", timeout: 30_000 });
  check(jobResponse.status() === 200, `GET /jobs/${failedId} is 200`, `it is ${jobResponse.status()}`);
  await waitInPage(10, "#job-status did not say done", () => document.getElementById("job-status")?.textContent.trim() === "done");
  const email = await page.$eval("#job-email", (e) => e.textContent.trim());
  check(email === failing.email, `#job-status is done and #job-email is ${email}`, `#job-email is ${JSON.stringify(email)}`);
  await screenshot("job-page");

  check(offMachine.length === 0, "the pages asked for nothing but the dashboard (no CDN)", offMachine.join(", "));
  check(pageErrors.length === 0, "no script error in the pages", pageErrors.join(" | "));

  step("shutdown");
  await browser.close();
  browser = null;
  await stop(dashboard);
  await stop(worker);
}

let status = 0;
try {
  await main();
} catch (e) {
  status = 1;
  console.log(`FAILED: ${e instanceof Failure ? e.message : e.stack}`);
  if (page) await screenshot("failure").catch(() => {});
  for (const name of ["dashboard", "worker"]) {
    const tail = logOf(name).trim().split("\n").slice(-5).join("\n    ");
    if (tail) console.log(`  ${name} stderr (last lines):\n    ${tail}`);
  }
} finally {
  if (browser) await browser.close().catch(() => {});
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  await Promise.all(children.map((c) => c.exited));
  if (db) await db.end().catch(() => {});
  if (scratchDb) {
    const admin = new pg.Client({ connectionString: adminUrl });
    try {
      await admin.connect();
      await admin.query(`drop database if exists ${scratchDb} with (force)`);
    } catch (e) {
      console.log(`browser: could not drop the scratch database ${scratchDb}: ${e.message}`);
      status = 1;
    } finally {
      await admin.end().catch(() => {});
    }
  } else if (db) {
    // A given database keeps its rows; the trigger and its function go.
    const c = new pg.Client({ connectionString: url });
    await c.connect().then(() => c.query("drop function if exists public.browser_test_refuse() cascade")).catch(() => {});
    await c.end().catch(() => {});
  }
  if (status === 0 && !process.env.BROWSER_KEEP_LOGS) fs.rmSync(logs, { recursive: true, force: true });
  else console.log(`browser: logs kept in ${logs}`);
  console.log(`browser: screenshots in ${artifacts}`);
  console.log(`browser: done in ${elapsed().trim()} s`);
  console.log(`browser: ${passed} passed, ${status} failed`);
  process.exit(status);
}
