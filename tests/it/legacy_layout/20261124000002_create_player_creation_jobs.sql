-- One job per signup: the durable hand-off from the auth side to the player worker.
-- The id is a UUIDv7 made by the client, so the caller knows it before commit and can wait on it.
create table player_creation_jobs (
    id uuid primary key,
    user_id bigint not null references users (id) on delete cascade,
    -- pending -> done, or pending -> failed after the last attempt; text, not an enum, so any
    -- language's driver reads and writes it without a custom type.
    status text not null default 'pending',
    -- Claims so far; incremented by every claim, successful or not.
    attempts integer not null default 0,
    last_error text,
    -- A pending job is not claimed before this moment (retry backoff).
    run_after timestamptz not null default now(),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    completed_at timestamptz,
    constraint player_creation_jobs_status_check check (status in ('pending', 'done', 'failed')),
    constraint player_creation_jobs_attempts_check check (attempts >= 0),
    -- A finished job says when it finished; a pending one has not.
    constraint player_creation_jobs_completed_at_check
        check ((status = 'pending') = (completed_at is null)),
    -- One signup, one player: a second job for the same user is a bug, not a retry.
    constraint player_creation_jobs_user_id_key unique (user_id)
);

-- Exactly the claim's predicate and order, so claiming stays an index scan over pending rows
-- however many finished rows accumulate.
create index player_creation_jobs_pending_idx
    on player_creation_jobs (run_after, id)
    where status = 'pending';
