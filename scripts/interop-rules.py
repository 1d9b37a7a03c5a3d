#!/usr/bin/env python3
"""Part of `make interop` (scripts/interop runs it with examples/python-auth/.venv's Python):
the database refuses exactly what its rules name, to a caller in any language.

The built-in auth service: for each edge case, ackloop.sign_up raises SQLSTATE 23514 (constraint
builtin_users_email_valid or builtin_users_display_name_valid, "invalid email: <rule>") exactly
when ackloop.email_problem or ackloop.display_name_problem names a rule; ackloop.sign_up_many
refuses the same entry, among others, exactly then and in the same words (the entry's position
in the detail); a taken email, in other letter case, raises 23505 on builtin_users_email_key.

A service's own users: ackloop.add_job raises 23514 (constraint
player_creation_jobs_user_id_valid, …_display_name_valid or …_extra_valid, "invalid user id:
<rule>", "invalid display name: <rule>", "invalid extra data: <rule>") exactly when
ackloop.user_id_problem, ackloop.display_name_problem or ackloop.json_object_problem names a
rule; its job id is an idempotency key (the same job again returns it; other data under it, or
a second job for the user, raise 23505 on player_creation_jobs_pkey, …_user_id_key); and
ackloop.mark_done refuses an answer without a player id or with a result that is not a JSON
object (23514 on player_creation_jobs_done_has_player).

Every call is rolled back, and the job table is checked empty at the end. Exits 1 naming each
mismatch.
"""

import json
import os
import sys
import uuid

import psycopg
from psycopg import errors
from psycopg.types.json import Jsonb

VALID_EMAIL = "someone@example.com"
VALID_NAME = "Someone"
VALID_USER_ID = "user-1"

EMAILS = [
    "a@b.co", "ada@example.com", "Ada.Lovelace+tag@Example.COM", "ü@bücher.de", "a@xn--bcher-kva.de",
    "a@1.2", "x@a-b.example", "a\u200bb@example.com",  # zero-width space is not White_Space
    "", "a", "@example.com", "a@", "a@b", "a@@example.com", "a@b@example.com",
    "a b@example.com", "a\tb@example.com", "a\u00a0b@example.com", "a\u2028b@example.com",
    "a\u3000b@example.com", "a\u0085b@example.com", "a\u007fb@example.com", "a\u0001@example.com",
    '"quoted"@example.com', "a,b@example.com", "a;b@example.com", "a:b@example.com", "a<b@example.com",
    "a[b]@example.com", "a\\b@example.com", "a(b)@example.com",
    "x" * 64 + "@example.com", "x" * 65 + "@example.com",
    "a@" + "b" * 247 + ".com", "a@" + "b" * 248 + ".com",  # 254 and 255 characters
    "a@example.com.", "a@.example.com", "a@example..com", "a@-example.com", "a@example-.com",
    "a@exa_mple.com", "a@exa mple.com", "a@bücher-.de", "a@b.c-d", "a@b.-c",
]

NAMES = [
    "A", "Ada Lovelace", "Zoë", "名前", "🎮 player one", "a\u200bb", "x" * 64, "x" * 65,
    "", " ", "\t", "\u00a0", "\u3000", "\u0085", " \u2028 ", "a\tb", "a\nb", "a\u0085b", "a\u007fb",
    "a\u0001", " a", "a ", "a\u00a0", "\u3000a", "a\u2029", "a b",
]

# A service's own user ids: numbers, UUIDs, strings; 128 characters at most, no control
# characters, no whitespace around.
USER_IDS = [
    "1", "9223372036854775807", "0193a5c2-7b1e-7c3a-9f00-0123456789ab", "alice", "a b", "名前",
    "a\u00a0b", "a\u200bb", "x" * 128, "x" * 129,
    "", " ", " a", "a ", "\u3000a", "a\u2029", "a\tb", "a\nb", "a\u0085b", "a\u007fb", "a\u0001",
]

# Extra data: a JSON object of at most 8192 bytes as JSON text ({"x": "…"} is 9 bytes and the
# string's), or none.
EXTRAS = [
    None, Jsonb({}), Jsonb({"plan": "free", "referrer": None}), Jsonb({"x": "y" * 8183}),
    Jsonb({"x": "y" * 8184}), Jsonb({"x": "é" * 4091}), Jsonb({"x": "é" * 4092}),
    Jsonb([]), Jsonb([{"a": 1}]), Jsonb("text"), Jsonb(1), Jsonb(None),
]


