-- `jobs prune` deletes finished jobs oldest first, a batch at a time: without this index every
-- batch sorts every finished job, and a busy service keeps millions of them. Partial, so the
-- pending rows the workers churn through never enter it.
-- Building it takes a lock that holds up writes to player_creation_jobs for the time it takes;
-- on a table with millions of rows, apply it when signups are quiet.
create index player_creation_jobs_finished_idx
    on player_creation_jobs (completed_at)
    where status <> 'pending';
