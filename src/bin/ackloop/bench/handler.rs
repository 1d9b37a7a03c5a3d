//! The trivial custom handler `ackloop bench --handler custom` runs: the built-in's effect (one
//! player row), written the way a player service's own handler would, so that the difference
//! measured is the handler path's cost (a savepoint and a statement per job), not the work.

use ackloop::{Handler, Job, JobError};
use sqlx::PgConnection;

/// Inserts the job's player with a statement of its own.
pub struct InsertPlayerAsUser;

impl Handler for InsertPlayerAsUser {
    async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<(), JobError> {
        sqlx::query!(
            r#"
            insert into players (user_id, display_name)
            values ($1, $2)
            on conflict (user_id) do nothing
            "#,
            job.user_id.get(),
            job.display_name,
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
