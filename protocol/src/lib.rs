//! shardmq-protocol: a sans-I/O MQTT 3.1 / 3.1.1 / 5.0 codec.
//!
//! Owns: the packet model ([`packet`]), reason codes ([`reason`]), decoding from a byte buffer
//! ([`decode`]), encoding into a `BytesMut` ([`encode`]), every malformed-packet and protocol-error
//! check that can be made on one packet in isolation, and the topic name/filter helpers ([`topic`])
//! that every other crate uses.
//!
//! Does not own: sockets, timers, session state, or checks that need state across packets (topic
//! alias mapping, packet id reuse, receive maximum): the broker does those.
//!
//! Invariants:
//! - An incomplete frame is `Ok(None)` ("need more bytes"), never an error, and consumes nothing.
//! - A decoded PUBLISH's topic and payload are slices of the input buffer: no copy.
//! - Decoding arbitrary bytes never panics (property-tested and fuzzed).
//! - Every [`DecodeError`] maps to exactly one MQTT 5 reason code and one 3.x action.

pub mod error;
pub mod packet;
pub mod reason;
pub mod topic;
pub mod utf8;

mod connect;
mod control;
mod decode;
mod encode;
mod properties;
mod publish;
mod reasons;
mod subscribe;
#[cfg(test)]
mod test_util;
mod wire;

pub use decode::{decode, frame_len};
pub use encode::{encode, encoded_len};
pub use error::{DecodeError, EncodeError, V3Action};
pub use packet::*;
pub use reason::ReasonCode;
pub use utf8::{Utf8, Utf8Error};

/// The largest remaining length MQTT can express (four varint bytes).
pub const REMAINING_LENGTH_MAX: usize = 268_435_455;

/// The largest whole packet: one type byte, four length bytes, and the largest remaining length.
pub const PACKET_SIZE_MAX_BYTES: u32 = 268_435_460;
