//! Unguessable tokens from the operating system's CSPRNG.

use std::fmt::Write;
use std::io::Read;

/// `bytes` random bytes from `/dev/urandom`, as lowercase hex (URL-safe, 4 bits per char).
pub fn hex_token(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    // Without an entropy source no secret or id can be made safely; there is no fallback.
    std::fs::File::open("/dev/urandom")
        .and_then(|mut source| source.read_exact(&mut buffer))
        .expect("/dev/urandom is readable");
    buffer
        .iter()
        .fold(String::with_capacity(bytes * 2), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}
