//! The one client for outbound requests (model servers and webhooks now; JWKS is to use it too;
//! `listen`, which streams, has its own): a request in, a whole
//! response out, over HTTP/1.1 on a fresh TCP connection per request.
//!
//! Invariants:
//! - **Timeouts on everything.** Resolving the host and connecting end within
//!   [`Limits::connect_timeout`]; the whole request, from resolving to the last body byte, ends
//!   within [`Limits::total_timeout`]. The connection is driven inside [`Client::send`], not in a
//!   spawned task, so nothing of it outlives the call.
//! - **A capped body.** A response declaring a body over [`Limits::max_response_bytes`] is
//!   refused before its body is read; any other stops being read at the first chunk past the
//!   cap. Either way the answer is [`Error::TooLarge`], never a truncated body.
//! - **No redirects.** A 3xx comes back as it is; following it is the caller's decision.
//! - **Every address is checked.** The client resolves the host itself and puts every address
//!   to the [`AddressPolicy`] before connecting to any, so a name that resolves to a private
//!   address at send time (DNS rebinding) is refused then, not only when the URL was configured.
//! - **No secret in errors.** No [`Error`], in `Display` or `Debug`, holds a header value, a
//!   body, or the URL's path or query: any of them may carry an API key, a bearer token or a
//!   webhook signature. Errors name the host and port at most.
//!
//! `http://` is spoken as is; `https://` needs a [`TlsConnector`] in [`Client::tls`] (the `tls`
//! cargo feature provides one, set by `backends::open`), else it is [`Error::TlsUnavailable`].

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{
    HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING, USER_AGENT,
};
use hyper::{HeaderMap, Method, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::events::BoxFuture;

/// How long resolving the host and opening the TCP connection may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole request may take, from resolving the host to the last body byte.
pub const DEFAULT_TOTAL_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest response body read in full (1 MiB); a larger one is an error.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// The `User-Agent` sent when the request sets none.
pub const DEFAULT_USER_AGENT: &str = concat!("artifact-events/", env!("CARGO_PKG_VERSION"));

/// Decides whether the client may connect to a resolved address; see [`is_public_address`].
pub type AddressPolicy = fn(IpAddr) -> bool;

/// A byte stream the client speaks HTTP over: a TCP connection, or TLS over one.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// Wraps a TCP connection in TLS for `https://` URLs. The seam keeps this module free of any
/// TLS library: the `tls` cargo feature implements it (`backends::tls`).
pub trait TlsConnector: Send + Sync + fmt::Debug {
    /// Runs the handshake with `server_name` (a DNS name or an IP address, without brackets)
    /// over `stream`, verifying the server's certificate for that name.
    fn connect(
        &self,
        server_name: String,
        stream: TcpStream,
    ) -> BoxFuture<'static, io::Result<Box<dyn Connection>>>;
}

/// The bounds on one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// For resolving the host and connecting; past it, [`Error::Connect`].
    pub connect_timeout: Duration,
    /// For the whole request, connecting included; past it, [`Error::Timeout`].
    pub total_timeout: Duration,
    /// For the response body; past it, [`Error::TooLarge`].
    pub max_response_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            total_timeout: DEFAULT_TOTAL_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// One request to send; `Host`, `Connection` and the body's framing are the client's to set.
// No `Debug`: the URL, the headers and the body may all hold secrets.
pub struct Request {
    /// The method, sent as is.
    pub method: Method,
    /// `http://HOST[:PORT][/PATH][?QUERY]`; a `#fragment` is dropped, as browsers do.
    pub url: String,
    /// Headers to send; a `User-Agent` here replaces [`DEFAULT_USER_AGENT`].
    pub headers: HeaderMap,
    /// The body, sent with its `Content-Length`; `None` sends neither.
    pub body: Option<Bytes>,
}

impl Request {
    /// A request with no headers and no body.
    pub fn new(method: Method, url: impl Into<String>) -> Request {
        Request {
            method,
            url: url.into(),
            headers: HeaderMap::new(),
            body: None,
        }
    }

    /// A `GET` of `url`.
    pub fn get(url: impl Into<String>) -> Request {
        Request::new(Method::GET, url)
    }

    /// A `POST` of `body` to `url`.
    pub fn post(url: impl Into<String>, body: impl Into<Bytes>) -> Request {
        Request {
            body: Some(body.into()),
            ..Request::new(Method::POST, url)
        }
    }

    /// The same request with one more header (appended, so a name may repeat).
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Request {
        self.headers.append(name, value);
        self
    }
}

/// A whole response: its status, its headers and its body, read in full.
#[derive(Clone, Debug)]
pub struct Response {
    /// The status, 3xx included (redirects are never followed).
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The body, at most [`Limits::max_response_bytes`] long.
    pub body: Bytes,
}

/// Why no response came back. No variant holds a header value, a body, a path or a query.
#[derive(Debug)]
pub enum Error {
    /// The URL cannot be sent; the text says why, without repeating the URL.
    InvalidUrl(&'static str),
    /// The URL is `https://`, and the client has no [`TlsConnector`].
    TlsUnavailable,
    /// The TLS handshake failed, e.g. the certificate is not valid for the host.
    Tls {
        /// `HOST:PORT` as written in the URL.
        server: String,
        /// The handshake's error.
        source: io::Error,
    },
    /// The host resolves to an address the client's address policy refuses.
    AddressRefused {
        /// The host as written in the URL.
        host: String,
        /// The first refused address.
        address: IpAddr,
    },
    /// The host could not be resolved or connected to within the connect timeout.
    Connect {
        /// `HOST:PORT` as written in the URL.
        server: String,
        /// The last resolver or socket error, or a `TimedOut` one for the connect timeout.
        source: io::Error,
    },
    /// The whole request took longer than this total timeout.
    Timeout(Duration),
    /// The response body is longer than this many bytes.
    TooLarge(usize),
    /// The HTTP exchange failed: the connection broke, or the response was malformed.
    Protocol(hyper::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidUrl(reason) => write!(f, "invalid URL: {reason}"),
            Error::TlsUnavailable => {
                f.write_str("https:// URLs need the `tls` cargo feature, which this build lacks")
            }
            Error::AddressRefused { host, address } => {
                write!(
                    f,
                    "{host} resolves to {address}, which the address policy refuses"
                )
            }
            Error::Tls { server, source } => {
                write!(f, "TLS handshake with {server} failed: {source}")
            }
            Error::Connect { server, source } => write!(f, "cannot connect to {server}: {source}"),
            Error::Timeout(limit) => write!(f, "no complete response within {limit:?}"),
            Error::TooLarge(limit) => write!(f, "the response body is over {limit} bytes"),
            Error::Protocol(error) => write!(f, "HTTP exchange failed: {error}"),
        }
    }
}

// The cause is part of each message, so `source` stays `None` and reporters print it once.
impl std::error::Error for Error {}

/// Sends requests within its limits, connecting only where its address policy allows.
#[derive(Clone, Debug, Default)]
pub struct Client {
    /// The timeouts and the body cap for every request.
    pub limits: Limits,
    /// Consulted for every resolved address before connecting; `None` allows any address.
    pub address_policy: Option<AddressPolicy>,
    /// Speaks TLS for `https://` URLs; `None` refuses them.
    pub tls: Option<Arc<dyn TlsConnector>>,
}

impl Client {
    /// Sends `request` on a new connection and reads the whole response, within the limits.
    pub async fn send(&self, request: Request) -> Result<Response, Error> {
        let target = Target::parse(&request.url)?;
        let exchange = async {
            let stream = TokioIo::new(self.connect(&target).await?);
            let (mut sender, connection) = hyper::client::conn::http1::handshake(stream)
                .await
                .map_err(Error::Protocol)?;
            let response = async {
                let response = sender.send_request(target.http_request(request));
                let (head, body) = response.await.map_err(Error::Protocol)?.into_parts();
                let body = read_capped(body, self.limits.max_response_bytes).await?;
                let (status, headers) = (head.status, head.headers);
                Ok(Response {
                    status,
                    headers,
                    body,
                })
            };
            // The connection may end while the body is still to be read (what is left of it is
            // queued by then), and its errors also reach `response`, as the error of the send or
            // of a body read; so the response alone ends the exchange.
            let connection = async {
                let _ = connection.await;
                std::future::pending().await
            };
            tokio::select! {
                result = response => result,
                result = connection => result,
            }
        };
        let limit = self.limits.total_timeout;
        timeout(limit, exchange)
            .await
            .map_err(|_| Error::Timeout(limit))?
    }

    /// Resolves the target, puts every address to the policy, tries them in turn, and for
    /// `https://` runs the TLS handshake: all within the connect timeout.
    async fn connect(&self, target: &Target) -> Result<Box<dyn Connection>, Error> {
        let connect_error = |source| Error::Connect {
            server: target.server(),
            source,
        };
        // Refused before anything is resolved or connected.
        let tls = match (target.tls, &self.tls) {
            (false, _) => None,
            (true, Some(tls)) => Some(tls),
            (true, None) => return Err(Error::TlsUnavailable),
        };
        let host = target.host.trim_start_matches('[').trim_end_matches(']');
        let connecting = async {
            let addresses = self.resolve(target).await?;
            let mut last_error = io::Error::new(io::ErrorKind::NotFound, "no address found");
            for address in addresses {
                let stream = match TcpStream::connect(address).await {
                    Ok(stream) => stream,
                    Err(error) => {
                        last_error = error;
                        continue;
                    }
                };
                return match tls {
                    None => Ok(Box::new(stream) as Box<dyn Connection>),
                    Some(tls) => tls
                        .connect(host.to_owned(), stream)
                        .await
                        .map_err(|source| {
                            let server = target.server();
                            Error::Tls { server, source }
                        }),
                };
            }
            Err(connect_error(last_error))
        };
        let limit = self.limits.connect_timeout;
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, format!("not within {limit:?}"));
        timeout(limit, connecting)
            .await
            .map_err(|_| connect_error(timed_out()))?
    }
}

