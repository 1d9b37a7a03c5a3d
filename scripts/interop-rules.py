#!/usr/bin/env python3
"""Part of `make interop` (scripts/interop runs it with examples/python-auth/.venv's Python):
the database refuses exactly what its rules name, to a caller in any language.

For each edge case, ackloop.sign_up raises SQLSTATE 23514 (constraint users_email_valid or
users_display_name_valid, "invalid email: <rule>") exactly when ackloop.email_problem or
ackloop.display_name_problem names a rule; a plain insert into ackloop.builtin_users is refused exactly then
too (the check constraints agree with the functions); a taken email, in other letter case,
raises 23505 on users_email_key. Every signup is rolled back. Exits 1 naming each mismatch.
"""

import os
import sys

import psycopg
from psycopg import errors

VALID_EMAIL = "someone@example.com"
VALID_NAME = "Someone"

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


def main() -> int:
    failures: list[str] = []
    refusals = 0
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        cases = [(email, VALID_NAME) for email in EMAILS] + [(VALID_EMAIL, name) for name in NAMES]
        for email, name in cases:
            email_problem, name_problem = conn.execute(
                "select ackloop.email_problem(%s), ackloop.display_name_problem(%s)", (email, name)
            ).fetchone()
            if email_problem:
                expected = ("users_email_valid", f"invalid email: {email_problem}")
            elif name_problem:
                expected = ("users_display_name_valid", f"invalid display name: {name_problem}")
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
            refused = False
            with conn.transaction(force_rollback=True):
                try:
                    conn.execute("insert into users (email, display_name) values (%s, %s)", (email, name))
                except errors.CheckViolation:
                    refused = True
            if refused != (expected is not None):
                failures.append(f"insert of {email!r}, {name!r}: refused={refused}, but the rules say {expected}")

        with conn.transaction(force_rollback=True):
            conn.execute("select * from ackloop.sign_up('Case@Example.com', 'Case')")
            try:
                conn.execute("select * from ackloop.sign_up('case@EXAMPLE.COM', 'Case again')")
                failures.append("a taken email in other letter case was accepted")
            except errors.UniqueViolation as err:
                if err.diag.constraint_name != "users_email_key":
                    failures.append(f"a taken email raised 23505 on {err.diag.constraint_name}, not users_email_key")

    for failure in failures:
        print(f"rules: {failure}", file=sys.stderr)
    verdict = "the database refuses exactly those" if not failures else f"{len(failures)} mismatches"
    print(f"rules: {len(EMAILS)} emails, {len(NAMES)} display names, {refusals} breaking a rule: {verdict}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
