//! A `redis-server` of a test's own, for the tests that stop, kill or restart Redis (which the
//! shared one at `REDIS_URL` must survive), and the lookup of that shared one.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TempDir, PATIENCE};

/// The shared Redis at `REDIS_URL`, for tests that leave Redis alone; `None` (the test skips).
pub fn shared_url() -> Option<String> {
    let url = std::env::var("REDIS_URL")
        .ok()
        .filter(|url| !url.is_empty());
    if url.is_none() {
        eprintln!("skipped: REDIS_URL is not set (start a redis-server and export it)");
    }
    url
}

/// A loopback port nothing listens on right now, for a server to take (or to find refused).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private `redis-server` on a free port with a data directory of its own, killed when dropped.
pub struct Redis {
    port: u16,
    /// Dropped after the process is killed, so Redis never writes into a removed directory.
    dir: TempDir,
    /// Append-only with an fsync per write, so that a SIGKILL loses nothing Redis answered.
    append_only: bool,
    child: Option<Child>,
}

impl Redis {
    /// Starts one; without `append_only` it keeps nothing, so that a restart loses every key.
    pub fn start(append_only: bool) -> Redis {
        let mut redis = Redis {
            port: free_port(),
            dir: TempDir::new("redis"),
            append_only,
            child: None,
        };
        redis.restart();
        redis
    }

    /// The URL the server binary and Redis clients connect with.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port, for a relay placed in front of this Redis.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts (again) on the same port and directory, and waits until it accepts connections.
    pub fn restart(&mut self) {
        let append_only = if self.append_only { "yes" } else { "no" };
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", append_only])
            .args(["--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir.0)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server; .ci/run does)");
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < PATIENCE, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `SHUTDOWN NOSAVE`: Redis stops at once, keeping nothing but its append-only file.
    pub fn shutdown(&mut self) {
        let status = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown", "nosave"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli is installed with redis-server");
        // The connection closes as Redis exits, which redis-cli may report as an error.
        let _ = status;
        if let Some(mut child) = self.child.take() {
            child.wait().unwrap();
        }
    }

    /// SIGKILL, as a crash would: only what the append-only file holds survives.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
