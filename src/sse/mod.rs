//! Server-Sent Events: the wire format, the per-client stream body and the per-user index.

pub mod encoder;
mod stream;
mod stream_index;

pub use stream::SseBody;
pub use stream_index::{StreamIndex, StreamLimitError};
