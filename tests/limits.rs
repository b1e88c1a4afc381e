//! Per-session limits end to end: the subscription quota answers SUBACK 0x97 (v5) / 0x80 (3.1.1)
//! for filters beyond `subscriptions_per_session_max`, counts them, and still accepts a
//! re-subscription to a filter the session already has.

mod common;

use common::{bounded, connect_packet, Raw, TestBroker, CORES};
use shardmq_protocol::{
    Packet, Properties, ProtocolVersion, QoS, ReasonCode, Subscribe, Subscription, SubscriptionOptions, Utf8,
};

fn subscribe(packet_id: u16, filters: &[&str]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        properties: Properties::default(),
        subscriptions: filters
            .iter()
            .map(|filter| Subscription {
                filter: Utf8::new(filter).expect("ASCII filter"),
                options: SubscriptionOptions { qos: QoS::AtLeastOnce, ..SubscriptionOptions::default() },
            })
            .collect(),
    })
}

async fn suback_reasons(raw: &mut Raw) -> Vec<ReasonCode> {
    match raw.expect().await {
        Packet::SubAck(suback) => suback.reasons,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn subscription_quota_per_session() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start_with(|cfg| {
                cfg.cores = cores;
                cfg.subscriptions_per_session_max = 2;
            });
            for (version, refused) in [
                (ProtocolVersion::V5, ReasonCode::QuotaExceeded),
                (ProtocolVersion::V3_1_1, ReasonCode::UnspecifiedError),
            ] {
                let mut raw = Raw::open(broker.addr, version).await;
                let id = broker.id_on_shard(&format!("quota-{version:?}"), cores - 1);
                raw.send(&Packet::Connect(Box::new(connect_packet(version, &id, true, 0)))).await;
                assert!(matches!(raw.expect().await, Packet::ConnAck(_)));
                raw.send(&subscribe(1, &["q/a", "q/b", "q/c"])).await;
                assert_eq!(
                    suback_reasons(&mut raw).await,
                    vec![ReasonCode::GrantedQoS1, ReasonCode::GrantedQoS1, refused],
                    "{version:?} at {cores} cores"
                );
                // The quota counts distinct filters: replacing an existing one is allowed.
                raw.send(&subscribe(2, &["q/a"])).await;
                assert_eq!(suback_reasons(&mut raw).await, vec![ReasonCode::GrantedQoS1]);
                raw.send(&subscribe(3, &["q/d"])).await;
                assert_eq!(suback_reasons(&mut raw).await, vec![refused]);
            }
            assert!(broker.stat(|s| &s.subscriptions_refused_quota) >= 4);
        }
    })
    .await;
}
