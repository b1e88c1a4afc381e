//! Fuzz target `scan`: arbitrary bytes as a segment file, through the recovery scan and the header
//! decoder.
//!
//! The first input byte chooses whether the segment is the log's last (`& 1`) and the maximum
//! record length used by the torn-tail check (`>> 1`, in units of 64 bytes, at least 1); the rest
//! is the file.
//!
//! Checked on every input:
//! - no panic, whatever the bytes;
//! - reported records start after the header, at increasing 8-byte aligned positions, each a
//!   valid frame that ends before the next record (or at the end of the records), and the end lies
//!   within the file (rounded up to the alignment);
//! - only the last segment may have a torn tail, and torn and corrupt exclude each other.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shardmq_storage::fuzzing::{decode_header, scan_segment, valid_frame};
use shardmq_storage::{RECORD_ALIGN_BYTES, SEGMENT_HEADER_LEN_BYTES};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, file)) = data.split_first() else { return };
    let last = selector & 1 == 1;
    let record_len_max = 64 * ((selector >> 1) as usize).max(1);
    let _ = decode_header(file);
    if file.len() < SEGMENT_HEADER_LEN_BYTES {
        return;
    }
    let outcome = scan_segment(file, last, record_len_max);
    assert!(!(outcome.torn && outcome.corrupt));
    assert!(last || !outcome.torn, "only the last segment may be torn");
    assert!(outcome.end <= file.len().next_multiple_of(RECORD_ALIGN_BYTES));
    let mut previous_end = SEGMENT_HEADER_LEN_BYTES;
    for &pos in &outcome.records {
        let pos = pos as usize;
        assert_eq!(pos, previous_end, "records are contiguous");
        assert_eq!(pos % RECORD_ALIGN_BYTES, 0);
        let len = valid_frame(file, pos).expect("a reported record is a valid frame");
        previous_end = (pos + 8 + len).next_multiple_of(RECORD_ALIGN_BYTES);
    }
    assert_eq!(outcome.end, previous_end.min(file.len()), "the records end where the last one does");
});
