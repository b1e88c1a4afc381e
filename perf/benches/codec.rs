//! Criterion benchmarks of the MQTT codec (`shardmq-protocol`): decode and encode of the packets
//! the data path sees most, one packet per iteration (`Throughput::Elements(1)`, so criterion
//! reports packets per second).
//!
//! Packets: a QoS 0 and a QoS 1 PUBLISH with a 64-byte payload (MQTT 3.1.1 and 5.0), a 5.0 CONNECT
//! with properties, and a SUBSCRIBE with 10 filters (3.1.1 and 5.0).
//!
//! Baseline, measured in the same run: `baseline/split_frame` does what every decode must do
//! anyway (split a frame off the read buffer and freeze it) and nothing else, so the distance
//! between it and `decode/*` is the cost of parsing. The target is 10 million 64-byte PUBLISH
//! decodes per second on one core (100 ns per decode); perf/RESULTS.md records the figures.
//!
//! Decode benchmarks give each iteration a fresh buffer holding one frame (built outside the
//! timed section, as a socket read would leave it); the decoded packet is dropped outside the
//! timed section too. Each of them therefore also pays the buffer's one-time promotion to a shared
//! buffer on the first split, which `baseline/split_frame` shows; `decode_stream/*` decodes 1,000
//! back-to-back frames from one buffer, the steady state of a busy connection. Encode benchmarks reuse one buffer, cleared before each packet.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shardmq_protocol::{
    decode, encode, Connect, Packet, Properties, ProtocolVersion, Publish, QoS, Subscribe, Subscription,
    SubscriptionOptions, UserProperty, Utf8, Will, PACKET_SIZE_MAX_BYTES,
};

/// The payload size of the PUBLISH benchmarks.
const PAYLOAD_SIZE_BYTES: usize = 64;
/// Filters in the SUBSCRIBE benchmarks.
const SUBSCRIBE_FILTER_COUNT: usize = 10;

fn publish(qos: QoS) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: Utf8::from_static("sensors/building-7/floor-3/temperature"),
        packet_id: (qos != QoS::AtMostOnce).then_some(4242),
        properties: Properties::default(),
        payload: Bytes::from(vec![0xA5; PAYLOAD_SIZE_BYTES]),
    })
}

fn connect_v5() -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 60,
        properties: Properties {
            session_expiry_interval: Some(3600),
            receive_maximum: Some(100),
            maximum_packet_size: Some(1 << 20),
            topic_alias_maximum: Some(16),
            request_problem_information: Some(1),
            user_properties: vec![UserProperty {
                name: Utf8::from_static("region"),
                value: Utf8::from_static("eu-west"),
            }],
            ..Default::default()
        },
        client_id: Utf8::from_static("device-000000000042"),
        will: Some(Will {
            topic: Utf8::from_static("devices/device-000000000042/status"),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties { will_delay_interval: Some(5), ..Default::default() },
        }),
        username: Some(Utf8::from_static("device-000000000042")),
        password: Some(Bytes::from_static(b"0123456789abcdef0123456789abcdef")),
    }))
}

fn subscribe(version: ProtocolVersion) -> Packet {
    let subscriptions = (0..SUBSCRIBE_FILTER_COUNT)
        .map(|i| Subscription {
            filter: Utf8::new(&format!("sensors/building-{i}/+/temperature")).expect("valid filter"),
            options: SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() },
        })
        .collect();
    let properties = if version.is_v5() {
        Properties { subscription_identifiers: vec![7], ..Default::default() }
    } else {
        Properties::default()
    };
    Packet::Subscribe(Subscribe { packet_id: 17, properties, subscriptions })
}

/// (name, version, packet) for every benchmarked packet.
fn cases() -> Vec<(&'static str, ProtocolVersion, Packet)> {
    use ProtocolVersion::{V3_1_1, V5};
    vec![
        ("publish_qos0_64B_v311", V3_1_1, publish(QoS::AtMostOnce)),
        ("publish_qos1_64B_v311", V3_1_1, publish(QoS::AtLeastOnce)),
        ("publish_qos0_64B_v5", V5, publish(QoS::AtMostOnce)),
        ("publish_qos1_64B_v5", V5, publish(QoS::AtLeastOnce)),
        ("connect_props_v5", V5, connect_v5()),
        ("subscribe_10_filters_v311", V3_1_1, subscribe(V3_1_1)),
        ("subscribe_10_filters_v5", V5, subscribe(V5)),
    ]
}

fn encoded(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf).expect("benchmark packets encode");
    // Check once, outside the timed loops, that the benchmark measures a real round trip.
    let decoded =
        decode(&mut buf.clone(), version, PACKET_SIZE_MAX_BYTES).expect("decodes").expect("complete");
    assert_eq!(&decoded, packet, "benchmark packet does not round-trip");
    buf.to_vec()
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    for (name, version, packet) in cases() {
        let frame = encoded(&packet, version);
        group.bench_function(name, |b| {
            b.iter_batched(
                || BytesMut::from(&frame[..]),
                |mut buf| decode(black_box(&mut buf), version, PACKET_SIZE_MAX_BYTES),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    for (name, version, packet) in cases() {
        let len = encoded(&packet, version).len();
        let mut buf = BytesMut::with_capacity(len);
        group.bench_function(name, |b| {
            b.iter(|| {
                buf.clear();
                encode(black_box(&packet), version, &mut buf).expect("encodes");
                black_box(buf.len())
            })
        });
    }
    group.finish();
}

/// Frames per buffer in the stream benchmarks.
const STREAM_FRAME_COUNT: usize = 1_000;

/// The steady state of a connection's read loop: one buffer holding many frames, decoded one
/// after the other. Here the buffer's one-time costs (promoting it to a shared buffer on the first
/// split) are spread over `STREAM_FRAME_COUNT` frames, as they are on a busy connection; the
/// packets are dropped as they are decoded. Throughput is per packet.
fn bench_decode_stream(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_stream");
    group.throughput(Throughput::Elements(STREAM_FRAME_COUNT as u64));
    for (name, version, packet) in cases().into_iter().filter(|(name, _, _)| name.starts_with("publish")) {
        let frame = encoded(&packet, version);
        let stream: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * STREAM_FRAME_COUNT).collect();
        group.bench_function(format!("{name}_x{STREAM_FRAME_COUNT}"), |b| {
            b.iter_batched(
                || BytesMut::from(&stream[..]),
                |mut buf| {
                    let mut count = 0usize;
                    while let Some(packet) = decode(&mut buf, version, PACKET_SIZE_MAX_BYTES).expect("valid")
                    {
                        black_box(&packet);
                        count += 1;
                    }
                    assert_eq!(count, STREAM_FRAME_COUNT);
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

/// The floor under any zero-copy decoder: split one frame off a read buffer and freeze it.
fn bench_baseline(c: &mut Criterion) {
    let mut group = c.benchmark_group("baseline");
    group.throughput(Throughput::Elements(1));
    let frame = encoded(&publish(QoS::AtMostOnce), ProtocolVersion::V3_1_1);
    group.bench_function("split_frame_publish_qos0_64B", |b| {
        b.iter_batched(
            || BytesMut::from(&frame[..]),
            |mut buf| {
                let len = black_box(frame.len());
                buf.split_to(len).freeze()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(codec, bench_decode, bench_decode_stream, bench_encode, bench_baseline);
criterion_main!(codec);
