//! Every stream feature over HTTP/2, with hyper's own HTTP/2 client on cleartext h2c (prior
//! knowledge) to a real server on 127.0.0.1: many streams multiplexed on one connection, auth
//! in header, query and cookie, `Last-Event-ID`, keepalives, a slow stream ended alone, the
//! per-user and global limits counting streams, and graceful shutdown with GOAWAY.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use artifact_events::events::EventType;
use artifact_events::server::MAX_CONCURRENT_STREAMS;
use bytes::Bytes;
use common::{config, SseClient, TestServer, PATIENCE};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const STREAM: &str = "/ai/artifact/events/stream";

/// One HTTP/2 connection from hyper's client; its connection task runs in the background.
struct H2 {
    addr: SocketAddr,
    sender: SendRequest<Full<Bytes>>,
    connection: JoinHandle<Result<(), hyper::Error>>,
}

impl H2 {
    async fn connect(addr: SocketAddr) -> H2 {
        Self::connect_with(addr, http2::Builder::new(TokioExecutor::new())).await
    }

    async fn connect_with(addr: SocketAddr, builder: http2::Builder<TokioExecutor>) -> H2 {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = builder.handshake(TokioIo::new(stream)).await.unwrap();
        H2 {
            addr,
            sender,
            connection: tokio::spawn(connection),
        }
    }

    fn get(&self, path_and_query: &str) -> hyper::http::request::Builder {
        Request::get(format!("http://{}{path_and_query}", self.addr))
    }

    async fn send(&mut self, request: Request<Full<Bytes>>) -> Response<Incoming> {
        self.sender.ready().await.expect("the connection is open");
        let response = tokio::time::timeout(PATIENCE, self.sender.send_request(request))
            .await
            .expect("response head arrives in time")
            .expect("the request is answered");
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        response
    }

    /// Opens `user`'s stream with the token in the Authorization header.
    async fn stream(&mut self, token: &str) -> SseClient {
        let request = self
            .get(STREAM)
            .header("authorization", format!("Bearer {token}"))
            .body(Full::default())
            .unwrap();
        SseClient::from_response(self.send(request).await)
    }

    /// Opens a stream and reads its connected frame.
    async fn connected(&mut self, token: &str) -> SseClient {
        let mut client = self.stream(token).await;
        assert_eq!(client.status, StatusCode::OK);
        let first = client.next_frame().await.expect("the connected frame");
        assert!(first.contains("\"type\":\"connected\""), "{first:?}");
        client
    }
}

async fn error_of(response: Response<Incoming>, status: StatusCode) -> String {
    assert_eq!(response.status(), status);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    body["error"].as_str().unwrap().to_owned()
}

async fn publish(server: &TestServer, user: &str, data: serde_json::Value) {
    let mut event = data;
    event["user_id"] = json!(user);
    server.state.bus.publish(&EventType::COMPLETED, event).await;
}

#[tokio::test]
async fn many_streams_share_one_connection_and_each_gets_its_users_events() {
    let server = TestServer::start(config()).await;
    let mut connection = H2::connect(server.addr).await;
    // Ten tabs' worth: more than HTTP/1.1's six connections per origin, on one connection.
    let mut alice = Vec::new();
    for _ in 0..10 {
        alice.push(connection.connected(&server.token("alice")).await);
    }
    let mut bob = connection.connected(&server.token("bob")).await;
    assert_eq!(server.state.streams.stream_count(), 11);

    publish(&server, "bob", json!({"n": 1})).await;
    publish(&server, "alice", json!({"n": 2})).await;
    for stream in &mut alice {
        assert_eq!(stream.next_event().await["n"], 2, "alice never sees bob's");
    }
    assert_eq!(bob.next_event().await["n"], 1);
    server.stop().await;
}