impl Client {
    /// Checks, without connecting, that a request to `url` could be sent now: the URL parses,
    /// its scheme is served, and every address its host resolves to (within the connect
    /// timeout) passes the address policy. Webhooks check this at registration; [`Client::send`]
    /// checks the addresses again at every request.
    pub async fn check_destination(&self, url: &str) -> Result<(), Error> {
        let target = Target::parse(url)?;
        if target.tls && self.tls.is_none() {
            return Err(Error::TlsUnavailable);
        }
        let limit = self.limits.connect_timeout;
        match timeout(limit, self.resolve(&target)).await {
            Ok(resolved) => resolved.map(drop),
            Err(_) => Err(Error::Connect {
                server: target.server(),
                source: io::Error::new(io::ErrorKind::TimedOut, format!("not within {limit:?}")),
            }),
        }
    }

    /// Every address the target's host resolves to, once each has passed the policy.
    async fn resolve(&self, target: &Target) -> Result<Vec<std::net::SocketAddr>, Error> {
        let host = target.host.trim_start_matches('[').trim_end_matches(']');
        let resolved = tokio::net::lookup_host((host, target.port)).await;
        let addresses: Vec<_> = resolved
            .map_err(|source| Error::Connect {
                server: target.server(),
                source,
            })?
            .collect();
        // One refused address refuses the host: a name that resolves both inside and outside
        // is not one to trust with a request.
        let policy = self.address_policy.unwrap_or(|_| true);
        if let Some(refused) = addresses.iter().find(|address| !policy(address.ip())) {
            let (host, address) = (target.host.clone(), refused.ip());
            return Err(Error::AddressRefused { host, address });
        }
        Ok(addresses)
    }
}

