-- A job's state in its row (issue 23): an attempt a worker counted and committed before making it
-- (a job taken alone) is `running`, with the time it started, instead of `pending` with a
-- provisional error text that code recognised by its words. The states and their transitions:
--
--   pending ──complete──▶ done           (complete_jobs; claim_jobs + mark_done, one transaction)
--   pending ──fail──────▶ failed         (record_failure: not retryable, or the last attempt)
--   pending ──retry─────▶ pending        (record_failure: retryable, due after the backoff)
--   pending ──start─────▶ running        (start_attempt, committed alone before the attempt)
--   running ──complete──▶ done           (lock_attempt + mark_done)
--   running ──fail──────▶ failed         (lock_attempt + record_failure)
--   running ──retry─────▶ pending        (lock_attempt + record_failure)
--   running ──give back─▶ pending        (give_back_attempt: it waited for a lock, uncounted)
--   running ──end───────▶ pending        (note_unfinished_attempt: it ended with an error its
--                                          session survived; the attempt stays counted)
--   running ──restart───▶ running        (start_attempt, its lease run out: the attempt ended
--                                          with its session; a new one is counted)
--   pending, running ──give up──▶ failed (start_attempt: the attempts are used up)
--   failed, done ──retry by an operator──▶ pending   (ackloop jobs retry)
--
-- A batch's claim is a row lock inside its transaction, not a state: a batch that dies leaves
-- its jobs `pending`, their attempts uncounted, and the worker then takes jobs alone.
--
-- Every row keeps its state: a job that the earlier functions left mid-attempt (pending, its
-- error the provisional text for its latest attempt) becomes `running`, started when that text
-- was written. The two indexes of unfinished jobs are built again for the new predicates, which
-- reads the whole table while it is locked: on a table of millions, apply this when signups
-- are quiet. Stop the workers while it runs, too: a worker's call to the functions replaced here
-- that waits behind this step's lock runs the earlier body when it resumes, which can cost the
-- job taken alone at that moment one attempt (counted, then taken as ended with its session).
--
-- Taking the table's lock waits behind a long transaction (a worker's claim, a prune) and holds
-- every signup up meanwhile: give up after 5 s instead; run `ackloop migrate` again.
set local lock_timeout = '5s';

alter table ackloop.player_creation_jobs
    add column attempt_started_at timestamptz;

alter table ackloop.player_creation_jobs
    drop constraint player_creation_jobs_status_check,
    drop constraint player_creation_jobs_completed_at_check;

-- What the earlier start_attempt left: `pending`, the attempt counted, its error the text
-- `unfinished_attempt_error` gave for that attempt.
update ackloop.player_creation_jobs as jobs
set status = 'running',
    attempt_started_at = jobs.updated_at,
    -- The provisional text said only that the attempt had not finished yet; the error before it
    -- was overwritten when the attempt started.
    last_error = null
where jobs.status = 'pending'
  and jobs.attempts > 0
  and jobs.last_error = ackloop.unfinished_attempt_error(jobs.attempts);

alter table ackloop.player_creation_jobs
    add constraint player_creation_jobs_status_check
        check (status in ('pending', 'running', 'done', 'failed')),
    -- Finished jobs have their time; only a running one has its attempt's start.
    add constraint player_creation_jobs_times_check check (
        (status in ('done', 'failed')) = (completed_at is not null)
        and (status = 'running') = (attempt_started_at is not null)
    );

-- Exactly the due-job predicate (below), so that claims stay index scans over the unfinished
-- rows however many finished rows accumulate. A batch (`attempts = 0`) never meets a running
-- job: those have made an attempt.
drop index ackloop.player_creation_jobs_pending_idx;
create index player_creation_jobs_pending_idx
    on ackloop.player_creation_jobs (run_after, id)
    where status in ('pending', 'running');
-- Jobs tried before, waiting for their next attempt or running one: workers take them alone
-- and ask often when the next is due; a few rows, whatever the queue of new jobs.
drop index ackloop.player_creation_jobs_retry_idx;
create index player_creation_jobs_retry_idx
    on ackloop.player_creation_jobs (run_after, id)
    where status in ('pending', 'running') and attempts > 0;
-- The finished jobs' index (`status <> 'pending'`) stays as it is, the largest of the table: it
-- now holds the few running jobs too (their `completed_at` is null), and the readers' predicate,
-- `status in ('done', 'failed')`, implies its own, so they still use it.

