//! TLS material for the public TLS listeners (the ghost relay, the sentry proxy): certificate
//! files named in the configuration, a self-signed certificate, or one issued by an ACME CA
//! (Let's Encrypt) over HTTP-01, with port 80 listening only while the CA validates.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_rustls::rustls::{
    ServerConfig,
    pki_types::{CertificateDer, pem::PemObject},
};
use tracing::{info, warn};

use crate::store;

/// Why no certificate, or no TLS configuration from one.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The certificate and key give no TLS configuration.
    #[error("TLS: {0}")]
    Tls(#[from] super::TlsConfigError),
    /// A certificate or key file does not read.
    #[error("TLS: {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: cannot make a self-signed certificate: {0}")]
    SelfSigned(#[source] rcgen::Error),
    /// A step of the ACME exchange (`new order`, `validation`...) failed.
    #[error("ACME: {step}: {source}")]
    Acme {
        step: &'static str,
        #[source]
        source: Box<instant_acme::Error>,
    },
    /// Port 80 (or the configured address) is not ours for the HTTP-01 challenge.
    #[error("ACME: cannot listen on {addr} for the HTTP-01 challenge: {source}")]
    AcmeListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("ACME: authorization is {0:?}")]
    AcmeAuthorization(instant_acme::AuthorizationStatus),
    #[error("ACME: the CA offers no http-01 challenge")]
    AcmeNoHttp01,
    #[error("ACME: the CA did not validate {domain}: order is {status:?}")]
    AcmeNotValidated {
        domain: String,
        status: instant_acme::OrderStatus,
    },
    #[error("ACME: the CA did not finish in time")]
    AcmeTimeout,
    #[error(transparent)]
    Daemon(#[from] crate::error::Error),
}

/// How long the CA may take to validate the HTTP-01 challenge and issue: within phantom-api's
/// default 60 s reply timeout, so `ghost enable` answers rather than leaving the CLI waiting
/// (Let's Encrypt usually takes seconds; a slow order fails cleanly and can be retried).
const ACME_TIMEOUT: Duration = Duration::from_secs(50);

/// A certificate chain and its key, both PEM.
pub struct CertPem {
    pub cert: String,
    pub key: String,
}

/// Builds the rustls server configuration from PEM text (the HTTP layer's, as the admin API's).
pub fn server_config(pem: &CertPem) -> Result<Arc<ServerConfig>, CertError> {
    Ok(super::tls_server_config(&pem.cert, &pem.key)?)
}

/// Reads a certificate chain and key from files (`tls = "files"`).
pub fn read_files(cert: &Path, key: &Path) -> Result<CertPem, CertError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| CertError::ReadFile {
            path: p.to_path_buf(),
            source,
        })
    };
    Ok(CertPem {
        cert: read(cert)?,
        key: read(key)?,
    })
}

/// A self-signed certificate for `domain` (the stock wstunnel client does not verify by
/// default; browsers need the operator to trust it).
pub fn self_signed(domain: &str) -> Result<CertPem, CertError> {
    let made = rcgen::generate_simple_self_signed(vec![domain.to_string()])
        .map_err(CertError::SelfSigned)?;
    Ok(CertPem {
        cert: made.cert.pem(),
        key: made.signing_key.serialize_pem(),
    })
}

/// When the first certificate of the chain expires (Unix seconds), read from its DER.
pub fn not_after(pem: &CertPem) -> Option<i64> {
    let der = CertificateDer::pem_slice_iter(pem.cert.as_bytes())
        .next()?
        .ok()?;
    not_after_der(&der)
}

