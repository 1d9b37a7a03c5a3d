//! The functions, headers built from the catalog's columns and bodies as written, and PUBLIC's
//! privileges.

use std::fmt::Write;

use sqlx::PgConnection;

use super::{SCHEMA, comment, quote_ident, rows, section};

/// A signature or result longer than this is written one argument (or column) a line.
const ONE_LINE: usize = 100;

#[derive(sqlx::FromRow)]
struct Function {
    name: String,
    identity_arguments: String,
    arguments: String,
    /// None for a procedure.
    result: Option<String>,
    procedure: bool,
    language: String,
    volatility: String,
    strict: bool,
    security_definer: bool,
    leakproof: bool,
    parallel: String,
    /// Set when it is not the language's default (1 for C and internal, 100 otherwise).
    cost: Option<String>,
    /// Set when a set-returning function's estimate is not the default 1000.
    rows: Option<String>,
    settings: Option<Vec<String>>,
    source: String,
    /// The body is the server's rendering of a parsed SQL-standard body, not source text.
    parsed_body: bool,
    description: Option<String>,
}

pub async fn functions(conn: &mut PgConnection, out: &mut String) {
    // Signatures and results by pg_get_function_arguments and pg_get_function_result, the rest
    // of the header from its columns, the body from prosrc: pg_get_functiondef would also do,
    // but re-renders the header (its `SET` quoting, say) as each server version chooses.
    let functions: Vec<Function> = rows(
        conn,
        "select functions.proname::text as name,
            pg_get_function_identity_arguments(functions.oid) as identity_arguments,
            pg_get_function_arguments(functions.oid) as arguments,
            pg_get_function_result(functions.oid) as result,
            functions.prokind = 'p' as procedure,
            languages.lanname::text as language,
            case functions.provolatile when 'i' then 'immutable' when 's' then 'stable' else 'volatile' end
                as volatility,
            functions.proisstrict as strict,
            functions.prosecdef as security_definer,
            functions.proleakproof as leakproof,
            case functions.proparallel when 's' then 'safe' when 'r' then 'restricted' else 'unsafe' end
                as parallel,
            case when functions.procost
                    <> case when languages.lanname in ('c', 'internal') then 1 else 100 end
                then functions.procost::text
            end as cost,
            case when functions.proretset and functions.prorows <> 1000
                then functions.prorows::text
            end as rows,
            functions.proconfig as settings,
            case when functions.prosqlbody is null
                then functions.prosrc
                else pg_get_function_sqlbody(functions.oid)
            end as source,
            functions.prosqlbody is not null as parsed_body,
            obj_description(functions.oid, 'pg_proc') as description
        from pg_proc as functions
        join pg_language as languages on languages.oid = functions.prolang
        where functions.pronamespace = $1::regnamespace
          and functions.prokind in ('f', 'p', 'w')
        order by functions.proname, identity_arguments",
    )
    .await;
    section(out, "Functions (by name)");
    for function in &functions {
        write_function(out, function);
    }
}

fn write_function(out: &mut String, function: &Function) {
    let kind = if function.procedure {
        "procedure"
    } else {
        "function"
    };
    let name = format!("{SCHEMA}.{}", quote_ident(&function.name));
    write!(
        out,
        "\ncreate {kind} {name}{}\n",
        listed(&function.arguments, "(", ")")
    )
    .unwrap();
    if let Some(result) = &function.result {
        let result = match result.strip_prefix("TABLE(") {
            Some(columns) => listed(columns.strip_suffix(')').unwrap_or(columns), "table (", ")"),
            None => result.clone(),
        };
        writeln!(out, "returns {result}").unwrap();
    }
    let mut attributes = vec![format!("language {}", function.language)];
    if !function.procedure {
        attributes.push(function.volatility.clone());
        if function.strict {
            attributes.push("strict".into());
        }
    }
    if function.security_definer {
        attributes.push("security definer".into());
    }
    if function.leakproof {
        attributes.push("leakproof".into());
    }
    if !function.procedure {
        attributes.push(format!("parallel {}", function.parallel));
    }
    if let Some(cost) = &function.cost {
        attributes.push(format!("cost {cost}"));
    }
    if let Some(rows) = &function.rows {
        attributes.push(format!("rows {rows}"));
    }
    writeln!(out, "{}", attributes.join(" ")).unwrap();
    for setting in function.settings.iter().flatten() {
        let (parameter, value) = setting.split_once('=').unwrap_or((setting, ""));
        writeln!(out, "set {parameter} = {value}").unwrap();
    }
    if function.parsed_body {
        writeln!(out, "{};", function.source.trim_end().trim_end_matches(';')).unwrap();
    } else {
        let quote = dollar_quote(&function.source);
        writeln!(out, "as {quote}{}{quote};", function.source).unwrap();
    }
    let identity = format!("{kind} {name}({})", function.identity_arguments);
    comment(out, &identity, &function.description);
}

