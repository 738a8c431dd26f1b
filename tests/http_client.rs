//! The outbound HTTP client against scripted servers on 127.0.0.1: what it sends, what it
//! returns, and how each limit and refusal ends a request.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use artifact_events::http_client::{is_public_address, Client, Error, Limits, Request, Response};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, LOCATION};
use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long any single wait in a test may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(10);
/// The body cap of the size tests.
const CAP: usize = 1024;

/// A request as a scripted server read it off the socket.
#[derive(Debug)]
struct Received {
    request_line: String,
    /// Names in lower case, in the order sent.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    /// The one value of header `name`; fails the test if it was sent more than once.
    fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.iter().filter(|(n, _)| n == name);
        let value = values.next().map(|(_, value)| value.as_str());
        assert!(values.next().is_none(), "{name} sent twice");
        value
    }
}

/// A server for one connection: reads the request, writes `reply`, then hangs up.
async fn answer_once(reply: impl Into<Vec<u8>>) -> (SocketAddr, JoinHandle<Received>) {
    serve(reply.into(), false).await
}

/// A server for one connection: reads the request, writes `reply` (perhaps nothing, perhaps only
/// a head), then keeps the connection open until the client hangs up.
async fn answer_and_hold(reply: impl Into<Vec<u8>>) -> (SocketAddr, JoinHandle<Received>) {
    serve(reply.into(), true).await
}

async fn serve(reply: Vec<u8>, hold: bool) -> (SocketAddr, JoinHandle<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let received = read_request(&mut stream).await;
        stream.write_all(&reply).await.unwrap();
        if hold {
            let mut rest = [0; 64];
            while stream.read(&mut rest).await.unwrap_or(0) > 0 {}
        }
        received
    });
    (addr, task)
}

