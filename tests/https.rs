//! The server's HTTPS (feature `tls`), run as the binary with `TLS_CERT_FILE` and
//! `TLS_KEY_FILE`: ALPN chooses HTTP/2 or HTTP/1.1, and SIGHUP reloads the certificate while
//! open streams carry on.

mod common;

use std::time::Duration;

use artifact_events::backends::tls::RustlsConnector;
use artifact_events::http_client::{Connection, TlsConnector};
use bytes::Bytes;
use common::{binary_publisher_token, binary_token, RunningServer, SseClient, TempDir, PATIENCE};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const STREAM: &str = "/ai/artifact/events/stream";

/// A self-signed certificate for localhost and 127.0.0.1, written as PEM into `dir`; returns
/// the file paths and the certificate's DER, for a client to trust.
fn write_certificate(dir: &TempDir) -> (String, String, Vec<u8>) {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let rcgen::CertifiedKey { cert, key_pair } = rcgen::generate_simple_self_signed(names).unwrap();
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key_pair.serialize_pem()).unwrap();
    let path = |file: std::path::PathBuf| file.to_str().unwrap().to_owned();
    (path(cert_file), path(key_file), cert.der().to_vec())
}

fn start(cert_file: &str, key_file: &str) -> RunningServer {
    RunningServer::start(&[("TLS_CERT_FILE", cert_file), ("TLS_KEY_FILE", key_file)])
}

/// A TLS connection to `server` that trusts only `root` and offers `alpn`.
async fn tls(
    server: &RunningServer,
    root: &[u8],
    alpn: &[u8],
) -> std::io::Result<Box<dyn Connection>> {
    let connector = RustlsConnector::with_root_certificate(root)
        .unwrap()
        .offering(&[alpn]);
    let tcp = TcpStream::connect(server.addr).await?;
    connector.connect("localhost".to_owned(), tcp).await
}

type ResponseFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = hyper::Result<Response<Incoming>>> + Send>>;

/// Sends `request` on its own connection, over HTTP/2 or HTTP/1.1 as `alpn` says.
async fn send(
    server: &RunningServer,
    root: &[u8],
    alpn: &[u8],
    request: Request<Full<Bytes>>,
) -> Response<Incoming> {
    let io = TokioIo::new(
        tls(server, root, alpn)
            .await
            .expect("the handshake succeeds"),
    );
    let response: ResponseFuture = if alpn == b"h2" {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(connection);
        Box::pin(sender.send_request(request))
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        Box::pin(sender.send_request(request))
    };
    tokio::time::timeout(PATIENCE, response)
        .await
        .expect("the response head arrives in time")
        .unwrap()
}

fn stream_request(user: &str) -> Request<Full<Bytes>> {
    Request::get(format!("https://localhost{STREAM}"))
        .header("host", "localhost")
        .header("authorization", format!("Bearer {}", binary_token(user)))
        .body(Full::default())
        .unwrap()
}

