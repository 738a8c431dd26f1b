//! Server-Sent Events: the wire format both ways, event ids and history, the per-client stream
//! body and the per-user index.

pub mod encoder;
mod history;
#[cfg(feature = "sqlite")]
mod history_store;
pub mod parser;
mod stream;
mod stream_index;

pub use history::{EventId, HistoryLimits};
pub use parser::{parse, ParsedEvent, Parser};
pub use stream::SseBody;
pub use stream_index::{StreamIndex, StreamLimitError, StreamSettings};