/// One DER element: tag, content, the rest.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |l, b| (l << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// `Certificate.tbsCertificate.validity.notAfter` (RFC 5280 section 4.1).
fn not_after_der(der: &[u8]) -> Option<i64> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let (tag, _, mut rest) = tlv(tbs)?;
    if tag == 0xa0 {
        // The optional [0] version came first; the serial is next.
        rest = tlv(rest)?.2;
    }
    let rest = tlv(rest)?.2; // signature algorithm
    let rest = tlv(rest)?.2; // issuer
    let (_, validity, _) = tlv(rest)?;
    let not_before_rest = tlv(validity)?.2;
    let (tag, text, _) = tlv(not_before_rest)?;
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let digits = |s: &str| s.parse::<i32>().ok();
    let (year, rest) = match tag {
        // UTCTime: two-digit year, 1950..2049.
        0x17 => {
            let yy = digits(text.get(..2)?)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (digits(text.get(..4)?)?, text.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| rest.get(i..i + 2).and_then(|s| s.parse::<u8>().ok());
    let month = time::Month::try_from(field(0)?).ok()?;
    let date = time::Date::from_calendar_date(year, month, field(2)?).ok()?;
    let clock = time::Time::from_hms(field(4)?, field(6)?, field(8)?).ok()?;
    Some(
        time::PrimitiveDateTime::new(date, clock)
            .assume_utc()
            .unix_timestamp(),
    )
}

/// Where issued or generated material is kept: `<dir>/{cert,key}.pem` (0600), e.g.
/// `<state>/ghost/tls/` or `<state>/sentry/tls/`.
pub struct TlsDir {
    pub dir: PathBuf,
}

impl TlsDir {
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    fn account(&self) -> PathBuf {
        self.dir.join("acme-account.json")
    }

    pub fn save(&self, pem: &CertPem) -> Result<(), CertError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| crate::error::Error::io(&self.dir, e))?;
        // Key first: a crash in between leaves the old certificate with a key that does not
        // match, which read-back catches, rather than a new certificate with an old key.
        store::write_atomic(&self.key(), pem.key.as_bytes())?;
        store::write_atomic(&self.cert(), pem.cert.as_bytes())?;
        Ok(())
    }

    pub fn load(&self) -> Result<CertPem, CertError> {
        read_files(&self.cert(), &self.key())
    }
}

/// Settings of an ACME issuance.
pub struct AcmeRequest<'a> {
    pub domain: &'a str,
    pub directory: &'a str,
    pub email: &'a str,
    /// Where the HTTP-01 responder listens while the CA validates (port 80).
    pub http_listen: SocketAddr,
    /// A PEM root to trust for the directory instead of the public web roots.
    pub ca_root: Option<&'a Path>,
}

/// Issues a certificate for `req.domain` from the ACME CA over HTTP-01. Port 80 is bound only
/// for the duration of this call.
pub async fn acme_issue(req: &AcmeRequest<'_>, tls_dir: &TlsDir) -> Result<CertPem, CertError> {
    let tokens: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let listener =
        TcpListener::bind(req.http_listen)
            .await
            .map_err(|source| CertError::AcmeListen {
                addr: req.http_listen,
                source,
            })?;
    let responder = tokio::spawn(serve_http01(listener, Arc::clone(&tokens)));
    let result = tokio::time::timeout(ACME_TIMEOUT, async {
        let account = acme_account(req, tls_dir).await?;
        let identifiers = [Identifier::Dns(req.domain.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(acme("new order"))?;
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(acme("authorization"))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(CertError::AcmeAuthorization(other)),
            }
            let mut challenge = authz
                .challenge(ChallengeType::Http01)
                .ok_or(CertError::AcmeNoHttp01)?;
            if let Ok(mut map) = tokens.lock() {
                map.insert(
                    challenge.token.clone(),
                    challenge.key_authorization().as_str().to_string(),
                );
            }
            challenge
                .set_ready()
                .await
                .map_err(acme("challenge ready"))?;
        }
        let retry = RetryPolicy::new().timeout(ACME_TIMEOUT);
        let status = order.poll_ready(&retry).await.map_err(acme("validation"))?;
        if status != OrderStatus::Ready {
            return Err(CertError::AcmeNotValidated {
                domain: req.domain.to_string(),
                status,
            });
        }
        let key = order.finalize().await.map_err(acme("finalize"))?;
        let cert = order
            .poll_certificate(&retry)
            .await
            .map_err(acme("certificate"))?;
        Ok(CertPem { cert, key })
    })
    .await;
    responder.abort();
    let _ = responder.await;
    let pem = result.map_err(|_| CertError::AcmeTimeout)??;
    info!(domain = req.domain, "ACME certificate issued");
    Ok(pem)
}

