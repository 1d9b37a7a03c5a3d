//! Reading connection settings: URLs, libpq strings, files, and what errors say.

use super::libpq::percent_decode;
use super::*;

fn parsed(text: &str) -> ConnectConfig {
    ConnectConfig::parse(text).unwrap_or_else(|err| panic!("{text}: {err}"))
}

/// sqlx keeps the password private; its URL form carries it.
fn password_of(options: &PgConnectOptions) -> Option<String> {
    use sqlx::ConnectOptions as _;
    let url = options.to_url_lossy();
    url.password().map(|password| percent_decode(password).unwrap())
}

#[test]
fn every_form_a_libpq_user_pastes() {
    // (string, host or socket, port, user, database)
    let cases: &[(&str, &str, u16, &str, &str)] = &[
        (
            "postgres://app@db.example.com/app",
            "db.example.com",
            5432,
            "app",
            "app",
        ),
        (
            "postgresql://app@db.example.com:6543/app",
            "db.example.com",
            6543,
            "app",
            "app",
        ),
        (
            "postgres://app@/app?host=/run/postgresql",
            "/run/postgresql",
            5432,
            "app",
            "app",
        ),
        (
            "postgres://app@localhost/app?host=/run/postgresql",
            "/run/postgresql",
            5432,
            "app",
            "app",
        ),
        (
            "postgres://app@%2Frun%2Fpostgresql/app",
            "/run/postgresql",
            5432,
            "app",
            "app",
        ),
        ("postgres://app@[::1]:5433/app", "::1", 5433, "app", "app"),
        (
            "postgres://127.0.0.1:5444/app?user=ops&port=5445",
            "127.0.0.1",
            5445,
            "ops",
            "app",
        ),
        (
            "host=/run/postgresql dbname=app user=app",
            "/run/postgresql",
            5432,
            "app",
            "app",
        ),
        (
            "host = db.example.com port=5433 dbname='my app' user=app",
            "db.example.com",
            5433,
            "app",
            "my app",
        ),
        (
            "hostaddr=10.0.0.5 host=db.example.com dbname=app user=app",
            "10.0.0.5",
            5432,
            "app",
            "app",
        ),
    ];
    for (text, host, port, user, database) in cases {
        let config = parsed(text);
        let options = config.options();
        let where_ = options
            .get_socket()
            .map_or_else(|| options.get_host().to_owned(), |dir| dir.display().to_string());
        assert_eq!(&where_, host, "{text}");
        assert_eq!(options.get_port(), *port, "{text}");
        assert_eq!(options.get_username(), *user, "{text}");
        assert_eq!(options.get_database(), Some(*database), "{text}");
    }
}

#[test]
fn passwords_are_decoded_and_never_shown() {
    let config = parsed("postgres://app:p%40ss%3Aw%2Frd%25@db.example.com/app");
    assert_eq!(password_of(config.options()).as_deref(), Some("p@ss:w/rd%"));
    assert!(!config.to_string().contains("p@ss"));
    let config = parsed(r"host=db user=app password='it\'s secret' dbname=app");
    assert_eq!(password_of(config.options()).as_deref(), Some("it's secret"));
    // An unencoded '@' in the password: the last '@' ends the user part.
    let config = parsed("postgres://app:a@b@db.example.com/app");
    assert_eq!(password_of(config.options()).as_deref(), Some("a@b"));
    assert_eq!(config.options().get_host(), "db.example.com");
}

#[test]
fn connect_timeout_follows_libpq() {
    assert_eq!(
        parsed("postgres://a@h/d?connect_timeout=5").connect_timeout(),
        Some(Duration::from_secs(5))
    );
    assert_eq!(
        parsed("postgres://a@h/d?connect_timeout=1").connect_timeout(),
        Some(Duration::from_secs(2))
    );
    assert_eq!(parsed("host=h connect_timeout=0").connect_timeout(), None);
}

