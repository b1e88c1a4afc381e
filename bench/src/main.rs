//! `shardmq-bench`: the load generator of shardmq, usable against any MQTT broker.
//!
//! Owns: the command line and the result line. Each scenario (`pubsub`, `conn`, `persist`,
//! `churn`) runs to completion and returns its parameters and figures; this file prints them as
//! one JSON line on stdout together with the run facts (git commit, nproc, kernel, UTC date).
//! `compare` runs a scenario against several brokers (see `compare.rs`). Progress goes to stderr,
//! and only when stderr is a terminal, so stdout stays machine-readable.
//!
//! Code map: `engine.rs` (worker threads, phases, pacing), `mqtt.rs` (a client connection over
//! the `shardmq-protocol` codec), `stream.rs` (TCP connect, and TLS with `--tls`), `payload.rs` (the timestamped payload header), `stats.rs`
//! (histograms, stream tracking), `cli.rs` (shared flags), one file per scenario, `broker.rs` and
//! `compare.rs` (side-by-side runs), `env.rs` (run facts, progress line).

mod broker;
mod churn;
mod cli;
mod compare;
mod conn;
mod engine;
mod env;
mod mqtt;
mod payload;
mod persist;
mod pubsub;
mod stats;
mod stream;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// Load generator for MQTT brokers: throughput, latency, connection storms, persistence.
#[derive(Parser, Debug)]
#[command(name = "shardmq-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Publishers and subscribers: fan-in, fan-out, pairs or shared subscriptions.
    Pubsub(pubsub::PubSubArgs),
    /// Connection storm and hold: connect rate, CONNACK latency, broker memory per connection.
    Conn(conn::ConnArgs),
    /// Offline queuing: fill persistent sessions while they are away, then drain them.
    Persist(persist::PersistArgs),
    /// Connect/disconnect storm over a fixed client-id pool (session takeover).
    Churn(churn::ChurnArgs),
    /// Run a scenario against shardmq, Mosquitto and others, side by side.
    Compare(compare::CompareArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (name, outcome) = match cli.command {
        Scenario::Pubsub(args) => ("pubsub", pubsub::run(args)),
        Scenario::Conn(args) => ("conn", conn::run(args)),
        Scenario::Persist(args) => ("persist", persist::run(args)),
        Scenario::Churn(args) => ("churn", churn::run(args)),
        Scenario::Compare(args) => {
            return match compare::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("shardmq-bench compare: {error:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match outcome {
        Ok((params, results)) => {
            println!(
                "{}",
                json!({ "scenario": name, "params": params, "results": results, "run": env::run_info(), "argv": argv })
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("shardmq-bench {name}: {error:#}");
            let line: Value = json!({ "scenario": name, "error": format!("{error:#}"), "run": env::run_info(), "argv": argv });
            println!("{line}");
            ExitCode::FAILURE
        }
    }
}
