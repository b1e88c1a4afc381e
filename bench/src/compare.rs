//! `shardmq-bench compare`: the same scenario against shardmq, Mosquitto and any other broker,
//! side by side, in the same run (the project's rule: every benchmark states its baseline).
//!
//! Owns: starting the brokers (through `broker.rs`), running the scenario as a child process of
//! this binary against each broker, alternating the order every round so drift (thermal, noisy
//! neighbours) does not favour one broker, taking the median of each figure over the rounds, and
//! printing a markdown table plus one JSON line. A broker that cannot start is reported with its
//! reason and the others still run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Map, Value};

use crate::broker::{self, Broker};

/// Flags of `shardmq-bench compare`.
#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// The scenario and its flags, e.g. "pubsub --mode pairs --pubs 4 --subs 4 --qos 1 --count 10000".
    /// --host and --port are added per broker.
    #[arg(long)]
    pub scenario: String,
    /// The shardmq binary (default: `shardmq` beside this binary, else target/release/shardmq).
    #[arg(long)]
    pub shardmq_bin: Option<PathBuf>,
    /// Cores given to shardmq (`--cores`) and to templates (`{cores}`).
    #[arg(long, default_value_t = 2)]
    pub cores: u32,
    /// Rounds; each runs the scenario once against every broker.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Another broker: `name=command template` with {port}, {cores} and {dir} substituted,
    /// e.g. `rumqttd=rumqttd --config {dir}/rumqttd.toml`. Repeatable.
    #[arg(long = "broker")]
    pub brokers: Vec<String>,
    /// Leave shardmq out (for comparing only the others).
    #[arg(long)]
    pub no_shardmq: bool,
}

/// Splits a command line on whitespace, honouring single and double quotes.
pub fn split_args(text: &str) -> anyhow::Result<Vec<String>> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => current.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    args.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            None => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        bail!("unbalanced quote in {text:?}");
    }
    if in_word {
        args.push(current);
    }
    Ok(args)
}

fn default_shardmq_bin() -> PathBuf {
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|dir| dir.join("shardmq")));
    match beside {
        Some(path) if path.exists() => path,
        _ => PathBuf::from("target/release/shardmq"),
    }
}

/// One broker's entry in the comparison.
#[derive(Debug)]
struct Contender {
    name: String,
    broker: Option<Broker>,
    status: String,
    rounds: Vec<Value>,
}

/// Runs the comparison and prints the table and the JSON line.
pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    let scenario = split_args(&args.scenario)?;
    let Some(scenario_name) = scenario.first().cloned() else {
        bail!("--scenario is empty");
    };
    if !["pubsub", "conn", "persist", "churn"].contains(&scenario_name.as_str()) {
        bail!("--scenario must start with pubsub, conn, persist or churn, not {scenario_name:?}");
    }
    if scenario.iter().any(|a| a == "--host" || a == "--port" || a.starts_with("--port=")) {
        bail!("--scenario must not set --host or --port: compare sets them per broker");
    }
    let mut contenders = Vec::new();
    if !args.no_shardmq {
        let bin = args.shardmq_bin.clone().unwrap_or_else(default_shardmq_bin);
        contenders.push(start("shardmq", broker::start_shardmq(&bin, args.cores)));
    }
    contenders.push(start("mosquitto", broker::start_mosquitto()));
    for spec in &args.brokers {
        let (name, template) = spec.split_once('=').context("--broker takes name=command-template")?;
        contenders.push(start(name, broker::start_template(name, template, args.cores)));
    }

    let exe = std::env::current_exe().context("locating this binary")?;
    for round in 0..args.rounds as usize {
        let count = contenders.len();
        for offset in 0..count {
            let contender = &mut contenders[(round + offset) % count];
            let Some(broker) = contender.broker.as_mut() else { continue };
            if !broker.alive() {
                contender.status =
                    format!("exited before round {}; log ends:\n{}", round + 1, broker.log_tail());
                contender.broker = None;
                continue;
            }
            eprintln!("compare: round {} of {}, {}", round + 1, args.rounds, contender.name);
            let mut command = Command::new(&exe);
            command.args(&scenario).args(["--host", "127.0.0.1", "--port", &broker.port.to_string()]);
            if scenario_name == "conn" && !scenario.iter().any(|a| a == "--broker-pid") {
                command.args(["--broker-pid", &broker.pid().to_string()]);
            }
            let output = command.stdin(Stdio::null()).stderr(Stdio::inherit()).output()?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            let line: Option<Value> = stdout.lines().rev().find_map(|l| serde_json::from_str(l).ok());
            match line {
                Some(value) if value.get("results").is_some() => {
                    contender.rounds.push(value["results"].clone())
                }
                Some(value) => {
                    contender.status = format!("round {} failed: {}", round + 1, value["error"]);
                }
                None => contender.status = format!("round {} failed: {}", round + 1, output.status),
            }
        }
    }
    for contender in &mut contenders {
        // Stop in reverse start order: drop kills the process.
        contender.broker = None;
    }

    let medians: Vec<Map<String, Value>> = contenders.iter().map(|c| median_results(&c.rounds)).collect();
    println!("{}", table(&scenario_name, &contenders, &medians));
    let mut brokers = Map::new();
    for (contender, median) in contenders.iter().zip(&medians) {
        brokers.insert(
            contender.name.clone(),
            json!({ "status": contender.status, "median": median, "rounds": contender.rounds }),
        );
    }
    let line = json!({
        "compare": {
            "scenario": args.scenario,
            "rounds": args.rounds,
            "cores": args.cores,
        },
        "brokers": brokers,
        "run": crate::env::run_info(),
    });
    println!("{line}");
    Ok(())
}

