//! End-to-end tests of the core broker features over loopback, with rumqttc (MQTT 3.1.1 and 5.0)
//! and a raw codec client, each against brokers with 2 and 4 shards.

mod common;

use common::*;

/// QoS 0/1/2 between clients homed on different shards, on both protocol versions.
#[tokio::test]
async fn pubsub_qos_across_shards() {
    bounded(async {
        for cores in CORES {
            let broker = TestBroker::start(cores);
            for version in VERSIONS {
                for (sub_shard, pub_shard) in [(0, 1), (1, 0), (cores - 1, 0)] {
                    let tag = format!("{version:?}-{cores}-{sub_shard}-{pub_shard}");
                    let mut sub = Client::connect(
                        broker.addr,
                        version,
                        &broker.id_on_shard(&format!("sub-{tag}"), sub_shard),
                    )
                    .await;
                    let mut publisher = Client::connect(
                        broker.addr,
                        version,
                        &broker.id_on_shard(&format!("pub-{tag}"), pub_shard),
                    )
                    .await;
                    let topic = format!("t/{tag}");
                    for qos in 0..=2u8 {
                        assert_eq!(sub.subscribe(&format!("{topic}/{qos}"), qos).await, qos);
                    }
                    for qos in 0..=2u8 {
                        publisher.publish(&format!("{topic}/{qos}"), qos, false, format!("m{qos}")).await;
                        let msg =
                            sub.expect_msg(&format!("{topic}/{qos}"), format!("m{qos}").as_bytes()).await;
                        assert_eq!(msg.qos, qos);
                        assert!(!msg.retain);
                    }
                    sub.expect_no_publish_within(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await;
}
