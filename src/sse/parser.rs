//! The SSE wire format, bytes to events, with no I/O: the WHATWG HTML "interpreting an event
//! stream" rules, to the letter.
//!
//! The stream is UTF-8 decoded lossily, after one leading BOM is stripped. Lines end with CRLF,
//! LF or CR, also when a CRLF is split across chunks. Decoding happens line by line, after the
//! split: CR and LF never occur inside a multi-byte sequence, so this is the same as decoding
//! the whole stream first, and a character split across chunks is decoded whole.

/// One dispatched event, as an `EventSource` hands it to its listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedEvent {
    /// The `event:` field's value, or `"message"` when the event had none (or an empty one).
    pub event_type: String,
    /// The `data:` lines, joined with LF.
    pub data: String,
    /// The last `id:` seen on the stream so far, which persists across events.
    pub last_event_id: String,
}

/// An incremental event stream parser: feed it the body's chunks as they arrive.
#[derive(Debug, Default)]
pub struct Parser {
    /// The bytes of the line not yet ended.
    line: Vec<u8>,
    /// The previous chunk ended with a CR, so a leading LF in the next one ends no line.
    after_cr: bool,
    /// A line has ended on this stream, so no BOM is stripped any more.
    past_first_line: bool,
    data: String,
    event_type: String,
    /// The spec's "last event ID buffer": set by `id:` fields, for this stream.
    last_event_id_buffer: String,
    /// The spec's "last event ID string" of the event source: set at each dispatch, kept
    /// across streams, and sent back as `Last-Event-ID` on reconnection.
    last_event_id: String,
    reconnection_time: Option<u64>,
}

/// The UTF-8 byte order mark, which the decoder strips once at the start of the stream.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Parses a whole stream at once; an event not ended by a blank line is discarded.
pub fn parse(stream: &[u8]) -> Vec<ParsedEvent> {
    let mut parser = Parser::new();
    let events = parser.feed(stream);
    parser.finish();
    events
}

impl Parser {
    /// A parser at the start of a stream, with no last event id and no reconnection time.
    pub fn new() -> Self {
        Parser::default()
    }

