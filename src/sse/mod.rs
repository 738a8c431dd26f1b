//! The Server-Sent Events wire format, both ways: the encoder writes frames, the parser reads
//! them to the letter of the WHATWG rules. Pure: no state beyond a parser's, no I/O.

pub mod encoder;
pub mod parser;

pub use parser::{parse, ParsedEvent, Parser};
