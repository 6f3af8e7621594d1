//! Security, with real processes: mutual TLS on the tarpc links (a plain client and a
//! foreign CA are refused and allocate nothing; a node's certificate may not load or
//! prepare slices or open sessions; a TLS cluster serves the same text as a plain one),
//! etcd over TLS with client certificates, API keys on the HTTP API, and a node under 1000
//! idle connections and garbage frames.

use std::io::Write;
use std::time::Duration;

use integration_tests::{
    completion, default_model, get, get_json, https_request, last_stage_session, models_dir,
    node_status, post_with, rss_kib, ClusterCerts, CoordinatorProcess, EtcdProcess, ShardProcess,
};
use proto_types::{ErrorCode, LoadSlice, NodeStatus, PlanEpoch};

const PROMPT: &str = "The three primary colors are";

fn tls_node(certs: &ClusterCerts, name: &str, extra: &[&str]) -> anyhow::Result<ShardProcess> {
    let flags = certs.flags(name);
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    ShardProcess::spawn(&models_dir(), &args)
}

fn leases(s: &NodeStatus) -> usize {
    s.leases.len()
}

fn ctx() -> tarpc::context::Context {
    let mut c = tarpc::context::current();
    c.deadline = std::time::Instant::now() + Duration::from_secs(10);
    c
}