def described(value) -> str:
    """A case's value, short enough for a line: long ones cut, with their length."""
    if isinstance(value, Jsonb):
        text = json.dumps(value.obj, ensure_ascii=False)
        size = f"{len(text.encode())} bytes of JSON"
    else:
        text = repr(value)
        size = f"{len(value)} characters"
    return text if len(text) <= 40 else f"{text[:30]}… ({size})"


def check_sign_up(conn, failures: list[str]) -> int:
    refusals = 0
    cases = [(email, VALID_NAME) for email in EMAILS] + [(VALID_EMAIL, name) for name in NAMES]
    for email, name in cases:
        email_problem, name_problem = conn.execute(
            "select ackloop.email_problem(%s), ackloop.display_name_problem(%s)", (email, name)
        ).fetchone()
        if email_problem:
            expected = ("builtin_users_email_valid", f"invalid email: {email_problem}")
        elif name_problem:
            expected = ("builtin_users_display_name_valid", f"invalid display name: {name_problem}")
        else:
            expected = None
        refusals += expected is not None
        case = f"sign_up({email!r}, {name!r})"
        got = None
        with conn.transaction(force_rollback=True):
            try:
                conn.execute("select * from ackloop.sign_up(%s, %s)", (email, name))
            except errors.CheckViolation as err:
                got = (err.diag.constraint_name, err.diag.message_primary)
        if got != expected:
            failures.append(f"{case}: expected {expected or 'success'}, got {got or 'success'}")
        # The same entry among good ones, as a grouping client sends them: the whole call is
        # refused the same way, with the entry's position in the detail.
        got = None
        with conn.transaction(force_rollback=True):
            try:
                conn.execute(
                    "select * from ackloop.sign_up_many(%s, %s, array[null, null]::uuid[])",
                    (["other@example.com", email], ["Other", name]),
                )
            except errors.CheckViolation as err:
                got = (err.diag.constraint_name, err.diag.message_primary)
                if err.diag.message_detail != "entry 2 of the call":
                    failures.append(f"sign_up_many of {email!r}, {name!r}: detail {err.diag.message_detail!r}")
        if got != expected:
            failures.append(f"sign_up_many of {email!r}, {name!r}: expected {expected or 'success'}, got {got or 'success'}")

    with conn.transaction(force_rollback=True):
        conn.execute("select * from ackloop.sign_up('Case@Example.com', 'Case')")
        try:
            conn.execute("select * from ackloop.sign_up('case@EXAMPLE.COM', 'Case again')")
            failures.append("a taken email in other letter case was accepted")
        except errors.UniqueViolation as err:
            if err.diag.constraint_name != "builtin_users_email_key":
                failures.append(f"a taken email raised 23505 on {err.diag.constraint_name}, not builtin_users_email_key")
    return refusals


def add_job(conn, user_id, name, extra=None, job_id=None):
    return conn.execute(
        "select ackloop.add_job(user_id => %s, display_name => %s, extra => %s::jsonb, new_job_id => %s)",
        (user_id, name, extra, job_id),
    ).fetchone()[0]


def refusal(conn, call) -> tuple[str, str, str] | None:
    """The (SQLSTATE, constraint, message) `call` raised in a savepoint, or None if it succeeded."""
    try:
        with conn.transaction():
            call()
    except (errors.CheckViolation, errors.UniqueViolation) as err:
        return (err.sqlstate, err.diag.constraint_name, err.diag.message_primary)
    return None


