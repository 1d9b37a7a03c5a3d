//! Groups concurrent signups into one transaction.
//!
//! Postgres serialises every commit that has notified, fsync included, behind one cluster-wide
//! lock; that lock, not the CPU, caps a loop with one notifying commit per signup (about 2,000 to
//! 4,000 a second on small machines, whatever the client count). So the callers of one
//! [`Signups`](crate::Signups) hand their signups to a few writer tasks, which write whatever is
//! queued as one statement: one commit for many signups.
//!
//! Each signup keeps its guarantee: its user, its job and its wake-up commit together in one
//! transaction or not at all. A taken email skips only its own signup. Any other error in a batch
//! writes nothing, and each of its signups is then written alone, so it fails alone. A lone
//! signup (the common case at low load) is written at once, without waiting for company.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::channel::Channels;
use crate::job::{JobId, UserId};
use crate::signup::{NewUser, SignupError, classify};
use crate::store;
use sqlx::PgPool;

/// A signup waiting for a writer.
struct Queued {
    new_user: NewUser,
    job_id: JobId,
    written: oneshot::Sender<Result<UserId, SignupError>>,
}

/// The writer tasks of one `Signups`. Dropping it stops them.
pub(crate) struct Writers {
    queue: mpsc::UnboundedSender<Queued>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Writers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Writers {
    pub(crate) fn start(pool: PgPool, channels: Channels, writers: usize, max_batch: usize) -> Self {
        let (queue, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        let tasks = (0..writers.max(1))
            .map(|_| {
                tokio::spawn(write_batches(
                    pool.clone(),
                    channels.clone(),
                    Arc::clone(&receiver),
                    max_batch.max(1),
                ))
            })
            .collect();
        Self { queue, tasks }
    }

    /// Writes one signup (with others queued at the same moment) and returns its user's id.
    pub(crate) async fn write(&self, new_user: &NewUser, job_id: JobId) -> Result<UserId, SignupError> {
        let (written, result) = oneshot::channel();
        let queued = Queued {
            new_user: new_user.clone(),
            job_id,
            written,
        };
        if self.queue.send(queued).is_err() {
            return Err(writers_gone());
        }
        result.await.unwrap_or_else(|_| Err(writers_gone()))
    }
}

fn writers_gone() -> SignupError {
    SignupError::Unavailable {
        job_id: None,
        source: sqlx::Error::PoolClosed,
    }
}

/// One writer: take everything queued (up to `max_batch`), write it, repeat. While one writer
/// waits for its commit, the next takes what queued up meanwhile.
async fn write_batches(
    pool: PgPool,
    channels: Channels,
    receiver: Arc<Mutex<mpsc::UnboundedReceiver<Queued>>>,
    max_batch: usize,
) {
    loop {
        let batch = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            batch
        };
        if batch.len() == 1 {
            write_alone(&pool, &channels, batch).await;
        } else {
            write_together(&pool, &channels, batch).await;
        }
    }
}

async fn write_alone(pool: &PgPool, channels: &Channels, batch: Vec<Queued>) {
    for queued in batch {
        let result = store::insert_user_and_job(
            pool,
            queued.new_user.email(),
            queued.new_user.display_name(),
            queued.job_id,
            &channels.jobs,
        )
        .await
        .map_err(|err| classify(err, Some(queued.job_id)));
        // The caller may have given up; its signup stands either way.
        let _ = queued.written.send(result);
    }
}

async fn write_together(pool: &PgPool, channels: &Channels, batch: Vec<Queued>) {
    let emails: Vec<String> = batch.iter().map(|q| q.new_user.email().to_owned()).collect();
    let names: Vec<String> = batch
        .iter()
        .map(|q| q.new_user.display_name().to_owned())
        .collect();
    let job_ids: Vec<Uuid> = batch.iter().map(|q| q.job_id.as_uuid()).collect();
    match store::insert_users_and_jobs(pool, &emails, &names, &job_ids, &channels.jobs).await {
        Ok(written) => {
            tracing::debug!(
                batch.size = batch.len(),
                written = written.len(),
                "signups written"
            );
            for queued in batch {
                let user_id = written
                    .iter()
                    .find(|w| w.job_id == queued.job_id)
                    .map(|w| w.user_id);
                let _ = queued.written.send(user_id.ok_or(SignupError::EmailTaken));
            }
        }
        // The commit may or may not have happened: writing again could sign someone up twice
        // or report their own signup as a taken email. Each caller gets the job id to check.
        Err(err) if store::is_unavailable(&err) => {
            let message = err.to_string();
            for queued in batch {
                let shared = sqlx::Error::Io(std::io::Error::other(message.clone()));
                let _ = queued.written.send(Err(classify(shared, Some(queued.job_id))));
            }
        }
        // The statement failed, so nothing was written: write each alone to find the culprit.
        Err(err) => {
            tracing::debug!(error = %crate::connect::Described(&err), batch.size = batch.len(), "batch failed; writing its signups one by one");
            write_alone(pool, channels, batch).await;
        }
    }
}