/// Coordinator, 3 nodes and etcd, with TLS on every link (etcd with client certificates):
/// the same greedy text as a plain cluster.
#[test]
fn a_tls_cluster_serves_the_same_text_as_a_plain_one() -> anyhow::Result<()> {
    let names = ["node-a", "node-b", "node-c"];
    let certs = ClusterCerts::new(&["node-a", "node-b", "node-c", "etcd"])?;
    let etcd = EtcdProcess::start_tls(&certs.etcd_files("etcd"))?;
    assert!(etcd.url.starts_with("https://"));
    let mut nodes = Vec::new();
    for n in names {
        let etcd_flags = certs.etcd_flags(n);
        let mut extra = vec!["--etcd", etcd.url.as_str(), "--node-id", n];
        extra.extend(etcd_flags.iter().map(String::as_str));
        nodes.push(tls_node(&certs, n, &extra)?);
    }
    let (flags, etcd_flags) = (certs.flags("coord"), certs.etcd_flags("coord"));
    let mut args = vec!["--etcd", etcd.url.as_str(), "--min-nodes", "3"];
    args.extend(flags.iter().chain(&etcd_flags).map(String::as_str));
    let tls = CoordinatorProcess::spawn_with(&default_model(), &args)?;
    let start = std::time::Instant::now();
    while get_json(&format!("{}/v1/cluster", tls.url))
        .ok()
        .and_then(|v| v["nodes"].as_array().map(Vec::len))
        != Some(3)
    {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(40), "no 3-stage plan");
        std::thread::sleep(Duration::from_millis(100));
    }
    let secure = completion(&tls.url, PROMPT, 16, false)?;
    drop(tls);
    drop(nodes);

    let plain: Vec<ShardProcess> = (0..3)
        .map(|_| ShardProcess::spawn(&models_dir(), &[]))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&ShardProcess> = plain.iter().collect();
    let coord = CoordinatorProcess::spawn(&default_model(), &refs)?;
    assert_eq!(secure, completion(&coord.url, PROMPT, 16, false)?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_foreign_clients_are_refused_and_hold_nothing() -> anyhow::Result<()> {
    let certs = ClusterCerts::new(&["node-a"])?;
    let node = tls_node(&certs, "node-a", &[])?;
    let before = certs.status(&node.addr).await?;
    assert_eq!(
        leases(&before),
        1,
        "only the status call's own lease: {before:?}"
    );
    // plain TCP: the TLS handshake fails on the first bytes
    let plain = tokio::time::timeout(Duration::from_secs(10), node_status(&node.addr)).await;
    assert!(!matches!(plain, Ok(Ok(_))), "a plain client got an answer");
    // a certificate from another CA
    let foreign = certs.connect(&node.addr, "intruder").await;
    assert!(foreign.is_err(), "a foreign CA's certificate was accepted");
    // the node's certificate checked by its address: a coordinator dialing it under another
    // name fails (here: `localhost`, not in the certificate)
    let port = node
        .addr
        .rsplit_once(':')
        .map(|(_, p)| p)
        .unwrap_or_default();
    let misnamed = certs.connect(&format!("localhost:{port}"), "coord").await;
    assert!(
        misnamed.is_err(),
        "a certificate without the dialed name was accepted"
    );
    let after = certs.status(&node.addr).await?;
    assert_eq!(leases(&after), 1, "no lease was granted: {after:?}");
    assert_eq!(after.attributed_bytes, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_may_not_change_what_a_node_holds() -> anyhow::Result<()> {
    let certs = ClusterCerts::new(&["node-a", "node-b"])?;
    let node = tls_node(&certs, "node-a", &[])?;
    let (peer, _) = certs.connect(&node.addr, "node-b").await?;
    let model = default_model();
    let load = LoadSlice {
        model: model
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default()
            .to_string(),
        sha256: String::new(),
        layers: proto_types::WireLayerRange { start: 0, end: 30 },
        epoch: PlanEpoch(1),
        max_ctx: 64,
        beside: false,
    };
    let denied = |r: Result<_, proto_types::ShardError>, what: &str| {
        let e = r.err().unwrap_or_else(|| panic!("{what} was allowed"));
        assert_eq!(e.code, ErrorCode::PermissionDenied, "{what}: {e}");
    };
    denied(
        peer.load_slice(ctx(), load.clone()).await?.map(|_| ()),
        "load_slice",
    );
    denied(
        peer.prepare_slice(ctx(), load).await?.map(|_| ()),
        "prepare_slice",
    );
    denied(
        peer.commit_slice(ctx(), PlanEpoch(1)).await?,
        "commit_slice",
    );
    denied(peer.abort_slice(ctx(), PlanEpoch(1)).await?, "abort_slice");
    let open = last_stage_session(proto_types::SessionId(1), PlanEpoch(1), 64);
    denied(peer.open_session(ctx(), open).await?, "open_session");
    // allowed: status, as any member of the cluster
    let s = certs.status(&node.addr).await?;
    assert_eq!(s.attributed_bytes, 0, "nothing was allocated: {s:?}");
    assert!(s.epoch.is_none() && s.prepared_epochs.is_empty());
    Ok(())
}

#[test]
fn the_api_needs_its_key() -> anyhow::Result<()> {
    let node = ShardProcess::spawn(&models_dir(), &[])?;
    let key = "sk-test-0123456789abcdef";
    let coord = CoordinatorProcess::spawn_with(
        &default_model(),
        &[
            "--nodes",
            &node.addr,
            "--api-key",
            key,
            "--metrics-key",
            "metrics-0123456789ab",
        ],
    )?;
    let url = format!("{}/v1/completions", coord.url);
    let body = serde_json::json!({"prompt": PROMPT, "max_tokens": 2}).to_string();
    for auth in [None, Some("Bearer wrong-key-0123456789"), Some(key)] {
        let headers: Vec<(&str, &str)> =
            auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
        let (code, text) = post_with(&url, &body, &headers)?;
        assert_eq!(code, 401, "{auth:?}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text)?;
        assert_eq!(v["error"]["code"], "invalid_api_key", "{text}");
    }
    let bearer = format!("Bearer {key}");
    let (code, text) = post_with(&url, &body, &[("authorization", &bearer)])?;
    assert_eq!(code, 200, "{text}");
    let (code, _) = get(&format!("{}/health", coord.url))?;
    assert_eq!(code, 200, "/health stays open");
    let (code, _) = get(&format!("{}/metrics", coord.url))?;
    assert_eq!(code, 401, "/metrics needs the metrics key");
    Ok(())
}

/// HTTPS on the API (`--http-tls-cert`, `--http-tls-key`), with a key: over TLS with the key
/// 200, without it 401; plain HTTP to the port gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_over_https() -> anyhow::Result<()> {
    let certs = ClusterCerts::new(&[])?;
    let node = ShardProcess::spawn(&models_dir(), &[])?;
    let flags = certs.flags("coord");
    let key = "sk-test-0123456789abcdef";
    let args = [
        "--nodes",
        node.addr.as_str(),
        "--api-key",
        key,
        "--http-tls-cert",
        flags[3].as_str(),
        "--http-tls-key",
        flags[5].as_str(),
    ];
    let coord = CoordinatorProcess::spawn_with(&default_model(), &args)?;
    let addr = coord.url.trim_start_matches("http://").to_string();
    let bearer = format!("Bearer {key}");
    let (code, body) = https_request(
        &addr,
        &certs.ca(),
        "GET",
        "/v1/models",
        &[("authorization", &bearer)],
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("SmolLM2"), "{body}");
    let (code, _) = https_request(&addr, &certs.ca(), "GET", "/v1/models", &[]).await?;
    assert_eq!(code, 401);
    let (code, _) = https_request(&addr, &certs.ca(), "GET", "/health", &[]).await?;
    assert_eq!(code, 200);
    let plain = get(&format!("{}/health", coord.url));
    assert!(!matches!(plain, Ok((200, _))), "plain HTTP was answered");
    Ok(())
}

/// 1000 idle connections and a flood of garbage: the node keeps serving, and its resident
/// set stays within 2 MiB of where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_garbage_do_not_hurt_a_node() -> anyhow::Result<()> {
    let certs = ClusterCerts::new(&["node-a"])?;
    let node = tls_node(
        &certs,
        "node-a",
        &["--tls-handshake-ms", "1000", "--max-connections", "256"],
    )?;
    certs.status(&node.addr).await?;
    let before = rss_kib(node.pid())?;
    let mut idle = Vec::new();
    for _ in 0..1000 {
        if let Ok(s) = std::net::TcpStream::connect(&node.addr) {
            idle.push(s);
        }
    }
    for i in 0..200u32 {
        if let Ok(mut s) = std::net::TcpStream::connect(&node.addr) {
            // a 4 GB length prefix, then noise
            let _ = s.write_all(&[0xff, 0xff, 0xff, 0xff]);
            let _ = s.write_all(&i.to_le_bytes().repeat(64));
        }
    }
    // the handshake deadline closes the idle ones; the node still answers
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = certs.status(&node.addr).await?;
    assert_eq!(s.leases.len(), 1, "{s:?}");
    drop(idle);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_kib(node.pid())?;
    assert!(
        after <= before + 2048,
        "resident set {before} kB -> {after} kB"
    );
    Ok(())
}
