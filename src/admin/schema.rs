//! Is the database's schema the one this version of ackloop was built for?

use sqlx::PgPool;

use crate::{MIGRATOR, store};

/// The database's schema does not match this version's migrations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// No migration was ever applied.
    #[error("the database has no ackloop schema; run `ackloop migrate` (or `sqlx migrate run`)")]
    Missing,
    /// Some of this version's migrations are not applied yet.
    #[error(
        "the database schema is behind this ackloop (missing migrations {missing:?}); run `ackloop migrate`"
    )]
    Behind {
        /// Versions of this binary's migrations not applied.
        missing: Vec<i64>,
    },
    /// The database has migrations this version does not know: a newer ackloop migrated it.
    #[error(
        "the database schema is newer than this ackloop (unknown migrations {unknown:?}); upgrade ackloop"
    )]
    Newer {
        /// Versions applied that this binary does not have.
        unknown: Vec<i64>,
    },
    /// The check itself failed.
    #[error("cannot read the applied migrations")]
    Database(#[source] sqlx::Error),
}

/// The schema was applied, at least in part, by a tool other than sqlx (psql, Flyway), which
/// sqlx's migrator does not know of: it would apply every file again.
#[derive(Debug, thiserror::Error)]
#[error(
    "the schema was applied by another tool (migrations {versions:?} are recorded in \
     ackloop.applied_migrations but not by sqlx): apply new migrations with that tool, each file \
     once and in order (docs/protocol.md, \"Applying the schema\")"
)]
pub struct AppliedByAnotherTool {
    /// The versions sqlx did not apply.
    pub versions: Vec<i64>,
}

/// Whether the migrations recorded versions that sqlx's own record lacks. `Ok(None)` when sqlx
/// applied everything recorded (or nothing is recorded yet).
pub(crate) async fn applied_by_another_tool(
    pool: &PgPool,
) -> Result<Option<AppliedByAnotherTool>, sqlx::Error> {
    let versions = match store::versions_sqlx_did_not_apply(pool).await {
        Ok(versions) => versions,
        Err(err) if is_undefined_table(&err) => match store::applied_migrations(pool).await {
            // No ackloop.applied_migrations: nothing applied, or a schema from before it.
            Err(err) if is_undefined_table(&err) => Vec::new(),
            // No _sqlx_migrations: everything recorded came from another tool.
            versions => versions?,
        },
        Err(err) => return Err(err),
    };
    // The earlier layout's versions (its tables in `public`) are for this layout's first
    // migration to take over, whichever tool applied them.
    let versions: Vec<i64> = versions
        .into_iter()
        .filter(|version| !is_earlier_layout(*version))
        .collect();
    Ok((!versions.is_empty()).then_some(AppliedByAnotherTool { versions }))
}

/// Whether `version` is a migration of the layout before ackloop kept everything in its own
/// schema (up to 20261126000004): this version's first migration moves such a database forward.
fn is_earlier_layout(version: i64) -> bool {
    MIGRATOR
        .iter()
        .next()
        .is_some_and(|first| version < first.version)
}

/// Checks that every migration this version knows is applied, and no other, as the migrations
/// record themselves in `ackloop.applied_migrations`: a database migrated by `sqlx migrate run`,
/// `ackloop migrate`, or psql and other tools from the same files passes alike.
///
/// # Errors
/// [`SchemaError::Missing`], [`SchemaError::Behind`], [`SchemaError::Newer`], or
/// [`SchemaError::Database`] when the check cannot run.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), ackloop::SchemaError> {
/// ackloop::check_schema(&pool).await?;
/// # Ok(()) }
/// ```
pub async fn check_schema(pool: &PgPool) -> Result<(), SchemaError> {
    let applied = match store::applied_migrations(pool).await {
        Ok(applied) => applied,
        // A schema from before the migrations recorded themselves: only sqlx's table tells.
        Err(err) if is_undefined_table(&err) => match store::applied_sqlx_migrations(pool).await {
            Ok(applied) => applied,
            Err(err) if is_undefined_table(&err) => return Err(SchemaError::Missing),
            Err(err) => return Err(SchemaError::Database(err)),
        },
        Err(err) => return Err(SchemaError::Database(err)),
    };
    // A database on the earlier layout is behind: `ackloop migrate` moves it forward.
    let earlier_layout = applied.iter().any(|version| is_earlier_layout(*version));
    let applied: Vec<i64> = applied
        .into_iter()
        .filter(|version| !is_earlier_layout(*version))
        .collect();
    let unknown: Vec<i64> = applied
        .iter()
        .copied()
        .filter(|version| !MIGRATOR.version_exists(*version))
        .collect();
    if !unknown.is_empty() {
        return Err(SchemaError::Newer { unknown });
    }
    if applied.is_empty() && !earlier_layout {
        return Err(SchemaError::Missing);
    }
    let missing: Vec<i64> = MIGRATOR
        .iter()
        .map(|migration| migration.version)
        .filter(|version| !applied.contains(version))
        .collect();
    if !missing.is_empty() {
        return Err(SchemaError::Behind { missing });
    }
    Ok(())
}

fn is_undefined_table(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|err| err.code())
        .is_some_and(|code| code == "42P01")
}
