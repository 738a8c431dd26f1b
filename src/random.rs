//! Unguessable tokens from the operating system's CSPRNG.

use std::fmt::Write;

/// `bytes` random bytes from the operating system, as lowercase hex (URL-safe, 4 bits per char).
pub(crate) fn hex_token(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    // Without an entropy source no secret or id can be made safely; there is no fallback.
    getrandom::getrandom(&mut buffer).expect("the operating system's random source works");
    buffer
        .iter()
        .fold(String::with_capacity(bytes * 2), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}