    /// Parses the next chunk of the stream and returns the events it completes, in order.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Vec<ParsedEvent> {
        let mut events = Vec::new();
        if let Some((&first, rest)) = chunk.split_first() {
            if self.after_cr && first == b'\n' {
                chunk = rest;
            }
            self.after_cr = false;
        }
        while let Some(end) = chunk
            .iter()
            .position(|&byte| byte == b'\r' || byte == b'\n')
        {
            self.line.extend_from_slice(&chunk[..end]);
            self.end_line(&mut events);
            let line_end = match &chunk[end..] {
                [b'\r', b'\n', ..] => 2,
                [b'\r'] => {
                    self.after_cr = true;
                    1
                }
                _ => 1,
            };
            chunk = &chunk[end + line_end..];
        }
        self.line.extend_from_slice(chunk);
        events
    }

    /// Ends the stream: the line and event not yet ended are discarded, as the spec says. The
    /// parser is then ready for the stream of a reconnection, keeping [`Parser::last_event_id`]
    /// and [`Parser::reconnection_time`].
    pub fn finish(&mut self) {
        self.line.clear();
        self.after_cr = false;
        self.past_first_line = false;
        self.data.clear();
        self.event_type.clear();
        self.last_event_id_buffer.clear();
    }

    /// The last event id of the last dispatch (or attempted dispatch: an event with no data
    /// still sets it): what a client sends as `Last-Event-ID` when it reconnects.
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// The reconnection delay in milliseconds from the last valid `retry:` field, if any; per
    /// the spec this is parser state, not part of any event.
    pub fn reconnection_time(&self) -> Option<u64> {
        self.reconnection_time
    }

    fn end_line(&mut self, events: &mut Vec<ParsedEvent>) {
        let mut bytes = &self.line[..];
        if !std::mem::replace(&mut self.past_first_line, true) {
            bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
        }
        let line = String::from_utf8_lossy(bytes).into_owned();
        self.line.clear();
        if line.is_empty() {
            return self.dispatch(events);
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        self.process_field(field, value);
    }

    fn process_field(&mut self, field: &str, value: &str) {
        match field {
            "event" => value.clone_into(&mut self.event_type),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => value.clone_into(&mut self.last_event_id_buffer),
            // The spec interprets any run of digits; one too large for a u64 is ignored here,
            // since no real delay is that long.
            "retry" if !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit()) => {
                if let Ok(millis) = value.parse() {
                    self.reconnection_time = Some(millis);
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, events: &mut Vec<ParsedEvent>) {
        self.last_event_id.clone_from(&self.last_event_id_buffer);
        let mut data = std::mem::take(&mut self.data);
        let event_type = std::mem::take(&mut self.event_type);
        if data.is_empty() {
            return;
        }
        data.pop();
        events.push(ParsedEvent {
            event_type: match event_type.is_empty() {
                true => "message".to_owned(),
                false => event_type,
            },
            data,
            last_event_id: self.last_event_id.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: &str, data: &str, last_event_id: &str) -> ParsedEvent {
        ParsedEvent {
            event_type: event_type.to_owned(),
            data: data.to_owned(),
            last_event_id: last_event_id.to_owned(),
        }
    }

    fn message(data: &str) -> ParsedEvent {
        event("message", data, "")
    }

    #[test]
    fn a_blank_line_dispatches_a_message_event() {
        assert_eq!(parse(b"data: hello\n\n"), [message("hello")]);
    }

    #[test]
    fn data_lines_are_joined_with_lf_and_the_last_lf_removed() {
        assert_eq!(parse(b"data: a\ndata:\ndata: b\n\n"), [message("a\n\nb")]);
        assert_eq!(parse(b"data\n\n"), [message("")]);
        assert_eq!(parse(b"data:\ndata:\n\n"), [message("\n")]);
    }

    #[test]
    fn cr_lf_and_crlf_each_end_a_line() {
        let expected = [message("a\nb")];
        assert_eq!(parse(b"data: a\rdata: b\r\r"), expected);
        assert_eq!(parse(b"data: a\r\ndata: b\r\n\r\n"), expected);
        assert_eq!(parse(b"data: a\ndata: b\r\n\r"), expected);
        // CR then CRLF: two line ends, so the second is the blank line that dispatches.
        assert_eq!(
            parse(b"data: a\r\r\ndata: b\n\n"),
            [message("a"), message("b")]
        );
    }

    #[test]
    fn a_crlf_split_across_chunks_is_one_line_end() {
        let mut parser = Parser::new();
        assert_eq!(parser.feed(b"data: a\r"), []);
        assert_eq!(parser.feed(b"\ndata: b\r"), []);
        assert_eq!(parser.feed(b""), []);
        assert_eq!(parser.feed(b"\n\r"), [message("a\nb")]);
        assert_eq!(parser.feed(b"\n"), []);
        assert_eq!(parser.feed(b"data: c\n\n"), [message("c")]);
    }

    #[test]
    fn a_character_split_across_chunks_is_decoded_whole() {
        let mut parser = Parser::new();
        assert_eq!(parser.feed(b"data: \xC3"), []);
        assert_eq!(parser.feed(b"\xA9\n\n"), [message("é")]);
    }

    #[test]
    fn invalid_utf8_becomes_replacement_characters() {
        assert_eq!(
            parse(b"data: a\xFFb\xE2\x82\n\n"),
            [message("a\u{FFFD}b\u{FFFD}")]
        );
    }

    #[test]
    fn one_leading_bom_is_stripped_once() {
        assert_eq!(parse(b"\xEF\xBB\xBFdata: a\n\n"), [message("a")]);
        let mut parser = Parser::new();
        assert_eq!(parser.feed(b"\xEF\xBB"), []);
        assert_eq!(parser.feed(b"\xBFdata: a\n\n"), [message("a")]);
        // A second BOM is part of the field name, so the field is unknown.
        assert_eq!(parse(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: a\n\n"), []);
        assert_eq!(parse(b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"), [message("a")]);
    }

    #[test]
    fn only_one_leading_space_of_a_value_is_stripped() {
        assert_eq!(parse(b"data:a\n\n"), [message("a")]);
        assert_eq!(parse(b"data:  a \n\n"), [message(" a ")]);
        assert_eq!(parse(b"data:\ta\n\n"), [message("\ta")]);
    }

    #[test]
    fn a_value_may_hold_colons() {
        assert_eq!(parse(b"data: a: b:c\n\n"), [message("a: b:c")]);
    }

    #[test]
    fn a_line_without_a_colon_is_a_field_with_an_empty_value() {
        assert_eq!(parse(b"data\ndata\n\n"), [message("\n")]);
        assert_eq!(parse(b"event\ndata: x\n\n"), [message("x")]);
    }

    #[test]
    fn comments_and_unknown_fields_are_ignored() {
        assert_eq!(
            parse(b": keepalive\n:\ndata: a\nfoo: bar\nData: b\n data: c\n\n"),
            [message("a")]
        );
    }

    #[test]
    fn event_sets_the_type_for_one_event_and_empty_means_message() {
        assert_eq!(
            parse(b"event: update\ndata: a\n\ndata: b\n\nevent:\ndata: c\n\n"),
            [event("update", "a", ""), message("b"), message("c")]
        );
    }

    #[test]
    fn the_last_event_id_persists_until_an_id_field_changes_it() {
        assert_eq!(
            parse(b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\n"),
            [
                event("message", "a", "1"),
                event("message", "b", "1"),
                message("c")
            ]
        );
    }

    #[test]
    fn an_id_holding_nul_is_ignored() {
        assert_eq!(
            parse(b"id: 1\ndata: a\n\nid: 2\0\ndata: b\n\n"),
            [event("message", "a", "1"), event("message", "b", "1")]
        );
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_but_its_id_persists() {
        let mut parser = Parser::new();
        assert_eq!(parser.feed(b"id: 7\nevent: x\n\n"), []);
        assert_eq!(parser.last_event_id(), "7");
        // The event type was reset by the non-dispatch, so this one is a message.
        assert_eq!(parser.feed(b"data: a\n\n"), [event("message", "a", "7")]);
    }

    #[test]
    fn retry_with_only_digits_sets_the_reconnection_time() {
        let mut parser = Parser::new();
        assert_eq!(parser.feed(b"retry: 2500\n"), []);
        assert_eq!(parser.reconnection_time(), Some(2500));
        for ignored in [
            &b"retry: 12a\n"[..],
            b"retry: -1\n",
            b"retry: +1\n",
            b"retry:  1\n",
            b"retry: 1.5\n",
            b"retry:\n",
            b"retry: 99999999999999999999999\n",
        ] {
            parser.feed(ignored);
            assert_eq!(parser.reconnection_time(), Some(2500), "{ignored:?}");
        }
        assert_eq!(parser.feed(b"retry: 0\n\n"), []);
        assert_eq!(parser.reconnection_time(), Some(0));
    }

    #[test]
    fn a_stream_ending_mid_event_discards_it() {
        assert_eq!(parse(b"data: a\n\ndata: b\n"), [message("a")]);
        assert_eq!(parse(b"data: a\n\ndata: b"), [message("a")]);
        let mut parser = Parser::new();
        assert_eq!(parser.feed(b"id: 3\ndata: a\n"), []);
        parser.finish();
        assert_eq!(parser.last_event_id(), "");
    }

    #[test]
    fn a_reconnection_stream_keeps_the_last_event_id_and_retry_but_not_buffers() {
        let mut parser = Parser::new();
        assert_eq!(
            parser.feed(b"retry: 10\nid: 1\ndata: a\n\nid: 2\ndata: half"),
            [event("message", "a", "1")]
        );
        parser.finish();
        assert_eq!(parser.last_event_id(), "1");
        assert_eq!(parser.reconnection_time(), Some(10));
        // The new stream starts afresh: its own BOM is stripped, and its last event ID buffer
        // is empty, so its first event carries "".
        assert_eq!(parser.feed(b"\xEF\xBB\xBFdata: b\n\n"), [message("b")]);
    }
}
