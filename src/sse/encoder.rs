//! The SSE wire format, fields to bytes, with no I/O.
//!
//! No value can inject a line, field or frame: `data` is split into one `data:` line per line
//! (CR, LF and CRLF each end a line, so the parser gives back the text with every line end as
//! LF), and single-line fields (`id`, `event`, comments) holding a line break are rejected.

use bytes::{BufMut, Bytes, BytesMut};

/// One event to encode; `None` fields are left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event<'a> {
    /// The `id:` field, which the client sends back as `Last-Event-ID`.
    pub id: Option<&'a str>,
    /// The `event:` field; clients using `onmessage` only see events without one. `Some("")`
    /// is sent as is and clients dispatch it as `message`, exactly like `None`.
    pub event: Option<&'a str>,
    /// The payload, any text.
    pub data: &'a str,
    /// The `retry:` field: the client's reconnection delay in milliseconds.
    pub retry: Option<u64>,
}

/// A field value that the SSE format cannot carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// `id`, `event` or a comment holds CR or LF, which would end the field early.
    LineBreak(&'static str),
    /// `id` holds NUL, which makes clients ignore the whole field.
    NulInId,
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncodeError::LineBreak(field) => write!(f, "SSE {field} must not contain CR or LF"),
            EncodeError::NulInId => f.write_str("SSE id must not contain NUL"),
        }
    }
}

impl std::error::Error for EncodeError {}

/// The keepalive comment frame.
pub const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// Encodes `event` as one frame (fields, then the blank line that dispatches it).
pub fn encode(event: &Event<'_>) -> Result<Bytes, EncodeError> {
    // Room for the usual fields, so that a frame is seldom reallocated while it is written.
    let fields = event.id.map_or(0, str::len) + event.event.map_or(0, str::len);
    let mut out = BytesMut::with_capacity(event.data.len() + fields + 40);
    if let Some(id) = event.id {
        check_single_line("id", id)?;
        if id.contains('\0') {
            return Err(EncodeError::NulInId);
        }
        put_field(&mut out, "id", id);
    }
    if let Some(event_type) = event.event {
        check_single_line("event", event_type)?;
        put_field(&mut out, "event", event_type);
    }
    if let Some(retry) = event.retry {
        put_field(&mut out, "retry", &retry.to_string());
    }
    put_data(&mut out, event.data);
    out.put_u8(b'\n');
    Ok(out.freeze())
}

/// Encodes an event that has only data; such an event always encodes.
pub fn encode_data(data: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 8);
    put_data(&mut out, data);
    out.put_u8(b'\n');
    out.freeze()
}

/// Encodes a comment frame, which clients ignore (used for keepalives).
pub fn encode_comment(text: &str) -> Result<Bytes, EncodeError> {
    check_single_line("comment", text)?;
    let mut out = BytesMut::with_capacity(text.len() + 4);
    put_field(&mut out, "", text);
    out.put_u8(b'\n');
    Ok(out.freeze())
}

fn put_data(out: &mut BytesMut, data: &str) {
    for line in lines(data) {
        put_field(out, "data", line);
    }
}

/// Writes `name: value\n`, or `name:\n` for an empty value (the parser strips one space).
fn put_field(out: &mut BytesMut, name: &str, value: &str) {
    out.put_slice(name.as_bytes());
    out.put_u8(b':');
    if !value.is_empty() {
        out.put_u8(b' ');
        out.put_slice(value.as_bytes());
    }
    out.put_u8(b'\n');
}

fn check_single_line(field: &'static str, value: &str) -> Result<(), EncodeError> {
    match value.contains(['\r', '\n']) {
        true => Err(EncodeError::LineBreak(field)),
        false => Ok(()),
    }
}

/// Splits on CRLF, CR and LF, each one line end, as SSE parsers do; `"a\n"` is `["a", ""]`.
/// Searched by byte, not by `char`: both are ASCII, so a match is always a char boundary.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.bytes().position(|b| b == b'\r' || b == b'\n') {
            None => {
                rest = None;
                Some(current)
            }
            Some(end) => {
                let after = match current[end..].starts_with("\r\n") {
                    true => end + 2,
                    false => end + 1,
                };
                rest = Some(&current[after..]);
                Some(&current[..end])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(text: &str) -> Bytes {
        let frame = encode_data(text);
        let as_event = Event {
            data: text,
            ..Event::default()
        };
        assert_eq!(encode(&as_event).unwrap(), frame);
        frame
    }

    #[test]
    fn data_only_event_is_one_line_and_a_blank_line() {
        assert_eq!(data(r#"{"a":1}"#), &b"data: {\"a\":1}\n\n"[..]);
    }

    #[test]
    fn every_line_end_becomes_its_own_data_line() {
        assert_eq!(data("a\nb"), &b"data: a\ndata: b\n\n"[..]);
        assert_eq!(data("a\r\nb"), &b"data: a\ndata: b\n\n"[..]);
        assert_eq!(data("a\rb"), &b"data: a\ndata: b\n\n"[..]);
        assert_eq!(data("a\n\nb"), &b"data: a\ndata:\ndata: b\n\n"[..]);
        assert_eq!(data("a\r\r\nb"), &b"data: a\ndata:\ndata: b\n\n"[..]);
    }

    #[test]
    fn trailing_and_empty_lines_are_kept() {
        assert_eq!(data(""), &b"data:\n\n"[..]);
        assert_eq!(data("a\n"), &b"data: a\ndata:\n\n"[..]);
        assert_eq!(data("\n"), &b"data:\ndata:\n\n"[..]);
    }

    #[test]
    fn leading_space_of_data_survives_the_parsers_one_space_strip() {
        assert_eq!(data(" x"), &b"data:  x\n\n"[..]);
    }

    #[test]
    fn fields_come_in_a_fixed_order() {
        let event = Event {
            id: Some("7"),
            event: Some("update"),
            data: "x",
            retry: Some(2000),
        };
        assert_eq!(
            encode(&event).unwrap(),
            &b"id: 7\nevent: update\nretry: 2000\ndata: x\n\n"[..]
        );
    }

    #[test]
    fn single_line_fields_reject_line_breaks_and_nul() {
        let with_id = |id| Event {
            id: Some(id),
            ..Event::default()
        };
        assert_eq!(encode(&with_id("1\n2")), Err(EncodeError::LineBreak("id")));
        assert_eq!(encode(&with_id("1\r")), Err(EncodeError::LineBreak("id")));
        assert_eq!(encode(&with_id("1\0")), Err(EncodeError::NulInId));
        let with_type = Event {
            event: Some("a\r\nb"),
            ..Event::default()
        };
        assert_eq!(encode(&with_type), Err(EncodeError::LineBreak("event")));
        assert_eq!(
            encode_comment("x\ny"),
            Err(EncodeError::LineBreak("comment"))
        );
    }

    #[test]
    fn keepalive_is_a_comment_frame() {
        assert_eq!(encode_comment("keepalive").unwrap(), KEEPALIVE);
    }
}
