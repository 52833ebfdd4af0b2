//! The rustls server configuration of the TLS listeners (the ghost relay, the admin API, the
//! sentry proxy): a certificate chain and key from PEM text, the ring provider, safe protocol
//! versions and HTTP/1.1 ALPN. A listener whose certificate changes while it runs (an ACME
//! renewal) or that serves more than one name (the sentry's port shared with ghost) takes a
//! [`CertSlot`] instead of a fixed certificate.

use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::{
    self, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// The ALPN protocol both TLS listeners speak (the stock wstunnel client never offers h2).
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why PEM text gives no server configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// The certificate chain's PEM text does not parse.
    #[error("certificate: {0}")]
    Certificate(#[source] rustls::pki_types::pem::Error),
    #[error("no certificate in the PEM text")]
    NoCertificate,
    #[error("private key: {0}")]
    PrivateKey(#[source] rustls::pki_types::pem::Error),
    /// rustls refused the protocol versions.
    #[error("{0}")]
    Rustls(#[source] rustls::Error),
    /// rustls refused the certificate with that key.
    #[error("certificate and key: {0}")]
    CertificateAndKey(#[source] rustls::Error),
}

fn parse_pem(
    cert: &str,
    key: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsConfigError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(TlsConfigError::Certificate)?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(TlsConfigError::PrivateKey)?;
    Ok((certs, key))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server configuration from a PEM certificate chain and its PEM private key.
pub fn server_config(cert: &str, key: &str) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let (certs, key) = parse_pem(cert, key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Rustls)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsConfigError::CertificateAndKey)?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// A certificate and key from PEM text, checked to belong together.
pub fn certified_key(cert: &str, key: &str) -> Result<Arc<CertifiedKey>, TlsConfigError> {
    let (certs, key) = parse_pem(cert, key)?;
    CertifiedKey::from_der(certs, key, &provider())
        .map(Arc::new)
        .map_err(TlsConfigError::CertificateAndKey)
}

/// The certificates of one TLS listener, replaceable while it runs: the listener's own
/// (`default`, renewed in place) and, by server name (SNI), those of another service sharing
/// the port (ghost's domain on the sentry's port).
#[derive(Debug)]
pub struct CertSlot {
    default: RwLock<Arc<CertifiedKey>>,
    /// Lower-case server name -> its certificate. A handful at most: a linear scan.
    by_name: RwLock<Vec<(String, Arc<CertifiedKey>)>>,
}

impl CertSlot {
    pub fn new(default: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self {
            default: RwLock::new(default),
            by_name: RwLock::new(Vec::new()),
        })
    }

    /// Replaces the listener's own certificate; connections already open keep theirs.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        match self.default.write() {
            Ok(mut g) => *g = key,
            Err(p) => *p.into_inner() = key,
        }
    }

    /// Serves `key` to clients asking for `name` (replacing what that name had), or stops
    /// doing so when `key` is `None`.
    pub fn set_named(&self, name: &str, key: Option<Arc<CertifiedKey>>) {
        let name = name.to_ascii_lowercase();
        let mut names = match self.by_name.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        names.retain(|(n, _)| *n != name);
        if let Some(key) = key {
            names.push((name, key));
        }
    }

    /// A server configuration that asks this slot for the certificate of each handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsConfigError> {
        let resolver: Arc<dyn ResolvesServerCert> = Arc::clone(self) as _;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsConfigError::Rustls)?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello.server_name() {
            let names = match self.by_name.read() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if let Some((_, key)) = names.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
                return Some(Arc::clone(key));
            }
        }
        let default = match self.default.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        Some(Arc::clone(&default))
    }
}
