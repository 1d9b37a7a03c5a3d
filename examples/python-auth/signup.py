#!/usr/bin/env python3
"""An auth service for ackloop in Python, written from docs/protocol.md alone.

Its users live in its own table, `py_users` (made at start if missing). A signup inserts the
user and adds its player-creation job with ackloop.add_job in ONE transaction, so the job exists
exactly when the user does; the job carries the user's own id (a UUID, as text) and display
name. The job id is chosen here (a UUIDv7), so that the process listens on `player_jobs_done`
for it before the signup commits; it waits with a timeout, rechecking with ackloop.job_outcomes
(a notification can be lost), and prints the player service's answer: its own player id and its
result (a JSON object). One JSON line per signup on stdout; exit 0 only if every signup's player
was confirmed in time.

With --builtin it signs users up on ackloop's built-in tables instead (ackloop.sign_up: the
built-in auth service's users, answered by the built-in player service, e.g. `ackloop worker`).

    DATABASE_URL=postgres://… python signup.py --email ada@example.com --display-name Ada
    DATABASE_URL=postgres://… python signup.py --count 500 --concurrency 16 --prefix py-
    DATABASE_URL=postgres://… python signup.py --builtin --count 500 --prefix py-
"""

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
import uuid

import psycopg
from psycopg import errors

DONE_CHANNEL = "player_jobs_done"
# While waiting, the job is read this often too: a notification can be lost (a listener
# reconnecting), and the job table is the truth anyway.
LOOK_EVERY_SECS = 1.0

# This service's own users. Whatever shape suits the service: ackloop only ever sees the id
# (as text) and the display name it is given in add_job.
CREATE_USERS = """
    create table if not exists py_users (
        id uuid primary key,
        email text not null,
        display_name text not null,
        created_at timestamptz not null default now(),
        constraint py_users_email_key unique (email),
        constraint py_users_email_valid check (email ~ '^[^@[:space:]]+@[^@[:space:]]+$')
    )
"""

# The refusals a caller is told about, by the constraint the database names: the field at fault.
INVALID = {
    "py_users_email_valid": "email",
    "player_creation_jobs_user_id_valid": "user_id",
    "player_creation_jobs_display_name_valid": "display_name",
    "player_creation_jobs_extra_valid": "extra",
    "builtin_users_email_valid": "email",
    "builtin_users_display_name_valid": "display_name",
}
EMAIL_TAKEN = {"py_users_email_key", "builtin_users_email_key"}


