//! Measurement types shared by the scenarios: latency histograms, per-stream order tracking,
//! failure tallies and the cache-padded counters that the progress line reads.
//!
//! Owns: how a histogram becomes JSON (percentiles, and a lossless bucket list for merging across
//! processes), duplicate / out-of-order detection per (publisher, subscriber) stream, and failure
//! maps. Does not own: what is measured when (the scenarios do that).
//!
//! Bounds: a histogram is fixed-size (1 µs .. 1 h, 3 significant digits); a stream tracker is a
//! fixed [`StreamTracker::WINDOW`]-bit window; a failure map has one entry per cause name, and the
//! cause names are a small fixed vocabulary.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

/// A latency histogram in microseconds, 1 µs to 1 hour at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

/// Inserts the percentiles of a microsecond histogram as `{prefix}_us_p50` .. `{prefix}_us_max`,
/// `{prefix}_us_mean` and `{prefix}_count` (units before the qualifier, as the project names them).
pub fn insert_latency(map: &mut Map<String, Value>, prefix: &str, histogram: &Histogram<u64>) {
    map.insert(format!("{prefix}_count"), json!(histogram.len()));
    if histogram.is_empty() {
        return;
    }
    for (name, quantile) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999)] {
        map.insert(format!("{prefix}_us_{name}"), json!(histogram.value_at_quantile(quantile)));
    }
    map.insert(format!("{prefix}_us_max"), json!(histogram.max()));
    map.insert(format!("{prefix}_us_mean"), json!((histogram.mean() * 10.0).round() / 10.0));
}

/// Every recorded bucket as `[value, count]` pairs: lossless for merging in another process.
pub fn histogram_buckets_json(histogram: &Histogram<u64>) -> Value {
    let buckets: Vec<Value> =
        histogram.iter_recorded().map(|v| json!([v.value_iterated_to(), v.count_at_value()])).collect();
    Value::Array(buckets)
}

/// Adds buckets written by [`histogram_buckets_json`] to `histogram`.
pub fn merge_histogram_buckets(histogram: &mut Histogram<u64>, buckets: &Value) {
    for bucket in buckets.as_array().into_iter().flatten() {
        if let (Some(value), Some(count)) = (bucket[0].as_u64(), bucket[1].as_u64()) {
            histogram.saturating_record_n(value, count);
        }
    }
}

/// Failures tallied by cause name (`refused`, `timeout`, `reset`, `connack_0x87`, `fd_limit`, ...).
pub type Failures = BTreeMap<String, u64>;

/// Adds `other` into `into`.
pub fn merge_failures(into: &mut Failures, other: &Failures) {
    for (cause, count) in other {
        *into.entry(cause.clone()).or_default() += count;
    }
}

/// A u64 counter on its own cache line, written by one worker thread and read by the progress line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct PaddedCounter(AtomicU64);

