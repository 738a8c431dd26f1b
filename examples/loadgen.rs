//! Load generator: drives a separately started artifact-events server over 127.0.0.1 and
//! prints one JSON line of figures per run.
//!
//! ```text
//! cargo run --release --example loadgen -- SCENARIO [--addr 127.0.0.1:8000] [--pid SERVER_PID] [options]
//!   idle     --streams C --users U                     RSS per idle stream
//!   cost     --others N --events E                     server CPU per publish with N other streams
//!   publish  --streams C --users U --rate R --seconds D --connections K
//!                                                      publish→receive latency, losses, leaks
//!   ramp     --streams C --users U --connections K [--start R] [--step-percent P]
//!                                                      highest delivered events/s with p99 ≤ 100 ms
//!   stalled  --streams C --events E --connections K [--pad BYTES]
//!                                                      RSS growth with C clients that never read
//! ```
//! `--publish-addr` sends the publishes to another server than the streams' `--addr` (two
//! processes sharing one Redis: the latency is then cross-process).
//! `--http2` opens the streams over HTTP/2 (h2c with prior knowledge, or ALPN `h2` with TLS),
//! `--per-connection N` of them multiplexed on each connection (default 100, the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`); publishes stay on HTTP/1.1. `--insecure` speaks TLS to
//! a server with a test certificate, verifying nothing (needs `--features tls`).
//! Tokens are signed with `JWT_SECRET`, like the server's. `--pid` lets it read the server's
//! RSS (`/proc/PID/status`) and CPU time (`/proc/PID/task/*/schedstat`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use artifact_events::http_client::Connection;
use artifact_events::server::Authenticator;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::Algorithm;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Latency histogram resolution and range: 10 µs buckets up to 10 s.
const BUCKET_MICROS: u64 = 10;
const BUCKETS: usize = 1_000_000;
/// A ramp step's p99 must stay within this.
const RAMP_P99_LIMIT: Duration = Duration::from_millis(100);

struct Options {
    addr: SocketAddr,
    publish_addr: SocketAddr,
    pid: Option<u32>,
    values: HashMap<String, String>,
    auth: Authenticator,
    transport: Transport,
}

/// How the load generator reaches the server.
#[derive(Clone, Copy)]
struct Transport {
    /// Streams over HTTP/2, this many per connection; `None`: one HTTP/1.1 connection each.
    http2: Option<u64>,
    /// TLS without verifying the certificate (`--insecure`).
    tls: bool,
}

impl Transport {
    /// A connection to `addr`, in TLS when asked, offering `alpn` (`h2` or `http/1.1`).
    async fn connect(self, addr: SocketAddr, alpn: &[u8]) -> std::io::Result<Box<dyn Connection>> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        if !self.tls {
            return Ok(Box::new(stream));
        }
        #[cfg(feature = "tls")]
        return insecure::connect(stream, alpn).await;
        #[cfg(not(feature = "tls"))]
        panic!("--insecure needs TLS: build the load generator with --features tls ({alpn:?})");
    }

    fn scheme(self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

/// TLS that trusts any certificate: for benchmarks against a server with a test certificate,
/// never for anything else.
#[cfg(feature = "tls")]
mod insecure {
    use std::sync::Arc;

    use artifact_events::http_client::Connection;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use tokio::net::TcpStream;

    #[derive(Debug)]
    struct AnyCertificate(Arc<CryptoProvider>);

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    pub async fn connect(stream: TcpStream, alpn: &[u8]) -> std::io::Result<Box<dyn Connection>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from("localhost").expect("a valid name");
        Ok(Box::new(connector.connect(name, stream).await?))
    }
}