def uuid_v7() -> uuid.UUID:
    """48 bits of Unix milliseconds, version 7, variant 10, random bits (RFC 9562)."""
    value = (time.time_ns() // 1_000_000 & (1 << 48) - 1) << 80 | secrets.randbits(80)
    value = value & ~(0xF << 76) | 0x7 << 76
    value = value & ~(0x3 << 62) | 0x2 << 62
    return uuid.UUID(int=value)


class Confirmations:
    """The process's one LISTEN connection: it wakes the waiter of each job id it hears of."""

    def __init__(self, url: str):
        self.url = url
        self.waiters: dict[str, asyncio.Event] = {}
        self.listening = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    await conn.execute(f"listen {DONE_CHANNEL}")
                    self.listening.set()
                    # Whatever was sent while we were away is lost: every waiter looks again.
                    for event in self.waiters.values():
                        event.set()
                    async for note in conn.notifies():
                        event = self.waiters.get(note.payload)  # anything else is noise
                        if event is not None:
                            event.set()
            except psycopg.OperationalError as err:
                print(f"listener lost: {err}; reconnecting", file=sys.stderr)
                await asyncio.sleep(0.5)


def refused(err: psycopg.Error) -> dict | None:
    """What a refused signup tells its caller, or None for an error that is not a refusal."""
    constraint = err.diag.constraint_name
    if isinstance(err, errors.CheckViolation) and constraint in INVALID:
        return {"outcome": "invalid", "field": INVALID[constraint], "message": err.diag.message_primary}
    if isinstance(err, errors.UniqueViolation) and constraint in EMAIL_TAKEN:
        return {"outcome": "email_taken", "message": "this email is already registered"}
    if isinstance(err, errors.LockNotAvailable):
        return {"outcome": "busy", "message": "another signup of this email is in progress"}
    return None


async def add_user_and_job(conn, job_id: uuid.UUID, email: str, name: str, lock_wait_ms: int) -> str:
    """This service's signup: its user and the user's job, committed together. Returns the user id."""
    user_id = uuid_v7()
    async with conn.transaction():
        # The job first: its lock_wait_ms bounds every row-lock wait for the rest of the
        # transaction, and the user's insert below waits for one when another signup of the same
        # email is in flight (then 55P03, `busy`).
        await conn.execute(
            "select ackloop.add_job(user_id => %s, display_name => %s, new_job_id => %s,"
            " lock_wait_ms => %s)",
            (str(user_id), name, job_id, lock_wait_ms),
        )
        await conn.execute(
            "insert into py_users (id, email, display_name) values (%s, %s, %s)",
            (user_id, email, name),
        )
    return str(user_id)


async def sign_up_builtin(conn, job_id: uuid.UUID, email: str, name: str, lock_wait_ms: int) -> str:
    """The built-in auth service's signup (its user in ackloop.builtin_users). Returns the user id."""
    cur = await conn.execute(
        "select user_id from ackloop.sign_up(%s, %s, new_job_id => %s, lock_wait_ms => %s)",
        (email, name, job_id, lock_wait_ms),
    )
    return str((await cur.fetchone())[0])


async def sign_up(conn, confirmations, write, email: str, name: str, timeout: float) -> dict:
    """One signup and its outcome, as a dict for one JSON line."""
    started = time.monotonic()
    job_id = uuid_v7()
    event = confirmations.waiters[str(job_id)] = asyncio.Event()  # before the signup commits
    try:
        outcome = await write_and_wait(conn, event, write, job_id, email, name, started + timeout)
    finally:
        del confirmations.waiters[str(job_id)]
    return {"email": email, **outcome, "elapsed_ms": round((time.monotonic() - started) * 1000, 2)}


async def write_and_wait(conn, event, write, job_id, email: str, name: str, deadline: float) -> dict:
    ours = {"job_id": str(job_id)}
    try:
        ours["user_id"] = await write(conn, job_id, email, name, max(1, int((deadline - time.monotonic()) * 1000)))
    except psycopg.OperationalError as err:  # the connection went: the job id tells if it committed
        return ours | {"outcome": "unavailable", "message": str(err).strip()}
    except psycopg.Error as err:
        if (answer := refused(err)) is None:
            raise
        return answer  # nothing was written
    while True:
        try:
            await asyncio.wait_for(event.wait(), max(0, min(LOOK_EVERY_SECS, deadline - time.monotonic())))
        except TimeoutError:
            pass
        event.clear()
        cur = await conn.execute(
            "select status, last_error, player_id, result from ackloop.job_outcomes(array[%s]::uuid[])",
            (job_id,),
        )
        row = await cur.fetchone()
        if row is None:
            return ours | {"outcome": "not_committed", "message": "no such job"}
        status, last_error, player_id, result = row
        if status == "done":  # a done job always carries the player service's answer
            return ours | {"outcome": "done", "player_id": player_id, "result": result}
        if status == "failed":
            return ours | {"outcome": "failed", "message": last_error}
        if time.monotonic() >= deadline:
            return ours | {"outcome": "timed_out", "message": "the job is committed and will still complete"}


async def make_users_table(url: str) -> None:
    """py_users, unless it exists; one process at a time (concurrent `create table if not exists`
    can collide in the catalog)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute("select pg_advisory_xact_lock(hashtext('py_users'))")
            await conn.execute(CREATE_USERS)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--email")
    parser.add_argument("--display-name")
    parser.add_argument("--count", type=int, default=1, help="signups to make (with --prefix)")
    parser.add_argument("--prefix", default="py-", help="email and display name prefix for --count")
    parser.add_argument("--concurrency", type=int, default=1, help="signups at once, one connection each")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds each signup may wait")
    parser.add_argument(
        "--builtin", action="store_true",
        help="sign up on ackloop's built-in tables (ackloop.sign_up) instead of py_users",
    )
    args = parser.parse_args()
    url = os.environ["DATABASE_URL"]
    if args.email is not None:
        users = [(args.email, args.display_name or "")]
    else:
        run = secrets.token_hex(3)
        users = [(f"{args.prefix}{run}-{i}@example.com", f"{args.prefix}{i}") for i in range(args.count)]
    if args.builtin:
        write = sign_up_builtin
    else:
        await make_users_table(url)
        write = add_user_and_job

    confirmations = Confirmations(url)
    listener = asyncio.create_task(confirmations.run())
    await asyncio.wait_for(confirmations.listening.wait(), args.timeout)  # listen before writing
    queue = list(reversed(users))
    outcomes: list[dict] = []

    async def caller() -> None:
        conn = None
        while queue:
            if conn is None or conn.closed:
                conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
            email, name = queue.pop()
            outcome = await sign_up(conn, confirmations, write, email, name, args.timeout)
            print(json.dumps(outcome), flush=True)
            outcomes.append(outcome)
        if conn is not None:
            await conn.close()

    started = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(min(args.concurrency, len(users)))))
    listener.cancel()
    done = sum(outcome["outcome"] == "done" for outcome in outcomes)
    print(f"{len(outcomes)} signups, {done} done, in {time.monotonic() - started:.2f} s", file=sys.stderr)
    return 0 if done == len(users) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
