//! Seeded model test of routing across shards, driving the shard state machines directly (no
//! sockets): several `Shard`s share a mesh; clients connect on their home shards, subscribe
//! (plain, overlapping, shared groups, no-local) and publish; the mesh is drained until quiet after
//! every step; then every session's queue is compared with a naive model of who must receive what.
//!
//! The model: a message reaches every session with a matching plain subscription exactly once
//! (at the highest QoS of its matching subscriptions, capped by the message's QoS), except the
//! publisher itself when all its matching subscriptions are no-local; and exactly one member of
//! each share group with a matching filter.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use proptest::prelude::*;
use shardmq_protocol::topic;
use shardmq_protocol::{
    Connect, Packet, Properties, ProtocolVersion, Publish, QoS, Subscribe, Subscription, SubscriptionOptions,
    Utf8,
};

use crate::config::BrokerConfig;
use crate::conn::{ConnShared, ShardCell};
use crate::mesh::{Mesh, ShardId};
use crate::message::TenantId;
use crate::session::SessionKey;
use crate::shard::{home_shard, ConnectOutcome, MeshMsg, Shard};

struct World {
    mesh: Arc<Mesh<MeshMsg>>,
    shards: Vec<ShardCell>,
    /// Client index -> (shard, session, connection).
    clients: Vec<(usize, SessionKey, Rc<ConnShared>)>,
}

impl World {
    fn new(shard_count: usize, client_count: usize, tenant_count: u32) -> World {
        let cfg = Arc::new(BrokerConfig { cores: shard_count, ..BrokerConfig::default() });
        let mesh = Mesh::new(shard_count, 1024);
        let shards: Vec<ShardCell> = (0..shard_count)
            .map(|i| {
                let shard = Shard::new(ShardId(i as u16), cfg.clone(), mesh.clone(), Default::default());
                Rc::new(RefCell::new(shard))
            })
            .collect();
        let mut world = World { mesh, shards, clients: Vec::new() };
        for client in 0..client_count {
            // Client ids repeat across tenants on purpose: the same id in two tenants is two sessions.
            let id = format!("client-{}", client / tenant_count as usize);
            let tenant = tenant_of(client, tenant_count);
            let home = home_shard(tenant, &id, shard_count).index();
            let cell = world.shards[home].clone();
            let conn_id = cell.borrow_mut().new_conn_id();
            let conn = ConnShared::new(conn_id, -1, ProtocolVersion::V5, &cell);
            let connect = Connect {
                protocol: ProtocolVersion::V5,
                clean_start: true,
                keep_alive: 0,
                properties: Properties::default(),
                client_id: Utf8::new(&id).expect("ASCII id"),
                will: None,
                username: None,
                password: None,
            };
            let outcome = cell.borrow_mut().connect_as(tenant, connect, conn.clone(), None, Instant::now());
            let ConnectOutcome::Accepted { session, .. } = outcome else { panic!("connect refused") };
            world.clients.push((home, session, conn));
        }
        world.settle();
        world
    }

    /// Drains every ring until no shard has anything left to say.
    fn settle(&self) {
        // Bounded: each round either moves messages or ends the loop; the model's message count
        // bounds the rounds.
        for _ in 0..10_000 {
            let mut moved = 0;
            for (index, cell) in self.shards.iter().enumerate() {
                let mut shard = cell.borrow_mut();
                let now = Instant::now();
                moved += self
                    .mesh
                    .drain(ShardId(index as u16), usize::MAX, |from, msg| shard.on_mesh(from, msg, now));
                shard.outbox.flush();
                moved += shard.outbox.backlog_len();
            }
            if moved == 0 {
                return;
            }
        }
        panic!("the mesh did not settle");
    }

    fn packet(&self, client: usize, packet: Packet) {
        let (shard, key, conn) = &self.clients[client];
        self.shards[*shard].borrow_mut().handle_packet(*key, conn.id, packet, Instant::now());
        self.settle();
    }

    /// (topic, payload, qos) of everything queued for a client, in order.
    fn queued(&self, client: usize) -> Vec<(String, Bytes, QoS)> {
        let (shard, key, _) = &self.clients[client];
        let shard = self.shards[*shard].borrow();
        let session = shard.sessions.get(*key).expect("session");
        session.queue.iter().map(|d| (d.msg.topic.to_string(), d.msg.payload.clone(), d.qos)).collect()
    }
}

fn tenant_of(client: usize, tenant_count: u32) -> TenantId {
    TenantId((client % tenant_count as usize) as u32)
}

#[derive(Debug, Clone)]
enum Op {
    Subscribe { client: usize, filter: String, qos: u8, no_local: bool, group: Option<u8> },
    Publish { client: usize, topic: String, qos: u8 },
}

fn level() -> impl Strategy<Value = String> {
    prop_oneof![Just("a".to_string()), Just("b".to_string()), Just("c".to_string())]
}

fn topic_name() -> impl Strategy<Value = String> {
    prop::collection::vec(level(), 1..4).prop_map(|levels| levels.join("/"))
}

fn filter() -> impl Strategy<Value = String> {
    let filter_level = prop_oneof![3 => level(), 1 => Just("+".to_string())];
    (prop::collection::vec(filter_level, 1..4), any::<bool>()).prop_map(|(levels, hash)| {
        let mut filter = levels.join("/");
        if hash {
            filter.push_str("/#");
        }
        filter
    })
}