impl Options {
    fn number(&self, name: &str, default: u64) -> u64 {
        self.values.get(name).map_or(default, |value| {
            value
                .parse()
                .unwrap_or_else(|_| panic!("--{name} takes a number, not {value:?}"))
        })
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().unwrap_or_else(|| {
        eprintln!(
            "usage: loadgen idle|cost|publish|ramp|stalled [--addr A] [--pid P] [--name value ...]"
        );
        std::process::exit(2);
    });
    let mut values = HashMap::new();
    let (mut http2, mut tls) = (false, false);
    while let Some(flag) = args.next() {
        let name = flag
            .strip_prefix("--")
            .unwrap_or_else(|| panic!("unexpected {flag:?}"));
        match name {
            "http2" => http2 = true,
            "insecure" => tls = true,
            _ => {}
        }
        if name == "http2" || name == "insecure" {
            continue;
        }
        values.insert(
            name.to_owned(),
            args.next()
                .unwrap_or_else(|| panic!("{flag} needs a value")),
        );
    }
    let secret = std::env::var("JWT_SECRET").expect("JWT_SECRET must be the server's secret");
    let addr: SocketAddr = values
        .remove("addr")
        .unwrap_or_else(|| "127.0.0.1:8000".into())
        .parse()
        .expect("--addr");
    let options = Options {
        addr,
        publish_addr: values
            .remove("publish-addr")
            .map_or(addr, |value| value.parse().expect("--publish-addr")),
        pid: values.remove("pid").map(|pid| pid.parse().expect("--pid")),
        transport: Transport {
            http2: http2.then(|| {
                values
                    .remove("per-connection")
                    .map_or(100, |value| value.parse().expect("--per-connection"))
            }),
            tls,
        },
        values,
        auth: Authenticator::new(secret.as_bytes(), Algorithm::HS256),
    };
    let figures = match scenario.as_str() {
        "idle" => idle(&options).await,
        "cost" => cost(&options).await,
        "publish" => {
            let streams = open_streams(
                &options,
                options.number("streams", 10_000),
                options.number("users", 1_000),
            )
            .await;
            let rate = options.number("rate", 5_000);
            let run = publish_run(&options, &streams, rate, options.number("seconds", 30)).await;
            json!({"scenario": "publish", "streams": streams.count, "users": streams.users,
                   "http2_streams_per_connection": options.transport.http2, "tls": options.transport.tls,
                   "connect_seconds": streams.connect_seconds, "connect_failures": streams.failures, "result": run})
        }
        "ramp" => ramp(&options).await,
        "stalled" => stalled(&options).await,
        other => panic!("unknown scenario {other:?}"),
    };
    println!("{figures}");
}

/// Opens C streams over U users and reports the server's RSS per stream.
async fn idle(options: &Options) -> serde_json::Value {
    let before = rss_bytes(options.pid);
    let streams = open_streams(
        options,
        options.number("streams", 10_000),
        options.number("users", 1_000),
    )
    .await;
    // Let allocator and kernel settle before reading RSS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(options.pid);
    let per_stream = match (before, after) {
        (Some(before), Some(after)) if streams.count > 0 => {
            Some(after.saturating_sub(before) / streams.count)
        }
        _ => None,
    };
    json!({"scenario": "idle", "streams": streams.count, "users": streams.users,
           "http2_streams_per_connection": options.transport.http2, "tls": options.transport.tls,
           "connect_seconds": streams.connect_seconds, "connect_failures": streams.failures,
           "rss_before": before, "rss_after": after, "rss_bytes_per_stream": per_stream})
}

/// Server CPU per publish to one recipient stream while N other users' streams are open.
async fn cost(options: &Options) -> serde_json::Value {
    let others = options.number("others", 10);
    let events = options.number("events", 20_000);
    let _others =
        open_streams_for(options, (0..others).map(|n| format!("other-{n}")).collect()).await;
    let target = open_streams_for(options, vec!["target".to_owned()]).await;
    let mut publisher = Publisher::connect(options).await;
    // Warm up connection and caches.
    for n in 0..1_000 {
        publisher.publish("target", n).await;
    }
    let cpu_before = cpu_nanos(options.pid);
    let started = Instant::now();
    for n in 0..events {
        publisher.publish("target", n).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_nanos(options.pid)
        .zip(cpu_before)
        .map(|(after, before)| (after - before) / events);
    target
        .wait_for_deliveries(1_000 + events, Duration::from_secs(30))
        .await;
    json!({"scenario": "cost", "other_streams": others, "events": events,
           "server_cpu_ns_per_publish": cpu, "wall_us_per_publish": elapsed.as_micros() as u64 / events,
           "leaks": target.stats.leaks.load(Ordering::Relaxed)})
}

/// Raises the publish rate until p99 passes 100 ms or publishing falls behind.
async fn ramp(options: &Options) -> serde_json::Value {
    let streams = open_streams(
        options,
        options.number("streams", 2_000),
        options.number("users", 20),
    )
    .await;
    let fan_out = streams.count as f64 / streams.users as f64;
    let mut rate = options.number("start", 200);
    let seconds = options.number("seconds", 5);
    // Small steps: the figure is the last rate that passed, so a coarse step understates it.
    let step = 1.0 + options.number("step-percent", 10) as f64 / 100.0;
    let mut best: Option<serde_json::Value> = None;
    let mut steps = Vec::new();
    loop {
        let run = publish_run(options, &streams, rate, seconds).await;
        let p99 = run["p99_us"].as_u64().unwrap_or(u64::MAX);
        let kept_up = run["published_per_second"].as_f64().unwrap_or(0.0) >= 0.95 * rate as f64;
        let clean = run["losses"] == 0 && run["leaks"] == 0;
        steps.push(json!({"rate": rate, "p99_us": p99, "delivered_per_second": run["delivered_per_second"], "kept_up": kept_up}));
        if p99 > RAMP_P99_LIMIT.as_micros() as u64 || !kept_up || !clean {
            break;
        }
        best = Some(run);
        rate = (rate as f64 * step) as u64;
    }
    json!({"scenario": "ramp", "streams": streams.count, "users": streams.users, "fan_out": fan_out,
           "http2_streams_per_connection": options.transport.http2, "tls": options.transport.tls,
           "best": best, "steps": steps})
}

/// Opens C streams that never read, publishes E events to their users, reports RSS growth.
async fn stalled(options: &Options) -> serde_json::Value {
    let count = options.number("streams", 1_000);
    let events = options.number("events", 1_000_000);
    let connections = options.number("connections", 8);
    let mut sockets = Vec::with_capacity(count as usize);
    for n in 0..count {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // A small window, as a stalled mobile client would have.
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(options.addr).await.expect("connect");
        let token = options
            .auth
            .issue(&format!("stalled-{n}"), false, Duration::from_secs(3600));
        let head = format!("GET /ai/artifact/events/stream HTTP/1.1\r\nhost: loadgen\r\nauthorization: Bearer {token}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        sockets.push(stream);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_bytes(options.pid);
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..connections {
        let mut publisher = Publisher::connect(options).await;
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = worker;
            while n < events {
                publisher
                    .publish(&format!("stalled-{}", n % count), n)
                    .await;
                sent.fetch_add(1, Ordering::Relaxed);
                n += connections;
            }
        }));
    }
    let mut peak = before.unwrap_or(0);
    while tasks.iter().any(|task| !task.is_finished()) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(rss_bytes(options.pid).unwrap_or(0));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(options.pid);
    drop(sockets);
    json!({"scenario": "stalled", "streams": count, "events": sent.load(Ordering::Relaxed),
           "seconds": started.elapsed().as_secs_f64(), "rss_before": before, "rss_after": after, "rss_peak": peak,
           "rss_growth": after.zip(before).map(|(after, before)| after as i64 - before as i64)})
}

/// One publish→receive run at `rate` events/s for `seconds`.
async fn publish_run(
    options: &Options,
    streams: &Streams,
    rate: u64,
    seconds: u64,
) -> serde_json::Value {
    let connections = options.number("connections", 8).max(1);
    streams.stats.reset();
    let total = rate * seconds;
    let expected_deliveries = Arc::new(AtomicU64::new(0));
    let published = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..connections {
        let mut publisher = Publisher::connect(options).await;
        let (users, per_user) = (streams.users, streams.count / streams.users);
        let (expected, published) = (expected_deliveries.clone(), published.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = worker;
            let mut random = 0x9E37_79B9_7F4A_7C15u64 ^ worker;
            while n < total {
                // Pace by the schedule, not by the last send, so slowness shows as falling behind.
                let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                random ^= random << 13;
                random ^= random >> 7;
                random ^= random << 17;
                publisher
                    .publish(&format!("user-{}", random % users), n)
                    .await;
                expected.fetch_add(per_user, Ordering::Relaxed);
                published.fetch_add(1, Ordering::Relaxed);
                n += connections;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let publish_seconds = started.elapsed().as_secs_f64();
    let expected = expected_deliveries.load(Ordering::Relaxed);
    streams
        .wait_for_deliveries(expected, Duration::from_secs(10))
        .await;
    let delivered = streams.stats.delivered.load(Ordering::Relaxed);
    let histogram = streams.stats.histogram.lock().unwrap();
    json!({"rate": rate, "seconds": seconds, "published": published.load(Ordering::Relaxed),
           "published_per_second": published.load(Ordering::Relaxed) as f64 / publish_seconds,
           "expected_deliveries": expected, "delivered": delivered,
           "delivered_per_second": delivered as f64 / publish_seconds,
           "losses": expected.saturating_sub(delivered), "leaks": streams.stats.leaks.load(Ordering::Relaxed),
           "p50_us": percentile(&histogram, 0.50), "p99_us": percentile(&histogram, 0.99),
           "max_us": percentile(&histogram, 1.0)})
}

/// What all stream readers of a run saw.
struct Stats {
    delivered: AtomicU64,
    leaks: AtomicU64,
    histogram: Mutex<Vec<u32>>,
}

impl Stats {
    fn reset(&self) {
        self.delivered.store(0, Ordering::Relaxed);
        self.leaks.store(0, Ordering::Relaxed);
        self.histogram
            .lock()
            .unwrap()
            .iter_mut()
            .for_each(|bucket| *bucket = 0);
    }
}

struct Streams {
    count: u64,
    users: u64,
    connect_seconds: f64,
    failures: u64,
    stats: Arc<Stats>,
}

impl Streams {
    async fn wait_for_deliveries(&self, expected: u64, patience: Duration) {
        let deadline = Instant::now() + patience;
        while self.stats.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn open_streams(options: &Options, count: u64, users: u64) -> Streams {
    let names = (0..count).map(|n| format!("user-{}", n % users)).collect();
    let mut streams = open_streams_for(options, names).await;
    streams.users = users;
    streams
}

/// Opens one stream per name and waits for every connected frame; readers run in the background.
/// Over HTTP/2, every `per_connection` streams share a connection.
async fn open_streams_for(options: &Options, users: Vec<String>) -> Streams {
    let stats = Arc::new(Stats {
        delivered: AtomicU64::new(0),
        leaks: AtomicU64::new(0),
        histogram: Mutex::new(vec![0; BUCKETS + 1]),
    });
    let started = Instant::now();
    let mut failures = 0;
    let count = users.len() as u64;
    let mut pending = tokio::task::JoinSet::new();
    let mut shared: Option<(H2Sender, u64)> = None;
    for user in users {
        let token = options.auth.issue(&user, false, Duration::from_secs(3600));
        let via = match options.transport.http2 {
            None => Via::Http1(options.addr, options.transport),
            Some(per_connection) => {
                if shared
                    .as_ref()
                    .is_none_or(|(_, used)| *used >= per_connection)
                {
                    match h2_connection(options).await {
                        Some(sender) => shared = Some((sender, 0)),
                        None => {
                            failures += 1;
                            continue;
                        }
                    }
                }
                let (sender, used) = shared.as_mut().expect("just connected");
                *used += 1;
                Via::Http2(sender.clone(), options.addr, options.transport)
            }
        };
        let stats = stats.clone();
        pending.spawn(async move { read_stream(via, user, token, stats).await });
        // Keep the accept backlog from overflowing.
        if pending.len() >= 256 {
            if let Some(Ok(false)) = pending.join_next().await {
                failures += 1;
            }
        }
    }
    while let Some(connected) = pending.join_next().await {
        if !matches!(connected, Ok(true)) {
            failures += 1;
        }
    }
    Streams {
        count,
        users: 1,
        connect_seconds: started.elapsed().as_secs_f64(),
        failures,
        stats,
    }
}

type H2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// How one stream reaches the server: a connection of its own, or a stream on a shared one.
enum Via {
    Http1(SocketAddr, Transport),
    Http2(H2Sender, SocketAddr, Transport),
}

/// A new HTTP/2 connection for streams to share; its connection task runs in the background.
async fn h2_connection(options: &Options) -> Option<H2Sender> {
    let io = options.transport.connect(options.addr, b"h2").await.ok()?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// Connects one stream; returns once the connected frame arrived (true) or it failed (false),
/// leaving a task that reads events into `stats`.
async fn read_stream(via: Via, user: String, token: String, stats: Arc<Stats>) -> bool {
    let response = match via {
        Via::Http1(addr, transport) => {
            let Ok(io) = transport.connect(addr, b"http/1.1").await else {
                return false;
            };
            let Ok((mut sender, connection)) =
                hyper::client::conn::http1::handshake(TokioIo::new(io)).await
            else {
                return false;
            };
            tokio::spawn(connection);
            let request = Request::get("/ai/artifact/events/stream")
                .header("host", "loadgen")
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            sender.send_request(request).await
        }
        Via::Http2(mut sender, addr, transport) => {
            let uri = format!("{}://{addr}/ai/artifact/events/stream", transport.scheme());
            let request = Request::get(uri)
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            if sender.ready().await.is_err() {
                return false;
            }
            sender.send_request(request).await
        }
    };
    let Ok(response) = response else {
        return false;
    };
    if response.status() != 200 {
        return false;
    }
    let mut body = response.into_body();
    let mut buffer = Vec::new();
    // The connected frame.
    while !buffer.windows(2).any(|pair| pair == b"\n\n") {
        match body.frame().await {
            Some(Ok(frame)) => {
                buffer.extend_from_slice(frame.data_ref().map_or(&[][..], |data| data))
            }
            _ => return false,
        }
    }
    let end = buffer.windows(2).position(|pair| pair == b"\n\n").unwrap() + 2;
    buffer.drain(..end);
    let own = format!("\"user_id\":\"{user}\"");
    tokio::spawn(async move {
        let mut local = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buffer.extend_from_slice(data);
            let mut start = 0;
            while let Some(offset) = buffer[start..].windows(2).position(|pair| pair == b"\n\n") {
                let frame = &buffer[start..start + offset];
                start += offset + 2;
                if frame.starts_with(b":") {
                    continue;
                }
                let text = std::str::from_utf8(frame).unwrap_or("");
                if !text.contains(&own) {
                    stats.leaks.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Some(sent) = field_number(text, "\"sent_ns\":") {
                    local.push(now_nanos().saturating_sub(sent) / 1_000);
                }
                stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
            buffer.drain(..start);
            if !local.is_empty() {
                let mut histogram = stats.histogram.lock().unwrap();
                for micros in local.drain(..) {
                    histogram[((micros / BUCKET_MICROS) as usize).min(BUCKETS)] += 1;
                }
            }
        }
    });
    true
}

/// One keep-alive connection for `POST /ai/events/publish`.
struct Publisher {
    sender: SendRequest<Full<Bytes>>,
    token: String,
    /// Filler added to every event (`--pad`), to publish large events.
    pad: String,
}

impl Publisher {
    async fn connect(options: &Options) -> Publisher {
        let stream = options
            .transport
            .connect(options.publish_addr, b"http/1.1")
            .await
            .expect("connect");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let token = options
            .auth
            .issue("loadgen", true, Duration::from_secs(3600));
        let pad = "x".repeat(options.number("pad", 0) as usize);
        Publisher { sender, token, pad }
    }

    async fn publish(&mut self, user: &str, n: u64) {
        let mut body = json!({"event_type": "artifact.completed",
                          "event_data": {"user_id": user, "job_id": n, "result": {"sent_ns": now_nanos()}}});
        if !self.pad.is_empty() {
            body["event_data"]["pad"] = json!(self.pad);
        }
        let request = Request::post("/ai/events/publish")
            .header("host", "loadgen")
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        // The connection task must have finished the previous exchange first.
        self.sender.ready().await.expect("publish connection");
        let response = self
            .sender
            .send_request(request)
            .await
            .expect("publish request");
        assert_eq!(response.status(), 202, "publish refused");
        let _ = response.into_body().collect().await;
    }
}

fn field_number(text: &str, field: &str) -> Option<u64> {
    let start = text.find(field)? + field.len();
    let digits: &str = &text[start..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

fn percentile(histogram: &[u32], fraction: f64) -> Option<u64> {
    let total: u64 = histogram.iter().map(|count| u64::from(*count)).sum();
    if total == 0 {
        return None;
    }
    let target = ((total as f64 * fraction).ceil() as u64).max(1);
    let mut seen = 0;
    for (bucket, count) in histogram.iter().enumerate() {
        seen += u64::from(*count);
        if seen >= target {
            return Some((bucket as u64 + 1) * BUCKET_MICROS);
        }
    }
    None
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

fn rss_bytes(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// The server's CPU time over all its threads, in nanoseconds.
fn cpu_nanos(pid: Option<u32>) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", pid?)).ok()?;
    Some(
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
            .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
            .sum(),
    )
}
