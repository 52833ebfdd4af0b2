//! TLS on the sentry's listener (`[sentry] tls`), so the challenge page runs in a secure
//! context (WebCrypto, the ticket cookie `Secure`) without another terminator in front: the
//! certificate from files, self-signed, or issued by an ACME CA with the machinery ghost uses
//! (`http::certs`). Made and issued material is kept in `<state>/sentry/tls/` (0600), so a
//! restart serves the same certificate and an ACME account is reused.
//!
//! An ACME certificate that is missing at start is not waited for: the listener starts with a
//! self-signed stand-in and the renewal task swaps the issued one in as soon as the CA
//! validates (the listener's [`CertSlot`] is replaced in place; open connections keep theirs).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;
use tokio_rustls::rustls::ServerConfig;
use tracing::{info, warn};

use super::SentryError;
use crate::{
    config::sentry::{SentryConfig, SentryTls},
    http::{
        self, CertSlot,
        certs::{self, CertPem, TlsDir},
    },
};

/// An ACME certificate is renewed this long before it expires (Let's Encrypt issues for 90
/// days and advises renewing with a third left).
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often the certificate's expiry is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(12 * 3600);
/// After a failed issuance, the next try (a CA rate-limits failures; ten minutes stays well
/// inside Let's Encrypt's five failed validations per hour).
const RETRY_AFTER: Duration = Duration::from_secs(600);

/// The listener's TLS: the slot its handshakes ask, and what the status reports.
pub struct ListenerTls {
    pub slot: Arc<CertSlot>,
    pub server_config: Arc<ServerConfig>,
    /// Unix seconds when the certificate in use expires (0: unknown).
    expires_at: AtomicI64,
    /// A stand-in serves until the ACME certificate is issued.
    stand_in: std::sync::atomic::AtomicBool,
}

impl ListenerTls {
    fn new(pem: &CertPem, stand_in: bool) -> Result<Self, SentryError> {
        let key = http::certified_key(&pem.cert, &pem.key).map_err(cert_error)?;
        let slot = CertSlot::new(key);
        let server_config = slot.server_config().map_err(cert_error)?;
        Ok(Self {
            slot,
            server_config,
            expires_at: AtomicI64::new(certs::not_after(pem).unwrap_or(0)),
            stand_in: std::sync::atomic::AtomicBool::new(stand_in),
        })
    }

    fn replace(&self, pem: &CertPem) -> Result<(), SentryError> {
        let key = http::certified_key(&pem.cert, &pem.key).map_err(cert_error)?;
        self.slot.replace(key);
        self.expires_at
            .store(certs::not_after(pem).unwrap_or(0), Ordering::Relaxed);
        self.stand_in.store(false, Ordering::Relaxed);
        Ok(())
    }

    pub fn expires_at(&self) -> i64 {
        self.expires_at.load(Ordering::Relaxed)
    }

    /// True while a self-signed stand-in waits for the ACME certificate.
    pub fn stand_in(&self) -> bool {
        self.stand_in.load(Ordering::Relaxed)
    }
}

fn cert_error(e: impl Into<certs::CertError>) -> SentryError {
    SentryError::Tls(e.into().to_string())
}

/// The subject of a self-signed certificate: `tls_domain`, else the listen address when it is
/// a specific one, else `localhost`.
fn self_signed_name(config: &SentryConfig, listen: SocketAddr) -> String {
    if !config.tls_domain.is_empty() {
        config.tls_domain.clone()
    } else if listen.ip().is_unspecified() {
        "localhost".into()
    } else {
        listen.ip().to_string()
    }
}

/// The listener's TLS per `[sentry] tls` (`None`: plain HTTP). `state_dir` is where made and
/// issued material is kept (`None`: nowhere; a sentry assembled from parts).
pub fn prepare(
    config: &SentryConfig,
    listen: SocketAddr,
    state_dir: Option<&Path>,
) -> Result<Option<Arc<ListenerTls>>, SentryError> {
    let dir = state_dir.map(|d| TlsDir {
        dir: d.join("sentry").join("tls"),
    });
    let made = |name: &str| -> Result<CertPem, SentryError> {
        let pem = certs::self_signed(name).map_err(cert_error)?;
        if let Some(dir) = &dir {
            dir.save(&pem).map_err(cert_error)?;
        }
        Ok(pem)
    };
    let tls = match config.tls {
        SentryTls::Off => return Ok(None),
        SentryTls::Files => {
            let pem = certs::read_files(Path::new(&config.tls_cert), Path::new(&config.tls_key))
                .map_err(cert_error)?;
            ListenerTls::new(&pem, false)?
        }
        SentryTls::SelfSigned => {
            let name = self_signed_name(config, listen);
            // The same certificate after a restart, so a browser or client told to trust it
            // keeps doing so; a stored one that no longer loads is made again.
            match dir.as_ref().map(TlsDir::load) {
                Some(Ok(pem)) if ListenerTls::new(&pem, false).is_ok() => {
                    ListenerTls::new(&pem, false)?
                }
                _ => ListenerTls::new(&made(&name)?, false)?,
            }
        }
        SentryTls::Acme => match dir.as_ref().map(TlsDir::load) {
            Some(Ok(pem)) if ListenerTls::new(&pem, false).is_ok() => {
                ListenerTls::new(&pem, false)?
            }
            _ => {
                // Not written to the state: the directory is the issued certificate's.
                let pem = certs::self_signed(&config.tls_domain).map_err(cert_error)?;
                warn!(
                    domain = %config.tls_domain,
                    "sentry: no ACME certificate yet; serving a self-signed one until it is issued"
                );
                ListenerTls::new(&pem, true)?
            }
        },
    };
    Ok(Some(Arc::new(tls)))
}

