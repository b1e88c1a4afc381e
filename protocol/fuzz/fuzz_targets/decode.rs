//! Fuzz target `decode`: arbitrary bytes into `decode`, under every protocol version and a few
//! maximum packet sizes.
//!
//! The first input byte chooses the version (`% 3`) and the maximum packet size (`/ 3 % 4`); the
//! rest is the stream. Frames are decoded until the stream is exhausted, incomplete, or refused.
//!
//! Checked on every input:
//! - no panic, whatever the bytes;
//! - `Ok(None)` consumes nothing; `Ok(Some(_))` consumes a frame no larger than the maximum;
//! - every error maps to a reason code and a 3.x action (the calls must not panic);
//! - a decoded packet encodes (under its own version: a CONNECT's protocol level, else the
//!   connection's), `encoded_len` agrees with `encode`, the encoding is never longer than the frame
//!   it came from, and decoding it again gives the same packet and consumes all of it.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shardmq_protocol::{decode, encode, encoded_len, Packet, ProtocolVersion, PACKET_SIZE_MAX_BYTES};

/// Bounds the work per input: a stream of one-byte-bodied frames cannot loop for long.
const FRAMES_PER_INPUT_MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else { return };
    let version = match selector % 3 {
        0 => ProtocolVersion::V3_1,
        1 => ProtocolVersion::V3_1_1,
        _ => ProtocolVersion::V5,
    };
    let max_packet_size_bytes = match (selector / 3) % 4 {
        0 => PACKET_SIZE_MAX_BYTES,
        1 => 16,
        2 => 256,
        _ => 65_536,
    };
    let mut buf = BytesMut::from(stream);
    for _ in 0..FRAMES_PER_INPUT_MAX {
        let len_before = buf.len();
        match decode(&mut buf, version, max_packet_size_bytes) {
            Ok(None) => {
                assert_eq!(buf.len(), len_before, "Ok(None) consumed bytes");
                return;
            }
            Err(error) => {
                let _ = (error.reason_code(), error.v3_action(), error.to_string());
                return;
            }
            Ok(Some(packet)) => {
                let consumed = len_before - buf.len();
                assert!(consumed >= 2, "a frame is at least two bytes");
                assert!(consumed <= max_packet_size_bytes as usize, "frame over the maximum accepted");
                check_round_trip(&packet, version, consumed);
            }
        }
    }
});

fn check_round_trip(packet: &Packet, version: ProtocolVersion, frame_len: usize) {
    let encode_version = match packet {
        Packet::Connect(connect) => connect.protocol,
        _ => version,
    };
    let mut encoded = BytesMut::new();
    if let Err(error) = encode(packet, encode_version, &mut encoded) {
        panic!("a decoded packet does not encode: {error:?}\n{packet:?}");
    }
    assert_eq!(encoded_len(packet, encode_version), Ok(encoded.len()), "encoded_len disagrees with encode");
    assert!(
        encoded.len() <= frame_len,
        "encoding ({} bytes) is longer than the frame ({frame_len})",
        encoded.len()
    );
    let mut again = encoded.clone();
    match decode(&mut again, encode_version, PACKET_SIZE_MAX_BYTES) {
        Ok(Some(decoded)) => {
            assert_eq!(&decoded, packet, "decode(encode(p)) != p; encoding {:02X?}", &encoded[..]);
            assert!(again.is_empty(), "the encoding holds more than one frame");
        }
        other => panic!("the encoding of a decoded packet does not decode: {other:?}\n{:02X?}", &encoded[..]),
    }
}