fn start(name: &str, started: anyhow::Result<Broker>) -> Contender {
    match started {
        Ok(broker) => Contender {
            name: name.to_string(),
            broker: Some(broker),
            status: "ok".into(),
            rounds: Vec::new(),
        },
        Err(error) => {
            eprintln!("compare: {name} not available: {error:#}");
            Contender {
                name: name.to_string(),
                broker: None,
                status: format!("not started: {error:#}"),
                rounds: Vec::new(),
            }
        }
    }
}

/// The median of every numeric figure across rounds (figures that are not numbers are dropped).
fn median_results(rounds: &[Value]) -> Map<String, Value> {
    let mut figures: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for round in rounds {
        for (key, value) in round.as_object().into_iter().flatten() {
            if let Some(number) = value.as_f64() {
                figures.entry(key.clone()).or_default().push(number);
            }
        }
    }
    let mut medians = Map::new();
    for (key, mut values) in figures {
        values.sort_by(f64::total_cmp);
        let middle = values.len() / 2;
        let median =
            if values.len() % 2 == 1 { values[middle] } else { (values[middle - 1] + values[middle]) / 2.0 };
        medians.insert(key, json!((median * 1000.0).round() / 1000.0));
    }
    medians
}

/// The markdown table: one row per figure, one column per broker, and the ratio of the first two.
fn table(scenario: &str, contenders: &[Contender], medians: &[Map<String, Value>]) -> String {
    let mut out = String::new();
    let names: Vec<&str> = contenders.iter().map(|c| c.name.as_str()).collect();
    out.push_str(&format!("### {scenario}\n\n| metric | {} |", names.join(" | ")));
    let ratio = names.len() >= 2;
    if ratio {
        out.push_str(&format!(" ratio ({}/{}) |", names[0], names[1]));
    }
    out.push_str(&format!("\n|---|{}", "---:|".repeat(names.len())));
    if ratio {
        out.push_str("---:|");
    }
    out.push('\n');
    let mut keys: Vec<&String> = medians.iter().flat_map(|m| m.keys()).collect();
    keys.sort();
    keys.dedup();
    let cell = |map: &Map<String, Value>, key: &str| map.get(key).and_then(Value::as_f64);
    for key in keys {
        out.push_str(&format!("| {key} |"));
        for median in medians {
            match cell(median, key) {
                Some(value) => out.push_str(&format!(" {} |", format_number(value))),
                None => out.push_str(" - |"),
            }
        }
        if ratio {
            match (cell(&medians[0], key), cell(&medians[1], key)) {
                (Some(a), Some(b)) if b != 0.0 => out.push_str(&format!(" {:.2} |", a / b)),
                _ => out.push_str(" - |"),
            }
        }
        out.push('\n');
    }
    for contender in contenders.iter().filter(|c| c.status != "ok") {
        out.push_str(&format!("\n**{}**: {}\n", contender.name, contender.status));
    }
    out
}

fn format_number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_args_honours_quotes() {
        assert_eq!(
            split_args(r#"pubsub --mode pairs  --topic-prefix "a b" --x 'c'"#).unwrap(),
            ["pubsub", "--mode", "pairs", "--topic-prefix", "a b", "--x", "c"]
        );
        assert!(split_args("a 'b").is_err());
    }

    #[test]
    fn medians_and_table() {
        let rounds = [json!({"rate": 1.0, "name": "x"}), json!({"rate": 3.0}), json!({"rate": 2.0})];
        let median = median_results(&rounds);
        assert_eq!(median["rate"], json!(2.0));
        assert!(!median.contains_key("name"));
        let contenders = vec![
            Contender { name: "a".into(), broker: None, status: "ok".into(), rounds: vec![] },
            Contender { name: "b".into(), broker: None, status: "not started: gone".into(), rounds: vec![] },
        ];
        let mut other = Map::new();
        other.insert("rate".into(), json!(4.0));
        let text = table("pubsub", &contenders, &[median, other]);
        assert!(text.contains("| rate | 2 | 4 | 0.50 |"), "{text}");
        assert!(text.contains("**b**: not started: gone"));
    }
}