/// `tls = "acme"`: issues the certificate when there is none (at once) or when it comes
/// within [`RENEW_BEFORE`] of expiry, and swaps it in; until `shutdown`.
pub async fn renew_loop(
    config: SentryConfig,
    state_dir: PathBuf,
    tls: Arc<ListenerTls>,
    mut shutdown: watch::Receiver<bool>,
) {
    let dir = TlsDir {
        dir: state_dir.join("sentry").join("tls"),
    };
    let listen_ip = crate::config::parse_listen("sentry.listen", &config.listen)
        .ok()
        .flatten()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    loop {
        let now = super::store::unix_now() as i64;
        let due = tls.stand_in()
            || tls.expires_at() == 0
            || tls.expires_at() - now < RENEW_BEFORE.as_secs() as i64;
        let wait = if due {
            let issued = certs::acme_issue(
                &certs::AcmeRequest {
                    domain: &config.tls_domain,
                    directory: &config.tls_acme_directory,
                    email: &config.tls_acme_email,
                    http_listen: SocketAddr::new(listen_ip, config.tls_acme_http_port),
                    ca_root: (!config.tls_acme_ca_root.is_empty())
                        .then(|| Path::new(&config.tls_acme_ca_root)),
                },
                &dir,
            )
            .await;
            // Refuse what rustls would refuse before anything on disk is replaced.
            let swapped = issued.map_err(cert_error).and_then(|pem| {
                tls.replace(&pem)?;
                dir.save(&pem).map_err(cert_error)
            });
            match swapped {
                Ok(()) => {
                    info!(domain = %config.tls_domain, expires_at = tls.expires_at(), "sentry: ACME certificate in use");
                    CHECK_EVERY
                }
                Err(e) => {
                    warn!(error = %e, domain = %config.tls_domain, "sentry: ACME issuance failed; trying again in 10 minutes");
                    RETRY_AFTER
                }
            }
        } else {
            CHECK_EVERY
        };
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(tls: SentryTls) -> SentryConfig {
        SentryConfig {
            tls,
            ..SentryConfig::default()
        }
    }

    #[test]
    fn off_is_plain_http_and_self_signed_survives_a_restart() {
        let listen: SocketAddr = "192.0.2.1:8443".parse().unwrap();
        assert!(
            prepare(&config(SentryTls::Off), listen, None)
                .unwrap()
                .is_none()
        );
        let state = tempfile::tempdir().unwrap();
        let first = prepare(&config(SentryTls::SelfSigned), listen, Some(state.path()))
            .unwrap()
            .unwrap();
        let stored = std::fs::read_to_string(state.path().join("sentry/tls/cert.pem")).unwrap();
        let again = prepare(&config(SentryTls::SelfSigned), listen, Some(state.path()))
            .unwrap()
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(state.path().join("sentry/tls/cert.pem")).unwrap(),
            stored
        );
        assert_eq!(first.expires_at(), again.expires_at());
        assert!(!first.stand_in());
    }

    #[test]
    fn acme_without_a_certificate_starts_on_a_stand_in() {
        let state = tempfile::tempdir().unwrap();
        let mut c = config(SentryTls::Acme);
        c.tls_domain = "site.example".into();
        let tls = prepare(&c, "0.0.0.0:443".parse().unwrap(), Some(state.path()))
            .unwrap()
            .unwrap();
        assert!(tls.stand_in());
        // The stand-in is not kept: the directory is for the issued certificate.
        assert!(!state.path().join("sentry/tls/cert.pem").exists());
    }

    #[test]
    fn missing_files_name_the_file() {
        let mut c = config(SentryTls::Files);
        c.tls_cert = "/nonexistent/cert.pem".into();
        c.tls_key = "/nonexistent/key.pem".into();
        let Err(e) = prepare(&c, "127.0.0.1:8443".parse().unwrap(), None) else {
            panic!("missing files accepted");
        };
        assert!(e.to_string().contains("/nonexistent/cert.pem"), "{e}");
    }
}