#[tokio::test]
async fn a_token_in_the_query_or_a_split_cookie_opens_a_stream_too() {
    let server = TestServer::start(config()).await;
    let mut connection = H2::connect(server.addr).await;
    let token = server.token("carol");
    let by_query = connection
        .get(&format!("{STREAM}?access_token={token}"))
        .body(Full::default())
        .unwrap();
    let mut by_query = SseClient::from_response(connection.send(by_query).await);
    // HTTP/2 clients may send each cookie in a header of its own (RFC 9113, 8.2.3).
    let by_cookie = connection
        .get(STREAM)
        .header("cookie", "theme=dark")
        .header("cookie", format!("access_token={token}"))
        .body(Full::default())
        .unwrap();
    let mut by_cookie = SseClient::from_response(connection.send(by_cookie).await);
    for client in [&mut by_query, &mut by_cookie] {
        assert_eq!(client.status, StatusCode::OK);
        let connected = client.next_frame().await.unwrap();
        assert!(connected.contains("\"user_id\":\"carol\""), "{connected:?}");
    }
    let no_token = connection.get(STREAM).body(Full::default()).unwrap();
    let refused = connection.send(no_token).await;
    assert!(error_of(refused, StatusCode::UNAUTHORIZED)
        .await
        .contains("token"));
    server.stop().await;
}

#[tokio::test]
async fn last_event_id_replays_what_was_missed_over_http2() {
    let server = TestServer::start(config()).await;
    let mut connection = H2::connect(server.addr).await;
    let token = server.token("dave");
    let mut first = connection.connected(&token).await;
    publish(&server, "dave", json!({"n": 1})).await;
    let (seen, _) = first.next_event_with_id().await;
    drop(first);
    publish(&server, "dave", json!({"n": 2})).await;
    publish(&server, "dave", json!({"n": 3})).await;

    let request = connection
        .get(STREAM)
        .header("authorization", format!("Bearer {token}"))
        .header("last-event-id", seen.unwrap())
        .body(Full::default())
        .unwrap();
    let mut again = SseClient::from_response(connection.send(request).await);
    again.next_frame().await.expect("the connected frame");
    assert_eq!(again.next_event().await["n"], 2);
    assert_eq!(again.next_event().await["n"], 3);
    server.stop().await;
}

#[tokio::test]
async fn keepalive_comments_arrive_over_http2() {
    let mut settings = config();
    settings.keepalive = Duration::from_secs(1);
    let server = TestServer::start(settings).await;
    let mut connection = H2::connect(server.addr).await;
    let mut client = connection.connected(&server.token("erin")).await;
    assert_eq!(client.next_frame().await.unwrap(), ": keepalive\n\n");
    server.stop().await;
}

#[tokio::test]
async fn the_per_user_limit_counts_streams_on_one_connection() {
    let mut settings = config();
    settings.max_streams_per_user = 2;
    let server = TestServer::start(settings).await;
    let mut connection = H2::connect(server.addr).await;
    let token = server.token("frank");
    let _first = connection.connected(&token).await;
    let mut second = connection.connected(&token).await;
    let third = connection
        .get(STREAM)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::default())
        .unwrap();
    let third = connection.send(third).await;
    assert!(third.headers().contains_key("retry-after"));
    assert!(error_of(third, StatusCode::TOO_MANY_REQUESTS)
        .await
        .contains("max 2"));
    // The refusal ended that stream only.
    publish(&server, "frank", json!({"n": 1})).await;
    assert_eq!(second.next_event().await["n"], 1);
    server.stop().await;
}