/// The error of the ACME step `step`.
fn acme(step: &'static str) -> impl Fn(instant_acme::Error) -> CertError {
    move |source| CertError::Acme {
        step,
        source: Box::new(source),
    }
}

/// The ACME account, created once and kept (0600) so renewals reuse it.
async fn acme_account(req: &AcmeRequest<'_>, tls_dir: &TlsDir) -> Result<Account, CertError> {
    let path = tls_dir.account();
    let builder = match req.ca_root {
        Some(root) => Account::builder_with_root(root),
        None => Account::builder(),
    }
    .map_err(acme("HTTP client"))?;
    if let Ok(text) = std::fs::read_to_string(&path) {
        match serde_json::from_str::<AccountCredentials>(&text) {
            Ok(credentials) => {
                return builder
                    .from_credentials(credentials)
                    .await
                    .map_err(acme("account"));
            }
            Err(e) => warn!(error = %e, "stored ACME account unreadable; creating a new one"),
        }
    }
    let contact = format!("mailto:{}", req.email);
    let contacts: Vec<&str> = if req.email.is_empty() {
        Vec::new()
    } else {
        vec![contact.as_str()]
    };
    let (account, credentials) = builder
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            req.directory.to_string(),
            None,
        )
        .await
        .map_err(acme("new account"))?;
    std::fs::create_dir_all(&tls_dir.dir).map_err(|e| crate::error::Error::io(&tls_dir.dir, e))?;
    store::write_json(&path, &credentials)?;
    Ok(account)
}

/// Answers `GET /.well-known/acme-challenge/<token>` with the key authorization; 404 else.
async fn serve_http01(listener: TcpListener, tokens: Arc<Mutex<HashMap<String, String>>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let tokens = Arc::clone(&tokens);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            let read = tokio::time::timeout(Duration::from_secs(10), async {
                while len < buf.len() {
                    let n = stream.read(&mut buf[len..]).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        return Some(());
                    }
                }
                None
            })
            .await;
            if !matches!(read, Ok(Some(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let answer = head
                .split_whitespace()
                .nth(1)
                .and_then(|path| path.strip_prefix("/.well-known/acme-challenge/"))
                .and_then(|token| tokens.lock().ok()?.get(token).cloned());
            let response = match answer {
                Some(body) => format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                ),
                None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string(),
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn self_signed_material_builds_a_server_config_with_http11_alpn() {
        let pem = self_signed("192-0-2-1.sslip.io").unwrap();
        let config = server_config(&pem).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn expiry_is_read_from_the_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["a.example".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 7, 9);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pem = CertPem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        };
        let expected = time::macros::datetime!(2031-07-09 0:00 UTC).unix_timestamp();
        assert_eq!(not_after(&pem), Some(expected));
        // GeneralizedTime after 2049.
        params.not_after = rcgen::date_time_ymd(2061, 1, 2);
        let cert = params.self_signed(&key).unwrap();
        let pem = CertPem {
            cert: cert.pem(),
            key: String::new(),
        };
        let expected = time::macros::datetime!(2061-01-02 0:00 UTC).unix_timestamp();
        assert_eq!(not_after(&pem), Some(expected));
        assert_eq!(
            not_after(&CertPem {
                cert: "junk".into(),
                key: String::new()
            }),
            None
        );
    }

    #[test]
    fn garbage_and_mismatched_keys_are_refused() {
        let a = self_signed("a.example").unwrap();
        let b = self_signed("b.example").unwrap();
        assert!(
            server_config(&CertPem {
                cert: "junk".into(),
                key: a.key.clone()
            })
            .is_err()
        );
        assert!(
            server_config(&CertPem {
                cert: a.cert,
                key: b.key
            })
            .is_err()
        );
    }
}
