//! Criterion benchmarks of the log: appends of 64-byte and 1 KiB records under each fsync
//! policy, and recovery (open of a closed log) throughput. Figures and the command line are in
//! `storage/BENCH.md`.
//!
//! - `append/<size>/<policy>`: one iteration is one append; each sample appends its records to a
//!   fresh log (64 MiB segments, so segment creation is included), commits, and then waits
//!   (polling `durable_offset`, as a shard would) until the last record is durable, so the time
//!   includes the writes (under `never`, durable means written) and the flushes: under `always`
//!   that is group commit, one `fdatasync` for every batch that arrived during the previous one.
//! - `append/<size>/baseline_vec`: the same bytes framed into a `Vec` (memory only), the floor.
//! - `append_stall/64B/<policy>` (printed first): the time of each call on the owner's thread
//!   (an append, or an append followed by a commit every 16 appends, as a shard commits at the end
//!   of a loop turn) over three segment rolls: percentiles and the longest, the figures that say
//!   whether the shard's loop stalls on the log.
//! - `recovery/<size>`: `Log::open` of a closed 256 MiB log (4 MiB under `cargo test --all-targets`) (page cache warm: the case after a
//!   process crash), which maps, scans and checksums every record. Throughput in bytes of log.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardmq_storage::{Config, FsyncPolicy, Log};

/// Whether this is `cargo bench` (criterion passes `--bench`) rather than `cargo test
/// --all-targets`, which runs each benchmark once as a smoke test: then the set-up stays small.
fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn config(policy: FsyncPolicy) -> Config {
    Config { fsync: policy, record_len_max_bytes: 4096, ..Config::default() }
}

/// The time of each owner call (a shard's stall) over enough 64-byte appends to roll three 64 MiB
/// segments, per policy, committing only when the buffer fills or also every 16 appends (timed
/// with the append it follows). Printed, not a criterion figure: criterion reports means.
fn stall_report() {
    if !measuring() {
        return;
    }
    for (name, policy, commit_every) in [
        ("never", FsyncPolicy::Never, 0u32),
        ("never_commit_per_16", FsyncPolicy::Never, 16),
        ("always", FsyncPolicy::Always, 0),
        ("always_commit_per_16", FsyncPolicy::Always, 16),
    ] {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let mut log = Log::open(tmp.path(), config(policy)).expect("open");
        let payload = [0x3Cu8; 64];
        let count = 3_000_000u32;
        let mut lat_ns: Vec<u32> = Vec::with_capacity(count as usize);
        let (mut roll_max_ns, mut other_max_ns) = (0u32, 0u32);
        for i in 0..count {
            let segments = log.stats().segments;
            let t = Instant::now();
            log.append(&payload).expect("append");
            if commit_every > 0 && i % commit_every == commit_every - 1 {
                log.commit().expect("commit");
            }
            let ns = t.elapsed().as_nanos().min(u32::MAX as u128) as u32;
            lat_ns.push(ns);
            if log.stats().segments != segments {
                roll_max_ns = roll_max_ns.max(ns);
            } else {
                other_max_ns = other_max_ns.max(ns);
            }
        }
        println!("append_stall/64B/{name}: max of an append that rolled {roll_max_ns} ns, of one that did not {other_max_ns} ns");
        lat_ns.sort_unstable();
        let at = |q: f64| lat_ns[((lat_ns.len() - 1) as f64 * q) as usize];
        println!(
            "append_stall/64B/{name}: {count} appends, {} segments, {} batches written by the owner: p50 {} ns, \
             p99 {} ns, p99.9 {} ns, p99.99 {} ns, max {} ns",
            log.stats().segments,
            log.stats().owner_writes,
            at(0.5),
            at(0.99),
            at(0.999),
            at(0.9999),
            lat_ns[lat_ns.len() - 1]
        );
    }
}

fn append(c: &mut Criterion) {
    stall_report();
    let mut group = c.benchmark_group("append");
    for size in [64usize, 1024] {
        let payload = vec![0xA5u8; size];
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new(format!("{size}B"), "baseline_vec"), |b| {
            b.iter_custom(|iters| {
                let mut buf: Vec<u8> = Vec::with_capacity(64 << 20);
                let start = Instant::now();
                for _ in 0..iters {
                    if buf.len() + size + 8 > buf.capacity() {
                        buf.clear();
                    }
                    buf.extend_from_slice(&(size as u32).to_le_bytes());
                    buf.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
                    buf.extend_from_slice(&payload);
                }
                std::hint::black_box(&buf);
                start.elapsed()
            })
        });
        for (name, policy) in [
            ("never", FsyncPolicy::Never),
            ("interval_5ms", FsyncPolicy::Interval(Duration::from_millis(5))),
            ("always", FsyncPolicy::Always),
        ] {
            group.bench_function(BenchmarkId::new(format!("{size}B"), name), |b| {
                b.iter_custom(|iters| {
                    let tmp = tempfile::tempdir().expect("temporary directory");
                    let mut log = Log::open(tmp.path(), config(policy)).expect("open");
                    let start = Instant::now();
                    for _ in 0..iters {
                        log.append(&payload).expect("append");
                    }
                    log.commit().expect("commit");
                    let end = log.end_offset();
                    while log.durable_offset() < end {
                        std::thread::yield_now();
                    }
                    let elapsed = start.elapsed();
                    drop(log);
                    elapsed
                })
            });
        }
    }
    group.finish();
}

fn recovery(c: &mut Criterion) {
    let mut group = c.benchmark_group("recovery");
    for size in [64usize, 1024] {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let log_bytes = if measuring() { 256u64 << 20 } else { 4 << 20 };
        {
            let mut log = Log::open(tmp.path(), config(FsyncPolicy::Never)).expect("open");
            let payload = vec![0x5Au8; size];
            while log.end_offset().0 < log_bytes {
                log.append(&payload).expect("append");
            }
            log.close().expect("close");
        }
        let bytes = Log::open(tmp.path(), config(FsyncPolicy::Never)).expect("open").recovery().record_bytes;
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(BenchmarkId::from_parameter(format!("{size}B")), |b| {
            b.iter(|| {
                let log = Log::open(tmp.path(), config(FsyncPolicy::Never)).expect("open");
                assert_eq!(log.recovery().record_bytes, bytes);
                log
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = append, recovery
}
criterion_main!(benches);