async fn stream(server: &RunningServer, root: &[u8], alpn: &[u8], user: &str) -> SseClient {
    let response = send(server, root, alpn, stream_request(user)).await;
    let expected = if alpn == b"h2" {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    assert_eq!(response.version(), expected);
    let mut client = SseClient::from_response(response);
    assert_eq!(client.status, StatusCode::OK);
    let first = client.next_frame().await.unwrap();
    assert!(first.contains("\"type\":\"connected\""), "{first:?}");
    client
}

async fn publish(server: &RunningServer, root: &[u8], user: &str, n: u32) {
    let body = json!({"event_type": "artifact.completed", "event_data": {"user_id": user, "n": n}});
    let request = Request::post("https://localhost/ai/events/publish")
        .header("host", "localhost")
        .header(
            "authorization",
            format!("Bearer {}", binary_publisher_token()),
        )
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = send(server, root, b"http/1.1", request).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

/// Waits until the server logs a line containing `text`.
fn wait_for_log(server: &RunningServer, text: &str) -> String {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(line) = server
            .log_lines()
            .into_iter()
            .find(|line| line.contains(text))
        {
            return line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no log line with {text:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hang_up(server: &RunningServer) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn alpn_chooses_http2_or_http11_and_streams_work_on_both() {
    let dir = TempDir::new("https-alpn");
    let (cert_file, key_file, root) = write_certificate(&dir);
    let server = start(&cert_file, &key_file);
    let mut over_h2 = stream(&server, &root, b"h2", "alice").await;
    let mut over_h1 = stream(&server, &root, b"http/1.1", "alice").await;

    publish(&server, &root, "alice", 1).await;
    assert_eq!(over_h2.next_event().await["n"], 1);
    assert_eq!(over_h1.next_event().await["n"], 1);
    // Cleartext on the HTTPS port gets no answer, not an unencrypted one.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let plain = common::request("GET", "/healthz", None, "");
    let plain = tokio::time::timeout(PATIENCE, sender.send_request(plain))
        .await
        .unwrap();
    assert!(plain.is_err(), "{plain:?}");
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_open_streams_carry_on() {
    let dir = TempDir::new("https-reload");
    let (cert_file, key_file, old_root) = write_certificate(&dir);
    let server = start(&cert_file, &key_file);
    let mut over_h2 = stream(&server, &old_root, b"h2", "bob").await;
    let mut over_h1 = stream(&server, &old_root, b"http/1.1", "bob").await;

    let (_, _, new_root) = write_certificate(&dir);
    hang_up(&server);
    wait_for_log(&server, "reloaded the TLS certificate");

    let refused = tls(&server, &old_root, b"h2").await;
    assert!(refused.is_err(), "the old certificate is no longer served");
    publish(&server, &new_root, "bob", 7).await;
    assert_eq!(over_h2.next_event().await["n"], 7);
    assert_eq!(over_h1.next_event().await["n"], 7);
    let mut fresh = stream(&server, &new_root, b"h2", "bob").await;
    publish(&server, &new_root, "bob", 8).await;
    assert_eq!(fresh.next_event().await["n"], 8);
}

#[tokio::test]
async fn a_reload_that_fails_keeps_the_certificate_in_use() {
    let dir = TempDir::new("https-bad-reload");
    let (cert_file, key_file, root) = write_certificate(&dir);
    let server = start(&cert_file, &key_file);

    std::fs::write(&cert_file, "not a certificate").unwrap();
    hang_up(&server);
    let line = wait_for_log(&server, "kept the previous TLS certificate");
    assert!(line.contains("TLS_CERT_FILE"), "{line}");

    let mut client = stream(&server, &root, b"h2", "carol").await;
    publish(&server, &root, "carol", 1).await;
    assert_eq!(client.next_event().await["n"], 1);
}

#[test]
fn unreadable_tls_files_stop_the_start_naming_the_file() {
    let dir = TempDir::new("https-missing");
    let missing = dir.join("missing.pem");
    let missing = missing.to_str().unwrap();
    let output = std::process::Command::new(common::BINARY)
        .env_remove("REDIS_URL")
        .env("ADDR", "127.0.0.1:0")
        .env("JWT_SECRET", common::SECRET)
        .env("TLS_CERT_FILE", missing)
        .env("TLS_KEY_FILE", missing)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("TLS_CERT_FILE") && stderr.contains(missing),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_http2_client_that_sends_no_preface_after_the_handshake_is_closed_in_time() {
    let dir = TempDir::new("https-preface");
    let (cert_file, key_file, root) = write_certificate(&dir);
    let server = RunningServer::start(&[
        ("TLS_CERT_FILE", &cert_file),
        ("TLS_KEY_FILE", &key_file),
        ("HEADER_READ_TIMEOUT_SECS", "1"),
    ]);
    let mut silent = tls(&server, &root, b"h2").await.unwrap();
    let mut byte = [0; 1];
    let read = tokio::time::timeout(PATIENCE, silent.read(&mut byte))
        .await
        .expect("the server closes the connection in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // A client that does send the preface is served on the same server.
    let response = send(
        &server,
        &root,
        b"h2",
        common::request("GET", "/healthz", None, ""),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
}