-- The jobs a worker may take now, written once: waiting ones whose time has come, and running
-- ones whose lease ran out (`run_after` of a running job is when its attempt is taken as ended
-- with its session). Every claim reads through it, adding which jobs it takes (`attempts = 0`
-- for a batch, `attempts > 0` for retries, the source) and `for update skip locked`. (`*` is
-- expanded when the view is made: a later step that changes the table's columns makes it again.)
create view ackloop.due_jobs as
select jobs.*
from ackloop.player_creation_jobs as jobs
where jobs.status in ('pending', 'running')
  and jobs.run_after <= now();

-- The limits a worker's transaction runs under, set once here and called by every worker function
-- that reads or writes the job table (complete_jobs, claim_jobs, start_attempt, lock_attempt,
-- give_back_attempt, note_unfinished_attempt, next_retry_due_in_secs, pending_jobs): idle in the
-- transaction for over 10 s loses the session (and its locks), a client gone while a statement
-- runs is noticed within 1 s, and a lock wait over 2 s fails a statement (55P03), which no job
-- is blamed for.
create or replace function ackloop.limit_claim_session() returns void
language sql volatile
set search_path = pg_catalog, ackloop, pg_temp
as $$
    select set_config('idle_in_transaction_session_timeout', '10s', true),
           set_config('client_connection_check_interval', '1s', true),
           set_config('lock_timeout', '2s', true)
$$;

-- The text a job's error shows when its attempt ended with its session (found running after its
-- lease ran out).
create or replace function ackloop.unfinished_attempt_error(attempt integer) returns text
language sql immutable parallel safe
set search_path = pg_catalog, ackloop, pg_temp
as $$
    select 'attempt ' || attempt || ' did not finish: its database session ended (a crash or '
        || 'terminated backend, an out-of-memory kill, or the worker stopped)'
$$;

-- The built-in player service in one statement: claims up to `batch_size` due signups of the
-- built-in tables never tried before (skipping any another worker holds; a service's jobs are
-- its own worker's), creates their players in ackloop.builtin_players, marks them done with the
-- player as their answer and notifies each id on `done_channel`. Any failure fails the whole
-- call and leaves every job as it was, its attempt uncounted: then take the jobs one by one with
-- claim_jobs(builtin_signups => true). Runs under limit_claim_session's limits.
create or replace function ackloop.complete_jobs(
    batch_size integer default 32,
    done_channel text default 'player_jobs_done'
) returns table (job_id uuid, waited_secs double precision)
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    return query
    with claimed as (
        select jobs.id, jobs.builtin_user_id, jobs.display_name
        from ackloop.due_jobs as jobs
        where jobs.attempts = 0
          and jobs.builtin_user_id is not null
        order by jobs.run_after, jobs.id
        limit batch_size
        for update skip locked
    ),
    new_players as (
        insert into ackloop.builtin_players (user_id, display_name)
        select claimed.builtin_user_id, claimed.display_name
        from claimed
        on conflict (user_id) do nothing
        returning builtin_players.id, builtin_players.user_id, builtin_players.display_name,
                  builtin_players.created_at
    ),
    completed as (
        update ackloop.player_creation_jobs as jobs
        set status = 'done',
            attempts = jobs.attempts + 1,
            last_error = null,
            updated_at = now(),
            completed_at = now(),
            -- A job whose user has a player already (made by hand) gets none here: null, which
            -- the table's check refuses, failing the batch; one at a time,
            -- insert_builtin_player answers with the player that exists.
            player_id = new_players.id::text,
            result = jsonb_build_object('display_name', new_players.display_name, 'created_at', new_players.created_at)
        from claimed
        left join new_players on new_players.user_id = claimed.builtin_user_id
        where jobs.id = claimed.id
        returning jobs.id, extract(epoch from now() - jobs.created_at)::float8 as waited_secs
    )
    select completed.id, completed.waited_secs
    from completed
    cross join lateral pg_notify(done_channel, completed.id::text) as notified;
end
$$;

-- Locks up to `batch_size` due jobs never tried before for the caller's transaction (skipping
-- any another worker holds), with what a handler needs: jobs services added (add_job), or with
-- `builtin_signups` the built-in tables' signups (sign_up), so that each kind goes to the worker
-- whose handler serves it; `attempt` is the number of the attempt now being made. Call it first
-- in a transaction; finish each job with mark_done or record_failure before committing. Sets
-- limit_claim_session's limits: a worker that hangs or dies in the transaction gives its jobs
-- back within about 10 s (a statement that keeps running keeps them until it ends or the server
-- notices the client is gone). The ids are noted in the transaction-local setting
-- `ackloop.claimed_jobs`, which mark_done and record_failure check.
create or replace function ackloop.claim_jobs(batch_size integer default 32, builtin_signups boolean default false)
returns table (
    job_id uuid,
    user_id text,
    display_name text,
    extra jsonb,
    attempt integer,
    waited_secs double precision
)
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    return query
    with claimed as (
        select jobs.id, jobs.user_id, jobs.display_name, jobs.extra, jobs.attempts, jobs.created_at
        from ackloop.due_jobs as jobs
        where jobs.attempts = 0
          and (jobs.builtin_user_id is not null) = builtin_signups
        order by jobs.run_after, jobs.id
        limit batch_size
        for update skip locked
    )
    select
        claimed.id,
        claimed.user_id,
        claimed.display_name,
        claimed.extra,
        claimed.attempts + 1,
        extract(epoch from now() - claimed.created_at)::float8
    from claimed
    -- One row: the claimed ids noted for mark_done and record_failure.
    cross join (
        select set_config(
            'ackloop.claimed_jobs',
            concat_ws(',', nullif(current_setting('ackloop.claimed_jobs', true), ''), array_to_string(array_agg(claimed.id), ',')),
            true
        )
        from claimed
    ) as noted
    order by claimed.id;
