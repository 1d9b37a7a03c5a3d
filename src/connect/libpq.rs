//! The two forms of a libpq connection string, read into key/value settings: URIs (with
//! percent-encoding, IPv6 hosts, the empty-host socket form) and `key=value` strings (quoting,
//! escapes). What the settings mean is decided in the parent module.

use std::collections::BTreeMap;

use super::refusal::{BadConnectionString, KNOWN_PARAMETERS};

/// Parses `[user[:password]@][host[:port][,host[:port]…]][/dbname][?key=value&…]` (after the
/// scheme). Several hosts come out as libpq's key=value form has them: `host=h1,h2`, with
/// `port=p1,p2` (an empty entry for a host without a port).
pub(super) fn parse_uri(rest: &str) -> Result<BTreeMap<String, String>, BadConnectionString> {
    let mut params = BTreeMap::new();
    // A password holding an unencoded '/', '?' or '#' ends the host part early, and the rest of
    // it would be read (and shown in messages) as a database name or a setting. Its '@' then
    // comes after the end of the host part, yet before any setting's '='.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let first_equals = rest.find('=').unwrap_or(rest.len());
    if !rest[..authority_end].contains('@')
        && rest[authority_end..]
            .find('@')
            .is_some_and(|at| authority_end + at < first_equals)
    {
        return Err(BadConnectionString::new(
            "the user name or password holds a '/', '?' or '#': percent-encode them (%2F, %3F, %23)",
        ));
    }
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.split_once('/') {
        Some((authority, path)) => (authority, Some(path)),
        None => (before_query, None),
    };
    // The last '@' ends the user part: a password may hold an unencoded '@'.
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        if !user.is_empty() {
            params.insert("user".to_owned(), decode("the user name", user)?);
        }
        if let Some(password) = password {
            params.insert("password".to_owned(), decode("the password", password)?);
        }
    }
    if !hosts.is_empty() {
        let mut host_list = Vec::new();
        let mut port_list = Vec::new();
        for entry in hosts.split(',') {
            let (host, port) = split_host_port(entry)?;
            host_list.push(decode("the host", &host)?);
            port_list.push(port.unwrap_or_default());
        }
        if host_list.iter().any(|host| !host.is_empty()) {
            params.insert("host".to_owned(), host_list.join(","));
        }
        if port_list.iter().any(|port| !port.is_empty()) {
            params.insert("port".to_owned(), port_list.join(","));
        }
    }
    if let Some(path) = path
        && !path.is_empty()
    {
        params.insert("dbname".to_owned(), decode("the database name", path)?);
    }
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
    {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(BadConnectionString::new(
                "a setting after '?' has no value: write key=value, joined by &",
            ));
        };
        let key = decode("a setting's name", key)?;
        let value = decode(&format!("the value of {key}"), value)?;
        params.insert(key, value);
    }
    Ok(params)
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(text: &str) -> Result<(String, Option<String>), BadConnectionString> {
    if let Some(rest) = text.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return Err(BadConnectionString::new("an IPv6 host has no closing ']'"));
        };
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port.to_owned()),
            None if after.is_empty() => None,
            None => return Err(BadConnectionString::new("unexpected text after an IPv6 host")),
        };
        return Ok((host.to_owned(), port));
    }
    Ok(match text.rsplit_once(':') {
        Some((host, port)) => (host.to_owned(), Some(port.to_owned())),
        None => (text.to_owned(), None),
    })
}

/// Parses libpq's `key=value key='quoted value'` form.
pub(super) fn parse_key_values(text: &str) -> Result<BTreeMap<String, String>, BadConnectionString> {
    let mut params = BTreeMap::new();
    let mut unquoted_password = false;
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(params);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // Not named: an unquoted password with a space in it ends up here.
            return Err(BadConnectionString::new(
                "a setting has no value: write key=value separated by spaces, and quote values \
                 that hold spaces: password='my secret'",
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => break,
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(BadConnectionString::new(format!(
                            "the quoted value of {key} has no closing quote"
                        )));
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
            if key == "password" && chars.peek().is_some() {
                unquoted_password = true;
            }
        }
        if unquoted_password && key != "password" && !KNOWN_PARAMETERS.contains(&key.as_str()) {
            // Most likely the rest of a password with a space in it: do not name it.
            return Err(BadConnectionString::new(
                "an unknown setting follows the password: if the password holds a space, quote \
                 it: password='my secret'",
            ));
        }
        params.insert(key, value);
    }
}

fn decode(what: &str, text: &str) -> Result<String, BadConnectionString> {
    percent_decode(text).ok_or_else(|| {
        BadConnectionString::new(format!(
            "{what} is not valid percent-encoded UTF-8: encode special characters, e.g. @ as %40"
        ))
    })
}

pub(super) fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub(super) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A setting's name for a message: short, and cut before anything that could be a password.
pub(super) fn shorten(text: &str) -> String {
    text.chars().take(24).collect()
}
