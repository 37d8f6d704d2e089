//! JWT client assertions (RFC 7523) for certificate-based client
//! credentials, signed RS256 with the account's private key and carrying the
//! certificate's `x5t#S256` thumbprint, as Microsoft Entra expects.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};

use crate::AuthError;

/// The `client_assertion_type` value for a JWT bearer assertion.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A loaded private key and certificate thumbprint.
pub struct CertificateKey {
    key: RsaKeyPair,
    x5t_s256: String,
    x5t: String,
}

impl std::fmt::Debug for CertificateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateKey")
            .field("x5t#S256", &self.x5t_s256)
            .finish_non_exhaustive()
    }
}

fn pem_block(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let body: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD.decode(body).ok()
}

fn config(message: String) -> AuthError {
    AuthError::Config { message }
}

impl CertificateKey {
    /// Loads an RSA private key (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE
    /// KEY` PEM) and the certificate registered with the provider.
    pub fn from_pem(private_key_pem: &str, certificate_pem: &str) -> Result<Self, AuthError> {
        let key = if let Some(der) = pem_block(private_key_pem, "PRIVATE KEY") {
            RsaKeyPair::from_pkcs8(&der)
        } else if let Some(der) = pem_block(private_key_pem, "RSA PRIVATE KEY") {
            RsaKeyPair::from_der(&der)
        } else {
            return Err(config(
                "private key file has no PEM `PRIVATE KEY` or `RSA PRIVATE KEY` block".into(),
            ));
        }
        .map_err(|e| config(format!("private key is not a usable RSA key: {e}")))?;
        let cert = pem_block(certificate_pem, "CERTIFICATE")
            .ok_or_else(|| config("certificate file has no PEM `CERTIFICATE` block".into()))?;
        let s256 = ring::digest::digest(&ring::digest::SHA256, &cert);
        let s1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &cert);
        Ok(CertificateKey {
            key,
            x5t_s256: URL_SAFE_NO_PAD.encode(s256.as_ref()),
            x5t: URL_SAFE_NO_PAD.encode(s1.as_ref()),
        })
    }

    /// The certificate's SHA-256 thumbprint, base64url.
    pub fn thumbprint_s256(&self) -> &str {
        &self.x5t_s256
    }

    /// A fresh assertion for `client_id` to present at `audience` (the
    /// token endpoint), valid for five minutes.
    pub fn assertion(&self, client_id: &str, audience: &str) -> Result<String, AuthError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let rng = ring::rand::SystemRandom::new();
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&rng, &mut jti)
            .map_err(|_| config("no randomness for the assertion id".into()))?;
        let header = serde_json::json!({
            "alg": "RS256",
            "typ": "JWT",
            "x5t#S256": self.x5t_s256,
            "x5t": self.x5t,
        });
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": URL_SAFE_NO_PAD.encode(jti),
            "iat": now,
            "nbf": now,
            "exp": now + 300,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &rng, signing_input.as_bytes(), &mut sig)
            .map_err(|_| config("signing the client assertion failed".into()))?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}
