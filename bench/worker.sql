-- The worker's batch, exactly as ackloop runs it: claim up to 32 due jobs, create their players,
-- mark them done, commit, then notify each in a transaction of its own, in one CALL.
-- tests/it/protocol.rs checks it against the code, with these binds:
-- store::complete_due_jobs
-- $1 = 32
-- $2 = 'player_jobs_done'
call ackloop.complete_jobs_then_notify(32, 'player_jobs_done', null, null);
