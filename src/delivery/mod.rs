//! Per-user delivery: the stream index fans each event out to its user's streams, the
//! history gives it its id and keeps it for `Last-Event-ID` replay, and each stream's bounded
//! queue feeds its response body. Nothing here knows which backend (if any) stores the history
//! or carries events between processes.

mod history;
mod stream;
mod stream_index;

pub use history::{EventId, History, HistoryLimits, HistorySink, RecordedEvent, Replay};
pub use stream::SseBody;
pub use stream_index::{EventStream, Registration, StreamIndex, StreamLimitError, StreamSettings};
