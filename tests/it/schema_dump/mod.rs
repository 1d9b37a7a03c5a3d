//! docs/schema.sql, the `ackloop` schema as the migrations leave it, is what the migrations
//! produce: compared here on a freshly migrated database, and rewritten from it with
//! `ACKLOOP_BLESS_SCHEMA=1` (`make schema`).
//!
//! The dump is the same on every machine and on PostgreSQL 14-17: no OIDs, no owners, no rows;
//! names qualified whatever the session's search_path; function headers built from the catalog's
//! columns and bodies taken as the migrations wrote them (`prosrc`), not `pg_get_functiondef`'s
//! rendering. It reads the catalog through sqlx rather than running pg_dump, whose client refuses
//! a server newer than itself.
//!
//! The queries are `sqlx::query_as` with `&'static str` SQL, not the checked macros: the macros
//! type `pg_get_*` results and many catalog columns as nullable or as types sqlx does not decode
//! (`"char"`, `name`), and would need an offline-cache entry per query for a test-only reader;
//! every column here is cast to a plain type instead.

mod functions;
mod tables;

use std::fmt::Write;
use std::path::PathBuf;

use sqlx::{PgConnection, PgPool};

/// ackloop's schema.
const SCHEMA: &str = "ackloop";

/// Set to rewrite docs/schema.sql instead of comparing it.
const BLESS: &str = "ACKLOOP_BLESS_SCHEMA";

const REGENERATE: &str = "make schema";

/// What the file says about itself, above the dump.
const HEADER: &str = "\
-- The `ackloop` schema as migrations/ leaves it: GENERATED, DO NOT EDIT.
--
-- migrations/ is the source of truth (forward-only, applied by `ackloop migrate`). This file is
-- for reading the contract as it is now, each function with its current body, rather than as a
-- history of migrations; it is not meant to be run.
--
-- Regenerate it after adding a migration:   make schema
--   (that is: ACKLOOP_BLESS_SCHEMA=1 cargo test --features cli --test it -- schema_dump)
-- The test in tests/it/schema_dump/ fails while this file differs from what the migrations make.
--
-- Left out, as they differ from one machine or run to another: OIDs, owners, rows (the rows of
-- ackloop.applied_migrations too), sqlx's own record ackloop._sqlx_migrations (made by sqlx, not
-- by the migrations), and grants to named roles: ackloop_auth and ackloop_worker are made by
-- sql/roles.sql, not by the migrations, and exist on one server and not on another (the
-- migrations grant them `select` on ackloop.applied_migrations only where they exist). PUBLIC's
-- privileges are listed at the end.
--
-- Function bodies are verbatim from the migrations (`prosrc`), except a body written the
-- SQL-standard way (`return …`, `begin atomic`), which the server keeps parsed: that one is the
-- server's rendering of it.
";

/// The dump of the `ackloop` schema as `conn`'s database has it.
pub async fn dump(conn: &mut PgConnection) -> String {
    // A name in a schema on the search_path prints unqualified: with only pg_catalog on it,
    // every one of ackloop's prints as `ackloop.name`, whatever the role's search_path.
    sqlx::query("set search_path = pg_catalog")
        .execute(&mut *conn)
        .await
        .expect("set the search_path");
    let mut out = String::from(HEADER);
    tables::schema(conn, &mut out).await;
    tables::types(conn, &mut out).await;
    tables::tables(conn, &mut out).await;
    tables::sequences(conn, &mut out).await;
    tables::views(conn, &mut out).await;
    functions::functions(conn, &mut out).await;
    functions::privileges(conn, &mut out).await;
    out
}

/// The rows of `sql`, its `$1` bound to the schema's name.
async fn rows<T>(conn: &mut PgConnection, sql: &'static str) -> Vec<T>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    sqlx::query_as(sql)
        .bind(SCHEMA)
        .fetch_all(conn)
        .await
        .unwrap_or_else(|err| panic!("{err}: {sql}"))
}

fn section(out: &mut String, title: &str) {
    write!(out, "\n\n-- {title}\n").unwrap();
}

/// `comment on …` for an object's comment, if it has one.
fn comment(out: &mut String, object: &str, text: &Option<String>) {
    if let Some(text) = text {
        let quoted = text.replace('\'', "''");
        writeln!(out, "\ncomment on {object} is '{quoted}';").unwrap();
    }
}

