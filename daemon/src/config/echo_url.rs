//! `[multihop] echo_url`: the plain-HTTP service that tells the exit's address.

use crate::error::InvalidValue;

/// `http://host[:port][/path]`. Plain HTTP only: the answer is one address, and a TLS stack
/// for it is not worth its weight; an operator who wants privacy from the echo service runs
/// their own (docs/multihop.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EchoUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl EchoUrl {
    pub fn parse(url: &str) -> Result<Self, InvalidValue> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            InvalidValue(format!(
                "{url:?} must start with http:// (the echo service is fetched over plain HTTP)"
            ))
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(InvalidValue(format!("{url:?} has no host")));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, rest) = v6
                .split_once(']')
                .ok_or_else(|| InvalidValue(format!("{url:?}: unclosed [ in the host")))?;
            let port = match rest.strip_prefix(':') {
                Some(p) => Some(p),
                None if rest.is_empty() => None,
                None => return Err(InvalidValue(format!("{url:?}: junk after the host"))),
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| InvalidValue(format!("{url:?}: bad port")))?,
            None => 80,
        };
        if host.is_empty()
            || host.chars().any(|c| c.is_whitespace() || c.is_control())
            || path.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(InvalidValue(format!("{url:?} is not a valid URL")));
        }
        Ok(Self {
            host,
            port,
            path: path.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() -> Result<(), InvalidValue> {
        let u = EchoUrl::parse("http://203.0.113.10:8080/ip")?;
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("203.0.113.10", 8080, "/ip")
        );
        let u = EchoUrl::parse("http://api.ipify.org")?;
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        let u = EchoUrl::parse("http://[2001:db8::1]/")?;
        assert_eq!(u.host, "2001:db8::1");
        for bad in [
            "https://x/",
            "ftp://x",
            "http://",
            "http://x:0/",
            "http://x:99999/",
            "http://a b/",
        ] {
            assert!(EchoUrl::parse(bad).is_err(), "{bad}");
        }
        Ok(())
    }
}
