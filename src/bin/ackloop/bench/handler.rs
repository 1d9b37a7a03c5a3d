//! The trivial custom handler `ackloop bench --handler custom` runs: the built-in's effect (one
//! player row), written the way a player service's own handler would, in its batch form (one
//! statement per batch) and per job (for retries, and a batch that failed), so that the
//! difference measured is the handler path's cost, not the work.

use std::collections::HashMap;

use ackloop::{BatchForm, Created, Handler, Job, JobError, JobSource};
use sqlx::PgConnection;

/// Inserts the job's player with a statement of its own, and answers as the built-in does (so
/// that the bench's callers, awaiting built-in players, read it the same way).
pub struct InsertPlayerAsUser;

impl Handler for InsertPlayerAsUser {
    const SOURCE: JobSource = JobSource::BuiltinSignup;
    const BATCH_FORM: BatchForm = BatchForm::Together;

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

    async fn handle_batch(&self, jobs: &[Job], conn: &mut PgConnection) -> Result<Vec<Created>, JobError> {
        let user_ids = jobs
            .iter()
            .map(|job| job.user_id.to_i64())
            .collect::<Option<Vec<i64>>>()
            .ok_or_else(|| JobError::fail("the bench signs users up on the built-in tables"))?;
        let names: Vec<&str> = jobs.iter().map(|job| job.display_name.as_str()).collect();
        let players = sqlx::query!(
            r#"
            insert into ackloop.builtin_players (user_id, display_name)
            select * from unnest($1::bigint[], $2::text[])
            on conflict (user_id) do update set display_name = builtin_players.display_name
            returning user_id, id, display_name, created_at
            "#,
            &user_ids,
            &names as &[&str],
        )
        .fetch_all(&mut *conn)
        .await?;
        let mut by_user: HashMap<i64, Created> = players
            .into_iter()
            .map(|player| {
                let created = Created::builtin_player(player.id, player.display_name, player.created_at);
                (player.user_id, created)
            })
            .collect();
        user_ids
            .iter()
            .map(|user_id| by_user.remove(user_id))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| JobError::retry_later("a user of the batch got no player"))
    }
}
