//! MQTT over WebSocket (`ws`) and over WebSocket in TLS (`wss`), end to end with a real WebSocket
//! client (tungstenite) speaking MQTT through the broker: packets split across frames and several
//! in one frame, ping/pong, routing to and from a plain TCP client, and bad input (the wrong
//! subprotocol, the wrong path, a text frame) refused with an answer, a log line and a counter
//! while other clients carry on.

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{connect_packet, publish_packet, TestBroker};
use shardmq_protocol::{
    decode, encode, Packet, ProtocolVersion, QoS, Subscribe, Subscription, SubscriptionOptions, Utf8,
};
use shardmq_shards::listener::{ListenerConfig, ListenerKind};
use shardmq_shards::tls::TlsFiles;
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

const V311: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;
const WAIT: Duration = Duration::from_secs(10);

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn frame(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(packet, version, &mut out).expect("encode");
    out.to_vec()
}

/// Reads MQTT packets from a byte source with the project's codec.
struct Decoder {
    buf: BytesMut,
    version: ProtocolVersion,
}

impl Decoder {
    fn next(&mut self) -> Option<Packet> {
        decode(&mut self.buf, self.version, 1 << 20).expect("the broker sends valid packets")
    }
}

/// A WebSocket client speaking MQTT: each `send` is one binary message.
struct WsClient<S: Read + Write> {
    ws: WebSocket<S>,
    decoder: Decoder,
}

impl<S: Read + Write> WsClient<S> {
    fn handshake(stream: S, url: &str, subprotocol: &str, version: ProtocolVersion) -> WsClient<S> {
        let mut request = url.into_client_request().expect("request");
        request.headers_mut().insert("Sec-WebSocket-Protocol", subprotocol.parse().expect("header"));
        let (ws, response) = tungstenite::client(request, stream).expect("WebSocket handshake");
        assert_eq!(
            response.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok()),
            Some(subprotocol),
            "the broker echoes the subprotocol"
        );
        WsClient { ws, decoder: Decoder { buf: BytesMut::new(), version } }
    }

    fn send_frames(&mut self, frames: &[&[u8]]) {
        for bytes in frames {
            self.ws.send(Message::Binary(bytes.to_vec())).expect("send");
        }
    }

    fn send(&mut self, packet: &Packet) {
        let bytes = frame(packet, self.decoder.version);
        self.send_frames(&[&bytes]);
    }

    /// The next MQTT packet (reads are bounded by the socket's read timeout).
    fn recv(&mut self) -> Packet {
        loop {
            if let Some(packet) = self.decoder.next() {
                return packet;
            }
            match self.ws.read().expect("a message in time") {
                Message::Binary(bytes) => self.decoder.buf.extend_from_slice(&bytes),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected WebSocket message {other:?}"),
            }
        }
    }

    fn connect(&mut self, id: &str) {
        self.send(&Packet::Connect(Box::new(connect_packet(self.decoder.version, id, true, 60))));
        match self.recv() {
            Packet::ConnAck(ack) => assert_eq!(ack.reason.as_u8(), 0, "CONNACK accepted"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

fn tcp(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream
}

fn subscribe(pid: u16, filter: &str) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: pid,
        properties: Default::default(),
        subscriptions: vec![Subscription {
            filter: Utf8::new(filter).expect("valid filter"),
            options: SubscriptionOptions { qos: QoS::AtMostOnce, ..Default::default() },
        }],
    })
}

/// Listener 0: plain TCP. Listener 1: WebSocket at the default `/mqtt`. Listener 2: WebSocket at
/// `/custom`.
fn start() -> TestBroker {
    TestBroker::start_with(|cfg| {
        cfg.listeners = vec![
            ListenerConfig::tcp(any_port()),
            ListenerConfig { kind: ListenerKind::Ws, ..ListenerConfig::tcp(any_port()) },
            ListenerConfig {
                kind: ListenerKind::Ws,
                ws_path: Some("/custom".into()),
                ..ListenerConfig::tcp(any_port())
            },
        ];
    })
}

