-- The worker transaction, exactly as ackloop runs it: claim up to 32 due jobs, create their
-- players, mark them done, notify each, one commit. tests/it/protocol.rs checks it against the
-- code, with these binds:
-- store::complete_due_jobs
-- $1 = 32
-- $2 = 'player_jobs_done'
select job_id as id, waited_secs as waited_secs
from ackloop.complete_jobs(32, 'player_jobs_done');
