//! The listener's TLS server configuration from the operator's PEM files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate or key that cannot be used, with the file and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TlsError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong and what to do.
    pub message: String,
}

/// A TLS 1.2/1.3 server configuration from a PEM certificate chain and its
/// private key (PKCS#8, PKCS#1 or SEC1).
pub fn server_config(
    certificate: &Path,
    private_key: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let err = |path: &Path, message: String| TlsError {
        path: path.to_owned(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
        .map_err(|e| err(certificate, format!("cannot read the certificate: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(certificate, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(err(
            certificate,
            "no certificate in the file (expected PEM `BEGIN CERTIFICATE`)".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(private_key)
        .map_err(|e| err(private_key, format!("not a PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(certificate, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            err(
                private_key,
                format!("the key does not fit the certificate: {e}"),
            )
        })?;
    Ok(Arc::new(config))
}
