//! ackloop's state in a schema of its own: beside a service's own tables of the same names, on
//! whatever search_path a caller has, and upgraded from the earlier layout with nothing lost.

mod builtin_batch_handler;
mod cheaper_checks;
mod locale_and_claims;
mod privileges;
mod running_attempts;
mod search_path;
mod services;
mod upgrade;
mod wake_ups_after_commit;