impl PaddedCounter {
    pub fn add(&self, amount: u64) {
        self.0.fetch_add(amount, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Sums one counter across per-thread slots.
pub fn sum(counters: &[PaddedCounter]) -> u64 {
    counters.iter().map(PaddedCounter::get).sum()
}

/// The order state of one (publisher, subscriber) stream.
///
/// Tracks the highest sequence seen and a window of [`Self::WINDOW`] sequences below it. A sequence
/// inside the window already seen is a duplicate; one inside the window not yet seen is a late
/// (out-of-order) arrival; one below the window is counted out-of-order and not checked for
/// duplication (the bound is what keeps a tracker at 144 bytes however long the run).
#[derive(Debug, Clone)]
pub struct StreamTracker {
    /// One past the highest sequence seen; 0 before the first message.
    next_sequence: u64,
    /// Bit `i` is set when sequence `next_sequence - 1 - i` was seen.
    seen: [u64; Self::WINDOW / 64],
    pub unique: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
}

/// What one arrival was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    InOrder,
    OutOfOrder,
    Duplicate,
}

impl Default for StreamTracker {
    fn default() -> Self {
        StreamTracker {
            next_sequence: 0,
            seen: [0; Self::WINDOW / 64],
            unique: 0,
            duplicates: 0,
            out_of_order: 0,
        }
    }
}

impl StreamTracker {
    /// Sequences remembered below the highest one seen.
    pub const WINDOW: usize = 1024;

    /// Records the arrival of `sequence`.
    pub fn record(&mut self, sequence: u32) -> Arrival {
        let sequence = u64::from(sequence);
        if sequence >= self.next_sequence {
            let shift = sequence + 1 - self.next_sequence;
            self.shift_window(shift);
            self.seen[0] |= 1;
            // A jump ahead leaves a gap: a later arrival inside it counts as out-of-order, and
            // what never arrives is loss (the scenario computes that from the expected total).
            self.next_sequence = sequence + 1;
            self.unique += 1;
            return Arrival::InOrder;
        }
        let age = (self.next_sequence - 1 - sequence) as usize;
        if age >= Self::WINDOW {
            self.unique += 1;
            self.out_of_order += 1;
            return Arrival::OutOfOrder;
        }
        let (word, bit) = (age / 64, age % 64);
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            Arrival::Duplicate
        } else {
            self.seen[word] |= 1 << bit;
            self.unique += 1;
            self.out_of_order += 1;
            Arrival::OutOfOrder
        }
    }

    /// Ages every remembered sequence by `shift` positions.
    fn shift_window(&mut self, shift: u64) {
        if shift >= Self::WINDOW as u64 {
            self.seen = [0; Self::WINDOW / 64];
            return;
        }
        let (words, bits) = ((shift / 64) as usize, (shift % 64) as u32);
        let count = self.seen.len();
        for index in (0..count).rev() {
            let source = index.checked_sub(words);
            let high = source.map_or(0, |s| self.seen[s]);
            let low = source.and_then(|s| s.checked_sub(1)).map_or(0, |s| self.seen[s]);
            self.seen[index] = if bits == 0 { high } else { (high << bits) | (low >> (64 - bits)) };
        }
    }
}

/// Totals over many stream trackers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamTotals {
    pub unique: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
}

impl StreamTotals {
    pub fn add(&mut self, tracker: &StreamTracker) {
        self.unique += tracker.unique;
        self.duplicates += tracker.duplicates;
        self.out_of_order += tracker.out_of_order;
    }

    pub fn merge(&mut self, other: StreamTotals) {
        self.unique += other.unique;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
    }
}

/// Messages (or connections) per second, rounded to one decimal; 0 for an empty interval.
pub fn per_sec(count: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    (count as f64 / secs * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_has_no_anomalies() {
        let mut tracker = StreamTracker::default();
        for sequence in 0..5000 {
            assert_eq!(tracker.record(sequence), Arrival::InOrder);
        }
        assert_eq!((tracker.unique, tracker.duplicates, tracker.out_of_order), (5000, 0, 0));
    }

    #[test]
    fn duplicates_and_late_arrivals_are_told_apart() {
        let mut tracker = StreamTracker::default();
        for sequence in [0, 1, 3, 4] {
            tracker.record(sequence);
        }
        assert_eq!(tracker.record(2), Arrival::OutOfOrder);
        assert_eq!(tracker.record(2), Arrival::Duplicate);
        assert_eq!(tracker.record(4), Arrival::Duplicate);
        assert_eq!(tracker.record(0), Arrival::Duplicate);
        // Far ahead, then something older than the window.
        assert_eq!(tracker.record(10_000), Arrival::InOrder);
        assert_eq!(tracker.record(5), Arrival::OutOfOrder);
        // Inside the window across a word boundary.
        assert_eq!(tracker.record(10_000 - 70), Arrival::OutOfOrder);
        assert_eq!(tracker.record(10_000 - 70), Arrival::Duplicate);
        assert_eq!(tracker.unique, 8);
        assert_eq!(tracker.duplicates, 4);
        assert_eq!(tracker.out_of_order, 3);
    }

    #[test]
    fn window_shift_keeps_bits_across_words() {
        let mut tracker = StreamTracker::default();
        for sequence in 0..200 {
            tracker.record(sequence);
        }
        // Every one of the last 200 is remembered as seen.
        for sequence in 0..200 {
            assert_eq!(tracker.record(sequence), Arrival::Duplicate, "sequence {sequence}");
        }
    }

    #[test]
    fn histogram_buckets_merge_losslessly() {
        let mut source = new_histogram();
        for value in [1, 5, 5, 900, 12_345] {
            source.record(value).unwrap();
        }
        let mut merged = new_histogram();
        merge_histogram_buckets(&mut merged, &histogram_buckets_json(&source));
        assert_eq!(merged.len(), source.len());
        assert_eq!(merged.max(), source.max());
        assert_eq!(merged.value_at_quantile(0.5), source.value_at_quantile(0.5));
    }
}