def check_add_job(conn, failures: list[str]) -> int:
    refusals = 0
    cases = (
        [(user_id, VALID_NAME, None) for user_id in USER_IDS]
        + [(VALID_USER_ID, name, None) for name in NAMES]
        + [(VALID_USER_ID, VALID_NAME, extra) for extra in EXTRAS]
    )
    for user_id, name, extra in cases:
        user_id_problem, name_problem, extra_problem = conn.execute(
            "select ackloop.user_id_problem(%s), ackloop.display_name_problem(%s), ackloop.json_object_problem(%s::jsonb)",
            (user_id, name, extra),
        ).fetchone()
        if user_id_problem:
            expected = ("23514", "player_creation_jobs_user_id_valid", f"invalid user id: {user_id_problem}")
        elif name_problem:
            expected = ("23514", "player_creation_jobs_display_name_valid", f"invalid display name: {name_problem}")
        elif extra_problem:
            expected = ("23514", "player_creation_jobs_extra_valid", f"invalid extra data: {extra_problem}")
        else:
            expected = None
        refusals += expected is not None
        with conn.transaction(force_rollback=True):
            got = refusal(conn, lambda: add_job(conn, user_id, name, extra))
        if got != expected:
            case = f"add_job({described(user_id)}, {described(name)}, {described(extra)})"
            failures.append(f"{case}: expected {expected or 'success'}, got {got or 'success'}")

    # The job id is the caller's idempotency key.
    with conn.transaction(force_rollback=True):
        key = uuid.uuid4()
        first = add_job(conn, "idem-1", "Idem", Jsonb({"plan": "free"}), key)
        again = add_job(conn, "idem-1", "Idem", Jsonb({"plan": "free"}), key)
        if first != key or again != key:
            failures.append(f"add_job with job id {key} returned {first}, then {again}")
        for what, call, constraint in [
            ("other extra data under a job id", lambda: add_job(conn, "idem-1", "Idem", Jsonb({"plan": "paid"}), key),
             "player_creation_jobs_pkey"),
            ("another user under a job id", lambda: add_job(conn, "idem-2", "Idem", None, key), "player_creation_jobs_pkey"),
            ("a second job for a user", lambda: add_job(conn, "idem-1", "Idem", Jsonb({"plan": "free"})),
             "player_creation_jobs_user_id_key"),
        ]:
            got = refusal(conn, call)
            if got is None or got[:2] != ("23505", constraint):
                failures.append(f"add_job of {what}: expected 23505 on {constraint}, got {got or 'success'}")
    return refusals


def check_mark_done(conn, failures: list[str]) -> int:
    refusals = 0
    with conn.transaction(force_rollback=True):
        job_id = add_job(conn, "answer-1", "Answer")
        claimed = conn.execute("select job_id, attempt from ackloop.claim_jobs(1)").fetchall()
        if claimed != [(job_id, 1)]:
            failures.append(f"claim_jobs(1) after one add_job claimed {claimed}, not its job")
            return refusals
        mark = "select * from ackloop.mark_done(array[%s]::uuid[], array[1], array[%s]::text[], array[%s::jsonb])"
        for player_id, result in [("", Jsonb({})), ("p 1 ", Jsonb({})), ("p-1", Jsonb([])), ("p-1", Jsonb("done"))]:
            refusals += 1
            got = refusal(conn, lambda: conn.execute(mark, (job_id, player_id, result)))
            if got is None or got[:2] != ("23514", "player_creation_jobs_done_has_player"):
                failures.append(
                    f"mark_done with player id {player_id!r} and result {described(result)}: expected 23514 on "
                    f"player_creation_jobs_done_has_player, got {got or 'success'}"
                )
        marked = conn.execute(mark, (job_id, "p-1", Jsonb({"display_name": "Answer"}))).fetchall()
        outcome = conn.execute(
            "select status, player_id, result from ackloop.job_outcomes(array[%s]::uuid[])", (job_id,)
        ).fetchone()
        if marked != [(job_id,)] or outcome != ("done", "p-1", {"display_name": "Answer"}):
            failures.append(f"mark_done of a valid answer marked {marked}; job_outcomes then said {outcome}")
    return refusals


def main() -> int:
    failures: list[str] = []
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        refusals = check_sign_up(conn, failures)
        refusals += check_add_job(conn, failures)
        refusals += check_mark_done(conn, failures)
        left = conn.execute("select count(*) from ackloop.player_creation_jobs").fetchone()[0]
        if left != 0:
            failures.append(f"{left} jobs were left behind by calls that were all rolled back")

    for failure in failures:
        print(f"rules: {failure}", file=sys.stderr)
    verdict = "the database refuses exactly those" if not failures else f"{len(failures)} mismatches"
    print(
        f"rules: {len(EMAILS)} emails, {len(NAMES)} display names, {len(USER_IDS)} user ids, {len(EXTRAS)} extras,"
        f" 4 answers, {refusals} breaking a rule: {verdict}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