/// A plain TCP MQTT client, blocking.
struct Plain {
    stream: TcpStream,
    decoder: Decoder,
}

impl Plain {
    fn connect(addr: SocketAddr, id: &str) -> Plain {
        let mut plain = Plain { stream: tcp(addr), decoder: Decoder { buf: BytesMut::new(), version: V311 } };
        plain.send(&Packet::Connect(Box::new(connect_packet(V311, id, true, 60))));
        assert!(matches!(plain.recv(), Packet::ConnAck(a) if a.reason.as_u8() == 0));
        plain
    }

    fn send(&mut self, packet: &Packet) {
        self.stream.write_all(&frame(packet, V311)).expect("send");
    }

    fn recv(&mut self) -> Packet {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(packet) = self.decoder.next() {
                return packet;
            }
            let n = self.stream.read(&mut chunk).expect("a packet in time");
            assert!(n > 0, "closed");
            self.decoder.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[test]
fn mqtt_over_websocket_in_split_and_joined_frames() {
    let broker = start();
    let addrs = broker.listener_addrs();
    let url = format!("ws://{}/mqtt", addrs[1]);
    let mut ws = WsClient::handshake(tcp(addrs[1]), &url, "mqtt", V5);
    ws.connect("ws-sub");

    // One SUBSCRIBE split over three frames (a split inside the fixed header too).
    let sub = frame(&subscribe(7, "ws/#"), V5);
    ws.send_frames(&[&sub[..1], &sub[1..4], &sub[4..]]);
    match ws.recv() {
        Packet::SubAck(ack) => assert_eq!(ack.packet_id, 7),
        other => panic!("expected SUBACK, got {other:?}"),
    }

    // A plain TCP client's message reaches the WebSocket subscriber, and the other way round.
    let mut plain = Plain::connect(addrs[0], "plain");
    plain.send(&subscribe(1, "tcp/#"));
    assert!(matches!(plain.recv(), Packet::SubAck(_)));
    plain.send(&Packet::Publish(publish_packet("ws/a", 0, None, b"from-tcp")));
    match ws.recv() {
        Packet::Publish(p) => assert_eq!((&p.topic[..], &p.payload[..]), ("ws/a", &b"from-tcp"[..])),
        other => panic!("expected PUBLISH, got {other:?}"),
    }

    // Two packets in one frame: a PINGREQ and a PUBLISH.
    let mut joined = frame(&Packet::PingReq, V5);
    joined.extend_from_slice(&frame(&Packet::Publish(publish_packet("tcp/b", 0, None, b"from-ws")), V5));
    ws.send_frames(&[&joined]);
    assert!(matches!(ws.recv(), Packet::PingResp));
    match plain.recv() {
        Packet::Publish(p) => assert_eq!(&p.payload[..], b"from-ws"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }

    // A WebSocket ping is answered with a pong carrying the same payload.
    ws.ws.send(Message::Ping(b"are you there".to_vec())).expect("ping");
    loop {
        match ws.ws.read().expect("pong in time") {
            Message::Pong(payload) => {
                assert_eq!(payload, b"are you there");
                break;
            }
            Message::Binary(bytes) => ws.decoder.buf.extend_from_slice(&bytes),
            other => panic!("unexpected {other:?}"),
        }
    }

    // MQTT 3.1.1 clients, with the old `mqttv3.1` name, on a configured path.
    let url = format!("ws://{}/custom", addrs[2]);
    let mut old = WsClient::handshake(tcp(addrs[2]), &url, "mqttv3.1", V311);
    old.connect("ws-old");
    assert_eq!(broker.listeners()[1].ws_errors.load(Ordering::Relaxed), 0);
}

/// Sends a hand-written upgrade request; returns the status line of the answer.
fn raw_upgrade(addr: SocketAddr, path: &str, subprotocol: &str) -> String {
    let mut stream = tcp(addr);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("the broker answers and closes");
    String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_string()
}

fn wait_counter(counter: &std::sync::atomic::AtomicU64, at_least: u64) {
    let deadline = Instant::now() + WAIT;
    while counter.load(Ordering::Relaxed) < at_least {
        assert!(Instant::now() < deadline, "counter stayed below {at_least}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn bad_upgrades_and_frames_are_refused_and_counted() {
    let broker = start();
    let addrs = broker.listener_addrs();
    let listener = broker.listeners()[1].clone();
    // A client already connected keeps working throughout.
    let url = format!("ws://{}/mqtt", addrs[1]);
    let mut bystander = WsClient::handshake(tcp(addrs[1]), &url, "mqtt", V311);
    bystander.connect("bystander");

    assert!(raw_upgrade(addrs[1], "/mqtt", "chat").starts_with("HTTP/1.1 400"), "wrong subprotocol");
    wait_counter(&listener.ws_errors, 1);
    assert!(raw_upgrade(addrs[1], "/elsewhere", "mqtt").starts_with("HTTP/1.1 404"), "wrong path");
    wait_counter(&listener.ws_errors, 2);

    // Plain MQTT on a WebSocket port: refused without waiting for the connect timeout.
    let mut plain = tcp(addrs[1]);
    plain.write_all(&frame(&Packet::Connect(Box::new(connect_packet(V311, "p", true, 60))), V311)).unwrap();
    let mut answer = Vec::new();
    plain.read_to_end(&mut answer).expect("closed");
    assert!(answer.starts_with(b"HTTP/1.1 4"), "an HTTP refusal: {:?}", String::from_utf8_lossy(&answer));
    wait_counter(&listener.ws_errors, 3);

    // A text frame: MQTT requires binary frames; the broker closes with 1003.
    let mut texter = WsClient::handshake(tcp(addrs[1]), &url, "mqtt", V311);
    texter.connect("texter");
    texter.ws.send(Message::Text("CONNECT".into())).expect("send text");
    let close = loop {
        match texter.ws.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(error) => panic!("expected a Close frame, got {error}"),
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1003));
    wait_counter(&listener.ws_errors, 4);

    bystander.send(&Packet::PingReq);
    assert!(matches!(bystander.recv(), Packet::PingResp), "the bystander is unaffected");
}

#[test]
fn mqtt_over_websocket_over_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = pki::Ca::new(dir.path(), "main");
    let server = ca.server(dir.path(), "server");
    let broker = TestBroker::start_with(|cfg| {
        cfg.listeners = vec![ListenerConfig {
            kind: ListenerKind::Wss,
            tls: Some(TlsFiles {
                cert_file: server.cert_file.clone(),
                key_file: server.key_file.clone(),
                client_ca_file: None,
                require_client_cert: true,
            }),
            ..ListenerConfig::tcp(any_port())
        }];
    });
    let addr = broker.listener_addrs()[0];
    let open = |id: &str| {
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let conn =
            rustls::ClientConnection::new(pki::client_config(&ca.cert_file, None), name).expect("client");
        let tls = rustls::StreamOwned::new(conn, tcp(addr));
        let mut ws = WsClient::handshake(tls, &format!("wss://localhost:{}/mqtt", addr.port()), "mqtt", V5);
        ws.connect(id);
        ws
    };
    let mut sub = open("wss-sub");
    sub.send(&subscribe(3, "secure/#"));
    assert!(matches!(sub.recv(), Packet::SubAck(_)));
    let mut publisher = open("wss-pub");
    let payload = vec![0x5a; 100_000]; // several TLS records and WebSocket frames
    publisher.send(&Packet::Publish(publish_packet("secure/big", 0, None, &payload)));
    match sub.recv() {
        Packet::Publish(p) => assert_eq!(&p.payload[..], &payload[..]),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    let listener = &broker.listeners()[0];
    assert_eq!(listener.tls_errors.load(Ordering::Relaxed) + listener.ws_errors.load(Ordering::Relaxed), 0);
}
