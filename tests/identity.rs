//! Tokens from an identity provider: RS256, ES256, ES384 and EdDSA keys from a PEM file or a
//! JWKS served on 127.0.0.1 (with rotation), the claim rules, the attack list, and streams
//! that end with their token.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use artifact_events::config::Config;
use artifact_events::server::ClaimRules;
use bytes::Bytes;
use common::{config, request, send, SseClient, TestServer, SECRET};
use http_body_util::BodyExt;
use hyper::StatusCode;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const STREAM: &str = "/ai/artifact/events/stream";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A signing key of the fixtures, with the algorithm its tokens use.
#[derive(Clone, Copy)]
struct Signer {
    file: &'static str,
    algorithm: Algorithm,
}

const RSA: Signer = Signer {
    file: "rsa_private.pem",
    algorithm: Algorithm::RS256,
};
const OTHER_RSA: Signer = Signer {
    file: "rsa2_private.pem",
    algorithm: Algorithm::RS256,
};
const EC256: Signer = Signer {
    file: "ec256_private.pem",
    algorithm: Algorithm::ES256,
};
const EC384: Signer = Signer {
    file: "ec384_private.pem",
    algorithm: Algorithm::ES384,
};
const ED25519: Signer = Signer {
    file: "ed25519_private.pem",
    algorithm: Algorithm::EdDSA,
};

impl Signer {
    fn encoding_key(self) -> EncodingKey {
        let pem = std::fs::read(fixture(self.file)).unwrap();
        match self.algorithm {
            Algorithm::RS256 | Algorithm::PS256 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            other => panic!("no fixture for {other:?}"),
        }
        .unwrap()
    }

    /// The public file next to the private one.
    fn public_file(self) -> PathBuf {
        fixture(&self.file.replace("_private", "_public"))
    }

    fn sign(self, claims: &Value) -> String {
        self.sign_with(Header::new(self.algorithm), claims)
    }

    fn sign_with_kid(self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(kid.to_owned());
        self.sign_with(header, claims)
    }

    fn sign_with(self, header: Header, claims: &Value) -> String {
        jsonwebtoken::encode(&header, claims, &self.encoding_key()).unwrap()
    }

    /// This key's public half as a JWK named `kid`.
    fn jwk(self, kid: &str) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(&self.encoding_key(), self.algorithm).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        jwk
    }
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 600})
}

/// A server that accepts only the identity provider's public key in `file`, no HMAC.
fn pem_config(file: PathBuf) -> Config {
    let mut config = config();
    config.jwt_secret = None;
    config.jwt_public_key_file = Some(file);
    config
}

