//! The schema, its types, tables (with their indexes and triggers), sequences and views.
//!
//! sqlx's own record, `ackloop._sqlx_migrations` (sqlx.toml's `table-name`), is left out: sqlx
//! makes it, not the migrations, and a database migrated with psql has none.

use std::collections::BTreeMap;
use std::fmt::Write;

use sqlx::PgConnection;

use super::{SCHEMA, comment, quote_ident, rows, section};

pub async fn schema(conn: &mut PgConnection, out: &mut String) {
    let (description,): (Option<String>,) = rows(
        conn,
        "select obj_description(oid, 'pg_namespace')
        from pg_namespace
        where nspname = $1",
    )
    .await
    .pop()
    .expect("the ackloop schema exists");
    section(out, "Schema");
    writeln!(out, "\ncreate schema {SCHEMA};").unwrap();
    comment(out, &format!("schema {SCHEMA}"), &description);
}

/// Enums and domains (none yet; a migration may add them).
pub async fn types(conn: &mut PgConnection, out: &mut String) {
    let types: Vec<(String,)> = rows(
        conn,
        "select case types.typtype
                when 'e' then format(E'create type %I.%I as enum (\\n    %s\\n);', $1, types.typname,
                    (select string_agg(quote_literal(labels.enumlabel), E',\\n    '
                                       order by labels.enumsortorder)
                     from pg_enum as labels
                     where labels.enumtypid = types.oid))
                else format('create domain %I.%I as %s%s%s%s;', $1, types.typname,
                    format_type(types.typbasetype, types.typtypmod),
                    case when types.typnotnull then ' not null' else '' end,
                    coalesce(' default ' || types.typdefault, ''),
                    (select coalesce(string_agg(format(E'\\n    constraint %I %s', checks.conname,
                                                       pg_get_constraintdef(checks.oid)),
                                                '' order by checks.conname), '')
                     from pg_constraint as checks
                     where checks.contypid = types.oid))
            end
        from pg_type as types
        where types.typnamespace = $1::regnamespace
          and types.typtype in ('e', 'd')
        order by types.typname",
    )
    .await;
    if !types.is_empty() {
        section(out, "Types");
    }
    for (definition,) in types {
        write!(out, "\n{definition}\n").unwrap();
    }
}

#[derive(sqlx::FromRow)]
struct Table {
    name: String,
    unlogged: bool,
    partition_key: Option<String>,
    description: Option<String>,
}

#[derive(sqlx::FromRow)]
struct Column {
    table_name: String,
    name: String,
    data_type: String,
    not_null: bool,
    default: Option<String>,
    identity: String,
    generated: String,
    collation: Option<String>,
    description: Option<String>,
}

/// A constraint, index or trigger of a table: its text, what `comment on` calls it, its comment.
#[derive(sqlx::FromRow)]
struct Part {
    table_name: String,
    text: String,
    object: String,
    description: Option<String>,
}

/// Groups `items` by their table's name, keeping their order.
fn by_table<T>(items: &[T], table: impl Fn(&T) -> &str) -> BTreeMap<String, Vec<&T>> {
    let mut grouped: BTreeMap<String, Vec<&T>> = BTreeMap::new();
    for item in items {
        grouped.entry(table(item).to_owned()).or_default().push(item);
    }
    grouped
}

