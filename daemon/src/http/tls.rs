//! The rustls server configuration of the TLS listeners (the ghost relay, the admin API): a
//! certificate chain and key from PEM text, the ring provider, safe protocol versions and
//! HTTP/1.1 ALPN.

use std::sync::Arc;

use tokio_rustls::rustls::{
    self, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
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

/// Builds the server configuration from a PEM certificate chain and its PEM private key.
pub fn server_config(cert: &str, key: &str) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(TlsConfigError::Certificate)?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(TlsConfigError::PrivateKey)?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(TlsConfigError::Rustls)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(TlsConfigError::CertificateAndKey)?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}
