//! Line-per-event logging to stderr, filtered by a process-wide level.

use std::sync::atomic::{AtomicU8, Ordering};

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

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Sets the most detailed level that is still written.
pub fn set_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

/// Whether a line at `level` would be written.
pub fn enabled(level: Level) -> bool {
    level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

/// Writes one line; call it through the `error!`/`warning!`/`info!`/`debug!` macros.
pub fn write(level: Level, args: std::fmt::Arguments<'_>) {
    eprintln!("{} {:5} {args}", crate::time::now_rfc3339(), level.label());
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