/// The address policy for webhooks: true only for addresses reachable on the public internet.
///
/// Refused: loopback, private (10/8, 172.16/12, 192.168/16), carrier-grade NAT (100.64/10),
/// link-local (169.254/16, where cloud metadata answers, and fe80::/10), unique-local
/// (fc00::/7), unspecified and the rest of 0/8, multicast, reserved 240/4 with broadcast, and
/// each of these IPv4 addresses in IPv4-mapped (`::ffff:a.b.c.d`) or NAT64 (`64:ff9b::a.b.c.d`)
/// form.
pub fn is_public_address(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(address) => is_public_v4(address),
        IpAddr::V6(address) => is_public_v6(address),
    }
}

fn is_public_v4(address: Ipv4Addr) -> bool {
    match address.octets() {
        [0 | 10 | 127, ..] => false, // this network (with unspecified), private, loopback
        [100, 64..=127, ..] => false, // carrier-grade NAT
        [169, 254, ..] => false,     // link-local, cloud metadata
        [172, 16..=31, ..] | [192, 168, ..] => false, // private
        [224..=255, ..] => false,    // multicast, reserved, broadcast
        _ => true,
    }
}

fn is_public_v6(address: Ipv6Addr) -> bool {
    let [.., a, b, c, d] = address.octets();
    match address.segments() {
        // IPv4-mapped; and NAT64's well-known prefix, whose gateway forwards to the IPv4 address.
        [0, 0, 0, 0, 0, 0xffff, ..] | [0x64, 0xff9b, 0, 0, 0, 0, ..] => {
            is_public_v4(Ipv4Addr::new(a, b, c, d))
        }
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => false, // unspecified, loopback
        [0xfe80..=0xfebf, ..] => false,        // link-local
        [0xfc00..=0xfdff, ..] => false,        // unique-local
        [0xff00..=0xffff, ..] => false,        // multicast
        _ => true,
    }
}