end
$$;

-- start_attempt answers with one more column (`abandoned_attempt`), so it is made again; its
-- grants are carried over.
create temporary table kept_start_attempt_grants on commit drop as
select grants.grantee::regrole::text as grantee
from pg_proc as procs
cross join lateral aclexplode(procs.proacl) as grants
where procs.oid = 'ackloop.start_attempt(integer, bigint, bigint, text, boolean, boolean)'::regprocedure
  and grants.privilege_type = 'EXECUTE'
  and grants.grantee <> 0
  and grants.grantee <> procs.proowner;
drop function ackloop.start_attempt(integer, bigint, bigint, text, boolean, boolean);

-- Starts an attempt of the next due job tried before (`any_job`: of any due job) of the kind
-- `builtin_signups` names (as in claim_jobs), for a worker that takes such jobs one at a time, as
-- a job that killed its session must be: locks it (skipping any another worker holds), counts
-- the attempt and marks the job `running` since now, not due again before its lease ends (the
-- backoff after this attempt, at least 1 s: `lease_ms`), when the attempt is taken as ended
-- with its session. Call it alone in its transaction and commit before making the attempt, so
-- the count survives a job that kills its session; then make the attempt in a new transaction
-- that begins with lock_attempt.
--
-- Status 'started': `attempt` is the attempt now counted, `last_error` what the job showed
-- before, and `abandoned_attempt` the number of the attempt found running past its lease (it
-- ended with its session), if one was. Status 'gave_up': the job's `max_attempts` were used up,
-- so it was failed instead (its id notified on `done_channel`), `last_error` saying why. No row:
-- nothing is due.
create function ackloop.start_attempt(
    max_attempts integer default 5,
    backoff_base_ms bigint default 1000,
    backoff_max_ms bigint default 300000,
    done_channel text default 'player_jobs_done',
    any_job boolean default false,
    builtin_signups boolean default false
) returns table (
    status text,
    job_id uuid,
    user_id text,
    display_name text,
    extra jsonb,
    attempt integer,
    waited_secs double precision,
    last_error text,
    lease_ms bigint,
    abandoned_attempt integer
)
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
#variable_conflict use_column
declare
    job record;
    shown text;
    lease bigint;