pub async fn tables(conn: &mut PgConnection, out: &mut String) {
    let tables: Vec<Table> = rows(
        conn,
        "select tables.relname::text as name,
            tables.relpersistence = 'u' as unlogged,
            pg_get_partkeydef(tables.oid) as partition_key,
            obj_description(tables.oid, 'pg_class') as description
        from pg_class as tables
        where tables.relnamespace = $1::regnamespace
          and tables.relkind in ('r', 'p')
          and tables.relname <> '_sqlx_migrations'
        order by tables.relname",
    )
    .await;
    let columns: Vec<Column> = rows(
        conn,
        "select tables.relname::text as table_name,
            columns.attname::text as name,
            format_type(columns.atttypid, columns.atttypmod) as data_type,
            columns.attnotnull as not_null,
            pg_get_expr(defaults.adbin, defaults.adrelid) as default,
            columns.attidentity::text as identity,
            columns.attgenerated::text as generated,
            case when columns.attcollation <> types.typcollation
                then format('%I.%I', collation_schemas.nspname, collations.collname)
            end as collation,
            col_description(tables.oid, columns.attnum) as description
        from pg_attribute as columns
        join pg_class as tables on tables.oid = columns.attrelid
        join pg_type as types on types.oid = columns.atttypid
        left join pg_attrdef as defaults
            on defaults.adrelid = columns.attrelid and defaults.adnum = columns.attnum
        left join pg_collation as collations on collations.oid = columns.attcollation
        left join pg_namespace as collation_schemas on collation_schemas.oid = collations.collnamespace
        where tables.relnamespace = $1::regnamespace
          and tables.relkind in ('r', 'p')
          and tables.relname <> '_sqlx_migrations'
          and columns.attnum > 0
          and not columns.attisdropped
        order by tables.relname, columns.attnum",
    )
    .await;
    // Keys first, then references, exclusions and checks, each kind by name. (Not-null
    // constraints, which PostgreSQL 18 lists here, are the columns' `not null`.)
    let constraints: Vec<Part> = rows(
        conn,
        "select tables.relname::text as table_name,
            format('constraint %I %s', constraints.conname, pg_get_constraintdef(constraints.oid)) as text,
            format('constraint %I on %I.%I', constraints.conname, $1, tables.relname) as object,
            obj_description(constraints.oid, 'pg_constraint') as description
        from pg_constraint as constraints
        join pg_class as tables on tables.oid = constraints.conrelid
        where tables.relnamespace = $1::regnamespace
          and tables.relname <> '_sqlx_migrations'
          and constraints.contype in ('p', 'u', 'f', 'x', 'c')
        order by tables.relname,
            array_position(array['p', 'u', 'f', 'x', 'c']::\"char\"[], constraints.contype),
            constraints.conname",
    )
    .await;
    // Indexes of their own (a key's index is its constraint), then triggers a migration made
    // (not the ones PostgreSQL makes for a reference).
    let after: Vec<Part> = rows(
        conn,
        "select tables.relname::text as table_name,
            pg_get_indexdef(indexes.oid) || ';' as text,
            format('index %I.%I', $1, indexes.relname) as object,
            obj_description(indexes.oid, 'pg_class') as description,
            1 as kind
        from pg_index
        join pg_class as indexes on indexes.oid = pg_index.indexrelid
        join pg_class as tables on tables.oid = pg_index.indrelid
        where tables.relnamespace = $1::regnamespace
          and tables.relname <> '_sqlx_migrations'
          and not exists (
              select from pg_constraint as constraints
              where constraints.conindid = pg_index.indexrelid
                and constraints.conrelid = pg_index.indrelid
                and constraints.contype in ('p', 'u', 'x'))
        union all
        select tables.relname::text,
            pg_get_triggerdef(triggers.oid, true) || ';',
            format('trigger %I on %I.%I', triggers.tgname, $1, tables.relname),
            obj_description(triggers.oid, 'pg_trigger'),
            2
        from pg_trigger as triggers
        join pg_class as tables on tables.oid = triggers.tgrelid
        where tables.relnamespace = $1::regnamespace
          and not triggers.tgisinternal
        order by table_name, kind, object",
    )
    .await;
    let columns_of = by_table(&columns, |column| &column.table_name);
    let constraints_of = by_table(&constraints, |part| &part.table_name);
    let after_of = by_table(&after, |part| &part.table_name);

    section(out, "Tables (columns in the order the migrations added them)");
    for table in &tables {
        let qualified = format!("{SCHEMA}.{}", quote_ident(&table.name));
        let columns = columns_of.get(&table.name).cloned().unwrap_or_default();
        let constraints = constraints_of.get(&table.name).cloned().unwrap_or_default();
        let lines: Vec<String> = columns
            .iter()
            .map(|column| column_line(column))
            .chain(constraints.iter().map(|part| part.text.clone()))
            .collect();
        let unlogged = if table.unlogged { "unlogged " } else { "" };
        write!(
            out,
            "\ncreate {unlogged}table {qualified} (\n    {}\n)",
            lines.join(",\n    ")
        )
        .unwrap();
        match &table.partition_key {
            Some(key) => writeln!(out, " partition by {key};").unwrap(),
            None => writeln!(out, ";").unwrap(),
        }
        comment(out, &format!("table {qualified}"), &table.description);
        for column in &columns {
            let object = format!("column {qualified}.{}", quote_ident(&column.name));
            comment(out, &object, &column.description);
        }
        for part in &constraints {
            comment(out, &part.object, &part.description);
        }
        for part in after_of.get(&table.name).into_iter().flatten() {
            write!(out, "\n{}\n", part.text).unwrap();
            comment(out, &part.object, &part.description);
        }
    }
}

fn column_line(column: &Column) -> String {
    let mut line = format!("{} {}", quote_ident(&column.name), column.data_type);
    if let Some(collation) = &column.collation {
        write!(line, " collate {collation}").unwrap();
    }
    let default = column.default.as_deref();
    match (column.identity.as_str(), column.generated.as_str(), default) {
        ("a", _, _) => line.push_str(" generated always as identity"),
        ("d", _, _) => line.push_str(" generated by default as identity"),
        (_, "s", Some(expression)) => write!(line, " generated always as ({expression}) stored").unwrap(),
        (_, _, Some(default)) => write!(line, " default {default}").unwrap(),
        _ => {}
    }
    if column.not_null {
        line.push_str(" not null");
    }
    line
}

/// Sequences that no identity column owns (none yet).
pub async fn sequences(conn: &mut PgConnection, out: &mut String) {
    let sequences: Vec<(String,)> = rows(
        conn,
        "select format(E'create sequence %I.%I as %s\\n    increment by %s minvalue %s maxvalue %s start with %s cache %s%s;',
            $1, sequences.relname, format_type(pg_sequence.seqtypid, null), pg_sequence.seqincrement,
            pg_sequence.seqmin, pg_sequence.seqmax, pg_sequence.seqstart, pg_sequence.seqcache,
            case when pg_sequence.seqcycle then ' cycle' else '' end)
        from pg_class as sequences
        join pg_sequence on pg_sequence.seqrelid = sequences.oid
        where sequences.relnamespace = $1::regnamespace
          and sequences.relkind = 'S'
          and not exists (
              select from pg_depend
              where pg_depend.classid = 'pg_class'::regclass
                and pg_depend.objid = sequences.oid
                and pg_depend.deptype = 'i')
        order by sequences.relname",
    )
    .await;
    if !sequences.is_empty() {
        section(out, "Sequences");
    }
    for (definition,) in sequences {
        write!(out, "\n{definition}\n").unwrap();
    }
}

/// Views and materialized views (none yet), as the server renders their queries.
pub async fn views(conn: &mut PgConnection, out: &mut String) {
    let views: Vec<(String, bool, String, Option<String>)> = rows(
        conn,
        "select views.relname::text,
            views.relkind = 'm',
            rtrim(rtrim(pg_get_viewdef(views.oid, true)), ';'),
            obj_description(views.oid, 'pg_class')
        from pg_class as views
        where views.relnamespace = $1::regnamespace
          and views.relkind in ('v', 'm')
        order by views.relname",
    )
    .await;
    if !views.is_empty() {
        section(out, "Views");
    }
    for (name, materialized, definition, description) in views {
        let kind = if materialized { "materialized view" } else { "view" };
        let qualified = format!("{SCHEMA}.{}", quote_ident(&name));
        write!(out, "\ncreate {kind} {qualified} as\n{definition};\n").unwrap();
        comment(out, &format!("{kind} {qualified}"), &description);
    }
}
