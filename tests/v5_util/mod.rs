//! Helpers for the MQTT 5 end-to-end tests: a raw MQTT 5 client on the protocol crate's codec,
//! for the tests that need exact control of what goes on the wire (aliases, properties, reason
//! codes, unacknowledged packets), and small builders for packets.
//!
//! Every wait is bounded: a receive that takes longer than [`WAIT`] fails the test.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use shardmq_protocol::{
    decode, encode, Connect, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS, ReasonCode,
    RetainHandling, SubAck, Subscribe, Subscription, SubscriptionOptions, UserProperty, Utf8,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any single expected packet may take to arrive.
pub const WAIT: Duration = Duration::from_secs(5);

/// How long a test watches for a packet that must not arrive.
pub const QUIET: Duration = Duration::from_millis(400);

pub fn utf8(text: &str) -> Utf8 {
    Utf8::new(text).expect("test strings are valid UTF-8")
}

pub fn user_property(name: &str, value: &str) -> UserProperty {
    UserProperty { name: utf8(name), value: utf8(value) }
}

/// A v5 CONNECT with clean start, no keep-alive and no properties.
pub fn connect_packet(client_id: &str) -> Connect {
    Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 0,
        properties: Properties::default(),
        client_id: utf8(client_id),
        will: None,
        username: None,
        password: None,
    }
}

