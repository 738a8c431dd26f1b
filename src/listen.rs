//! The `listen` command's client: opens a user's event stream over plain HTTP/1.1 and writes
//! each event's data as a line the moment it arrives.

use std::fmt;
use std::io::Write;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, HOST};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::sse::Parser;

/// The server `listen` connects to unless `--url` says otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8000";
/// The event stream's path on the server.
pub const STREAM_PATH: &str = "/ai/artifact/events/stream";

/// Why listening ended before the server ended the stream.
#[derive(Debug)]
pub enum ListenError {
    /// The URL is not `http://HOST[:PORT]`.
    Url(String),
    /// The token cannot be sent in a header (it holds a line break or other control byte).
    Token,
    /// The TCP connection could not be opened.
    Connect(std::io::Error),
    /// The HTTP exchange failed: the connection broke or the response was malformed.
    Http(hyper::Error),
    /// The server refused the stream; the text is its JSON error body.
    Refused(StatusCode, String),
    /// An event could not be written out (say, the reading end of a pipe closed).
    Output(std::io::Error),
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenError::Url(problem) => write!(f, "--url: {problem}"),
            ListenError::Token => f.write_str("the token is not a valid header value"),
            ListenError::Connect(error) => write!(f, "cannot connect: {error}"),
            ListenError::Http(error) => write!(f, "HTTP error: {error}"),
            ListenError::Refused(status, body) => write!(f, "the server answered {status}: {body}"),
            ListenError::Output(error) => write!(f, "cannot write an event: {error}"),
        }
    }
}

impl std::error::Error for ListenError {}

/// Streams the events of `token`'s user from the server at `url` (`http://HOST[:PORT]`),
/// writing each event's data and a newline to `out`; returns when the server ends the stream.
///
/// This server's events are compact JSON, so each is one line, ready for `jq`; data holding
/// line breaks would span several lines.
pub async fn listen(url: &str, token: &str, out: &mut impl Write) -> Result<(), ListenError> {
    let uri: Uri = url
        .parse()
        .map_err(|error| ListenError::Url(format!("{url}: {error}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(ListenError::Url(format!(
            "{url}: only http:// is supported"
        )));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(ListenError::Url(format!(
            "{url}: give the server's root, e.g. {DEFAULT_URL}; the stream's path is added"
        )));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| ListenError::Url(format!("{url}: no host")))?;
    let bearer =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| ListenError::Token)?;
    let stream = TcpStream::connect((authority.host(), authority.port_u16().unwrap_or(80)))
        .await
        .map_err(ListenError::Connect)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ListenError::Http)?;
    // The connection task ends with the stream; its errors also surface as body errors below.
    tokio::spawn(connection);
    let request = Request::get(STREAM_PATH)
        .header(HOST, authority.as_str())
        .header(AUTHORIZATION, bearer)
        .header(ACCEPT, "text/event-stream")
        .body(Empty::<Bytes>::new())
        .expect("a constant path and valid headers make a valid request");
    let (head, mut body) = sender
        .send_request(request)
        .await
        .map_err(ListenError::Http)?
        .into_parts();
    if head.status != StatusCode::OK {
        let error = body.collect().await.map_err(ListenError::Http)?.to_bytes();
        let error = String::from_utf8_lossy(&error).into_owned();
        return Err(ListenError::Refused(head.status, error));
    }
    let mut parser = Parser::new();
    while let Some(frame) = body.frame().await {
        let Ok(chunk) = frame.map_err(ListenError::Http)?.into_data() else {
            continue;
        };
        for event in parser.feed(&chunk) {
            writeln!(out, "{}", event.data).map_err(ListenError::Output)?;
            // Each event is shown as it arrives, also when `out` is a pipe.
            out.flush().map_err(ListenError::Output)?;
        }
    }
    parser.finish();
    Ok(())
}
