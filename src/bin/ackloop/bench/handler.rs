//! The trivial custom handler `ackloop bench --handler custom` runs: the built-in's effect (one
//! player row), written the way a player service's own handler would, so that the difference
//! measured is the handler path's cost (a savepoint and a statement per job), not the work.

use ackloop::{Created, Handler, Job, JobError, JobSource};
use sqlx::PgConnection;

/// Inserts the job's player with a statement of its own, and answers as the built-in does (so
/// that the bench's callers, awaiting built-in players, read it the same way).
pub struct InsertPlayerAsUser;

impl Handler for InsertPlayerAsUser {
    const SOURCE: JobSource = JobSource::BuiltinSignup;

    async fn handle(&self, job: &Job, conn: &mut PgConnection) -> Result<Created, JobError> {
        let user_id = job
            .user_id
            .to_i64()
            .ok_or_else(|| JobError::fail("the bench signs users up on the built-in tables"))?;
        let player = sqlx::query!(
            r#"
            insert into ackloop.builtin_players (user_id, display_name)
            values ($1, $2)
            on conflict (user_id) do update set display_name = builtin_players.display_name
            returning id, display_name, created_at
            "#,
            user_id,
            job.display_name,
        )
        .fetch_one(&mut *conn)
        .await?;
        Ok(Created::builtin_player(
            player.id,
            player.display_name,
            player.created_at,
        ))
    }
}