#[test]
fn sslmodes_map_as_libpq_does() {
    let mode = |text: &str| parsed(text).options().get_ssl_mode();
    assert!(matches!(mode("host=h sslmode=disable"), PgSslMode::Disable));
    assert!(matches!(mode("host=h sslmode=allow"), PgSslMode::Prefer));
    assert!(matches!(mode("host=h sslmode=require"), PgSslMode::Require));
    assert!(matches!(
        mode("host=h sslmode=verify-full"),
        PgSslMode::VerifyFull
    ));
    // `require` with a root certificate checks the chain, as in libpq.
    let dir = std::env::temp_dir().join(format!("ackloop-conninfo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, "not read until a connection is made").unwrap();
    let text = format!("host=h sslmode=require sslrootcert={}", ca.display());
    assert!(matches!(mode(&text), PgSslMode::VerifyCa));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refusals_say_what_is_wrong_and_show_the_accepted_forms() {
    let cases = [
        ("", "empty"),
        ("db.example.com", "neither"),
        ("mysql://app@db/app", "scheme"),
        ("postgres://app@db/app?sslmode=maybe", "sslmode must be"),
        ("postgres://app@db/app?connect_timeout=soon", "whole number"),
        ("postgres://app@db:port/app", "not a number"),
        ("postgres://app@db/app?pool=5", "unknown setting"),
        (
            "postgres://app@db/app?sslrootcert=/nonexistent/ca.crt",
            "does not exist",
        ),
        ("postgres://app@h1,h2,h3/app?port=1,2", "3 hosts and 2 ports"),
        ("host=h1,h2 port=5432,x", "not a number"),
        ("host=h1 port=0", "not a number"),
        (
            "host=db1,db2 hostaddr=10.0.0.1 dbname=app user=app",
            "could not match 2 host names to 1 hostaddr values",
        ),
        (
            "postgres://app@h1,h2/app?target_session_attrs=standby",
            "use read-write",
        ),
        (
            "postgres://app@h1,h2/app?target_session_attrs=prefer-primary",
            "must be any, read-write or primary",
        ),
        ("host=db dbname", "has no value"),
        ("host=db password='open", "no closing quote"),
        (
            "postgres://app@db/app?channel_binding=require",
            "channel_binding=prefer",
        ),
    ];
    for (text, expected) in cases {
        let err = ConnectConfig::parse(text).expect_err(text).to_string();
        assert!(err.contains(expected), "{text:?}: {err}");
        assert!(err.contains("postgres://user:password@host"), "{text:?}: {err}");
    }
}

#[test]
fn refusals_never_repeat_a_password() {
    for text in [
        "postgres://app:hunter2@db/app?sslmode=hunter2",
        "postgres://app:hunter2@db:hunter2/app",
        "host=db password=hunter2 bogus=1",
        "postgres://app:%ZZhunter2@db/app",
        "postgres://app:hun?ter2@db/app",
        "postgres://app:hun/ter2@db/app?sslmode=require",
        "host=db password=hun ter2 dbname=app",
        "host=db password=hun ter2=x dbname=app",
    ] {
        let err = ConnectConfig::parse(text).expect_err(text).to_string();
        assert!(!err.contains("ter2"), "{text:?}: {err}");
    }
}

#[test]
fn several_hosts_as_libpq_pairs_them_with_ports() {
    // (string, [(host, port)], attrs)
    type Case<'a> = (&'a str, &'a [(&'a str, u16)], TargetSessionAttrs);
    let cases: &[Case] = &[
        (
            "postgres://app@h1:5433,h2:5434/app?target_session_attrs=read-write",
            &[("h1", 5433), ("h2", 5434)],
            TargetSessionAttrs::ReadWrite,
        ),
        (
            "postgres://app@h1,h2:6000/app",
            &[("h1", 5432), ("h2", 6000)],
            TargetSessionAttrs::Any,
        ),
        (
            "postgres://app@[::1]:5433,[::2]/app?target_session_attrs=primary",
            &[("::1", 5433), ("::2", 5432)],
            TargetSessionAttrs::Primary,
        ),
        (
            "host=h1,h2,h3 port=6000 dbname=app user=app target_session_attrs=read-write",
            &[("h1", 6000), ("h2", 6000), ("h3", 6000)],
            TargetSessionAttrs::ReadWrite,
        ),
        (
            "host=h1,h2 port=6001,6002 dbname=app user=app",
            &[("h1", 6001), ("h2", 6002)],
            TargetSessionAttrs::Any,
        ),
        (
            "postgres://app@/app?host=h1,h2&port=7001,7002",
            &[("h1", 7001), ("h2", 7002)],
            TargetSessionAttrs::Any,
        ),
        // An empty hostaddr entry means its host, as in libpq.
        (
            "host=db1,db2 hostaddr=10.0.0.1, dbname=app user=app",
            &[("10.0.0.1", 5432), ("db2", 5432)],
            TargetSessionAttrs::Any,
        ),
    ];
    for (text, expected, attrs) in cases {
        let config = parsed(text);
        let hosts: Vec<(&str, u16)> = config
            .hosts()
            .iter()
            .map(|options| (options.get_host(), options.get_port()))
            .collect();
        assert_eq!(&hosts, expected, "{text}");
        assert_eq!(config.target_session_attrs(), *attrs, "{text}");
        // Every host gets the other settings.
        for options in config.hosts() {
            assert_eq!(options.get_username(), "app", "{text}");
            assert_eq!(options.get_database(), Some("app"), "{text}");
        }
        assert_eq!(config.options().get_host(), expected[0].0, "{text}");
    }
    assert_eq!(
        parsed("postgres://app:secret@h1:5433,h2:5434/app").to_string(),
        "app@h1:5433,h2:5434/app"
    );
}