/// Reads one request: the head up to the blank line, then a `Content-Length` body.
async fn read_request(stream: &mut TcpStream) -> Received {
    let mut bytes = Vec::new();
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let mut chunk = [0; 1024];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the client hung up before the end of the head");
        bytes.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(bytes[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap().to_owned();
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    let mut body = bytes[head_end + 4..].to_vec();
    let length = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .map_or(0, |(_, value)| value.parse().unwrap());
    while body.len() < length {
        let mut chunk = [0; 1024];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the client hung up before the end of the body");
        body.extend_from_slice(&chunk[..n]);
    }
    Received {
        request_line,
        headers,
        body,
    }
}

/// A listener nobody accepts on, to prove that no connection was made to it.
fn untouched_listener() -> std::net::TcpListener {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    listener
}

/// Fails unless no connection is waiting on `listener`: the kernel queues a connection the
/// moment the client's connect returns, so one made during the request would be here now.
fn assert_never_connected(listener: &std::net::TcpListener) {
    match listener.accept() {
        Err(error) if error.kind() == ErrorKind::WouldBlock => {}
        other => panic!("something connected: {other:?}"),
    }
}

/// An address nothing listens on: bound to find a free port, then released.
async fn closed_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A client that gives up long before the test would.
fn client(max_response_bytes: usize) -> Client {
    let limits = Limits {
        connect_timeout: Duration::from_secs(2),
        total_timeout: Duration::from_secs(5),
        max_response_bytes,
    };
    Client {
        limits,
        ..Client::default()
    }
}

async fn send(client: Client, request: Request) -> Result<Response, Error> {
    tokio::time::timeout(PATIENCE, client.send(request))
        .await
        .expect("the client's own timeouts end every request")
}

/// Waits for the scripted server's task: it ends once the client has hung up.
async fn received(server: JoinHandle<Received>) -> Received {
    tokio::time::timeout(PATIENCE, server)
        .await
        .expect("the client hung up")
        .unwrap()
}

#[tokio::test]
async fn get_sends_host_user_agent_and_connection_close_and_returns_the_whole_response() {
    let (addr, server) =
        answer_once("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Reply: yes\r\n\r\nhello").await;

    let request = Request::get(format!("http://{addr}/jwks?kid=1#ignored")).header(
        "x-request-id".parse().unwrap(),
        HeaderValue::from_static("abc"),
    );
    let response = send(client(CAP), request).await.unwrap();

    assert_eq!(response.status, 200);
    assert_eq!(response.headers["x-reply"], "yes");
    assert_eq!(&response.body[..], b"hello");
    let received = received(server).await;
    assert_eq!(received.request_line, "GET /jwks?kid=1 HTTP/1.1");
    assert_eq!(received.header("host"), Some(addr.to_string().as_str()));
    let user_agent = format!("artifact-events/{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(received.header("user-agent"), Some(user_agent.as_str()));
    assert_eq!(received.header("connection"), Some("close"));
    assert_eq!(received.header("x-request-id"), Some("abc"));
    assert_eq!(received.header("content-length"), None);
    assert_eq!(received.header("transfer-encoding"), None);
    assert!(received.body.is_empty());
}

#[tokio::test]
async fn post_sends_a_json_body_with_its_length_and_reads_a_chunked_reply() {
    let reply = "HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n\
                 5\r\n{\"ok\"\r\n6\r\n:true}\r\n0\r\n\r\n";
    let (addr, server) = answer_once(reply).await;
    let json = br#"{"event":"artifact.ready","n":1}"#;

    let request = Request::post(format!("http://{addr}/hooks/1"), &json[..])
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(AUTHORIZATION, HeaderValue::from_static("Bearer t0ken"));
    let response = send(client(CAP), request).await.unwrap();

    assert_eq!(response.status, 201);
    assert_eq!(&response.body[..], br#"{"ok":true}"#);
    let received = received(server).await;
    assert_eq!(received.request_line, "POST /hooks/1 HTTP/1.1");
    assert_eq!(received.header("content-type"), Some("application/json"));
    assert_eq!(received.header("authorization"), Some("Bearer t0ken"));
    let length = json.len().to_string();
    assert_eq!(received.header("content-length"), Some(length.as_str()));
    assert_eq!(received.header("connection"), Some("close"));
    assert_eq!(received.body, json);
}

#[tokio::test]
async fn other_methods_are_sent_as_given() {
    let (addr, server) = answer_once("HTTP/1.1 204 No Content\r\n\r\n").await;

    let request = Request::new(Method::DELETE, format!("http://{addr}"));
    let response = send(client(CAP), request).await.unwrap();

    assert_eq!(response.status, 204);
    assert_eq!(received(server).await.request_line, "DELETE / HTTP/1.1");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_at_the_total_deadline() {
    let (addr, server) = answer_and_hold("").await;
    let deadline = Duration::from_millis(300);
    let mut client = client(CAP);
    client.limits.total_timeout = deadline;

    let started = Instant::now();
    let result = send(client, Request::get(format!("http://{addr}/"))).await;
    let took = started.elapsed();

    assert!(
        matches!(result, Err(Error::Timeout(limit)) if limit == deadline),
        "{result:?}"
    );
    assert!(took >= deadline, "gave up after {took:?}");
    assert!(
        took < deadline + Duration::from_secs(2),
        "gave up after {took:?}"
    );
    // The server's task ends only when the client has closed the connection.
    assert_eq!(received(server).await.request_line, "GET / HTTP/1.1");
}

#[tokio::test]
async fn a_declared_length_over_the_cap_is_refused_before_the_body_arrives() {
    // The head alone: a client that waited for the body would time out instead.
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", CAP + 1);
    let (addr, server) = answer_and_hold(head).await;

    let result = send(client(CAP), Request::get(format!("http://{addr}/"))).await;

    assert!(matches!(result, Err(Error::TooLarge(CAP))), "{result:?}");
    received(server).await;
}

#[tokio::test]
async fn a_chunked_body_is_refused_at_the_first_chunk_past_the_cap() {
    // Three chunks of half the cap and no final chunk: only the cap can end this request.
    let half = "x".repeat(CAP / 2);
    let chunk = format!("{:x}\r\n{half}\r\n", half.len());
    let reply =
        format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}{chunk}");
    let (addr, server) = answer_and_hold(reply).await;

    let result = send(client(CAP), Request::get(format!("http://{addr}/"))).await;

    assert!(matches!(result, Err(Error::TooLarge(CAP))), "{result:?}");
    received(server).await;
}

#[tokio::test]
async fn a_body_exactly_at_the_cap_is_returned_whole() {
    let body = "y".repeat(CAP);
    let declared = format!("HTTP/1.1 200 OK\r\nContent-Length: {CAP}\r\n\r\n{body}");
    let half = &body[..CAP / 2];
    let chunk = format!("{:x}\r\n{half}\r\n", half.len());
    let chunked =
        format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n");

    for reply in [declared, chunked] {
        let (addr, _server) = answer_once(reply).await;
        let response = send(client(CAP), Request::get(format!("http://{addr}/")))
            .await
            .unwrap();
        assert_eq!(response.body, body.as_bytes());
    }
}

#[tokio::test]
async fn a_redirect_is_returned_to_the_caller_and_not_followed() {
    let target = untouched_listener();
    let location = format!("http://{}/elsewhere", target.local_addr().unwrap());
    let reply = format!("HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n");
    let (addr, server) = answer_once(reply).await;

    let response = send(client(CAP), Request::get(format!("http://{addr}/old")))
        .await
        .unwrap();

    assert_eq!(response.status, 302);
    assert_eq!(response.headers[LOCATION], location.as_str());
    assert_eq!(received(server).await.request_line, "GET /old HTTP/1.1");
    assert_never_connected(&target);
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error_naming_the_server() {
    let addr = closed_address().await;

    let result = send(client(CAP), Request::get(format!("http://{addr}/"))).await;

    match result {
        Err(Error::Connect { server, source }) => {
            assert_eq!(server, addr.to_string());
            assert_eq!(source.kind(), ErrorKind::ConnectionRefused);
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_https_url_is_refused_for_want_of_tls_without_connecting() {
    let listener = untouched_listener();
    let url = format!("https://{}/", listener.local_addr().unwrap());

    let error = send(client(CAP), Request::get(url)).await.unwrap_err();

    assert!(matches!(error, Error::TlsUnavailable), "{error:?}");
    assert!(error.to_string().contains("`tls` cargo feature"), "{error}");
    assert_never_connected(&listener);
}

#[tokio::test]
async fn the_public_address_policy_refuses_loopback_before_connecting() {
    let listener = untouched_listener();
    let port = listener.local_addr().unwrap().port();
    let mut public_only = client(CAP);
    public_only.address_policy = Some(is_public_address);

    for host in ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"] {
        let url = format!("http://{host}:{port}/");
        match send(public_only.clone(), Request::get(url)).await {
            Err(Error::AddressRefused {
                host: refused,
                address,
            }) => {
                assert_eq!(refused, host);
                assert!(address.to_canonical().is_loopback(), "{address}");
            }
            other => panic!("{host}: expected a refusal, got {other:?}"),
        }
    }
    assert_never_connected(&listener);
}

#[tokio::test]
async fn the_address_policy_is_what_decides() {
    let (addr, server) = answer_once("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
    let mut loopback_only = client(CAP);
    loopback_only.address_policy = Some(|address| address.is_loopback());

    let response = send(loopback_only, Request::get(format!("http://{addr}/")))
        .await
        .unwrap();

    assert_eq!(response.status, 200);
    received(server).await;
}

#[tokio::test]
async fn no_error_message_holds_a_header_value_the_body_the_path_or_the_query() {
    let request = |addr: SocketAddr| {
        let url = format!("http://{addr}/hooks/SECRET-path?sig=SECRET-query");
        Request::post(url, "SECRET-body")
            .header(
                AUTHORIZATION,
                HeaderValue::from_static("Bearer SECRET-token"),
            )
            .header(
                "x-signature".parse().unwrap(),
                HeaderValue::from_static("SECRET-sig"),
            )
    };
    let loopback = "127.0.0.1:9".parse().unwrap();
    let mut impatient = client(CAP);
    impatient.limits.total_timeout = Duration::from_millis(100);
    let mut public_only = client(CAP);
    public_only.address_policy = Some(is_public_address);
    let mut unsendable = request(loopback);
    unsendable.url.push_str(" SECRET-space");
    let (silent, _server) = answer_and_hold("").await;
    let (huge, _server) = answer_and_hold("HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\n").await;
    let (garbled, _server) = answer_once("garbage, not HTTP\r\n\r\n").await;

    let errors = [
        failure(client(CAP), request(closed_address().await)).await,
        failure(impatient, request(silent)).await,
        failure(client(CAP), request(huge)).await,
        failure(client(CAP), request(garbled)).await,
        failure(public_only, request(loopback)).await,
        failure(client(CAP), unsendable).await,
    ];

    let variants = errors.each_ref().map(variant);
    let expected = [
        "Connect",
        "Timeout",
        "TooLarge",
        "Protocol",
        "AddressRefused",
        "InvalidUrl",
    ];
    assert_eq!(variants, expected);
    for error in &errors {
        let (display, debug) = (error.to_string(), format!("{error:?}"));
        assert!(!display.is_empty());
        assert!(
            !display.contains("SECRET") && !debug.contains("SECRET"),
            "{display} / {debug}"
        );
    }
}

async fn failure(client: Client, request: Request) -> Error {
    send(client, request)
        .await
        .expect_err("the request was meant to fail")
}

fn variant(error: &Error) -> &'static str {
    match error {
        Error::InvalidUrl(_) => "InvalidUrl",
        Error::TlsUnavailable => "TlsUnavailable",
        Error::Tls { .. } => "Tls",
        Error::AddressRefused { .. } => "AddressRefused",
        Error::Connect { .. } => "Connect",
        Error::Timeout(_) => "Timeout",
        Error::TooLarge(_) => "TooLarge",
        Error::Protocol(_) => "Protocol",
    }
}