/// Opens a stream with `token`: the user id of its connected frame, or the 401's reason.
async fn stream_as(addr: SocketAddr, token: &str) -> Result<String, String> {
    let response = common::open(addr, request("GET", STREAM, Some(token), Bytes::new())).await;
    if response.status() != StatusCode::OK {
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let challenge = response.headers()["www-authenticate"].to_str().unwrap();
        assert!(challenge.contains("invalid_token"), "{challenge}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: Value = serde_json::from_slice(&body).unwrap();
        return Err(json["error"].as_str().unwrap().to_owned());
    }
    let mut client = SseClient::from_response(response);
    let first = client.next_event().await;
    assert_eq!(first["type"], "connected");
    Ok(first["user_id"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_pem_key_of_each_type_verifies_its_own_tokens_only() {
    for signer in [RSA, EC256, EC384, ED25519] {
        let server = TestServer::open(pem_config(signer.public_file())).await;
        let token = signer.sign(&claims("ada"));
        assert_eq!(stream_as(server.addr, &token).await, Ok("ada".to_owned()));
        // Another key of the same type: the signature does not verify.
        if signer.file == RSA.file {
            let forged = OTHER_RSA.sign(&claims("ada"));
            assert_eq!(
                stream_as(server.addr, &forged).await,
                Err("token signature is invalid".to_owned())
            );
        }
        // A key of another type: its algorithm is not this key's.
        let other = if signer.file == EC256.file {
            ED25519
        } else {
            EC256
        };
        assert_eq!(
            stream_as(server.addr, &other.sign(&claims("ada"))).await,
            Err("token algorithm is not accepted".to_owned())
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn hs256_signed_with_the_public_pem_is_refused_with_or_without_a_secret() {
    let public_pem = std::fs::read(RSA.public_file()).unwrap();
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("mallory"),
        &EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    let alone = TestServer::open(pem_config(RSA.public_file())).await;
    assert_eq!(
        stream_as(alone.addr, &confused).await,
        Err("token algorithm is not accepted".to_owned())
    );
    let mut both = pem_config(RSA.public_file());
    both.jwt_secret = config().jwt_secret;
    let both = TestServer::open(both).await;
    assert_eq!(
        stream_as(both.addr, &confused).await,
        Err("token signature is invalid".to_owned())
    );
    // The HMAC secret still works beside the key file, and so does the key.
    assert_eq!(
        stream_as(both.addr, &both.token("bob")).await,
        Ok("bob".into())
    );
    assert_eq!(
        stream_as(both.addr, &RSA.sign(&claims("carol"))).await,
        Ok("carol".into())
    );
}

#[tokio::test]
async fn alg_none_crit_and_a_blank_sub_are_refused_with_a_key_file() {
    let server = TestServer::open(pem_config(RSA.public_file())).await;
    let unsigned = {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(claims("mallory").to_string());
        format!("{header}.{body}.")
    };
    assert_eq!(
        stream_as(server.addr, &unsigned).await,
        Err("token algorithm is not accepted".to_owned())
    );
    let mut critical = Header::new(Algorithm::RS256);
    critical.crit = Some(vec!["exp".to_owned()]);
    assert_eq!(
        stream_as(server.addr, &RSA.sign_with(critical, &claims("ada"))).await,
        Err("token has a crit header parameter this server does not understand".to_owned())
    );
    for blank in ["", "   ", "\t\n"] {
        assert_eq!(
            stream_as(server.addr, &RSA.sign(&claims(blank))).await,
            Err("token has no sub claim".to_owned())
        );
    }
}

#[tokio::test]
async fn audience_and_issuer_are_required_when_configured() {
    let mut config = pem_config(EC256.public_file());
    config.jwt_rules.audience = vec!["artifact-events".into(), "second-app".into()];
    config.jwt_rules.issuer = Some("https://idp.test/".into());
    let server = TestServer::open(config).await;
    let exp = now() + 600;
    let cases = [
        (
            json!({"sub": "ada", "exp": exp, "aud": "artifact-events", "iss": "https://idp.test/"}),
            Ok("ada".to_owned()),
        ),
        (
            json!({"sub": "ada", "exp": exp, "aud": ["other", "second-app"], "iss": "https://idp.test/"}),
            Ok("ada".to_owned()),
        ),
        (
            json!({"sub": "ada", "exp": exp, "aud": "other-app", "iss": "https://idp.test/"}),
            Err("token audience (aud) is not accepted"),
        ),
        (
            json!({"sub": "ada", "exp": exp, "iss": "https://idp.test/"}),
            Err("token has no aud claim"),
        ),
        (
            json!({"sub": "ada", "exp": exp, "aud": "artifact-events", "iss": "https://evil.test/"}),
            Err("token issuer (iss) is not accepted"),
        ),
        (
            json!({"sub": "ada", "exp": exp, "aud": "artifact-events"}),
            Err("token has no iss claim"),
        ),
    ];
    for (claims, expected) in cases {
        let outcome = stream_as(server.addr, &EC256.sign(&claims)).await;
        assert_eq!(outcome, expected.map_err(str::to_owned), "{claims}");
    }
}

#[tokio::test]
async fn the_leeway_applies_to_exp_and_nbf() {
    let mut config = pem_config(ED25519.public_file());
    config.jwt_rules.leeway_secs = 30;
    let lenient = TestServer::open(config.clone()).await;
    config.jwt_rules.leeway_secs = 0;
    let strict = TestServer::open(config).await;
    let just_expired = json!({"sub": "ada", "exp": now() - 10});
    let long_expired = json!({"sub": "ada", "exp": now() - 120});
    let soon_valid = json!({"sub": "ada", "exp": now() + 600, "nbf": now() + 10});
    let later_valid = json!({"sub": "ada", "exp": now() + 600, "nbf": now() + 120});
    let expired = Err("token has expired".to_owned());
    let not_yet = Err("token is not valid yet (nbf)".to_owned());
    let sign = |claims: &Value| ED25519.sign(claims);
    assert_eq!(
        stream_as(lenient.addr, &sign(&just_expired)).await,
        Ok("ada".into())
    );
    assert_eq!(stream_as(lenient.addr, &sign(&long_expired)).await, expired);
    assert_eq!(
        stream_as(lenient.addr, &sign(&soon_valid)).await,
        Ok("ada".into())
    );
    assert_eq!(stream_as(lenient.addr, &sign(&later_valid)).await, not_yet);
    assert_eq!(stream_as(strict.addr, &sign(&just_expired)).await, expired);
    assert_eq!(stream_as(strict.addr, &sign(&soon_valid)).await, not_yet);
}

#[tokio::test]
async fn jwt_algorithms_narrows_what_a_key_accepts() {
    let mut config = pem_config(RSA.public_file());
    config.jwt_rules.algorithms = Some(vec![Algorithm::PS256]);
    let server = TestServer::open(config).await;
    assert_eq!(
        stream_as(server.addr, &RSA.sign(&claims("ada"))).await,
        Err("token algorithm is not accepted".to_owned())
    );
    let ps256 = Signer {
        algorithm: Algorithm::PS256,
        ..RSA
    };
    assert_eq!(
        stream_as(server.addr, &ps256.sign(&claims("ada"))).await,
        Ok("ada".into())
    );
}

#[tokio::test]
async fn the_publisher_role_claim_works_with_a_key_file() {
    let server = TestServer::open(pem_config(EC384.public_file())).await;
    let publisher = EC384.sign(&json!({"sub": "backend", "exp": now() + 600, "role": "publisher"}));
    let user = EC384.sign(&claims("backend"));
    let body = json!({"event_type": "artifact.completed", "event_data": {"user_id": "ada", "job_id": "j1", "result": {}}});
    for (token, status) in [
        (publisher, StatusCode::ACCEPTED),
        (user, StatusCode::FORBIDDEN),
    ] {
        let reply = send(
            server.addr,
            request("POST", "/ai/events/publish", Some(&token), body.to_string()),
        )
        .await;
        assert_eq!(reply.status, status, "{:?}", reply.body);
    }
}

/// A JWKS endpoint on 127.0.0.1 whose document (or failure) the test changes while the
/// server runs, and which counts the fetches.
struct JwksServer {
    url: String,
    /// `None` answers 500.
    document: Arc<Mutex<Option<String>>>,
    fetches: Arc<Mutex<usize>>,
}

impl JwksServer {
    async fn start(keys: Vec<Jwk>) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let document = Arc::new(Mutex::new(Some(jwks(keys))));
        let fetches = Arc::new(Mutex::new(0));
        let (shared_document, shared_fetches) = (document.clone(), fetches.clone());
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut buffer = [0u8; 1024];
                while !head.windows(4).any(|window| window == b"\r\n\r\n") {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(read) => head.extend_from_slice(&buffer[..read]),
                    }
                }
                *shared_fetches.lock().unwrap() += 1;
                let answer = match shared_document.lock().unwrap().clone() {
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    None => "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned(),
                };
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        JwksServer {
            url,
            document,
            fetches,
        }
    }

    fn serve(&self, keys: Option<Vec<Jwk>>) {
        *self.document.lock().unwrap() = keys.map(jwks);
    }

    fn fetches(&self) -> usize {
        *self.fetches.lock().unwrap()
    }
}

fn jwks(keys: Vec<Jwk>) -> String {
    serde_json::to_string(&JwkSet { keys }).unwrap()
}

fn jwks_config(url: &str) -> Config {
    let mut config = config();
    config.jwt_secret = None;
    config.jwt_jwks_url = Some(url.to_owned());
    config
}

#[tokio::test]
async fn a_jwks_kid_selects_the_key_and_rotation_needs_no_restart() {
    let provider = JwksServer::start(vec![RSA.jwk("rsa-1"), ED25519.jwk("ed-1")]).await;
    let server = TestServer::open(jwks_config(&provider.url)).await;
    let started = Instant::now();
    assert_eq!(provider.fetches(), 1, "fetched once at start");
    let rsa = RSA.sign_with_kid("rsa-1", &claims("ada"));
    let ed = ED25519.sign_with_kid("ed-1", &claims("bob"));
    assert_eq!(stream_as(server.addr, &rsa).await, Ok("ada".into()));
    assert_eq!(stream_as(server.addr, &ed).await, Ok("bob".into()));
    // A kid the set has, but whose key is of another type.
    let mismatched = EC256.sign_with_kid("rsa-1", &claims("mallory"));
    assert_eq!(
        stream_as(server.addr, &mismatched).await,
        Err("token kid names no known key".to_owned())
    );

    // An unknown kid within 10 s of the last fetch: refused without asking the provider.
    let rotated = EC256.sign_with_kid("ec-2", &claims("carol"));
    let unknown = Err("token kid names no known key".to_owned());
    assert_eq!(stream_as(server.addr, &rotated).await, unknown);
    assert_eq!(provider.fetches(), 1, "refetches are rate-limited");

    // Past the interval, a refetch that fails keeps the cached keys.
    provider.serve(None);
    tokio::time::sleep_until((started + Duration::from_secs(10)).into()).await;
    assert_eq!(stream_as(server.addr, &rotated).await, unknown);
    assert_eq!(provider.fetches(), 2);
    assert_eq!(stream_as(server.addr, &rsa).await, Ok("ada".into()));

    // The provider rotates: a new key appears, and the old one goes.
    provider.serve(Some(vec![EC256.jwk("ec-2"), ED25519.jwk("ed-1")]));
    tokio::time::sleep_until((started + Duration::from_secs(22)).into()).await;
    assert_eq!(stream_as(server.addr, &rotated).await, Ok("carol".into()));
    assert_eq!(provider.fetches(), 3);
    assert_eq!(stream_as(server.addr, &ed).await, Ok("bob".into()));
    // A forgotten key's token: its kid is unknown, and the interval has not passed.
    assert_eq!(stream_as(server.addr, &rsa).await, unknown);
    assert_eq!(provider.fetches(), 3);
}

#[tokio::test]
async fn without_a_kid_the_only_key_of_the_algorithm_is_used() {
    let provider = JwksServer::start(vec![
        RSA.jwk("rsa-1"),
        OTHER_RSA.jwk("rsa-2"),
        EC256.jwk("ec"),
    ])
    .await;
    let server = TestServer::open(jwks_config(&provider.url)).await;
    assert_eq!(
        stream_as(server.addr, &EC256.sign(&claims("ada"))).await,
        Ok("ada".into())
    );
    assert_eq!(
        stream_as(server.addr, &RSA.sign(&claims("ada"))).await,
        Err("token has no kid, and no single key of its algorithm can verify it".to_owned())
    );
}

#[test]
fn a_jwks_that_cannot_be_fetched_refuses_the_start() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", closed.local_addr().unwrap());
    drop(closed);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_artifact-events"))
        .env_clear()
        .env("ADDR", "127.0.0.1:0")
        .env("JWT_JWKS_URL", &url)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("JWT_JWKS_URL could not be fetched"),
        "{stderr}"
    );
}

#[test]
fn a_short_jwt_secret_refuses_the_start_and_says_why() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_artifact-events"))
        .env_clear()
        .env("ADDR", "127.0.0.1:0")
        .env("JWT_SECRET", "change-me")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("JWT_SECRET: is 9 bytes, and at least 32 are needed"),
        "{stderr}"
    );
    assert!(stderr.contains("brute-forced offline"), "{stderr}");
}

#[tokio::test]
async fn a_stream_ends_with_its_token_and_a_fresh_token_resumes_it_without_loss() {
    let mut settings = config();
    settings.jwt_rules = ClaimRules {
        leeway_secs: 1,
        ..settings.jwt_rules
    };
    let server = TestServer::start(settings).await;
    let short = server
        .state
        .auth
        .issue("ada", false, Duration::from_secs(2));
    let valid_until = now() + 2 + 1;
    let mut stream = SseClient::connected(server.addr, &short).await;
    let completed =
        |job: &str| json!({"user_id": "ada", "job_id": job, "artifact_type": "quiz", "result": {}});
    common::publish_http(&server, "artifact.completed", completed("before")).await;
    let (last_id, event) = stream.next_event_with_id().await;
    assert_eq!(event["job_id"], "before");

    // The last frame names the reason, and the stream ends; not before the token's end.
    let expired = loop {
        match stream.next_frame().await {
            Some(frame) if frame == ": keepalive\n\n" => continue,
            frame => break frame,
        }
    };
    assert_eq!(
        expired.as_deref(),
        Some("data: {\"type\":\"token_expired\"}\n\n")
    );
    assert!(now() >= valid_until - 1, "ended early");
    assert_eq!(stream.next_frame().await, None);

    // While the client fetches a fresh token, events keep coming.
    common::publish_http(&server, "artifact.completed", completed("between")).await;
    let fresh = server.token("ada");
    let mut resumed = request("GET", STREAM, Some(&fresh), Bytes::new());
    resumed
        .headers_mut()
        .insert("last-event-id", last_id.unwrap().parse().unwrap());
    let mut stream = SseClient::from_response(common::open(server.addr, resumed).await);
    assert_eq!(stream.next_event().await["type"], "connected");
    assert_eq!(stream.next_event().await["job_id"], "between");
    common::publish_http(&server, "artifact.completed", completed("after")).await;
    assert_eq!(stream.next_event().await["job_id"], "after");
}

#[test]
fn a_forged_log_line_in_a_signed_sub_is_escaped_and_a_long_sub_is_capped() {
    let server = common::RunningServer::start(&[]);
    let auth = artifact_events::server::Authenticator::new(SECRET.as_bytes(), Algorithm::HS256);
    let forged = "ada\n2026-01-01T00:00:00Z ERROR forged line";
    let long = "x".repeat(10_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for sub in [forged, long.as_str()] {
        let token = auth.issue(sub, false, Duration::from_secs(600));
        let body = json!({
            "notebook_id": "nb",
            "artifact_type": "quiz",
            "content": "Photosynthesis turns light into sugar in the leaves of plants.",
            "options": {"num_questions": 3},
        });
        runtime.block_on(common::generate(server.addr, &token, &body));
    }
    let (_, log) = server.terminate();
    assert!(
        !log.lines()
            .any(|line| line.starts_with("2026-01-01T00:00:00Z ERROR")),
        "a forged line reached the log:\n{log}"
    );
    assert!(
        log.contains("user ada\\n2026-01-01T00:00:00Z ERROR forged line"),
        "{log}"
    );
    let longest = log.lines().map(str::len).max().unwrap();
    assert!(longest < 4096 + 200, "a {longest}-byte log line");
}
