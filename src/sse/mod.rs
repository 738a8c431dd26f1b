//! Server-Sent Events: the wire format both ways, the per-client stream body and the per-user
//! index.

pub mod encoder;
pub mod parser;
mod stream;
mod stream_index;

pub use parser::{parse, ParsedEvent, Parser};
pub use stream::SseBody;
pub use stream_index::{StreamIndex, StreamLimitError};