fn op(clients: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..clients, filter(), 0u8..3, any::<bool>(), prop::option::weighted(0.3, 0u8..2)).prop_map(
            |(client, filter, qos, no_local, group)| Op::Subscribe {
                client,
                filter,
                qos,
                no_local: no_local && group.is_none(),
                group,
            }
        ),
        3 => (0..clients, topic_name(), 0u8..3).prop_map(|(client, topic, qos)| Op::Publish { client, topic, qos }),
    ]
}

/// A subscription in the model: (filter, qos, no_local).
type ModelSub = (String, u8, bool);

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn routing_across_shards_matches_the_model(
        shard_count in 1usize..5,
        tenant_count in 1u32..3,
        ops in prop::collection::vec(op(6), 1..40),
    ) {
        let clients = 6;
        let world = World::new(shard_count, clients, tenant_count);
        // Plain subscriptions per client: full filter -> (qos, no_local).
        let mut plain: Vec<BTreeMap<String, (u8, bool)>> = vec![BTreeMap::new(); clients];
        // Share groups: (tenant, group, filter) -> members.
        let mut groups: BTreeMap<(u32, u8, String), BTreeSet<usize>> = BTreeMap::new();
        // Expected plain deliveries per client, and shared deliveries per message.
        let mut expected: Vec<Vec<(String, Bytes, QoS)>> = vec![Vec::new(); clients];
        let mut shared_expected: Vec<(Bytes, Vec<BTreeSet<usize>>)> = Vec::new();
        let mut next_packet_id = 1u16;
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Subscribe { client, filter, qos, no_local, group } => {
                    let full = match group {
                        Some(g) => format!("$share/g{g}/{filter}"),
                        None => filter.clone(),
                    };
                    let options = SubscriptionOptions {
                        qos: QoS::from_u8(qos).expect("0..3"),
                        no_local,
                        ..SubscriptionOptions::default()
                    };
                    let subscribe = Subscribe {
                        packet_id: next_packet_id,
                        properties: Properties::default(),
                        subscriptions: vec![Subscription { filter: Utf8::new(&full).expect("ASCII"), options }],
                    };
                    next_packet_id += 1;
                    world.packet(client, Packet::Subscribe(subscribe));
                    match group {
                        Some(g) => {
                            groups.entry((tenant_of(client, tenant_count).0, g, filter)).or_default().insert(client);
                        }
                        None => { plain[client].insert(filter, (qos, no_local)); }
                    }
                }
                Op::Publish { client, topic: topic_name, qos } => {
                    let payload = Bytes::from(format!("m{step}"));
                    let qos = QoS::from_u8(qos).expect("0..3");
                    let publish = Publish {
                        dup: false,
                        qos,
                        retain: false,
                        topic: Utf8::new(&topic_name).expect("ASCII"),
                        packet_id: (qos != QoS::AtMostOnce).then(|| { next_packet_id += 1; next_packet_id }),
                        properties: Properties::default(),
                        payload: payload.clone(),
                    };
                    world.packet(client, Packet::Publish(publish));
                    let publisher_tenant = tenant_of(client, tenant_count);
                    for (subscriber, subs) in plain.iter().enumerate() {
                        if tenant_of(subscriber, tenant_count) != publisher_tenant {
                            continue; // tenants never see each other's messages
                        }
                        let matching: Vec<ModelSub> = subs
                            .iter()
                            .filter(|(filter, _)| topic::matches(filter, &topic_name))
                            .map(|(filter, (q, nl))| (filter.clone(), *q, *nl))
                            .filter(|(_, _, no_local)| !(*no_local && subscriber == client))
                            .collect();
                        if let Some(max_qos) = matching.iter().map(|(_, q, _)| *q).max() {
                            let delivered = qos.min(QoS::from_u8(max_qos).expect("0..3"));
                            expected[subscriber].push((topic_name.clone(), payload.clone(), delivered));
                        }
                    }
                    let member_sets: Vec<BTreeSet<usize>> = groups
                        .iter()
                        .filter(|((tenant, _, filter), members)| {
                            *tenant == publisher_tenant.0 && !members.is_empty() && topic::matches(filter, &topic_name)
                        })
                        .map(|(_, members)| members.clone())
                        .collect();
                    shared_expected.push((payload, member_sets));
                }
            }
        }
        // Each expected plain delivery must be in the client's queue (same topic, payload, QoS);
        // whatever is left over are shared-group deliveries.
        let mut shared_got: BTreeMap<(Bytes, usize), usize> = BTreeMap::new();
        for (client, expected_plain) in expected.iter().enumerate() {
            let mut got = world.queued(client);
            for wanted in expected_plain {
                let index = got.iter().position(|d| d == wanted);
                prop_assert!(index.is_some(), "client {} missed {:?} (shards {})", client, wanted, shard_count);
                got.remove(index.expect("checked"));
            }
            for (_, payload, _) in got {
                *shared_got.entry((payload, client)).or_default() += 1;
            }
        }
        // Per message: one delivery per matching share group, each to a member of such a group.
        for (payload, member_sets) in &shared_expected {
            let mut total = 0;
            for client in 0..clients {
                let count = shared_got.remove(&(payload.clone(), client)).unwrap_or(0);
                let groups_with_client = member_sets.iter().filter(|set| set.contains(&client)).count();
                prop_assert!(count <= groups_with_client, "client {} got {} shared copies of {:?}", client, count, payload);
                total += count;
            }
            prop_assert_eq!(total, member_sets.len(), "message {:?}: shared deliveries", payload);
        }
        prop_assert!(shared_got.is_empty(), "deliveries nobody expected: {:?}", shared_got);
    }
}
