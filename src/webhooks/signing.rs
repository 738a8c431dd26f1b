//! Standard Webhooks signing, pure: secrets in their `whsec_<base64>` form, and the
//! `webhook-signature` value `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed
//! with the secret's decoded bytes (<https://www.standardwebhooks.com>).
//!
//! **Invariant:** nothing here logs or formats a secret; a [`SigningKey`]'s `Debug` is redacted.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix of a secret's text form, as the specification writes it.
pub const SECRET_PREFIX: &str = "whsec_";
/// Random bytes in a generated secret: 192 bits, within the specification's 24 to 64.
const GENERATED_SECRET_BYTES: usize = 24;

/// A secret's decoded bytes, the HMAC key.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    /// A new random key from the operating system's random source.
    pub fn generate() -> SigningKey {
        let mut key = vec![0u8; GENERATED_SECRET_BYTES];
        getrandom::getrandom(&mut key).expect("the operating system's random source works");
        SigningKey(key)
    }

    /// Decodes `whsec_<base64>`; the error says what is wrong without repeating the value.
    pub fn parse(text: &str) -> Result<SigningKey, &'static str> {
        let encoded = text
            .strip_prefix(SECRET_PREFIX)
            .ok_or("expected whsec_ followed by base64")?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| "the part after whsec_ is not valid base64")?;
        if key.len() < 16 {
            return Err("the decoded secret is shorter than 16 bytes");
        }
        Ok(SigningKey(key))
    }

    /// The `whsec_<base64>` text, shown once to the subscriber and stored for signing.
    pub fn to_text(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.0))
    }

    /// The `webhook-signature` header value for one attempt of message `id`.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_specifications_test_vector_exactly() {
        // The example in the Standard Webhooks specification and its reference libraries.
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = key.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_generated_secret_round_trips_through_its_text_form() {
        let key = SigningKey::generate();
        let text = key.to_text();
        assert!(text.starts_with("whsec_"), "{text}");
        assert_eq!(SigningKey::parse(&text).unwrap(), key);
        assert_ne!(SigningKey::generate(), key);
        assert_eq!(format!("{key:?}"), "SigningKey([redacted])");
    }

    #[test]
    fn malformed_secrets_are_refused_without_repeating_them() {
        for (text, expected) in [
            ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "expected whsec_"),
            ("whsec_not base64!", "not valid base64"),
            ("whsec_c2hvcnQ=", "shorter than 16 bytes"),
        ] {
            let reason = SigningKey::parse(text).unwrap_err();
            assert!(reason.contains(expected), "{text}: {reason}");
        }
    }
}
