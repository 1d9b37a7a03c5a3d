-- The dashboard and `ackloop status` list the latest failed jobs, newest first. Failed jobs are
-- few beside the done ones a busy service keeps (millions, until pruned): without this index that
-- list walks every finished job to find them. Partial, so it holds the failed jobs alone.
-- Building it holds up writes to player_creation_jobs while it runs: on a table of millions,
-- apply it when signups are quiet.
create index player_creation_jobs_failed_idx
    on player_creation_jobs (completed_at)
    where status = 'failed';

insert into ackloop.applied_migrations (version, description)
values (20261126000004, 'index failed jobs');
