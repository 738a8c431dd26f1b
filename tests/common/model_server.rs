//! A fake OpenAI-compatible model server on 127.0.0.1: it answers `POST …/chat/completions`
//! from a script, one reply per request in order (then a fallback), records every request it
//! reads, and reports each connection whose client hung up while it held the answer back.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::PATIENCE;

/// What the fake does with one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// Answers with this status, these extra headers and this JSON body.
    Http {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Never answers; holds the connection until the client drops it, then reports that.
    Hang,
}

impl Reply {
    /// A 200 chat completion whose message content is `content`.
    pub fn completion(content: &str) -> Reply {
        let body = json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": "fake-model",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }],
        });
        Reply::status(200, body)
    }

    /// A 200 chat completion whose content is `artifact` as compact JSON.
    pub fn artifact(artifact: &Value) -> Reply {
        Reply::completion(&artifact.to_string())
    }

    /// An answer with `status` and a JSON `body` (an OpenAI-style error, for instance).
    pub fn status(status: u16, body: Value) -> Reply {
        Reply::Http {
            status,
            headers: Vec::new(),
            body: body.to_string(),
        }
    }

    /// An OpenAI-style error: `{"error": {"message": …}}`.
    pub fn error(status: u16, message: &str) -> Reply {
        Reply::status(
            status,
            json!({"error": {"message": message, "type": "fake_error"}}),
        )
    }

    /// The same reply with one more header.
    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        if let Reply::Http { headers, .. } = &mut self {
            headers.push((name.to_owned(), value.to_owned()));
        }
        self
    }
}

/// A request as the fake read it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub request_line: String,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Value,
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let found = self.headers.iter().find(|(n, _)| n == name);
        found.map(|(_, value)| value.as_str())
    }

    /// The `content` of message `index` (negative counts from the end).
    pub fn message(&self, index: isize) -> String {
        let messages = self.body["messages"].as_array().expect("messages");
        let index = if index < 0 {
            messages.len() as isize + index
        } else {
            index
        };
        messages[index as usize]["content"]
            .as_str()
            .expect("a text message")
            .to_owned()
    }
}

/// The running fake.
pub struct ModelServer {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    received: mpsc::UnboundedReceiver<()>,
    dropped: mpsc::UnboundedReceiver<()>,
}

impl ModelServer {
    /// Serves plain HTTP: `script` in order, then `fallback` for every later request.
    pub async fn start(script: Vec<Reply>, fallback: Reply) -> ModelServer {
        Self::start_wrapped(script, fallback, |stream| async move { stream }).await
    }

    /// Serves over whatever `wrap` makes of each accepted connection (TLS, for instance).
    pub async fn start_wrapped<W, F, S>(script: Vec<Reply>, fallback: Reply, wrap: W) -> ModelServer
    where
        W: Fn(TcpStream) -> F + Send + 'static,
        F: Future<Output = S> + Send + 'static,
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let (received_tx, received) = mpsc::unbounded_channel();
        let (dropped_tx, dropped) = mpsc::unbounded_channel();
        let recorded = requests.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let stream = wrap(stream);
                let (requests, script, fallback) =
                    (recorded.clone(), script.clone(), fallback.clone());
                let (received_tx, dropped_tx) = (received_tx.clone(), dropped_tx.clone());
                tokio::spawn(async move {
                    let mut stream = stream.await;
                    let Some(request) = read_request(&mut stream).await else {
                        return;
                    };
                    requests.lock().unwrap().push(request);
                    let _ = received_tx.send(());
                    let reply = script.lock().unwrap().pop_front().unwrap_or(fallback);
                    match reply {
                        Reply::Http {
                            status,
                            headers,
                            body,
                        } => {
                            let mut head = format!(
                                "HTTP/1.1 {status} Scripted\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                                body.len()
                            );
                            for (name, value) in headers {
                                head.push_str(&format!("{name}: {value}\r\n"));
                            }
                            head.push_str("\r\n");
                            let _ = stream.write_all(head.as_bytes()).await;
                            let _ = stream.write_all(body.as_bytes()).await;
                            let _ = stream.shutdown().await;
                        }
                        Reply::Hang => {
                            let mut rest = [0; 256];
                            while stream.read(&mut rest).await.is_ok_and(|n| n > 0) {}
                            let _ = dropped_tx.send(());
                        }
                    }
                });
            }
        });
        ModelServer {
            addr,
            requests,
            received,
            dropped,
        }
    }

    /// `http://ADDR/v1`, the base URL the generator is configured with.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request read so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until the fake has read one more request.
    pub async fn next_request(&mut self) {
        tokio::time::timeout(PATIENCE, self.received.recv())
            .await
            .expect("a request reaches the model server in time")
            .unwrap();
    }

    /// Waits until a client hangs up on a connection the fake is holding (a `Reply::Hang`).
    pub async fn connection_dropped(&mut self) {
        tokio::time::timeout(PATIENCE, self.dropped.recv())
            .await
            .expect("the client drops the held connection in time")
            .unwrap();
    }
}

/// Reads one request: the head, then a `Content-Length` body, parsed as JSON.
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Recorded> {
    let mut bytes = Vec::new();
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let mut chunk = [0; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
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
    let length = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .map_or(0, |(_, value)| value.parse().unwrap());
    let mut body = bytes[head_end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = [0; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Recorded {
        request_line,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        at: Instant::now(),
    })
}

/// A valid quiz of `count` distinct questions, as a model following the prompt would write it.
pub fn quiz(count: usize) -> Value {
    let questions: Vec<Value> = (1..=count)
        .map(|n| {
            json!({
                "question": format!("Which organelle is described by fact {n} about cells?"),
                "options": ["Mitochondrion", "Nucleus", "Ribosome", "Cell membrane"],
                "answer_index": n % 4,
                "explanation": format!("Fact {n} describes it."),
            })
        })
        .collect();
    json!({ "questions": questions })
}