/// Where a URL points: what to resolve and connect to, and the request line's target.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// `https://`: the connection needs TLS.
    tls: bool,
    /// A name, an IPv4 address, or an IPv6 address in brackets.
    host: String,
    port: u16,
    /// The origin-form request target: the path and query, at least `/`.
    path: Uri,
}

impl Target {
    fn parse(url: &str) -> Result<Target, Error> {
        let invalid = Error::InvalidUrl;
        let (scheme, rest) = url
            .split_once("://")
            .ok_or(invalid("expected http://HOST[:PORT][/PATH]"))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return Err(invalid("the scheme is not http:// or https://")),
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        if authority.contains('@') {
            let reason = "credentials in the URL are not supported; send an Authorization header";
            return Err(invalid(reason));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => (host, Some(port)),
            _ => (authority, None),
        };
        let in_name = |b: u8| b.is_ascii_alphanumeric() || b"-._".contains(&b);
        let valid_host = match host.strip_prefix('[').and_then(|v6| v6.strip_suffix(']')) {
            Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
            None => host.bytes().all(in_name),
        };
        if host.is_empty() {
            return Err(invalid("the URL has no host"));
        } else if !valid_host {
            return Err(invalid(
                "the host is not an ASCII name, IPv4, or IPv6 in [brackets]",
            ));
        }
        let port = match port {
            None => target_default_port(tls),
            // Digits only: `str::parse` would also take a leading `+`.
            Some(digits) => match digits.parse::<u16>() {
                Ok(port) if port != 0 && digits.bytes().all(|b| b.is_ascii_digit()) => port,
                _ => return Err(invalid("the port is not a number from 1 to 65535")),
            },
        };
        let path = Uri::try_from(format!("/{}", path.strip_prefix('/').unwrap_or(path)))
            .map_err(|_| invalid("the path or query holds a character a URL cannot carry"))?;
        Ok(Target {
            tls,
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// `HOST:PORT`, for error messages.
    fn server(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// `request` as hyper sends it, with the client's own headers set.
    fn http_request(&self, request: Request) -> hyper::Request<Full<Bytes>> {
        let mut headers = request.headers;
        // `Host` leaves out the scheme's default port, as curl and browsers do.
        let host = if self.port == target_default_port(self.tls) {
            self.host.clone()
        } else {
            self.server()
        };
        let host = HeaderValue::try_from(host).expect("a parsed host is a valid header value");
        headers.insert(HOST, host);
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        let user_agent = HeaderValue::from_static(DEFAULT_USER_AGENT);
        headers.entry(USER_AGENT).or_insert(user_agent);
        // The body's length is always known, so its framing is the client's alone.
        headers.remove(TRANSFER_ENCODING);
        headers.remove(CONTENT_LENGTH);
        if let Some(body) = &request.body {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let mut http = hyper::Request::new(Full::new(request.body.unwrap_or_default()));
        *http.method_mut() = request.method;
        *http.uri_mut() = self.path.clone();
        *http.headers_mut() = headers;
        http
    }
}

/// The port a URL without one means: 443 for `https://`, 80 for `http://`.
fn target_default_port(tls: bool) -> u16 {
    if tls {
        443
    } else {
        80
    }
}

/// Reads the whole of `body`, or fails as soon as it is known to be over `limit` bytes.
async fn read_capped(mut body: Incoming, limit: usize) -> Result<Bytes, Error> {
    // hyper gives a declared `Content-Length` as the exact size.
    if body.size_hint().lower() > limit as u64 {
        return Err(Error::TooLarge(limit));
    }
    let mut collected = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.map_err(Error::Protocol)?.data_ref() {
            if data.len() > limit - collected.len() {
                return Err(Error::TooLarge(limit));
            }
            collected.extend_from_slice(data);
        }
    }
    Ok(collected.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Target {
        Target::parse(url).unwrap_or_else(|error| panic!("{url}: {error}"))
    }

    fn refusal(url: &str) -> &'static str {
        match Target::parse(url) {
            Err(Error::InvalidUrl(reason)) => reason,
            other => panic!("{url}: expected InvalidUrl, got {other:?}"),
        }
    }

    #[test]
    fn refuses_loopback_private_link_local_and_other_non_public_addresses() {
        let refused = [
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.0.1",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "::ffff:100.64.0.1",
            "64:ff9b::169.254.169.254",
            "64:ff9b::127.0.0.1",
        ];
        for address in refused {
            let ip: IpAddr = address.parse().unwrap();
            assert!(!is_public_address(ip), "{address} was allowed");
        }
    }

    #[test]
    fn allows_public_addresses_including_the_neighbours_of_refused_ranges() {
        let allowed = [
            "8.8.8.8",
            "1.1.1.1",
            "9.255.255.255",
            "11.0.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "fe7f::1",
            "fec0::1",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
        ];
        for address in allowed {
            let ip: IpAddr = address.parse().unwrap();
            assert!(is_public_address(ip), "{address} was refused");
        }
    }

    #[test]
    fn a_url_gives_host_port_and_an_origin_form_path() {
        let plain = target("http://example.com");
        assert_eq!((plain.host.as_str(), plain.port), ("example.com", 80));
        assert_eq!(plain.server(), "example.com:80");
        assert_eq!(plain.path, "/");

        let full = target("HTTP://api.example.com:8080/v1/chat?stream=false#top");
        assert_eq!((full.host.as_str(), full.port), ("api.example.com", 8080));
        assert_eq!(full.path, "/v1/chat?stream=false");

        assert_eq!(target("http://example.com?a=b").path, "/?a=b");
        assert_eq!(target("http://example.com/#x").path, "/");

        let v6 = target("http://[::1]:8000/jwks");
        assert_eq!((v6.host.as_str(), v6.port), ("[::1]", 8000));
        assert_eq!(v6.path, "/jwks");
        assert_eq!(target("http://[fe80::1]/").server(), "[fe80::1]:80");
        assert_eq!(target("http://example.com//twice").path, "//twice");
    }

    #[test]
    fn host_header_has_the_port_unless_it_is_80() {
        let host = |url: &str| target(url).http_request(Request::get(url)).headers()[HOST].clone();
        assert_eq!(host("http://example.com/"), "example.com");
        assert_eq!(host("http://example.com:80/"), "example.com");
        assert_eq!(host("http://example.com:8080/"), "example.com:8080");
        assert_eq!(host("http://[::1]/"), "[::1]");
        assert_eq!(host("http://[::1]:8080/"), "[::1]:8080");
    }

    #[test]
    fn the_clients_framing_headers_replace_the_callers() {
        let request = Request::get("http://example.com/")
            .header(HOST, HeaderValue::from_static("evil.example"))
            .header(CONNECTION, HeaderValue::from_static("keep-alive"))
            .header(TRANSFER_ENCODING, HeaderValue::from_static("chunked"))
            .header(CONTENT_LENGTH, HeaderValue::from_static("99"));
        let sent = target(&request.url.clone()).http_request(request);
        let headers = sent.headers();
        assert_eq!(headers.get_all(HOST).iter().count(), 1);
        assert_eq!(headers[HOST], "example.com");
        assert_eq!(headers[CONNECTION], "close");
        assert!(!headers.contains_key(TRANSFER_ENCODING));
        assert!(!headers.contains_key(CONTENT_LENGTH));
        assert_eq!(headers[USER_AGENT], DEFAULT_USER_AGENT);

        let own_agent = Request::post("http://example.com/", "{}")
            .header(USER_AGENT, HeaderValue::from_static("generator/2"));
        let sent = target("http://example.com/").http_request(own_agent);
        assert_eq!(sent.headers()[USER_AGENT], "generator/2");
        assert_eq!(sent.headers()[CONTENT_LENGTH], "2");
    }

    #[test]
    fn https_means_tls_on_port_443_unless_the_url_says_otherwise() {
        let secure = target("https://example.com/v1");
        assert!(secure.tls);
        assert_eq!(secure.server(), "example.com:443");
        assert!(!target("http://example.com/").tls);
        assert_eq!(target("HTTPS://example.com:8443/").port, 8443);
        let host = |url: &str| target(url).http_request(Request::get(url)).headers()[HOST].clone();
        assert_eq!(host("https://example.com/"), "example.com");
        assert_eq!(host("https://example.com:80/"), "example.com:80");
        assert!(Error::TlsUnavailable
            .to_string()
            .contains("`tls` cargo feature"));
    }

    #[test]
    fn malformed_urls_are_refused_with_a_reason_that_does_not_repeat_them() {
        let cases = [
            ("example.com/path", "expected http://"),
            ("ftp://example.com/", "scheme"),
            ("https://user:secret@example.com/", "credentials"),
            ("http://", "no host"),
            ("http:///path", "no host"),
            ("http://:8080/", "no host"),
            ("http://user:secret@example.com/", "credentials"),
            ("http://example.com:0/", "port"),
            ("http://example.com:65536/", "port"),
            ("http://example.com:+80/", "port"),
            ("http://example.com:/", "port"),
            ("http://example.com:http/", "port"),
            ("http://::1/", "[brackets]"),
            ("http://[::1/", "[brackets]"),
            ("http://[example.com]/", "[brackets]"),
            ("http://[::1]x/", "[brackets]"),
            ("http://exa mple.com/", "ASCII name"),
            ("http://bücher.example/", "ASCII name"),
            ("http://example.com/a b", "character"),
            ("http://example.com/\nsecret", "character"),
        ];
        for (url, expected) in cases {
            let reason = refusal(url);
            assert!(reason.contains(expected), "{url}: {reason}");
            let message = Error::InvalidUrl(reason).to_string();
            assert!(
                !message.contains("secret") && !message.contains("example"),
                "{message}"
            );
        }
    }
}