/// `list` (a comma-separated list, as the pg_get_function_* functions print them) between
/// `open` and `close`: on one line when short, else one item a line.
fn listed(list: &str, open: &str, close: &str) -> String {
    if open.len() + list.len() + close.len() <= ONE_LINE {
        return format!("{open}{list}{close}");
    }
    let items: Vec<&str> = split_top_level(list);
    format!("{open}\n    {}\n{close}", items.join(",\n    "))
}

/// `list` split at the commas outside parentheses, quotes and double quotes (a default may be
/// `'a, b'::text` or `array[1, 2]`).
fn split_top_level(list: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut quote, mut start) = (0i32, None::<char>, 0);
    for (at, c) in list.char_indices() {
        match (quote, c) {
            (Some(open), _) if c == open => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '(' | '[') => depth += 1,
            (None, ')' | ']') => depth -= 1,
            (None, ',') if depth == 0 => {
                items.push(list[start..at].trim());
                start = at + 1;
            }
            _ => {}
        }
    }
    items.push(list[start..].trim());
    items
}

/// A dollar quote that does not occur in `body`: `$$`, else `$body$`, `$body1$`, ….
fn dollar_quote(body: &str) -> String {
    std::iter::once("$$".to_owned())
        .chain(std::iter::once("$body$".to_owned()))
        .chain((1..).map(|n| format!("$body{n}$")))
        .find(|quote| !body.contains(quote.as_str()))
        .expect("some quote is free")
}

/// PUBLIC's privileges on the schema and everything in it, from each object's ACL, or from
/// PostgreSQL's default for its kind when it has none (where a function's lets PUBLIC execute
/// it). Grants to roles are left out (see the file's header).
pub async fn privileges(conn: &mut PgConnection, out: &mut String) {
    let grants: Vec<(String,)> = rows(
        conn,
        "select grant_line
        from (
            select 1 as kind, format('grant %s on schema %I to public;', lower(grants.privilege_type),
                                     schemas.nspname) as grant_line
            from pg_namespace as schemas
            cross join lateral aclexplode(coalesce(schemas.nspacl, acldefault('n', schemas.nspowner)))
                as grants
            where schemas.oid = $1::regnamespace
              and grants.grantee = 0
            union all
            select 2, format('grant %s on %s %I.%I to public;', lower(grants.privilege_type),
                             case relations.relkind when 'S' then 'sequence' else 'table' end,
                             $1, relations.relname)
            from pg_class as relations
            cross join lateral aclexplode(coalesce(relations.relacl, acldefault(
                case relations.relkind when 'S' then 's' else 'r' end::\"char\", relations.relowner)))
                as grants
            where relations.relnamespace = $1::regnamespace
              and relations.relkind in ('r', 'p', 'v', 'm', 'S')
              and relations.relname <> '_sqlx_migrations'
              and grants.grantee = 0
            union all
            select 3, format('grant %s (%s) on table %I.%I to public;', lower(grants.privilege_type),
                             string_agg(quote_ident(columns.attname), ', ' order by columns.attnum),
                             $1, relations.relname)
            from pg_attribute as columns
            join pg_class as relations on relations.oid = columns.attrelid
            cross join lateral aclexplode(columns.attacl) as grants
            where relations.relnamespace = $1::regnamespace
              and grants.grantee = 0
            group by relations.relname, grants.privilege_type
            union all
            select 4, format('grant %s on %s %I.%I(%s) to public;', lower(grants.privilege_type),
                             case functions.prokind when 'p' then 'procedure' else 'function' end,
                             $1, functions.proname, pg_get_function_identity_arguments(functions.oid))
            from pg_proc as functions
            cross join lateral aclexplode(coalesce(functions.proacl, acldefault('f', functions.proowner)))
                as grants
            where functions.pronamespace = $1::regnamespace
              and grants.grantee = 0
        ) as lines
        order by kind, grant_line",
    )
    .await;
    section(
        out,
        "Privileges of PUBLIC (what is not listed here, PUBLIC may not do; the roles that may\n\
         -- call each side's functions are granted them by sql/roles.sql or by an operator)",
    );
    writeln!(out).unwrap();
    for (line,) in grants {
        writeln!(out, "{line}").unwrap();
    }
}

#[test]
fn lists_split_at_their_own_commas_only() {
    assert_eq!(
        split_top_level("a text DEFAULT 'x, y'::text, b integer[] DEFAULT ARRAY[1, 2], \"c,d\" numeric(3,1)"),
        vec![
            "a text DEFAULT 'x, y'::text",
            "b integer[] DEFAULT ARRAY[1, 2]",
            "\"c,d\" numeric(3,1)"
        ]
    );
}
