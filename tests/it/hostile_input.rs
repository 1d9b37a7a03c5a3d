//! Property tests over emails and display names: every input is either stored byte for byte or
//! refused with `InvalidInput` naming the field, never a raw database error, never a partial row.

use ackloop::{Channels, Field, NewUser, SignupError, create_user};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use sqlx::PgPool;

use crate::common::*;

const CASES: u32 = 400;

fn emails() -> impl Strategy<Value = String> {
    prop_oneof![
        // Plausible addresses, unicode included.
        6 => "[a-zA-Z0-9._%+'-]{1,30}@[a-z0-9]{1,20}\\.[a-z]{2,6}",
        2 => "\\PC{1,20}@\\PC{1,20}\\.\\PC{2,5}",
        // Anything at all: control characters, NUL, very long.
        1 => ".{0,300}",
        1 => "\\PC{250,260}@example.com",
        // SQL and shell metacharacters around an @.
        1 => "['\";\\\\%_$()-]{0,10}@['\";\\\\%_$()-]{0,10}\\.com",
        1 => "\\s{0,4}[a-z]{1,5}@[a-z]{1,5}\\.com\\s{0,4}",
    ]
}

fn display_names() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "\\PC{1,64}",
        1 => ".{0,100}",
        1 => "\\s{0,8}",
        1 => "[\\x00-\\x1f\\x7f]{1,5}",
        1 => "\\PC{60,70}",
        1 => "['\";\\\\%_$()-]{1,20}",
        1 => " ?[a-zA-Z ]{1,10} ?",
    ]
}

#[sqlx::test]
async fn every_input_is_stored_as_given_or_refused_naming_the_field(pool: PgPool) {
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        ..Config::default()
    });
    let strategy = (emails(), display_names());
    let mut conn = pool.acquire().await.unwrap();
    let (mut stored, mut refused) = (0, 0);
    for _ in 0..CASES {
        let (email, display_name) = strategy.new_tree(&mut runner).unwrap().current();
        let before = counts(&pool).await;
        let new_user = match NewUser::new(email.clone(), display_name.clone()) {
            Ok(new_user) => new_user,
            Err(invalid) => {
                // The message names the field, and the rule broken.
                let field = match invalid.field {
                    Field::Email => "email",
                    Field::DisplayName => "display name",
                    Field::Extra => unreachable!("a signup has no extra data"),
                };
                assert!(
                    invalid.to_string().starts_with(&format!("invalid {field}: ")),
                    "{invalid}"
                );
                refused += 1;
                continue;
            }
        };
        match create_user(&mut conn, &Channels::default(), &new_user).await {
            Ok(signup) => {
                let row = sqlx::query!(
                    "select email, display_name from ackloop.builtin_users as users where id = $1",
                    signup.user_id.get()
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                assert_eq!(
                    row.email.as_bytes(),
                    email.as_bytes(),
                    "email stored byte for byte"
                );
                assert_eq!(
                    row.display_name.as_bytes(),
                    display_name.as_bytes(),
                    "name stored byte for byte"
                );
                stored += 1;
            }
            // Generated addresses can repeat; that is the only refusal the database may add.
            Err(SignupError::EmailTaken) => assert_eq!(counts(&pool).await, before, "no partial rows"),
            Err(err) => {
                panic!("{email:?} / {display_name:?} passed validation but the database refused it: {err:?}")
            }
        }
    }
    // The generators exercise both outcomes.
    assert!(
        stored > CASES / 10 && refused > CASES / 10,
        "stored {stored}, refused {refused}"
    );
    let counts = counts(&pool).await;
    assert_eq!(counts.users, counts.jobs, "every stored user has its job");
}
