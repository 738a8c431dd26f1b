//! Voice notifications: the server, plus a bus subscriber in the shape of the product
//! documentation's `voice_notification_handler`. When a job completes for a user with an
//! active voice session, it says "Your quiz is ready" with `espeak-ng`: to the default audio
//! device, or into `<wav-dir>/<job_id>.wav`.
//!
//! ```text
//! cargo run --example voice_notifier -- [--wav-dir DIR] [--session USER]... [--sessions-addr 127.0.0.1:8010]
//! ```
//! The server takes its usual settings from the environment (`ADDR`, `JWT_SECRET`, ...).
//! Voice sessions are a set of user ids: `--session USER` at start, and a small API on
//! `--sessions-addr`: `PUT /voice/sessions/{user_id}` opens one, `DELETE` closes it (204 each),
//! `GET /voice/sessions` lists them.
//!
//! Utterances are spoken one at a time, in the order the jobs completed (one speaker task
//! behind a queue), so that they never talk over each other, and the handler itself only
//! queues: the bus is never held up by speech synthesis.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use artifact_events::config::Config;
use artifact_events::server::{self, AppState};
use artifact_events::{get_event_bus, EventType, Handler};
use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Utterances waiting for the speaker; beyond it one is skipped (and logged).
const SPEECH_QUEUE: usize = 64;

/// The users with an active voice session.
type Sessions = Arc<Mutex<BTreeSet<String>>>;

/// One thing to say, and where.
struct Utterance {
    text: String,
    /// `Some(path)`: write a WAV there; `None`: play on the default audio device.
    wav: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    let mut wav_dir: Option<PathBuf> = None;
    let mut sessions_addr = "127.0.0.1:8010".to_owned();
    let sessions: Sessions = Arc::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--wav-dir" => wav_dir = Some(PathBuf::from(value())),
            "--session" => {
                sessions.lock().unwrap().insert(value());
            }
            "--sessions-addr" => sessions_addr = value(),
            _ => usage(&format!("unknown argument {arg}")),
        }
    }
    if let Some(dir) = &wav_dir {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| usage(&format!("--wav-dir: {e}")));
    }

    let (speech, queue) = mpsc::channel(SPEECH_QUEUE);
    tokio::spawn(speaker(queue));
    let bus = get_event_bus();
    bus.subscribe(
        EventType::COMPLETED,
        voice_notification_handler(sessions.clone(), speech, wav_dir),
    );

    let sessions_listener = TcpListener::bind(&sessions_addr)
        .await
        .unwrap_or_else(|e| usage(&format!("--sessions-addr {sessions_addr}: {e}")));
    eprintln!(
        "voice sessions on http://{}",
        sessions_listener.local_addr().unwrap()
    );
    tokio::spawn(serve_sessions(sessions_listener, sessions));

    let config = Config::from_env().unwrap_or_else(|e| usage(&e.to_string()));
    let listener = TcpListener::bind(config.addr)
        .await
        .unwrap_or_else(|e| usage(&format!("ADDR {}: {e}", config.addr)));
    let state = AppState::open(config, bus)
        .await
        .unwrap_or_else(|e| usage(&e));
    server::run(listener, state, server::shutdown_signal()).await;
}

/// The documentation's `voice_notification_handler`: for a completed job whose user has an
/// active voice session, queue "Your <artifact_type> is ready".
fn voice_notification_handler(
    sessions: Sessions,
    speech: mpsc::Sender<Utterance>,
    wav_dir: Option<PathBuf>,
) -> Handler {
    Handler::new(move |event_data: Arc<Value>| {
        let user = event_data["user_id"].as_str().unwrap_or_default();
        let active = sessions.lock().unwrap().contains(user);
        if active {
            let artifact = event_data["artifact_type"].as_str().unwrap_or("artifact");
            let verb = if artifact.ends_with('s') { "are" } else { "is" };
            let job_id: String = event_data["job_id"]
                .as_str()
                .unwrap_or("job")
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            let utterance = Utterance {
                text: format!("Your {artifact} {verb} ready"),
                wav: wav_dir
                    .as_ref()
                    .map(|dir| dir.join(format!("{job_id}.wav"))),
            };
            if speech.try_send(utterance).is_err() {
                eprintln!("voice: the speech queue is full; job {job_id} is not announced");
            }
        }
        std::future::ready(())
    })
}

/// Speaks the queued utterances one after the other with `espeak-ng`.
async fn speaker(mut queue: mpsc::Receiver<Utterance>) {
    while let Some(utterance) = queue.recv().await {
        let Utterance { text, wav } = utterance;
        let spoken = tokio::task::spawn_blocking(move || {
            let mut command = std::process::Command::new("espeak-ng");
            if let Some(path) = &wav {
                command.arg("-w").arg(path);
            }
            let status = command.arg("--").arg(&text).status();
            (text, wav, status)
        })
        .await;
        match spoken {
            Ok((text, wav, Ok(status))) if status.success() => match wav {
                Some(path) => eprintln!("voice: said {text:?} into {}", path.display()),
                None => eprintln!("voice: said {text:?}"),
            },
            Ok((text, _, Ok(status))) => {
                eprintln!("voice: espeak-ng failed ({status}) on {text:?}")
            }
            Ok((_, _, Err(error))) => eprintln!("voice: cannot run espeak-ng: {error}"),
            Err(error) => eprintln!("voice: the speech task failed: {error}"),
        }
    }
}

/// The session API: `PUT` and `DELETE /voice/sessions/{user_id}`, `GET /voice/sessions`.
async fn serve_sessions(listener: TcpListener, sessions: Sessions) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let sessions = sessions.clone();
        let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let sessions = sessions.clone();
            async move {
                let path = request.uri().path().to_owned();
                let user = path
                    .strip_prefix("/voice/sessions/")
                    .filter(|u| !u.is_empty());
                let mut sessions = sessions.lock().unwrap();
                let (status, body) = match (request.method(), user) {
                    (&Method::PUT, Some(user)) => {
                        sessions.insert(user.to_owned());
                        (StatusCode::NO_CONTENT, String::new())
                    }
                    (&Method::DELETE, Some(user)) => {
                        sessions.remove(user);
                        (StatusCode::NO_CONTENT, String::new())
                    }
                    (&Method::GET, None) if path == "/voice/sessions" => {
                        (StatusCode::OK, serde_json::json!(*sessions).to_string())
                    }
                    _ => (StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.to_owned()),
                };
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(socket), service));
    }
}

fn usage(problem: &str) -> ! {
    eprintln!("voice_notifier: {problem}\nusage: voice_notifier [--wav-dir DIR] [--session USER]... [--sessions-addr ADDR]");
    std::process::exit(2)
}
