//! Domain names: one set of rules for every part of Phantom that stores, matches or serves a
//! name — the blocklist, the kernel's blocked set, the resolver's tests and ghost mode's domain —
//! so a name one of them accepts means the same to all the others.
//!
//! A normalised name is lowercase ASCII with internationalised labels in punycode, has no
//! trailing dot, is at most 253 characters long, and its labels are 1 to 63 letters, digits,
//! `-` and `_`, never starting or ending with `-`. Callers with a narrower need add one rule
//! on top: [`registrable`] (at least a registrable domain, never a public suffix),
//! [`host_name`] (a name a certificate and a resolver accept), [`normalise_ascii`] (the input
//! must be punycode already).

use std::net::IpAddr;

/// Why a name was refused; the message quotes the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{0}")]
    Invalid(String),
    /// The name is (or sits above) a public suffix: `co.za`, `com`.
    #[error("{0}")]
    PublicSuffix(String),
}

const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// The normal form of `raw` (see the module comment); internationalised names become punycode.
pub fn normalise(raw: &str) -> Result<String, NameError> {
    let trimmed = raw.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return Err(NameError::Invalid("empty domain".into()));
    }
    // Most names (a million-name list's) are plain ASCII: lowercased, such a name is what IDNA
    // gives back, unless a label is punycode (which IDNA decodes and checks). Those skip IDNA;
    // a name `check` refuses takes the full path, for its message.
    if let Some(name) = plain_ascii(trimmed)
        && let Ok(name) = check(raw, name)
    {
        return Ok(name);
    }
    normalise_idna(raw, trimmed)
}

/// `trimmed` lowercased, when it is only ASCII letters, digits, `-`, `_` and dots and no label
/// is punycode (`xn--`).
fn plain_ascii(trimmed: &str) -> Option<String> {
    if !trimmed
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return None;
    }
    let name = trimmed.to_ascii_lowercase();
    (!name.split('.').any(|label| label.starts_with("xn--"))).then_some(name)
}

/// [`normalise`] through IDNA's mapping, for any name.
fn normalise_idna(raw: &str, trimmed: &str) -> Result<String, NameError> {
    let ascii = idna::domain_to_ascii(trimmed)
        .map_err(|_| NameError::Invalid(format!("{raw:?} is not a valid domain name")))?;
    check(raw, ascii)
}

/// Like [`normalise`], for input that must be punycode already: what an operator types is
/// exactly what is listed (the kernel set's own rules).
pub fn normalise_ascii(raw: &str) -> Result<String, NameError> {
    let trimmed = raw.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return Err(NameError::Invalid("empty domain".into()));
    }
    if !trimmed.is_ascii() {
        return Err(NameError::Invalid(format!(
            "{raw:?} is not ASCII; give internationalised names in punycode (xn--...)"
        )));
    }
    check(raw, trimmed.to_ascii_lowercase())
}

fn check(raw: &str, name: String) -> Result<String, NameError> {
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::Invalid(format!(
            "{raw:?} is longer than {MAX_NAME_LEN} characters"
        )));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL_LEN {
            return Err(NameError::Invalid(format!(
                "{raw:?} has an empty or over-long label"
            )));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(NameError::Invalid(format!(
                "{raw:?} has an invalid label {label:?}"
            )));
        }
    }
    Ok(name)
}

/// A normalised name that is at least a registrable domain: a rule must never cover a whole
/// public suffix (`co.za`, `com`, `github.io`).
pub fn registrable(raw: &str) -> Result<String, NameError> {
    let name = normalise(raw)?;
    if !name.contains('.') {
        return Err(NameError::PublicSuffix(format!(
            "{name:?} is a top-level domain; a rule needs at least a registrable domain"
        )));
    }
    match psl::domain_str(&name) {
        Some(_) => Ok(name),
        None => Err(NameError::PublicSuffix(format!(
            "{name:?} is a public suffix; a rule needs at least a registrable domain under it"
        ))),
    }
}

