//! A webhook receiver on 127.0.0.1:0: real TCP and HTTP/1.1, answering each request as its
//! script says (a status, or never), and handing every request it got to the test.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::PATIENCE;

/// How the receiver answers one request.
#[derive(Clone, Debug)]
pub enum Answer {
    /// This status, with an empty body.
    Status(u16),
    /// `307 Temporary Redirect` to this URL.
    Redirect(String),
    /// Nothing, ever: the request stays open until the client gives up.
    Hang,
}

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// The receiver; it serves until the test's runtime ends.
pub struct Receiver {
    pub addr: SocketAddr,
    received: mpsc::UnboundedReceiver<Received>,
}

impl Receiver {
    /// Answers the requests with `script` in order, then every further one with `fallback`.
    pub async fn start(script: Vec<Answer>, fallback: Answer) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sender, received) = mpsc::unbounded_channel();
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let (sender, script, fallback) = (sender.clone(), script.clone(), fallback.clone());
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let (sender, script, fallback) =
                        (sender.clone(), script.clone(), fallback.clone());
                    async move {
                        let (head, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let answer = script.lock().unwrap().pop_front();
                        let answer = answer.unwrap_or(fallback);
                        let _ = sender.send(Received {
                            path: head.uri.path().to_owned(),
                            headers: head.headers,
                            body,
                        });
                        match answer {
                            Answer::Status(status) => {
                                let mut response = Response::new(Full::new(Bytes::new()));
                                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                                Ok::<_, hyper::Error>(response)
                            }
                            Answer::Redirect(location) => {
                                let mut response = Response::new(Full::new(Bytes::new()));
                                *response.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                                let location = location.parse().unwrap();
                                response.headers_mut().insert("location", location);
                                Ok(response)
                            }
                            Answer::Hang => std::future::pending().await,
                        }
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(socket), service));
            }
        });
        Receiver { addr, received }
    }

    /// The receiver's URL, with `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next request received; panics if none arrives within `PATIENCE`.
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(PATIENCE, self.received.recv())
            .await
            .expect("a webhook request arrives in time")
            .expect("the receiver runs")
    }
}