#[tokio::test]
async fn the_connection_limit_counts_http2_streams_not_only_connections() {
    let mut settings = config();
    // One slot for the connection and two for its streams.
    settings.max_connections = 3;
    let server = TestServer::start(settings).await;
    let mut connection = H2::connect(server.addr).await;
    let first = connection.connected(&server.token("gina")).await;
    let _second = connection.connected(&server.token("hank")).await;
    let third = connection.stream(&server.token("ivan")).await;
    assert_eq!(third.status, StatusCode::SERVICE_UNAVAILABLE);

    // A stream that ends gives its slot back.
    drop(first);
    server
        .wait_until("the first stream is unregistered", |state| {
            state.streams.stream_count() == 1
        })
        .await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut retry = connection.stream(&server.token("ivan")).await;
        if retry.status == StatusCode::OK {
            assert!(retry.next_frame().await.unwrap().contains("ivan"));
            break;
        }
        // The slot is freed when hyper drops the body, just after the index forgets it.
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_stream_whose_client_stops_reading_it_ends_alone() {
    let mut settings = config();
    settings.stream_queue_capacity = 4;
    let server = TestServer::start(settings).await;
    // A small window per stream, so the stalled stream's backlog reaches its queue quickly.
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .initial_stream_window_size(16 * 1024)
        .adaptive_window(false);
    let mut connection = H2::connect_with(server.addr, builder).await;
    let mut stalled = connection.connected(&server.token("judy")).await;
    let mut reading = connection.connected(&server.token("judy")).await;

    // 4 KiB events: the window, hyper's send buffer and the queue hold a few dozen.
    let pad = "x".repeat(4096);
    let mut n = 0;
    while server.state.metrics.slow_consumer_disconnects() == 0 {
        n += 1;
        assert!(n < 1000, "the stalled stream was never disconnected");
        publish(&server, "judy", json!({"n": n, "pad": pad})).await;
        assert_eq!(reading.next_event().await["n"], n);
    }
    publish(&server, "judy", json!({"sentinel": true})).await;
    assert_eq!(reading.next_event().await["sentinel"], true);
    assert_eq!(server.state.streams.stream_count(), 1);

    // Read again, the stalled stream gets what was queued, then ends cleanly; its
    // `EventSource` would reconnect with Last-Event-ID.
    let mut last = 0;
    while let Some(frame) = stalled.next_frame().await {
        if frame.contains("\"n\":") {
            last += 1;
        }
    }
    assert!(last > 0 && last < n, "got {last} of {n}");
    assert!(
        !connection.connection.is_finished(),
        "the connection stays open"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_its_connection_loses_it_after_an_unanswered_ping() {
    let mut settings = config();
    settings.keepalive = Duration::from_secs(1);
    settings.header_read_timeout = Duration::from_secs(1);
    let server = TestServer::start(settings).await;
    // By hand, since hyper's client answers pings from a task of its own: the preface, empty
    // SETTINGS, and a stream's HEADERS; then this client never reads or answers anything.
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    let token = server.token("kate");
    socket.write_all(CLIENT_PREFACE).await.unwrap();
    socket
        .write_all(&headers_frame(1, &format!("{STREAM}?access_token={token}")))
        .await
        .unwrap();
    server
        .wait_until("the stream is open", |state| {
            state.streams.stream_count() == 1
        })
        .await;

    server
        .wait_until("the silent connection is closed", |state| {
            state.streams.stream_count() == 0
        })
        .await;
    server.stop().await;
}

/// HTTP/2's client connection preface, then an empty SETTINGS frame.
const CLIENT_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// A HEADERS frame (END_STREAM, END_HEADERS) for `GET path` on stream `id`, its header block in
/// HPACK literals without Huffman coding or indexing (RFC 7541, 6.2.2).
fn headers_frame(id: u32, path: &str) -> Vec<u8> {
    fn integer(value: usize, out: &mut Vec<u8>) {
        // A 7-bit prefix, then 7 bits per byte (RFC 7541, 5.1).
        if value < 127 {
            return out.push(value as u8);
        }
        out.push(127);
        let mut rest = value - 127;
        while rest >= 128 {
            out.push((rest % 128) as u8 | 0x80);
            rest /= 128;
        }
        out.push(rest as u8);
    }
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "localhost"),
        (":path", path),
    ] {
        block.push(0);
        integer(name.len(), &mut block);
        block.extend_from_slice(name.as_bytes());
        integer(value.len(), &mut block);
        block.extend_from_slice(value.as_bytes());
    }
    let mut frame = (block.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[0x1, 0x5]);
    frame.extend_from_slice(&id.to_be_bytes());
    frame.extend_from_slice(&block);
    frame
}

#[tokio::test]
async fn shutdown_sends_goaway_and_ends_every_stream_cleanly() {
    let server = TestServer::start(config()).await;
    let mut connection = H2::connect(server.addr).await;
    let mut first = connection.connected(&server.token("liam")).await;
    let mut second = connection.connected(&server.token("mona")).await;

    server.stop().await;
    assert_eq!(first.next_frame().await, None);
    assert_eq!(second.next_frame().await, None);
    // A connection that ends with GOAWAY ends without an error; a dropped one would not.
    let ended = tokio::time::timeout(PATIENCE, connection.connection)
        .await
        .expect("the connection ends")
        .unwrap();
    assert!(ended.is_ok(), "{ended:?}");
}

#[tokio::test]
async fn the_server_announces_its_concurrent_stream_limit_in_its_settings() {
    let server = TestServer::start(config()).await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket.write_all(CLIENT_PREFACE).await.unwrap();
    let mut header = [0; 9];
    tokio::time::timeout(PATIENCE, socket.read_exact(&mut header))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(header[3], 0x4, "the server's first frame is SETTINGS");
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0; length];
    socket.read_exact(&mut payload).await.unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks_exact(6)
        .map(|entry| {
            let id = u16::from_be_bytes([entry[0], entry[1]]);
            (
                id,
                u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]),
            )
        })
        .collect();
    // SETTINGS_MAX_CONCURRENT_STREAMS is 0x3.
    assert!(
        settings.contains(&(0x3, MAX_CONCURRENT_STREAMS)),
        "{settings:?}"
    );
    assert!(MAX_CONCURRENT_STREAMS as usize > config().max_streams_per_user);
    server.stop().await;
}

