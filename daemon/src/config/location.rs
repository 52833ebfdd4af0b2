//! Where a blocklist source is fetched from: a file path or an http(s) URL.

use std::path::{Path, PathBuf};

use crate::error::InvalidValue;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    File(PathBuf),
    Http(String),
}

impl Location {
    /// "/path/to/list", "file:///path", "http://..." or "https://...".
    pub fn parse(url: &str) -> Result<Self, InvalidValue> {
        if let Some(path) = url.strip_prefix("file://") {
            return Self::file(path);
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return url
                .parse::<hyper::Uri>()
                .map(|_| Self::Http(url.to_string()))
                .map_err(|e| InvalidValue(format!("{url:?} is not a valid URL: {e}")));
        }
        if url.contains("://") {
            return Err(InvalidValue(format!(
                "{url:?}: only file paths, file://, http:// and https://"
            )));
        }
        Self::file(url)
    }

    fn file(path: &str) -> Result<Self, InvalidValue> {
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(InvalidValue(format!("{path:?} must be an absolute path")));
        }
        Ok(Self::File(p.to_path_buf()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            Location::parse("/srv/list.txt"),
            Ok(Location::File("/srv/list.txt".into()))
        );
        assert_eq!(
            Location::parse("file:///srv/list.txt"),
            Ok(Location::File("/srv/list.txt".into()))
        );
        assert!(matches!(
            Location::parse("https://lists.example/gambling.txt"),
            Ok(Location::Http(_))
        ));
        assert!(Location::parse("relative/list.txt").is_err());
        assert!(Location::parse("ftp://lists.example/x").is_err());
    }
}
