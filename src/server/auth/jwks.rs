//! The identity provider's published keys (`JWT_JWKS_URL`): fetched at start, refetched when a
//! token names a key not seen yet, so that a key rotation needs no restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey};

use super::keys::{self, VerifyingKey};
use crate::http_client::{Client, Limits, Request, TlsConnector};
use crate::log;

/// The shortest time between two fetches: a stream of tokens with made-up `kid`s costs the
/// provider one request per interval, not one per token.
pub const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Time allowed for one fetch, connect included. It is short because a token with a new
/// `kid` waits for it.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest JWKS document read; providers publish a few keys, a few KiB.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// The cached key set of one JWKS URL.
pub struct Jwks {
    url: String,
    client: Client,
    keys: RwLock<Arc<Vec<VerifyingKey>>>,
    /// When the last fetch began; held across a fetch, so that concurrent requests for an
    /// unknown `kid` wait for one fetch instead of each starting their own.
    last_fetch: tokio::sync::Mutex<Instant>,
    /// Counts the key sets fetched, so that tokens verified under an earlier set are checked
    /// again.
    generation: AtomicU64,
}

impl Jwks {
    /// Fetches `url` once; an error (unreachable, not JSON, no usable key) refuses the start.
    pub async fn fetch(url: &str, tls: Option<Arc<dyn TlsConnector>>) -> Result<Jwks, String> {
        let client = Client {
            limits: Limits {
                connect_timeout: FETCH_TIMEOUT,
                total_timeout: FETCH_TIMEOUT,
                max_response_bytes: MAX_JWKS_BYTES,
            },
            // The operator chose this URL; a provider on the private network is common.
            address_policy: None,
            tls,
        };
        let keys = fetch_keys(&client, url).await?;
        Ok(Jwks {
            url: url.to_owned(),
            client,
            keys: RwLock::new(Arc::new(keys)),
            last_fetch: tokio::sync::Mutex::new(Instant::now()),
            generation: AtomicU64::new(0),
        })
    }

    /// The key with this `kid` that accepts `algorithm`, refetching the set first when the
    /// `kid` is unknown and the last fetch is at least [`MIN_REFETCH_INTERVAL`] old. A failed
    /// refetch keeps the cached keys.
    pub async fn key(&self, kid: &str, algorithm: Algorithm) -> Option<DecodingKey> {
        if let Some(key) = self.cached(kid, algorithm) {
            return Some(key);
        }
        let mut last_fetch = self.last_fetch.lock().await;
        // Someone else's fetch, which this request waited for, may have brought the key.
        if let Some(key) = self.cached(kid, algorithm) {
            return Some(key);
        }
        if last_fetch.elapsed() < MIN_REFETCH_INTERVAL {
            return None;
        }
        *last_fetch = Instant::now();
        match fetch_keys(&self.client, &self.url).await {
            // A poisoned lock still holds a whole key set: writers only swap an `Arc`.
            Ok(keys) => {
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                self.generation.fetch_add(1, Ordering::Release);
            }
            Err(error) => log::warning!("JWT_JWKS_URL {error}; keeping the cached keys"),
        }
        self.cached(kid, algorithm)
    }

    /// The only cached key that accepts `algorithm`, for a token without a `kid`; `None` when
    /// there is none, or several to choose from.
    pub fn only_key_for(&self, algorithm: Algorithm) -> Option<DecodingKey> {
        let keys = self.snapshot();
        let mut fitting = keys.iter().filter(|key| key.accepts(algorithm));
        match (fitting.next(), fitting.next()) {
            (Some(key), None) => Some(key.key.clone()),
            _ => None,
        }
    }

    /// Which key set is current: it changes with every successful refetch.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// How many keys are cached, for the start-up log line.
    pub fn key_count(&self) -> usize {
        self.snapshot().len()
    }

    fn cached(&self, kid: &str, algorithm: Algorithm) -> Option<DecodingKey> {
        self.snapshot()
            .iter()
            .find(|key| key.kid.as_deref() == Some(kid) && key.accepts(algorithm))
            .map(|key| key.key.clone())
    }

    fn snapshot(&self) -> Arc<Vec<VerifyingKey>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One fetch: the error names the URL's problem but never a response body.
async fn fetch_keys(client: &Client, url: &str) -> Result<Vec<VerifyingKey>, String> {
    let response = client
        .send(Request::get(url))
        .await
        .map_err(|error| format!("could not be fetched: {error}"))?;
    if !response.status.is_success() {
        return Err(format!("answered {}", response.status));
    }
    let (keys, skipped) = keys::from_jwks(&response.body)?;
    if skipped > 0 {
        log::debug!(
            "JWT_JWKS_URL: skipped {skipped} keys that are not signing keys this server supports"
        );
    }
    Ok(keys)
}