begin
    perform ackloop.limit_claim_session();
    -- Two statements, so that looking for retries stays on their own small index.
    if any_job then
        select jobs.id, jobs.status, jobs.user_id, jobs.display_name, jobs.extra, jobs.attempts,
               jobs.last_error, extract(epoch from now() - jobs.created_at)::float8 as waited
        into job
        from ackloop.due_jobs as jobs
        where (jobs.builtin_user_id is not null) = builtin_signups
        order by jobs.run_after, jobs.id
        limit 1
        for update skip locked;
    else
        select jobs.id, jobs.status, jobs.user_id, jobs.display_name, jobs.extra, jobs.attempts,
               jobs.last_error, extract(epoch from now() - jobs.created_at)::float8 as waited
        into job
        from ackloop.due_jobs as jobs
        where jobs.attempts > 0
          and (jobs.builtin_user_id is not null) = builtin_signups
        order by jobs.run_after, jobs.id
        limit 1
        for update skip locked;
    end if;
    if not found then
        return;
    end if;
    -- A running job past its lease: its attempt ended with its session.
    shown := case when job.status = 'running' then ackloop.unfinished_attempt_error(job.attempts)
                  else job.last_error end;
    if job.attempts >= max_attempts then
        shown := left('gave up after ' || job.attempts || ' attempts' || coalesce('; ' || shown, ''), 2000);
        update ackloop.player_creation_jobs
        set status = 'failed', last_error = shown, attempt_started_at = null,
            updated_at = now(), completed_at = now()
        where id = job.id;
        perform pg_notify(done_channel, job.id::text);
        return query select 'gave_up'::text, job.id, job.user_id, job.display_name, job.extra,
            job.attempts, job.waited, shown, null::bigint, null::integer;
        return;
    end if;
    lease := greatest(ackloop.backoff_ms(job.attempts + 1, backoff_base_ms, backoff_max_ms), 1000);
    update ackloop.player_creation_jobs
    set status = 'running',
        attempts = job.attempts + 1,
        attempt_started_at = now(),
        last_error = shown,
        run_after = now() + make_interval(secs => lease / 1000.0),
        updated_at = now()
    where id = job.id;
    return query select 'started'::text, job.id, job.user_id, job.display_name, job.extra,
        job.attempts + 1, job.waited, shown, lease,
        case when job.status = 'running' then job.attempts end;
end
$$;
revoke execute on function ackloop.start_attempt(integer, bigint, bigint, text, boolean, boolean) from public;
do $$
declare
    kept record;
begin
    for kept in select distinct grantee from kept_start_attempt_grants loop
        execute format('grant execute on function ackloop.start_attempt(integer, bigint, bigint, text, boolean, boolean) to %s', kept.grantee);
    end loop;
end
$$;

-- Locks, for the caller's transaction, the job whose attempt `attempt` start_attempt started:
-- false when the job has changed since (an operator finished or retried it, or its lease ran out
-- and another worker restarted it), and the attempt must not be made. Sets limit_claim_session's
-- limits for the rest of the transaction. Then: the effect, and mark_done or record_failure.
create or replace function ackloop.lock_attempt(job_id uuid, attempt integer) returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    perform
    from ackloop.player_creation_jobs as jobs
    where jobs.id = lock_attempt.job_id
      and jobs.status = 'running'
      and jobs.attempts = lock_attempt.attempt
    for update;
    if found then
        perform set_config(
            'ackloop.claimed_jobs',
            concat_ws(',', nullif(current_setting('ackloop.claimed_jobs', true), ''), lock_attempt.job_id::text),
            true
        );
    end if;
    return found;
end
$$;

-- Gives back attempt `attempt` that start_attempt started but that never ran: it waited too long
-- for a lock another session holds (55P03), which is not the job's fault. Only if the job is as
-- that attempt left it (running that attempt: another worker may have restarted it since its
-- lease ran out): returns whether it was given back. The job is pending again, shows `error`,
-- and is due after the backoff for `attempt`. Call it in its own transaction, after the
-- attempt's rolled back.
create or replace function ackloop.give_back_attempt(
    job_id uuid,
    attempt integer,
    error text,
    backoff_base_ms bigint default 1000,
    backoff_max_ms bigint default 300000
) returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    update ackloop.player_creation_jobs as jobs
    set status = 'pending',
        attempts = jobs.attempts - 1,
        attempt_started_at = null,
        last_error = left(error, 2000),
        run_after = now() + make_interval(
            secs => ackloop.backoff_ms(give_back_attempt.attempt, backoff_base_ms, backoff_max_ms) / 1000.0
        ),
        updated_at = now()
    where jobs.id = give_back_attempt.job_id
      and jobs.status = 'running'
      and jobs.attempts = give_back_attempt.attempt;
    return found;
end
$$;

