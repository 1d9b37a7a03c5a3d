-- Jobs tried before are retried alone, never in a batch. Workers look for the next one due, and
-- ask when it will be, often; this index holds only pending retries (a few rows), so those looks
-- cost nothing however long the queue of new jobs, and new jobs never enter it.
create index player_creation_jobs_retry_idx
    on player_creation_jobs (run_after, id)
    where status = 'pending' and attempts > 0;
