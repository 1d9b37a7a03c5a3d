//! `ackloop jobs show|retry|prune`: an operator's view of single jobs, and the ways to act on them.

use serde_json::json;

use crate::args::{ConnectionArgs, JobsCommand};
use crate::exit::Failure;

pub(super) async fn run(connection: &ConnectionArgs, command: JobsCommand) -> Result<(), Failure> {
    let pool = connection
        .migrated_pool(1, connection.default_patience()?)
        .await?;
    match command {
        JobsCommand::Show { job_id, json } => {
            let job = ackloop::admin::job_details(&pool, job_id).await?;
            if json {
                println!("{}", serde_json::to_string(&job).expect("job details serialise"));
                return Ok(());
            }
            for (name, value) in job_rows(&job) {
                println!("{name:<11} {value}");
            }
        }
        JobsCommand::Retry {
            job_id, repair, json, ..
        } => {
            let channels = connection.channels()?;
            let jobs = match (repair, job_id) {
                (false, Some(job_id)) => {
                    ackloop::admin::retry_failed_job(&pool, &channels, job_id).await?;
                    vec![job_id]
                }
                (false, None) => ackloop::admin::retry_all_failed_jobs(&pool, &channels).await?,
                (true, Some(job_id)) => {
                    ackloop::admin::repair_job(&pool, &channels, job_id).await?;
                    vec![job_id]
                }
                (true, None) => ackloop::admin::repair_all_missing_players(&pool, &channels).await?,
            };
            let (key, what) = if repair {
                ("repaired", "done job(s) without a player")
            } else {
                ("retried", "failed job(s)")
            };
            if json {
                println!("{}", json!({ key: jobs }));
            } else {
                println!("{} {what} put back to pending", jobs.len());
                for job_id in &jobs {
                    println!("  {job_id}");
                }
            }
        }
        JobsCommand::Prune {
            older_than,
            dry_run,
            json,
        } => {
            let (count, verb) = if dry_run {
                let count = ackloop::admin::count_prunable_jobs(&pool, older_than).await?;
                (u64::try_from(count).unwrap_or_default(), "would delete")
            } else {
                (
                    ackloop::admin::prune_finished_jobs(&pool, older_than).await?,
                    "deleted",
                )
            };
            if json {
                println!("{}", json!({ "dry_run": dry_run, "jobs": count }));
            } else {
                println!("{verb} {count} finished job(s) older than {older_than:?}");
            }
        }
    }
    Ok(())
}

/// `jobs show`'s lines: a name and a value each, with a "problem" line when the job is done but
/// its player is missing.
fn job_rows(job: &ackloop::admin::JobDetails) -> Vec<(&'static str, String)> {
    let time = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut rows = vec![
        ("job", job.job_id.to_string()),
        ("status", job.status.to_string()),
        (
            "user",
            match &job.email {
                Some(email) => format!("{} ({email})", job.user_id),
                None => job.user_id.to_string(),
            },
        ),
        (
            "player",
            job.player_id
                .as_ref()
                .map_or_else(|| "none".to_owned(), |id| id.to_string()),
        ),
    ];
    if job.player_missing {
        rows.push((
            "problem",
            format!(
                "done but its player is missing (deleted or restored without it); repair with: ackloop jobs retry --repair {}",
                job.job_id
            ),
        ));
    }
    rows.extend([
        ("attempts", job.attempts.to_string()),
        (
            "last error",
            job.last_error.clone().unwrap_or_else(|| "-".to_owned()),
        ),
        ("created", time(job.created_at)),
        ("updated", time(job.updated_at)),
        ("run after", time(job.run_after)),
        ("completed", job.completed_at.map_or_else(|| "-".to_owned(), time)),
    ]);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done_job(player_id: Option<ackloop::ExternalId>) -> ackloop::admin::JobDetails {
        let now = chrono::Utc::now();
        ackloop::admin::JobDetails {
            job_id: ackloop::JobId::new(),
            user_id: ackloop::ExternalId::from(1_i64),
            email: Some("ada@example.com".to_owned()),
            status: ackloop::JobStatus::Done,
            attempts: 1,
            last_error: None,
            run_after: now,
            created_at: now,
            updated_at: now,
            completed_at: Some(now),
            player_missing: player_id.is_none(),
            player_id,
        }
    }

    #[test]
    fn jobs_show_names_a_missing_player_as_a_problem_with_its_repair() {
        let healthy = job_rows(&done_job(Some(ackloop::ExternalId::from(9_i64))));
        assert!(healthy.iter().all(|(name, _)| *name != "problem"), "{healthy:?}");

        let job = done_job(None);
        let rows = job_rows(&job);
        let problem = rows
            .iter()
            .find(|(name, _)| *name == "problem")
            .map(|(_, value)| value.as_str());
        let repair = format!("ackloop jobs retry --repair {}", job.job_id);
        assert!(
            problem.is_some_and(|text| text.contains("player is missing") && text.ends_with(&repair)),
            "{rows:?}"
        );
    }
}
