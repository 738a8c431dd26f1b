//! Server-Sent Events: the wire format, event ids and history, the per-client stream body and
//! the per-user index.

pub mod encoder;
mod history;
mod stream;
mod stream_index;

pub use history::{EventId, HistoryLimits};
pub use stream::SseBody;
pub use stream_index::{StreamIndex, StreamLimitError, StreamSettings};
