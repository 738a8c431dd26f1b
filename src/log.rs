//! Line-per-event logging to stderr, filtered by a process-wide level, as text or as one JSON
//! object per line.
//!
//! A logged value can come from a client (a token's `sub`, a path): no line it writes can
//! forge another line, because text lines escape control characters and JSON lines are JSON.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// How much is logged; each level includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Something failed and needs attention.
    Error = 0,
    /// Something unusual that the server handled.
    Warn = 1,
    /// One line per notable thing (the default).
    Info = 2,
    /// Per-request and per-event detail.
    Debug = 3,
}

impl Level {
    /// Parses a `LOG_LEVEL` value (`error`, `warn`, `info`, `debug`), case-insensitively.
    pub fn parse(text: &str) -> Option<Level> {
        match text.to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" | "trace" => Some(Level::Debug),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

/// How lines are written (`LOG_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `<time> <LEVEL> <message>`, for people.
    Text,
    /// `{"ts":…,"level":…,"msg":…}`, one object per line, for log collectors.
    Json,
}

impl Format {
    /// Parses a `LOG_FORMAT` value (`text` or `json`), case-insensitively.
    pub fn parse(text: &str) -> Option<Format> {
        match text.to_ascii_lowercase().as_str() {
            "text" => Some(Format::Text),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// Longest message written, in bytes; the rest is cut, so that no client-sized value makes a
/// line of any length.
const MAX_MESSAGE_BYTES: usize = 4096;

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static JSON: AtomicBool = AtomicBool::new(false);

/// Sets the most detailed level that is still written.
pub fn set_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

/// Sets how lines are written.
pub fn set_format(format: Format) {
    JSON.store(format == Format::Json, Ordering::Relaxed);
}

/// Whether a line at `level` would be written.
pub fn enabled(level: Level) -> bool {
    level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

/// Writes one line; call it through the `error!`/`warning!`/`info!`/`debug!` macros.
pub fn write(level: Level, args: std::fmt::Arguments<'_>) {
    let mut message = args.to_string();
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    eprintln!(
        "{}",
        format_line(level, &message, JSON.load(Ordering::Relaxed))
    );
}

/// One log line, without its line end.
fn format_line(level: Level, message: &str, json: bool) -> String {
    let ts = crate::time::now_rfc3339();
    if json {
        let level = level.label().to_ascii_lowercase();
        return serde_json::json!({"ts": ts, "level": level, "msg": message}).to_string();
    }
    let mut line = format!("{ts} {:5} ", level.label());
    for c in message.chars() {
        match c {
            '\\' => line.push_str("\\\\"),
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(line, "\\u{{{:x}}}", c as u32);
            }
            c => line.push(c),
        }
    }
    line
}

macro_rules! log_at {
    ($level:expr, $($arg:tt)*) => {
        if $crate::log::enabled($level) {
            $crate::log::write($level, format_args!($($arg)*));
        }
    };
}

macro_rules! error {
    ($($arg:tt)*) => { $crate::log::log_at!($crate::log::Level::Error, $($arg)*) };
}

macro_rules! warning {
    ($($arg:tt)*) => { $crate::log::log_at!($crate::log::Level::Warn, $($arg)*) };
}

macro_rules! info {
    ($($arg:tt)*) => { $crate::log::log_at!($crate::log::Level::Info, $($arg)*) };
}

macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::log_at!($crate::log::Level::Debug, $($arg)*) };
}

pub(crate) use {debug, error, info, log_at, warning};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_line_cannot_forge_another_line() {
        let line = format_line(
            Level::Info,
            "user a\n2026-01-01T00:00:00Z ERROR forged\u{1b}[2J",
            false,
        );
        assert!(!line.contains('\n') && !line.contains('\u{1b}'), "{line}");
        assert!(
            line.ends_with("INFO  user a\\n2026-01-01T00:00:00Z ERROR forged\\u{1b}[2J"),
            "{line}"
        );
    }

    #[test]
    fn a_json_line_is_one_object_with_ts_level_and_msg() {
        let line = format_line(Level::Warn, "two\nlines \"quoted\"", true);
        assert!(!line.contains('\n'));
        let object: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(object["level"], "warn");
        assert_eq!(object["msg"], "two\nlines \"quoted\"");
        assert!(object["ts"].as_str().unwrap().ends_with('Z'));
    }
}