/// A normalised name that is also a host name: letters, digits and inner hyphens only (no
/// `_`), at least two labels, not an address, and a last label that is not numeric.
pub fn host_name(raw: &str) -> Result<String, NameError> {
    if raw.trim().trim_end_matches('.').parse::<IpAddr>().is_ok() {
        return Err(NameError::Invalid(format!(
            "{raw:?} is an address, not a domain name (try <a-b-c-d>.sslip.io)"
        )));
    }
    let name = normalise(raw)?;
    if let Some(label) = name.split('.').find(|l| l.contains('_')) {
        return Err(NameError::Invalid(format!(
            "{raw:?} has the label {label:?}: a host name has letters, digits and inner hyphens only"
        )));
    }
    if !name.contains('.') {
        return Err(NameError::Invalid(format!(
            "{raw:?} needs at least two labels, e.g. vpn.example.com"
        )));
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(NameError::Invalid(format!(
            "{raw:?}: the last label cannot be numeric"
        )));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_normal_form() {
        assert_eq!(
            normalise("WWW.Example-Bet.COM."),
            Ok("www.example-bet.com".into())
        );
        assert_eq!(
            normalise("bücher.example"),
            Ok("xn--bcher-kva.example".into())
        );
        assert_eq!(
            normalise("_dmarc.example.com"),
            Ok("_dmarc.example.com".into())
        );
        for bad in ["", ".", "a..b", "-x.com", "x-.com", "a b.com", "*.x.com"] {
            assert!(normalise(bad).is_err(), "{bad:?}");
        }
        assert!(normalise(&format!("{}.com", "a".repeat(64))).is_err());
        assert!(normalise(&format!("{}com", "a.".repeat(130))).is_err());
    }

    /// The plain-ASCII shortcut gives what IDNA's mapping gives, names and refusals alike.
    #[test]
    fn plain_ascii_names_normalise_as_through_idna() {
        let long_label = format!("{}.example", "a".repeat(64));
        let long_name = format!("{}com", "ab.".repeat(90));
        let names = [
            "casino1.bet1.example",
            "WWW.Example-Bet.COM.",
            "_dmarc.example.com",
            "a--b.example",
            "ab--cd.example",
            "xn--bcher-kva.example",
            "XN--BCHER-KVA.example",
            "xn--zz.example",
            "xn--.example",
            "x_n--a.example",
            "-x.com",
            "x-.com",
            "a..b",
            ".a.b",
            "123.456",
            "1.2.3.4",
            "com",
            long_label.as_str(),
            long_name.as_str(),
            " spaced.example ",
        ];
        for raw in names {
            let trimmed = raw.trim().trim_end_matches('.');
            assert_eq!(normalise(raw), normalise_idna(raw, trimmed), "{raw:?}");
        }
    }

    #[test]
    fn ascii_input_stays_what_was_typed() {
        assert_eq!(
            normalise_ascii("WWW.Example.COM."),
            Ok("www.example.com".into())
        );
        assert!(normalise_ascii("bücher.de").is_err());
        assert_eq!(
            normalise_ascii("xn--bcher-kva.example"),
            normalise("bücher.example")
        );
    }

    #[test]
    fn public_suffixes_are_refused_as_rules() {
        for bad in ["co.za", "com", "github.io"] {
            assert!(
                matches!(registrable(bad), Err(NameError::PublicSuffix(_))),
                "{bad}"
            );
        }
        assert_eq!(registrable("bet.co.za"), Ok("bet.co.za".into()));
    }

    #[test]
    fn host_names() {
        assert_eq!(host_name("VPN.Example.com."), Ok("vpn.example.com".into()));
        assert_eq!(
            host_name("192-0-2-1.sslip.io"),
            Ok("192-0-2-1.sslip.io".into())
        );
        for bad in [
            "localhost",
            "-a.example",
            "a-.example",
            "a..example",
            "a b.example",
            "ex_ample.com",
            "192.0.2.1",
            "a.123",
            &"a".repeat(64),
        ] {
            assert!(host_name(bad).is_err(), "{bad:?}");
        }
    }
}
