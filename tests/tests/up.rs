//! `coordinator up`: one command starts shard nodes and serves; ctrl-c stops everything.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{coordinator_bin, default_model, post};

/// Starts `coordinator up`; returns it, its nodes' addresses and its HTTP address.
fn up() -> anyhow::Result<(std::process::Child, Vec<String>, String)> {
    let model = default_model();
    let mut child = Command::new(coordinator_bin())
        .args(["up", "--nodes", "2", "--http", "127.0.0.1:0", "--model"])
        .arg(&model)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut err = BufReader::new(
        child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stderr"))?,
    );
    let mut started = String::new();
    err.read_line(&mut started)?;
    let nodes: Vec<String> = started
        .trim()
        .split_once("shard nodes: ")
        .map(|(_, a)| a.split(", ").map(String::from).collect())
        .ok_or_else(|| anyhow::anyhow!("unexpected {started:?}"))?;
    assert_eq!(nodes.len(), 2);
    let mut out = BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    );
    let mut line = String::new();
    out.read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| anyhow::anyhow!("{line:?}"))?
        .to_string();
    Ok((child, nodes, addr))
}

/// Waits until nothing listens on any of `nodes`.
fn nodes_gone(nodes: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    for n in nodes {
        while std::net::TcpStream::connect(n).is_ok() {
            assert!(
                Instant::now() < deadline,
                "shard node {n} outlived the coordinator"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn up_serves_and_ctrl_c_stops_the_nodes() -> anyhow::Result<()> {
    let (mut child, nodes, addr) = up()?;
    let (code, body) = post(
        &format!("http://{addr}/v1/completions"),
        r#"{"prompt":"Hello","max_tokens":4,"temperature":0}"#,
    )?;
    assert_eq!(code, 200, "{body}");

    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        assert!(
            Instant::now() < deadline,
            "coordinator did not stop on ctrl-c"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    nodes_gone(&nodes, Duration::from_secs(1));
    Ok(())
}

#[test]
fn nodes_end_when_the_coordinator_is_killed() -> anyhow::Result<()> {
    let (mut child, nodes, _) = up()?;
    child.kill()?; // SIGKILL: no Drop, no signal handler runs
    child.wait()?;
    nodes_gone(&nodes, Duration::from_secs(5));
    Ok(())
}
