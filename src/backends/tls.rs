//! TLS on rustls with the ring provider (feature `tls`), both ways: [`RustlsConnector`], the
//! outbound HTTP client's [`TlsConnector`], and [`RustlsAcceptor`], the server's HTTPS
//! ([`TlsAcceptor`]). Both take the provider and protocol versions from [`provider`].
//!
//! Invariant: the client always verifies certificates, against the Mozilla roots
//! (`webpki-roots`) or the roots given; there is no switch that turns verification off.
//! Invariant: the server reads its certificate only from the files configured, at start-up
//! and on [`TlsAcceptor::reload`]; a reload that fails keeps the certificate in use.

use std::io;
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;

use crate::config::TlsFiles;
use crate::events::BoxFuture;
use crate::http_client::{Connection, TlsConnector};
use crate::panic::lock;
use crate::server::{Protocol, TlsAcceptor};

/// ALPN's name for HTTP/2.
const ALPN_H2: &[u8] = b"h2";
/// ALPN's name for HTTP/1.1.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The one rustls set-up both sides share: the ring provider (no cmake or NASM to build), TLS
/// 1.2 and 1.3.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Speaks TLS 1.2 and 1.3 (HTTP/1.1 over ALPN), trusting one set of root certificates.
#[derive(Clone)]
pub struct RustlsConnector {
    config: Arc<ClientConfig>,
}

impl RustlsConnector {
    /// Trusts the Mozilla root certificates, as browsers do: for hosted APIs.
    pub fn with_webpki_roots() -> RustlsConnector {
        let roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        RustlsConnector::trusting(roots)
    }

    /// Trusts only the certificate `der` (DER-encoded): a private CA's, or a test server's own.
    pub fn with_root_certificate(der: &[u8]) -> Result<RustlsConnector, String> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(der.to_vec()))
            .map_err(|error| format!("not a usable root certificate: {error}"))?;
        Ok(RustlsConnector::trusting(roots))
    }

    /// The same connector offering `protocols` by ALPN, most preferred first (an HTTP/2
    /// client offers `h2`); the outbound client itself speaks HTTP/1.1 only.
    pub fn offering(mut self, protocols: &[&[u8]]) -> RustlsConnector {
        Arc::make_mut(&mut self.config).alpn_protocols =
            protocols.iter().map(|protocol| protocol.to_vec()).collect();
        self
    }

    fn trusting(roots: RootCertStore) -> RustlsConnector {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        RustlsConnector {
            config: Arc::new(config),
        }
    }
}

// The root store is long and says nothing useful in a log.
impl std::fmt::Debug for RustlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RustlsConnector")
    }
}

impl TlsConnector for RustlsConnector {
    fn connect(
        &self,
        server_name: String,
        stream: TcpStream,
    ) -> BoxFuture<'static, io::Result<Box<dyn Connection>>> {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        Box::pin(async move {
            let name = ServerName::try_from(server_name)
                .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
            let stream = connector.connect(name, stream).await?;
            Ok(Box::new(stream) as Box<dyn Connection>)
        })
    }
}

/// The server's HTTPS: the certificate chain and key from [`TlsFiles`], ALPN `h2` then
/// `http/1.1`, and a reload that swaps the configuration for later handshakes.
pub struct RustlsAcceptor {
    files: TlsFiles,
    /// What the next handshake uses. A std `Mutex`, held only to clone or replace the `Arc`;
    /// a connection keeps the configuration its handshake started with.
    config: Mutex<Arc<ServerConfig>>,
}

impl RustlsAcceptor {
    /// Reads the certificate chain and key from `files`; the error names the file at fault.
    pub fn open(files: TlsFiles) -> Result<RustlsAcceptor, String> {
        let config = Mutex::new(Arc::new(server_config(&files)?));
        Ok(RustlsAcceptor { files, config })
    }
}

impl TlsAcceptor for RustlsAcceptor {
    fn accept(
        &self,
        stream: TcpStream,
    ) -> BoxFuture<'static, io::Result<(Box<dyn Connection>, Protocol)>> {
        let acceptor = tokio_rustls::TlsAcceptor::from(lock(&self.config).clone());
        Box::pin(async move {
            let stream = acceptor.accept(stream).await?;
            let protocol = match stream.get_ref().1.alpn_protocol() {
                Some(ALPN_H2) => Protocol::Http2,
                _ => Protocol::Http1,
            };
            Ok((Box::new(stream) as Box<dyn Connection>, protocol))
        })
    }

    fn reload(&self) -> Result<(), String> {
        let config = server_config(&self.files)?;
        *lock(&self.config) = Arc::new(config);
        Ok(())
    }
}

/// A server configuration for the PEM files in `files`.
fn server_config(files: &TlsFiles) -> Result<ServerConfig, String> {
    let (cert_file, key_file) = (files.cert_file.display(), files.key_file.display());
    let chain = CertificateDer::pem_file_iter(&files.cert_file)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("TLS_CERT_FILE {cert_file}: {error}"))?;
    if chain.is_empty() {
        return Err(format!("TLS_CERT_FILE {cert_file}: no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|error| format!("TLS_KEY_FILE {key_file}: {error}"))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| {
            format!("TLS_CERT_FILE {cert_file} with TLS_KEY_FILE {key_file}: {error}")
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok(config)
}
