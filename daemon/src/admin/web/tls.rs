//! The HTTPS admin API's certificate: PEM files named in `[admin] tls_cert` / `tls_key`, or a
//! self-signed one for the listen address and `localhost`, made at first start and kept in
//! `<state_dir>/admin/tls/{cert,key}.pem` (0600). rustls with the ring provider and HTTP/1.1
//! ALPN, as the ghost relay builds it.

use std::{net::SocketAddr, path::Path, sync::Arc};

use tokio_rustls::rustls::ServerConfig;
use tracing::{info, warn};

use crate::{error::Error, store};

fn tls_error(what: impl std::fmt::Display) -> Error {
    Error::config(format!("admin TLS: {what}"))
}

/// Builds the rustls configuration from PEM text (the HTTP layer's, as the ghost relay's).
pub fn server_config(cert: &str, key: &str) -> Result<Arc<ServerConfig>, Error> {
    crate::http::tls_server_config(cert, key).map_err(tls_error)
}

/// The configuration for the listener: from `cert`/`key` when given, else the self-signed
/// pair in `dir` (made when missing or unreadable).
pub fn load(
    cert: &str,
    key: &str,
    dir: &Path,
    listen: SocketAddr,
) -> Result<Arc<ServerConfig>, Error> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Error::io(p, e));
    if !cert.is_empty() {
        return server_config(&read(Path::new(cert))?, &read(Path::new(key))?);
    }
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert_path.exists() && key_path.exists() {
        match server_config(&read(&cert_path)?, &read(&key_path)?) {
            Ok(c) => return Ok(c),
            Err(e) => {
                warn!(error = %e, "the admin API's self-signed certificate is damaged: a new one is made");
                let _ = store::set_aside(&cert_path);
                let _ = store::set_aside(&key_path);
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut names = vec!["localhost".to_string(), listen.ip().to_string()];
    names.dedup();
    let made = rcgen::generate_simple_self_signed(names).map_err(tls_error)?;
    let (cert_pem, key_pem) = (made.cert.pem(), made.signing_key.serialize_pem());
    // Key first, as the ghost relay does: a crash in between leaves a mismatch read-back
    // catches, never a new certificate with an old key.
    store::write_atomic(&key_path, key_pem.as_bytes())?;
    store::write_atomic(&cert_path, cert_pem.as_bytes())?;
    info!(cert = %cert_path.display(), "admin API: self-signed certificate made");
    server_config(&cert_pem, &key_pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_made_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = "127.0.0.1:9443".parse().unwrap();
        load("", "", dir.path(), addr).unwrap();
        let first = std::fs::read(dir.path().join("cert.pem")).unwrap();
        load("", "", dir.path(), addr).unwrap();
        assert_eq!(first, std::fs::read(dir.path().join("cert.pem")).unwrap());
        let mode = std::fs::metadata(dir.path().join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(server_config("garbage", "garbage").is_err());
    }
}
