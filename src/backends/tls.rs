//! TLS for the outbound HTTP client (feature `tls`): [`RustlsConnector`], the client's
//! [`TlsConnector`], on rustls with the ring provider.
//!
//! Invariant: certificates are always verified, against the Mozilla roots (`webpki-roots`) or
//! the roots given; there is no switch that turns verification off.

use std::io;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;

use crate::events::BoxFuture;
use crate::http_client::{Connection, TlsConnector};

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

    fn trusting(roots: RootCertStore) -> RustlsConnector {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
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
