#!/usr/bin/env python3
"""An auth side for ackloop in Python, written from docs/protocol.md alone.

It listens on `player_jobs_done` before it writes anything, signs users up with
ackloop.sign_up (choosing each job id itself, a UUIDv7, so that it can wait for the id before
the signup commits), waits for its ids with a timeout, and reads each outcome with
ackloop.job_outcomes. One JSON line per signup on stdout; exit 0 only if every signup's player
was confirmed in time.

    DATABASE_URL=postgres://… python signup.py --email ada@example.com --display-name Ada
    DATABASE_URL=postgres://… python signup.py --count 500 --concurrency 16 --prefix py-
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
# While waiting, the tables are read this often too: a notification can be lost (a listener
# reconnecting), and the tables are the truth anyway.
LOOK_EVERY_SECS = 1.0


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
    diag = err.diag
    if isinstance(err, errors.CheckViolation):
        field = "email" if diag.constraint_name == "users_email_valid" else "display_name"
        return {"outcome": "invalid", "field": field, "message": diag.message_primary}
    if isinstance(err, errors.UniqueViolation) and diag.constraint_name == "users_email_key":
        return {"outcome": "email_taken", "message": "this email is already registered"}
    if isinstance(err, errors.LockNotAvailable):
        return {"outcome": "busy", "message": "another signup of this email is in progress"}
    return None


async def sign_up(conn, confirmations, email: str, name: str, timeout: float) -> dict:
    """One signup and its outcome, as a dict for one JSON line."""
    started = time.monotonic()
    job_id = uuid_v7()
    event = confirmations.waiters[str(job_id)] = asyncio.Event()  # before the signup commits
    try:
        outcome = await write_and_wait(conn, event, job_id, email, name, started + timeout)
    finally:
        del confirmations.waiters[str(job_id)]
    return {"email": email, **outcome, "elapsed_ms": round((time.monotonic() - started) * 1000, 2)}


async def write_and_wait(conn, event, job_id, email: str, name: str, deadline: float) -> dict:
    ours = {"job_id": str(job_id)}
    try:
        cur = await conn.execute(
            "select user_id from ackloop.sign_up(%s, %s, new_job_id => %s, lock_wait_ms => %s)",
            (email, name, job_id, max(1, int((deadline - time.monotonic()) * 1000))),
        )
        ours["user_id"] = (await cur.fetchone())[0]
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
            "select status, last_error, player_id, player_display_name"
            " from ackloop.job_outcomes(array[%s]::uuid[])",
            (job_id,),
        )
        row = await cur.fetchone()
        if row is None:
            return ours | {"outcome": "not_committed", "message": "no such job"}
        status, last_error, player_id, player_name = row
        if status == "done" and player_id is not None:
            return ours | {"outcome": "done", "player_id": player_id, "player_display_name": player_name}
        if status == "done":
            return ours | {"outcome": "failed", "message": "the job is done but its player no longer exists"}
        if status == "failed":
            return ours | {"outcome": "failed", "message": last_error}
        if time.monotonic() >= deadline:
            return ours | {"outcome": "timed_out", "message": "the job is committed and will still complete"}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--email")
    parser.add_argument("--display-name")
    parser.add_argument("--count", type=int, default=1, help="signups to make (with --prefix)")
    parser.add_argument("--prefix", default="py-", help="email and display name prefix for --count")
    parser.add_argument("--concurrency", type=int, default=1, help="signups at once, one connection each")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds each signup may wait")
    args = parser.parse_args()
    url = os.environ["DATABASE_URL"]
    if args.email is not None:
        users = [(args.email, args.display_name or "")]
    else:
        run = secrets.token_hex(3)
        users = [(f"{args.prefix}{run}-{i}@example.com", f"{args.prefix}{i}") for i in range(args.count)]

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
            outcome = await sign_up(conn, confirmations, email, name, args.timeout)
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