/// A PUBLISH with no properties.
pub fn publish_packet(topic: &str, qos: QoS, packet_id: Option<PacketId>, payload: &[u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: utf8(topic),
        packet_id,
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

/// Subscription options with the given QoS and everything else at its default.
pub fn options(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: RetainHandling::SendAtSubscribe,
    }
}

/// What the connection did instead of sending the packet a test waited for.
#[derive(Debug)]
pub enum RecvError {
    /// The broker closed the connection.
    Closed,
    /// Nothing arrived in time.
    TimedOut,
}

/// A raw MQTT 5 client: one TCP stream and a read buffer, packets encoded and decoded by
/// `shardmq_protocol`.
#[derive(Debug)]
pub struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub async fn open(addr: SocketAddr) -> Raw {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("TCP connect timed out")
            .expect("TCP connect failed");
        stream.set_nodelay(true).expect("nodelay");
        Raw { stream, buf: BytesMut::with_capacity(4096) }
    }

    /// Opens a connection, sends `connect` and returns the CONNACK (panics on anything else).
    pub async fn connect_with(addr: SocketAddr, connect: Connect) -> (Raw, shardmq_protocol::ConnAck) {
        let mut raw = Raw::open(addr).await;
        raw.send(&Packet::Connect(Box::new(connect))).await;
        match raw.recv().await {
            Packet::ConnAck(connack) => (raw, connack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects with clean start and the given properties; asserts the CONNACK is a success.
    pub async fn connect(addr: SocketAddr, client_id: &str, properties: Properties) -> Raw {
        let mut connect = connect_packet(client_id);
        connect.properties = properties;
        let (raw, connack) = Raw::connect_with(addr, connect).await;
        assert_eq!(connack.reason, ReasonCode::Success, "CONNACK of {client_id}: {connack:?}");
        raw
    }

    pub async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        encode(packet, ProtocolVersion::V5, &mut out).expect("test packet encodes");
        self.send_bytes(&out).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("write timed out")
            .expect("write failed");
    }

    /// The next packet, waiting at most `wait`.
    pub async fn try_recv(&mut self, wait: Duration) -> Result<Packet, RecvError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match decode(&mut self.buf, ProtocolVersion::V5, u32::MAX) {
                Ok(Some(packet)) => return Ok(packet),
                Ok(None) => {}
                Err(error) => panic!("broker sent a malformed packet: {error}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(RecvError::TimedOut),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(RecvError::Closed),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next packet; panics if none arrives within [`WAIT`] or the connection closes.
    pub async fn recv(&mut self) -> Packet {
        match self.try_recv(WAIT).await {
            Ok(packet) => packet,
            Err(error) => panic!("expected a packet, got {error:?}"),
        }
    }

    /// The next PUBLISH, answering PINGRESP-free: panics on any other packet.
    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Packet::Publish(publish) => publish,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Asserts that nothing arrives for [`QUIET`].
    pub async fn expect_quiet(&mut self) {
        match self.try_recv(QUIET).await {
            Err(RecvError::TimedOut) => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// Asserts that the next packet is a DISCONNECT and returns its reason; then that the broker
    /// closes the connection.
    pub async fn expect_disconnect(&mut self) -> ReasonCode {
        let reason = match self.recv().await {
            Packet::Disconnect(disconnect) => disconnect.reason,
            other => panic!("expected DISCONNECT, got {other:?}"),
        };
        match self.try_recv(WAIT).await {
            Err(RecvError::Closed) => {}
            other => panic!("expected the broker to close after DISCONNECT, got {other:?}"),
        }
        reason
    }

    /// Subscribes with one filter; returns the SUBACK.
    pub async fn subscribe(
        &mut self,
        packet_id: PacketId,
        filter: &str,
        options: SubscriptionOptions,
        subscription_id: Option<u32>,
    ) -> SubAck {
        let mut properties = Properties::default();
        properties.subscription_identifiers.extend(subscription_id);
        let subscribe = Subscribe {
            packet_id,
            properties,
            subscriptions: vec![Subscription { filter: utf8(filter), options }],
        };
        self.send(&Packet::Subscribe(subscribe)).await;
        match self.recv().await {
            Packet::SubAck(suback) => {
                assert_eq!(suback.packet_id, packet_id);
                suback
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Subscribes and asserts the grant of the requested QoS.
    pub async fn subscribe_ok(&mut self, packet_id: PacketId, filter: &str, qos: QoS, id: Option<u32>) {
        let suback = self.subscribe(packet_id, filter, options(qos), id).await;
        let granted = match qos {
            QoS::AtMostOnce => ReasonCode::GrantedQoS0,
            QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
            QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
        };
        assert_eq!(suback.reasons, vec![granted], "SUBACK for {filter}");
    }

    /// Publishes at QoS 1 and waits for the PUBACK; returns its reason.
    pub async fn publish_qos1(&mut self, mut publish: Publish, packet_id: PacketId) -> ReasonCode {
        publish.qos = QoS::AtLeastOnce;
        publish.packet_id = Some(packet_id);
        self.send(&Packet::Publish(publish)).await;
        match self.recv().await {
            Packet::PubAck(ack) => {
                assert_eq!(ack.packet_id, packet_id);
                ack.reason
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }

    /// Sends a PINGREQ and waits for the PINGRESP: every packet sent before it has been handled.
    pub async fn ping(&mut self) {
        self.send(&Packet::PingReq).await;
        match self.recv().await {
            Packet::PingResp => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }

    /// Sends a normal DISCONNECT with the given properties and waits for the close.
    pub async fn disconnect(mut self, reason: ReasonCode, properties: Properties) {
        let disconnect = shardmq_protocol::Disconnect { reason, properties };
        self.send(&Packet::Disconnect(disconnect)).await;
        match self.try_recv(WAIT).await {
            Err(RecvError::Closed) => {}
            other => panic!("expected the broker to close after our DISCONNECT, got {other:?}"),
        }
    }

    /// Drops the TCP connection without a DISCONNECT (an abnormal close).
    pub fn drop_connection(self) {
        drop(self.stream);
    }
}

/// A rumqttc v5 client whose event loop runs in a task and forwards every incoming packet, for
/// the tests that use a real client library with MQTT 5 properties.
#[derive(Debug)]
pub struct R5 {
    pub client: rumqttc::v5::AsyncClient,
    incoming: tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for R5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl R5 {
    /// Connects a clean-start client and waits for a successful CONNACK.
    pub async fn connect(addr: SocketAddr, client_id: &str) -> R5 {
        use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet as P};
        let mut options = rumqttc::v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 100);
        let (tx, incoming) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let rumqttc::v5::Event::Incoming(packet) = event {
                    if tx.send(packet).is_err() {
                        break;
                    }
                }
            }
        });
        let mut r5 = R5 { client, incoming, task };
        match r5.next().await {
            P::ConnAck(connack) => assert_eq!(connack.code, ConnectReturnCode::Success),
            other => panic!("{client_id}: expected CONNACK, got {other:?}"),
        }
        r5
    }

    /// The next incoming packet within [`WAIT`].
    pub async fn next(&mut self) -> rumqttc::v5::mqttbytes::v5::Packet {
        tokio::time::timeout(WAIT, self.incoming.recv())
            .await
            .expect("no packet from the broker in time")
            .expect("event loop ended")
    }

    /// Waits for the next packet of the kind `pick` accepts, skipping acknowledgements and pings.
    pub async fn wait<T>(
        &mut self,
        mut pick: impl FnMut(rumqttc::v5::mqttbytes::v5::Packet) -> Option<T>,
    ) -> T {
        loop {
            if let Some(found) = pick(self.next().await) {
                return found;
            }
        }
    }

    /// The next PUBLISH (acknowledgements and other packets in between are skipped).
    pub async fn next_publish(&mut self) -> rumqttc::v5::mqttbytes::v5::Publish {
        use rumqttc::v5::mqttbytes::v5::Packet as P;
        self.wait(|packet| match packet {
            P::Publish(publish) => Some(publish),
            P::PubAck(_) | P::PubRec(_) | P::PubComp(_) | P::PingResp(_) | P::SubAck(_) => None,
            other => panic!("expected PUBLISH, got {other:?}"),
        })
        .await
    }

    /// Subscribes with an optional subscription identifier; returns the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, id: Option<usize>) -> rumqttc::v5::mqttbytes::v5::SubAck {
        use rumqttc::v5::mqttbytes::v5::{Packet as P, SubscribeProperties};
        let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
        match id {
            Some(id) => self
                .client
                .subscribe_with_properties(
                    filter,
                    qos,
                    SubscribeProperties { id: Some(id), user_properties: vec![] },
                )
                .await
                .expect("request queued"),
            None => self.client.subscribe(filter, qos).await.expect("request queued"),
        }
        self.wait(|packet| match packet {
            P::SubAck(suback) => Some(suback),
            _ => None,
        })
        .await
    }
}