#[tokio::test]
async fn http1_clients_are_served_as_before_on_the_same_port() {
    let server = TestServer::start(config()).await;
    let mut client = SseClient::connected(server.addr, &server.token("nora")).await;
    // A method that starts like the HTTP/2 preface's first letter is still HTTP/1.1.
    let reply = common::send(
        server.addr,
        common::request(
            "POST",
            "/ai/events/publish",
            Some(&server.publisher_token()),
            "{}",
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    publish(&server, "nora", json!({"n": 1})).await;
    assert_eq!(client.next_event().await["n"], 1);
    server.stop().await;
}

#[tokio::test]
async fn a_cleartext_client_that_stops_mid_preface_is_closed_after_the_header_read_timeout() {
    let mut settings = config();
    settings.header_read_timeout = Duration::from_secs(1);
    let server = TestServer::start(settings).await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket.write_all(&CLIENT_PREFACE[..10]).await.unwrap();
    let mut byte = [0; 1];
    let read = tokio::time::timeout(PATIENCE, socket.read(&mut byte))
        .await
        .expect("the server closes the connection in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_connection_without_a_slot_gets_503_and_then_goaway() {
    let mut settings = config();
    settings.max_connections = 1;
    let server = TestServer::start(settings).await;
    // The one slot goes to this HTTP/2 connection (its stream cannot get a second one).
    let mut first = H2::connect(server.addr).await;
    let refused_stream = first.stream(&server.token("gina")).await;
    assert_eq!(refused_stream.status, StatusCode::SERVICE_UNAVAILABLE);

    let mut second = H2::connect(server.addr).await;
    let answered = second.stream(&server.token("hank")).await;
    assert_eq!(answered.status, StatusCode::SERVICE_UNAVAILABLE);
    // The server then closes the connection, rather than keep answering 503 on it.
    let closed = tokio::time::timeout(PATIENCE, second.connection)
        .await
        .expect("the server closes the connection in time");
    assert!(closed.unwrap().is_ok(), "closed with GOAWAY, not reset");
    // The connection that holds the slot is still served.
    assert!(!first.connection.is_finished());
    server.stop().await;
}
