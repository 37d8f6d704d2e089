//! TLS to PostgreSQL, and the connection address that asks for it.
//!
//! The address is a libpq URL; two of libpq's parameters choose TLS:
//! `sslmode` (`disable`, `require`, `verify-ca`, `verify-full`) and
//! `sslrootcert` (a PEM file of the CA certificates to trust). Every mode
//! that asks for TLS verifies the server's certificate and name as
//! `verify-full` does — against `sslrootcert`, or the public web roots
//! without it — so a password is never sent to a server that is not the
//! one named. Without `sslmode` (or with `disable` or `prefer`) the
//! connection is not encrypted, as before.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// A PostgreSQL address split into what tokio-postgres parses and how to
/// secure the connection.
#[derive(Debug, Clone)]
pub struct PgAddress {
    /// The URL without the TLS parameters tokio-postgres does not know.
    pub(crate) url: String,
    /// Whether the connection must be TLS, verified.
    pub tls: bool,
    /// The CA certificates to trust instead of the public roots.
    pub root_cert: Option<PathBuf>,
}

impl PgAddress {
    /// Splits `url`'s TLS parameters off, refusing values it cannot honour
    /// (with the fix). Does not read `sslrootcert`.
    pub fn parse(url: &str) -> Result<PgAddress, String> {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut kept = Vec::new();
        let (mut tls, mut root_cert) = (false, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslmode" => match value {
                    "disable" | "prefer" => tls = false,
                    "require" | "verify-ca" | "verify-full" => tls = true,
                    other => {
                        return Err(format!(
                            "sslmode={other} is not one sendbox knows: use verify-full (TLS, the server's certificate and name checked) or disable"
                        ));
                    }
                },
                "sslrootcert" => {
                    let path = PathBuf::from(percent_decode(value)?);
                    if !path.is_absolute() {
                        return Err(format!(
                            "sslrootcert={value} must be an absolute path (e.g. /etc/sendbox/db-ca.pem)"
                        ));
                    }
                    root_cert = Some(path);
                }
                _ => kept.push(pair),
            }
        }
        if root_cert.is_some() && !tls {
            return Err(
                "sslrootcert is set but sslmode does not ask for TLS: add sslmode=verify-full"
                    .into(),
            );
        }
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok(PgAddress {
            url,
            tls,
            root_cert,
        })
    }

    /// Checks `url` as a node would use it — its TLS parameters, and the
    /// CA file read — without connecting: what `sendbox check` reports.
    pub fn check(url: &str) -> Result<(), String> {
        PgAddress::parse(url)?.connector().map(|_| ())
    }

    /// The TLS connector this address asks for, if any: its trusted roots
    /// read now, so a missing or empty file is named before connecting.
    pub(crate) fn connector(&self) -> Result<Option<MakeRustls>, String> {
        if !self.tls {
            return Ok(None);
        }
        let mut roots = rustls::RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                for cert in read_certs(path)? {
                    roots.add(cert).map_err(|e| {
                        format!(
                            "sslrootcert {}: a certificate cannot be used: {e}",
                            path.display()
                        )
                    })?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Some(MakeRustls(Arc::new(config))))
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("sslrootcert {}: cannot read it: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("sslrootcert {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "sslrootcert {}: holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)",
            path.display()
        ));
    }
    Ok(certs)
}

/// `%XX` escapes in a URL parameter's value.
fn percent_decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("`{value}` has a bad %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{value}` is not UTF-8"))
}

/// Makes a verified TLS connection per server name.
#[derive(Clone)]
pub(crate) struct MakeRustls(Arc<rustls::ClientConfig>);

/// One TLS handshake with a named server.
pub(crate) struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_owned()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{domain}` cannot be checked against a certificate: {e}"),
            )
        })?;
        Ok(RustlsConnect {
            config: self.0.clone(),
            name,
        })
    }
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS connection to the server.
pub(crate) struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_split_off_and_the_rest_kept() {
        let a = PgAddress::parse(
            "postgres://s@db:5432/x?application_name=n&sslmode=verify-full&sslrootcert=/etc/ca%20s.pem",
        )
        .unwrap();
        assert_eq!(a.url, "postgres://s@db:5432/x?application_name=n");
        assert!(a.tls);
        assert_eq!(a.root_cert.as_deref(), Some(Path::new("/etc/ca s.pem")));
        let plain = PgAddress::parse("postgres://s@db/x").unwrap();
        assert!(!plain.tls && plain.root_cert.is_none());
        assert_eq!(plain.url, "postgres://s@db/x");
        assert!(
            PgAddress::parse("postgres://s@db/x?sslmode=require")
                .unwrap()
                .tls
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_with_the_fix() {
        let e = PgAddress::parse("postgres://s@db/x?sslmode=allow").unwrap_err();
        assert!(e.contains("use verify-full"), "{e}");
        let e = PgAddress::parse("postgres://s@db/x?sslrootcert=/ca.pem").unwrap_err();
        assert!(e.contains("add sslmode=verify-full"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = PgAddress::parse(&format!(
            "postgres://s@db/x?sslmode=verify-full&sslrootcert={}",
            empty.display()
        ))
        .unwrap()
        .connector()
        .err()
        .unwrap();
        assert!(e.contains("holds no certificate"), "{e}");
    }
}
