//! The write's transitions, pinned without a database: each takes an attempt's result to an
//! answer or to the next step.

use super::*;

fn attempts(key: Key, time: Duration) -> Attempts {
    let started = Instant::now();
    Attempts::new(JobId::new(), key, started, started + time)
}

fn answer(then: Then) -> Result<(UserId, Written), SignupError> {
    match then {
        Then::Answer(answer) => answer,
        other => panic!("expected an answer, got {other:?}"),
    }
}

#[test]
fn a_taken_email_in_a_group_is_written_alone_only_under_a_callers_key() {
    let mut keyed = attempts(Key::Caller, Duration::from_secs(5));
    assert!(matches!(
        keyed.after_grouped(Attempt::EmailTaken),
        Then::Attempt(Step::Alone)
    ));
    // Alone, `sign_up` has told whose the email is.
    assert!(matches!(
        answer(keyed.after(Attempt::EmailTaken)),
        Err(SignupError::EmailTaken)
    ));
    let mut new = attempts(Key::None, Duration::from_secs(5));
    assert!(matches!(
        answer(new.after_grouped(Attempt::EmailTaken)),
        Err(SignupError::EmailTaken)
    ));
}

#[test]
fn a_found_signup_was_written_earlier_only_under_a_callers_key() {
    let user = UserId::from(7);
    let mut keyed = attempts(Key::Caller, Duration::from_secs(5));
    assert!(matches!(
        answer(keyed.after(Attempt::Found(user))),
        Ok((_, Written::Earlier))
    ));
    let mut new = attempts(Key::None, Duration::from_secs(5));
    assert!(matches!(
        answer(new.after(Attempt::Found(user))),
        Ok((_, Written::Now))
    ));
}

#[test]
fn a_lost_answer_is_looked_up_for_a_new_job_id_and_written_again_under_a_key() {
    let mut new = attempts(Key::None, Duration::from_secs(5));
    let then = new.after(Attempt::Unknown(sqlx::Error::PoolClosed));
    assert!(matches!(then, Then::Attempt(Step::Resolving(_))), "{then:?}");
    let mut keyed = attempts(Key::Caller, Duration::from_secs(5));
    let then = keyed.after(Attempt::Unknown(sqlx::Error::PoolClosed));
    assert!(matches!(then, Then::Wait(_, Step::Alone)), "{then:?}");
    // Out of time: the job id is kept, since the lost attempt may have committed.
    let mut late = attempts(Key::None, Duration::ZERO);
    let job_id = late.job_id;
    let then = answer(late.after(Attempt::Unknown(sqlx::Error::PoolClosed)));
    assert!(matches!(then, Err(SignupError::Unavailable { job_id: Some(id), .. }) if id == job_id));
}

#[test]
fn after_a_lost_answer_every_answer_keeps_the_job_id() {
    let mut new = attempts(Key::None, Duration::from_secs(5));
    let job_id = new.job_id;
    new.after(Attempt::Unknown(sqlx::Error::PoolClosed));
    let then = answer(new.after(Attempt::Unsent(Unsent::Busy)));
    assert!(matches!(then, Err(SignupError::Unavailable { job_id: Some(id), .. }) if id == job_id));
}

#[test]
fn an_unsent_signup_is_an_outage_only_if_the_database_was_met_away() {
    let mut busy = attempts(Key::None, Duration::from_secs(5));
    assert!(matches!(
        answer(busy.after(Attempt::Unsent(Unsent::Busy))),
        Err(SignupError::NotWritten { .. })
    ));
    let mut silent = attempts(Key::None, Duration::from_secs(5));
    let then = answer(silent.after(Attempt::Unsent(Unsent::NoAnswer)));
    assert!(
        matches!(then, Err(SignupError::Unavailable { job_id: None, .. })),
        "{then:?}"
    );
    let mut away = attempts(Key::None, Duration::from_secs(5));
    let then = away.after(Attempt::NotCommitted(sqlx::Error::PoolTimedOut));
    assert!(matches!(then, Then::Wait(delay, Step::Alone) if delay == WRITE_RETRY_BACKOFF.base));
    let then = answer(away.after(Attempt::Unsent(Unsent::Busy)));
    assert!(
        matches!(
            then,
            Err(SignupError::Unavailable {
                job_id: None,
                source: sqlx::Error::PoolTimedOut
            })
        ),
        "{then:?}"
    );
}

#[test]
fn what_waiting_cannot_change_is_answered_at_once() {
    let mut new = attempts(Key::None, Duration::from_secs(5));
    let then = answer(new.after(Attempt::NotCommitted(sqlx::Error::RowNotFound)));
    assert!(
        matches!(then, Err(SignupError::Database(sqlx::Error::RowNotFound))),
        "{then:?}"
    );
    // Worth retrying, but no time for the wait: certainly not written, and unreachable.
    let mut late = attempts(Key::None, Duration::from_millis(10));
    let then = answer(late.after(Attempt::NotCommitted(sqlx::Error::PoolTimedOut)));
    assert!(
        matches!(then, Err(SignupError::Unavailable { job_id: None, .. })),
        "{then:?}"
    );
}
