//! The protocol's SQL exists once, in `src/store/`: `docs/protocol.md` and the pgbench scripts
//! in `bench/` repeat statements for other languages and for the ceiling runs. These tests fail
//! when a copy drifts from the code.
//!
//! A copy is marked with the name of the store function it repeats: in the docs, a line
//! `<!-- store::NAME -->` right before the ```` ```sql ```` block; in a bench script, a line
//! `-- store::NAME`, then one `-- $N = expression` line per bind parameter, which the test
//! substitutes into the code's statement. Compared without comments, whitespace differences or
//! sqlx's column-type annotations (`as "id!: JobId"` reads `as id`).

use std::collections::BTreeMap;
use std::path::Path;

/// Statements a peer in another language needs: each must appear in docs/protocol.md.
const PROTOCOL: &[&str] = &[
    "insert_user_and_job",
    "insert_users_and_jobs",
    "job_outcomes",
    "complete_due_jobs",
    "claim_due_jobs",
    "job_savepoint",
    "renew_job_savepoint",
    "release_job_savepoint",
    "rollback_to_job_savepoint",
    "insert_player",
    "mark_jobs_done",
    "schedule_retry",
    "mark_job_failed",
    "lock_next_due_job",
    "start_attempt",
    "give_back_attempt",
    "lock_started_attempt",
];

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|err| panic!("read {}: {err}", full.display()))
}

/// The first SQL string of each `pub(crate) async fn` in the store's files.
pub(crate) fn code_statements() -> BTreeMap<String, String> {
    let mut statements = BTreeMap::new();
    for file in ["src/store/signup.rs", "src/store/worker.rs", "src/store/admin.rs"] {
        let source = read(file);
        for chunk in source.split("pub(crate) async fn ").skip(1) {
            let name: String = chunk
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let body = chunk.split("\npub(crate) ").next().unwrap_or(chunk);
            let sql = match (body.find("r#\""), body.find("raw_sql(\"")) {
                (Some(start), raw) if raw.is_none_or(|raw| start < raw) => {
                    let rest = &body[start + 3..];
                    rest[..rest.find("\"#").expect("a raw string ends")].to_owned()
                }
                (_, Some(start)) => {
                    let rest = &body[start + 9..];
                    rest[..rest.find('"').expect("a string ends")].to_owned()
                }
                _ => continue,
            };
            statements.insert(name, sql);
        }
    }
    statements
}

/// The statement as compared: no comments, sqlx's annotations reduced to the column name,
/// whitespace collapsed, no final semicolon.
fn normalise(sql: &str) -> String {
    let without_comments: Vec<&str> = sql
        .lines()
        .map(|line| line.find("--").map_or(line, |at| &line[..at]))
        .collect();
    let mut text = without_comments.join(" ");
    // `as "name!: Type"`, `as "name?"` → `as name`
    while let Some(start) = text.find("as \"") {
        let rest = &text[start + 4..];
        let end = rest.find('"').expect("an annotation ends");
        let name: String = rest[..end]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        text = format!("{}as {name}{}", &text[..start], &rest[end + 1..]);
    }
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed.trim_end_matches(';').trim().to_owned()
}

/// The marked ```sql blocks of docs/protocol.md, by store function.
fn doc_statements() -> Vec<(String, String)> {
    let doc = read("docs/protocol.md");
    let mut found = Vec::new();
    let mut lines = doc.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- store::")
            .and_then(|rest| rest.strip_suffix("-->"))
        else {
            continue;
        };
        assert_eq!(
            lines.next().map(str::trim),
            Some("```sql"),
            "docs/protocol.md: the marker for {name} must sit right before a ```sql block"
        );
        let block: Vec<&str> = lines.by_ref().take_while(|line| line.trim() != "```").collect();
        found.push((name.trim().to_owned(), block.join("\n")));
    }
    found
}

#[test]
fn the_protocol_doc_repeats_the_codes_statements() {
    let code = code_statements();
    let docs = doc_statements();
    for (name, sql) in &docs {
        let code_sql = code.get(name).unwrap_or_else(|| {
            panic!("docs/protocol.md shows store::{name}, which has no SQL in src/store/")
        });
        assert_eq!(
            normalise(sql),
            normalise(code_sql),
            "docs/protocol.md's store::{name} differs from src/store/ (left: the docs)"
        );
    }
    for name in PROTOCOL {
        assert!(
            docs.iter().any(|(shown, _)| shown == name),
            "docs/protocol.md does not show store::{name}"
        );
    }
}

#[test]
fn the_bench_scripts_run_the_codes_statements() {
    let code = code_statements();
    for script in ["bench/signup.sql", "bench/worker.sql"] {
        let text = read(script);
        let name = text
            .lines()
            .find_map(|line| line.trim().strip_prefix("-- store::"))
            .unwrap_or_else(|| panic!("{script} names no store function (`-- store::NAME`)"))
            .trim()
            .to_owned();
        let mut sql = code
            .get(&name)
            .unwrap_or_else(|| panic!("{script} repeats store::{name}, which has no SQL in src/store/"))
            .clone();
        let mut binds: Vec<(String, String)> = text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("-- $"))
            .map(|bind| {
                let (number, expression) = bind.split_once(" = ").expect("`-- $N = expression`");
                (format!("${number}"), expression.to_owned())
            })
            .collect();
        // $10 before $1.
        binds.sort_by_key(|(parameter, _)| std::cmp::Reverse(parameter.len()));
        for (parameter, expression) in &binds {
            sql = sql.replace(parameter.as_str(), expression);
        }
        let body: Vec<&str> = text
            .lines()
            .filter(|line| !line.trim_start().starts_with("--") && !line.trim_start().starts_with('\\'))
            .collect();
        assert_eq!(
            normalise(&body.join("\n")),
            normalise(&sql),
            "{script} differs from store::{name} (left: the script)"
        );
    }
}

#[test]
fn normalising_ignores_layout_comments_and_annotations() {
    assert_eq!(
        normalise("select id as \"id!: JobId\",  -- the id\n  n as \"n?\"\nfrom t;"),
        "select id as id, n as n from t"
    );
}