/// A name as SQL writes it: bare when it can be, quoted otherwise.
fn quote_ident(name: &str) -> String {
    let plain = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/schema.sql")
}

/// The first place where `committed` and `made` part, as a unified diff's first hunk shows it:
/// the lines up to where the two agree again (three lines alike), with a few lines before.
fn first_difference(committed: &str, made: &str) -> String {
    const CONTEXT: usize = 3;
    const SHOWN: usize = 30;
    let old: Vec<&str> = committed.lines().collect();
    let new: Vec<&str> = made.lines().collect();
    let start = old.iter().zip(&new).take_while(|(a, b)| a == b).count();
    let (old_rest, new_rest) = (&old[start..], &new[start..]);
    let agree_from = |i: usize, j: usize| {
        let (a, b) = (&old_rest[i..], &new_rest[j..]);
        a.iter().zip(b).take(CONTEXT).all(|(x, y)| x == y) && a.len().min(CONTEXT) == b.len().min(CONTEXT)
    };
    // The nearest point where both agree again: fewest lines out plus lines in.
    let (out, into) = (0..=old_rest.len() + new_rest.len())
        .flat_map(|total| (0..=total).map(move |i| (i, total - i)))
        .find(|&(i, j)| i <= old_rest.len() && j <= new_rest.len() && agree_from(i, j))
        .unwrap_or((old_rest.len(), new_rest.len()));
    let before = start.saturating_sub(CONTEXT);
    let mut diff = format!(
        "--- docs/schema.sql (committed)\n+++ what the migrations make\n@@ line {} @@\n",
        before + 1
    );
    for line in &old[before..start] {
        writeln!(diff, " {line}").unwrap();
    }
    for line in old_rest[..out].iter().take(SHOWN) {
        writeln!(diff, "-{line}").unwrap();
    }
    for line in new_rest[..into].iter().take(SHOWN) {
        writeln!(diff, "+{line}").unwrap();
    }
    if out > SHOWN || into > SHOWN {
        writeln!(diff, "… ({out} lines out and {into} in, in all)").unwrap();
    }
    for line in old_rest[out..].iter().take(CONTEXT) {
        writeln!(diff, " {line}").unwrap();
    }
    if old_rest[out..] != new_rest[into..] {
        diff.push_str("(and more differences after these)\n");
    } else if committed.ends_with('\n') != made.ends_with('\n') {
        diff.push_str("(and one ends with a newline, the other does not)\n");
    }
    diff
}

#[sqlx::test]
async fn schema_dump_matches_the_migrations(pool: PgPool) {
    let mut conn = pool.acquire().await.unwrap();
    let made = dump(&mut conn).await;
    // A dump that lost a section would be blessed as readily as a right one.
    for expected in [
        "create table ackloop.player_creation_jobs (",
        "create function ackloop.sign_up(",
        "create unique index builtin_users_email_key on ackloop.builtin_users",
    ] {
        assert!(
            made.to_lowercase().contains(expected),
            "the dump has no `{expected}`:\n{made}"
        );
    }
    let path = committed_path();
    if std::env::var_os(BLESS).is_some_and(|value| !value.is_empty()) {
        std::fs::write(&path, &made).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
        println!("wrote {} ({} lines)", path.display(), made.lines().count());
        return;
    }
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("read {}: {err}; make it with `{REGENERATE}`", path.display()));
    assert!(
        committed == made,
        "docs/schema.sql is not what the migrations make; if the migrations are right, regenerate \
         it with `{REGENERATE}` ({BLESS}=1 cargo test --features cli --test it -- schema_dump) and \
         commit it\n{}",
        first_difference(&committed, &made)
    );
}

#[test]
fn the_first_difference_shows_the_lines_that_differ() {
    let committed = "a\nb\nc\nd\ne\nf\ng\nh\ni\n";
    let made = "a\nb\nx\ny\nd\ne\nf\ng\nz\ni\n";
    let diff = first_difference(committed, made);
    assert!(
        diff.ends_with(" a\n b\n-c\n+x\n+y\n d\n e\n f\n(and more differences after these)\n"),
        "{diff}"
    );
    assert_eq!(first_difference("a\nb\n", "a\n").lines().last(), Some("-b"));
}
