//! The OpenAI-compatible generator over https:// (feature `tls`): against a fake model server
//! on 127.0.0.1 that speaks TLS with a certificate this test generates.

mod common;

use std::sync::Arc;
use std::time::Duration;

use artifact_events::backends::tls::RustlsConnector;
use artifact_events::http_client::TlsConnector;
use artifact_events::jobs::generator::OpenAiSettings;
use artifact_events::jobs::OpenAiGenerator;
use artifact_events::secret::Secret;
use common::model_server::{quiz, ModelServer, Reply};
use common::{config, SseClient, TestServer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};

/// A fake model server speaking TLS for `localhost` and 127.0.0.1; returns it and its
/// certificate (DER), which no public authority signed.
async fn https_model_server(script: Vec<Reply>) -> (ModelServer, Vec<u8>) {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let rcgen::CertifiedKey { cert, key_pair } = rcgen::generate_simple_self_signed(names).unwrap();
    let certificate = cert.der().to_vec();
    let key = PrivateKeyDer::Pkcs8(key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(certificate.clone())], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let model = ModelServer::start_wrapped(script, Reply::error(500, "unscripted"), move |tcp| {
        let acceptor = acceptor.clone();
        async move {
            acceptor
                .accept(tcp)
                .await
                .expect("the TLS handshake succeeds")
        }
    })
    .await;
    (model, certificate)
}

/// Runs one quiz job for alice on a server whose generator talks to `model` at `base_url`
/// through `tls`; returns the job's last event.
async fn run_job(base_url: String, tls: Arc<dyn TlsConnector>) -> Value {
    let settings = OpenAiSettings {
        base_url,
        api_key: Some(Secret::new("sk-tls-test")),
        model: "fake-model".to_owned(),
        timeout: Duration::from_secs(5),
        max_tokens: 1000,
    };
    let mut settings_config = config();
    settings_config.max_retries = 0;
    let generator = OpenAiGenerator::new(settings, Some(tls), settings_config.job_timeout);
    let server = TestServer::start_with_generator(settings_config, Arc::new(generator)).await;
    let token = server.token("alice");
    let mut client = SseClient::connected(server.addr, &token).await;
    let body = json!({"notebook_id": "nb-1", "artifact_type": "quiz", "content": "Create quiz on cells", "options": {"num_questions": 2}});
    common::generate(server.addr, &token, &body).await;
    let last = loop {
        let event = client.next_event().await;
        if event["status"] != "running" {
            break event;
        }
    };
    server.stop().await;
    last
}

#[tokio::test]
async fn a_job_completes_over_https_with_a_trusted_certificate() {
    let (model, certificate) = https_model_server(vec![Reply::artifact(&quiz(2))]).await;
    let tls = Arc::new(RustlsConnector::with_root_certificate(&certificate).unwrap());

    let completed = run_job(format!("https://localhost:{}/v1", model.addr.port()), tls).await;

    assert_eq!(completed["result"], quiz(2), "{completed}");
    let requests = model.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].header("authorization"),
        Some("Bearer sk-tls-test")
    );
    assert_eq!(
        requests[0].header("host"),
        Some(format!("localhost:{}", model.addr.port()).as_str())
    );
}

#[tokio::test]
async fn a_certificate_no_trusted_authority_signed_is_refused() {
    let (model, _) = https_model_server(vec![Reply::artifact(&quiz(2))]).await;
    let tls = Arc::new(RustlsConnector::with_webpki_roots());

    let failed = run_job(format!("https://127.0.0.1:{}/v1", model.addr.port()), tls).await;

    let error = failed["error"].as_str().unwrap();
    let expected = format!(
        "generation failed: the model server is unreachable: TLS handshake with 127.0.0.1:{} failed: invalid peer certificate: UnknownIssuer",
        model.addr.port()
    );
    assert_eq!(error, expected);
    assert!(model.requests().is_empty());
}
