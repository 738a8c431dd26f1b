//! Tokens already verified, so that a client sending the same token on every request (a
//! publisher, a browser reopening its stream) pays for the signature check once.
//!
//! Only a token that passed every check is remembered, under its exact text, and only while
//! the key set that verified it is current, until it expires, and for at most [`MAX_AGE`]. A
//! JWKS refetch therefore checks every token again, as the removal of a key requires.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::Identity;
use crate::panic::lock;

/// How long a verified token is trusted without checking it again.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// Most tokens remembered; past that, the stale ones are dropped, or all of them.
const CAPACITY: usize = 1024;
/// Longer tokens are verified every time, so the cache stays within a few MiB (a token and
/// its `sub`, which a token of this length can hold, per entry).
const MAX_TOKEN_LEN: usize = 2048;

/// Verified tokens and whom they speak for.
#[derive(Default)]
pub(super) struct VerifiedTokens {
    entries: Mutex<HashMap<Box<str>, Remembered>>,
}

struct Remembered {
    identity: Identity,
    /// The key set's generation when the token was verified.
    generation: u64,
    until: Instant,
}

impl VerifiedTokens {
    /// The identity of `token` if it was verified under key set `generation`, less than
    /// [`MAX_AGE`] ago, and has not expired since (`now_unix` in seconds since the epoch).
    pub(super) fn get(&self, token: &str, generation: u64, now_unix: u64) -> Option<Identity> {
        let entries = lock(&self.entries);
        let remembered = entries.get(token)?;
        let fresh = remembered.generation == generation
            && Instant::now() < remembered.until
            && now_unix <= remembered.identity.valid_until;
        fresh.then(|| remembered.identity.clone())
    }

    /// Remembers that `token` verified as `identity` under key set `generation`.
    pub(super) fn insert(&self, token: &str, generation: u64, identity: &Identity) {
        if token.len() > MAX_TOKEN_LEN {
            return;
        }
        let now = Instant::now();
        let mut entries = lock(&self.entries);
        if entries.len() >= CAPACITY {
            entries.retain(|_, remembered| now < remembered.until);
            // Mostly fresh entries: more tokens are in use than fit, and scanning again at
            // the next insert would only make every request wait on the lock.
            if entries.len() >= CAPACITY * 3 / 4 {
                entries.clear();
            }
        }
        let remembered = Remembered {
            identity: identity.clone(),
            generation,
            until: now + MAX_AGE,
        };
        entries.insert(token.into(), remembered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(valid_until: u64) -> Identity {
        Identity {
            user_id: "alice".to_owned(),
            publisher: false,
            valid_until,
        }
    }

    #[test]
    fn a_token_is_remembered_until_it_expires() {
        let tokens = VerifiedTokens::default();
        tokens.insert("a.b.c", 0, &identity(100));
        assert_eq!(tokens.get("a.b.c", 0, 100), Some(identity(100)));
        assert_eq!(tokens.get("a.b.c", 0, 101), None);
        assert_eq!(tokens.get("a.b.d", 0, 50), None);
    }

    #[test]
    fn a_new_key_set_checks_every_token_again() {
        let tokens = VerifiedTokens::default();
        tokens.insert("a.b.c", 3, &identity(u64::MAX));
        assert_eq!(tokens.get("a.b.c", 4, 0), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_is_checked_again_after_the_maximum_age() {
        let tokens = VerifiedTokens::default();
        tokens.insert("a.b.c", 0, &identity(u64::MAX));
        tokio::time::advance(MAX_AGE - Duration::from_secs(1)).await;
        assert!(tokens.get("a.b.c", 0, 0).is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(tokens.get("a.b.c", 0, 0), None);
    }

    #[test]
    fn long_tokens_are_not_kept_and_the_cache_stays_bounded() {
        let tokens = VerifiedTokens::default();
        tokens.insert(&"x".repeat(MAX_TOKEN_LEN + 1), 0, &identity(u64::MAX));
        assert_eq!(lock(&tokens.entries).len(), 0);
        for n in 0..CAPACITY * 3 {
            tokens.insert(&format!("token-{n}"), 0, &identity(u64::MAX));
            assert!(lock(&tokens.entries).len() <= CAPACITY);
        }
    }
}
