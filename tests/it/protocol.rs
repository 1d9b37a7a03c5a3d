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

/// The steps a peer takes, by the store function that takes them for the Rust side, and the
/// contract function each runs: the Rust side has no second copy of the contract's SQL.
const STEPS: &[(&str, &str)] = &[
    ("insert_user_and_job", "sign_up"),
    ("write_user_and_job", "sign_up_then_notify"),
    ("insert_users_and_jobs", "sign_up_many_then_notify"),
    ("job_outcomes", "job_outcomes"),
    ("complete_due_jobs", "complete_jobs"),
    ("claim_due_jobs", "claim_jobs"),
    ("mark_jobs_done", "mark_done"),
    ("record_failure", "record_failure"),
    ("start_attempt", "start_attempt"),
    ("lock_started_attempt", "lock_attempt"),
    ("give_back_attempt", "give_back_attempt"),
    ("note_unfinished_attempt", "note_unfinished_attempt"),
];

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|err| panic!("read {}: {err}", full.display()))
}

/// The first SQL string of each `pub(crate) async fn` in the store's files.
pub(crate) fn code_statements() -> BTreeMap<String, String> {
    let mut statements = BTreeMap::new();
    for file in [
        "src/store/signup.rs",
        "src/store/worker.rs",
        "src/store/attempts.rs",
        "src/store/admin.rs",
    ] {
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

/// The names of the contract's functions and procedures, as the migrations create them.
fn contract_functions() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("migrations/") {
        let sql = std::fs::read_to_string(entry.expect("a migration").path()).expect("read a migration");
        for chunk in sql
            .split("create function ackloop.")
            .skip(1)
            .chain(sql.split("create procedure ackloop.").skip(1))
        {
            names.push(
                chunk
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    names.sort();
    names
}

#[test]
fn the_protocol_doc_documents_every_function_of_the_contract() {
    let doc = read("docs/protocol.md");
    let headings: Vec<&str> = doc.lines().filter(|line| line.starts_with('#')).collect();
    let functions = contract_functions();
    assert!(
        functions.len() >= 11,
        "the migrations create the contract: {functions:?}"
    );
    for name in &functions {
        let call = format!("ackloop.{name}(");
        assert!(
            headings.iter().any(|heading| heading.contains(&call)),
            "docs/protocol.md has no heading for {call}…)"
        );
    }
}

#[test]
fn the_rust_side_takes_each_step_through_the_contract() {
    let code = code_statements();
    for (step, function) in STEPS {
        let sql = code
            .get(*step)
            .unwrap_or_else(|| panic!("src/store/ has no statement for store::{step}"));
        assert!(
            sql.contains(&format!("ackloop.{function}(")),
            "store::{step} does not call ackloop.{function}: {sql}"
        );
    }
    // Nothing else in the store signs users up by itself.
    for (name, sql) in &code {
        assert!(
            !sql.contains("insert into ackloop.builtin_users")
                && !sql.contains("insert into ackloop.player_creation_jobs"),
            "store::{name} repeats a step of the contract instead of calling it: {sql}"
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
