//! Durations on the command line (`--timeout 5s`), shared by the commands and the bench: a leaf,
//! so neither imports the other for it.

use std::time::Duration;

/// The forms a duration takes, for the messages.
const FORMS: &str = "a number with a unit: 500ms, 30s, 2m, 12h or 7d (us, ms, s, m, h, d)";

/// The longest duration accepted: a century, far past any retention or timeout, and well inside
/// what PostgreSQL's timestamps and tokio's timers can add to now.
const LONGEST: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Reads `500us`, `500ms`, `5s`, `2m`, `1h` or `7d`. The unit is required: a bare `7` could mean
/// seconds or days, and `jobs prune --older-than 7` pruning everything older than seven seconds
/// is not a mistake to allow.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: give {FORMS}"))?;
    let seconds = match unit {
        "us" => value / 1_000_000.0,
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        "" => return Err(format!("{text:?} has no unit: give {FORMS}")),
        _ => return Err(format!("unknown unit {unit:?} in {text:?}: give {FORMS}")),
    };
    match Duration::try_from_secs_f64(seconds) {
        Ok(duration) if duration <= LONGEST => Ok(duration),
        _ => Err(format!("{text:?} is too long: at most 36500d (a century)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("1000000000000s").unwrap_err().contains("too long"));
        assert_eq!(parse_duration("36500d"), Ok(Duration::from_secs(36500 * 86_400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
