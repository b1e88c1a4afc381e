//! shardmq-shards: the per-core broker runtime.
//!
//! Owns: the shard threads and their monoio runtimes ([`runtime`]), the connection tasks
//! ([`conn`]), the per-shard broker state and logic ([`shard`]): sessions ([`session`]), the trie
//! slice and interest table ([`trie`]), retained messages, the core-to-core mesh ([`mesh`]), and the
//! sans-I/O WebSocket layer for MQTT over WebSocket ([`ws`]).
//!
//! Does not own: the CLI and config files (the `shardmq` binary), the byte layout of packets
//! (`shardmq-protocol`), the log format (`shardmq-storage`; the
//! records the broker keeps in it are in [`store`]).
//!
//! Architecture invariant: a shard's state is touched only by its own thread; other shards reach
//! it only through mesh messages.

pub mod admin;
pub mod auth;
pub mod config;
pub mod conn;
pub mod events;
pub mod listener;
pub mod mesh;
pub mod message;
pub mod runtime;
pub mod scram;
pub mod session;
pub mod shard;
pub mod store;
pub mod tenants;
pub mod tls;
pub mod transport;
pub mod trie;
pub mod ws;

#[cfg(test)]
mod routing_tests;

pub use admin::AdminHandle;
pub use config::{BrokerConfig, FsyncPolicy, IoDriver, QueueFullPolicy};
pub use runtime::{start, Broker};