-- Ends attempt `attempt` that start_attempt started, when it ended with an error its session
-- survived but could not record with record_failure (its transaction was lost, say): the job is
-- pending again with `error`, the attempt still counted, due when its lease would have ended.
-- Only if the job is still running that attempt. Returns whether it was ended.
create or replace function ackloop.note_unfinished_attempt(job_id uuid, attempt integer, error text)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    update ackloop.player_creation_jobs as jobs
    set status = 'pending',
        attempt_started_at = null,
        last_error = left(error, 2000),
        updated_at = now()
    where jobs.id = note_unfinished_attempt.job_id
      and jobs.status = 'running'
      and jobs.attempts = note_unfinished_attempt.attempt;
    return found;
end
$$;

-- Marks jobs this transaction claimed (claim_jobs, lock_attempt) done, each with the attempt that
-- did it (claim_jobs' `attempt`) and the player service's answer: its player id (never null: a
-- handler that created no player has not done its job) and a result (a JSON object up to 8 KiB;
-- null stores {}); and notifies each id on `done_channel` (delivered at commit). Returns the ids
-- marked: a job already finished (by an operator) is left as it is and not returned. A job this
-- transaction did not claim: 55000, and nothing is marked.
create or replace function ackloop.mark_done(
    job_ids uuid[],
    attempts integer[],
    player_ids text[],
    results jsonb[],
    done_channel text default 'player_jobs_done'
) returns setof uuid
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
declare
    missing uuid;
    problem text;
    -- The jobs this transaction claimed (claim_jobs, lock_attempt: `ackloop.claimed_jobs`).
    claimed uuid[] := coalesce(
        string_to_array(nullif(current_setting('ackloop.claimed_jobs', true), ''), ',')::uuid[], '{}'
    );
begin
    if cardinality(job_ids) is distinct from cardinality(mark_done.attempts)
        or cardinality(job_ids) is distinct from cardinality(player_ids)
        or cardinality(job_ids) is distinct from cardinality(results) then
        raise exception 'mark_done needs one attempt, player id and result per job id'
            using errcode = 'invalid_parameter_value';
    end if;
    select given.id
    into missing
    from unnest(job_ids) as given (id)
    where given.id <> all (claimed)
    limit 1;
    if found then
        raise exception 'job % was not claimed in this transaction', missing
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'claim jobs in the transaction that completes them: ackloop.claim_jobs, or ackloop.lock_attempt after ackloop.start_attempt';
    end if;
    select done.id, coalesce(ackloop.user_id_problem(done.player_id), ackloop.json_object_problem(done.result))
    into missing, problem
    from unnest(job_ids, player_ids, results) as done (id, player_id, result)
    where ackloop.user_id_problem(done.player_id) is not null
       or ackloop.json_object_problem(done.result) is not null
    limit 1;
    if found then
        raise exception 'the answer for job % is not valid: player id or result %', missing, problem
            using errcode = 'check_violation', constraint = 'player_creation_jobs_done_has_player',
                  table = 'player_creation_jobs', schema = 'ackloop';
    end if;
    return query
    with completed as (
        update ackloop.player_creation_jobs as jobs
        set status = 'done',
            attempts = done.attempt,
            last_error = null,
            attempt_started_at = null,
            updated_at = now(),
            completed_at = now(),
            player_id = done.player_id,
            result = coalesce(done.result, '{}'::jsonb)
        from unnest(job_ids, mark_done.attempts, player_ids, results) as done (id, attempt, player_id, result)
        where jobs.id = done.id
          and jobs.status in ('pending', 'running')
        returning jobs.id
    )
    select completed.id
    from completed
    cross join lateral pg_notify(done_channel, completed.id::text) as notified;
end
$$;

-- Records that attempt `attempt` of a job this transaction claimed failed with `error` (kept to
-- 2,000 characters; a job it did not claim: 55000). Not `retryable`, or the last of
-- `max_attempts`: the job is failed and its id notified on `done_channel`, so a waiting caller
-- hears at once. Otherwise it is pending again, not due before the backoff. `counted` false
-- gives the attempt back (it never ran: it waited for a lock another session holds), so it does
-- not bring the job closer to failing. Returns the job's status after the call and, when
-- pending, the milliseconds until it is due; no row when the job is already finished (by an
-- operator meanwhile), which is left as it is.
create or replace function ackloop.record_failure(
    job_id uuid,
    attempt integer,
    error text,
    retryable boolean default true,
    done_channel text default 'player_jobs_done',
    max_attempts integer default 5,
    backoff_base_ms bigint default 1000,
    backoff_max_ms bigint default 300000,
    counted boolean default true
) returns table (status text, retry_in_ms bigint)
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
#variable_conflict use_column
declare
    made integer := case when counted then attempt else attempt - 1 end;
    reason text := left(error, 2000);
    delay bigint := ackloop.backoff_ms(attempt, backoff_base_ms, backoff_max_ms);
begin
    if record_failure.job_id <> all (
        coalesce(string_to_array(nullif(current_setting('ackloop.claimed_jobs', true), ''), ',')::uuid[], '{}')
    ) then
        raise exception 'job % was not claimed in this transaction', record_failure.job_id
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'claim jobs in the transaction that records their failures: ackloop.claim_jobs, or ackloop.lock_attempt after ackloop.start_attempt';
    end if;
    if counted and (not retryable or attempt >= max_attempts) then
        update ackloop.player_creation_jobs
        set status = 'failed', attempts = made, last_error = reason, attempt_started_at = null,
            updated_at = now(), completed_at = now()
        where id = record_failure.job_id and status in ('pending', 'running');
        if found then
            perform pg_notify(done_channel, record_failure.job_id::text);
            return query select 'failed'::text, null::bigint;
        end if;
    else
        update ackloop.player_creation_jobs
        set status = 'pending', attempts = made, last_error = reason, attempt_started_at = null,
            run_after = now() + make_interval(secs => delay / 1000.0),
            updated_at = now()
        where id = record_failure.job_id and status in ('pending', 'running');
        if found then
            return query select 'pending'::text, delay;
        end if;
    end if;
end
$$;

-- Seconds until the next job tried before (of the kind claim_jobs' `builtin_signups` names) is
-- due, a running one's when its lease ends (negative if one is due now but held by another
-- worker), or null when there is none: how long a worker that takes such jobs alone may sleep.
-- (Volatile now: it sets limit_claim_session's limits.)
create or replace function ackloop.next_retry_due_in_secs(builtin_signups boolean default false)
returns double precision
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    return (
        select extract(epoch from min(jobs.run_after) - now())::float8
        from ackloop.player_creation_jobs as jobs
        where jobs.status in ('pending', 'running')
          and jobs.attempts > 0
          and (jobs.builtin_user_id is not null) = builtin_signups
    );
end
$$;

-- How many jobs are not finished (pending or running) and how long the oldest has waited, for
-- the queue gauges a worker samples every few seconds (`ackloop_jobs_pending`,
-- `ackloop_oldest_pending_seconds`). Reads only unfinished rows, through the pending index: it
-- must not grow with the finished jobs kept.
create or replace function ackloop.pending_jobs()
returns table (pending bigint, oldest_pending_secs double precision)
language plpgsql volatile security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    perform ackloop.limit_claim_session();
    return query
    select count(*), extract(epoch from now() - min(jobs.created_at))::float8
    from ackloop.player_creation_jobs as jobs
    where jobs.status in ('pending', 'running');
end
$$;

-- Each of `job_ids` that exists, as a caller needs it: `status` is `pending` until the job is
-- finished (a running attempt included: callers wait either way, and clients written before
-- `running` existed read it), then `done` or `failed`; with the player service's answer when it
-- is done (ids of no job are absent: not committed, or pruned). `player_id` and `result` are
-- what the player service's handler returned (for the built-in tables: the built-in player's id,
-- display name and creation time). `since_done_secs`: seconds since the job finished, by the
-- server's clock.
create or replace function ackloop.job_outcomes(job_ids uuid[])
returns table (
    job_id uuid,
    user_id text,
    status text,
    last_error text,
    player_id text,
    result jsonb,
    since_done_secs double precision
)
language plpgsql stable security definer
set search_path = pg_catalog, ackloop, pg_temp
as $$
begin
    return query
    select
        jobs.id,
        jobs.user_id,
        case jobs.status when 'running' then 'pending' else jobs.status end,
        jobs.last_error,
        jobs.player_id,
        jobs.result,
        extract(epoch from clock_timestamp() - jobs.completed_at)::float8
    from ackloop.player_creation_jobs as jobs
    where jobs.id = any(job_ids);
end
$$;

insert into ackloop.applied_migrations (version, description)
values (20261207000006, 'running attempts');
