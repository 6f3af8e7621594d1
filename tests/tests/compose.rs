//! The cluster as deployed: cluster-configs/compose.yml on Docker (3 etcd members, 2
//! coordinators, 3 shard nodes, mutual TLS), with containers killed, cut off and restarted.
//! Each test is its own compose project, torn down when it ends; the images are built once
//! per run (scripts/build-images.sh, from this run's binaries). After each test every live
//! node holds exactly one committed slice, no prepared one, no session and no cache.
//!
//! Set LLMC_SKIP_DOCKER=1 to leave these out on a machine without Docker.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use integration_tests::compose::{build_images, eventually, held, Compose, Held};
use integration_tests::{
    completion, default_model, generate, sse_text, workspace_root, BackgroundStream,
};

/// One project at a time: each runs 8 containers on a 2-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
const PROMPT: &str = "The capital of France is";

/// `None` when LLMC_SKIP_DOCKER=1 leaves the compose tests out; else the lock that runs
/// them one at a time.
fn docker() -> Option<std::sync::MutexGuard<'static, ()>> {
    if std::env::var("LLMC_SKIP_DOCKER").is_ok_and(|v| v == "1") {
        return None;
    }
    Some(ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner()))
}

/// The one-host compose, up and serving through both coordinators.
struct Demo {
    c: Compose,
    coord: [String; 2],
    /// Every epoch a node was seen serving.
    seen: Mutex<std::collections::BTreeSet<u64>>,
}

impl Demo {
    fn up(name: &str) -> anyhow::Result<Self> {
        build_images()?;
        Self::start(Compose::new(
            name,
            &["cluster-configs/compose.yml"],
            &[("HTTP_PORT_1", "0"), ("HTTP_PORT_2", "0")],
        ))
    }

    fn start(c: Compose) -> anyhow::Result<Self> {
        c.up(&[])?;
        let coord = [c.url("coordinator-1", 8080)?, c.url("coordinator-2", 8080)?];
        let d = Demo {
            c,
            coord,
            seen: Mutex::default(),
        };
        for url in &d.coord {
            eventually(Duration::from_secs(120), || completion(url, "Hi", 2, false))
                .map_err(|e| e.context(d.c.logs("coordinator-1")))?;
        }
        d.settled(&NODES, 0)?;
        Ok(d)
    }

    /// The decision etcd holds for `epoch` (through the members that still have an address).
    fn decision(
        &self,
        epoch: u64,
    ) -> anyhow::Result<Option<proto_types::registry::DecisionRecord>> {
        let urls: Vec<String> = ["etcd-1", "etcd-2", "etcd-3"]
            .iter()
            .filter_map(|m| self.c.url(m, 2379).ok())
            .collect();
        let urls = urls.join(",");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let r = cluster_registry::Registry::connect(&urls, "llm").await?;
                Ok(r.decision(proto_types::PlanEpoch(epoch)).await?)
            })
    }

    /// Every epoch a node was seen serving was committed in etcd first.
    fn only_committed_epochs_served(&self) -> anyhow::Result<()> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for e in seen {
            let d = self.decision(e)?;
            anyhow::ensure!(
                d.as_ref()
                    .is_some_and(|d| d.decision == proto_types::registry::Decision::Commit),
                "a node served epoch {e}, whose decision in etcd is {d:?}"
            );
        }
        Ok(())
    }

    fn node_url(&self, node: &str) -> anyhow::Result<String> {
        self.c.url(node, 9100)
    }

    /// Every node in `live` serves the same epoch, later than `after`, holds exactly one
    /// committed slice, and nothing else: no prepared slice, no session, no cache. Returns
    /// the epoch.
    fn settled(&self, live: &[&str], after: u64) -> anyhow::Result<u64> {
        self.planned(live, after, true)
    }

    /// As [`Demo::settled`]; with `idle` false, sessions and their caches may be open (a
    /// client is streaming).
    fn planned(&self, live: &[&str], after: u64, idle: bool) -> anyhow::Result<u64> {
        self.try_planned(live, after, idle).map_err(|e| {
            // both coordinators' last lines (one of them leads the planning), to tell why
            e.context(format!(
                "coordinator-1:\n{}\ncoordinator-2:\n{}",
                self.c.logs("coordinator-1"),
                self.c.logs("coordinator-2")
            ))
        })
    }

    fn try_planned(&self, live: &[&str], after: u64, idle: bool) -> anyhow::Result<u64> {
        eventually(Duration::from_secs(60), || {
            let mut epochs = Vec::new();
            for n in live {
                let mut h = held(&self.node_url(n)?)?;
                if !idle {
                    (h.sessions, h.transient) = (0, 0);
                }
                anyhow::ensure!(
                    h == Held {
                        epoch: h.epoch,
                        weight_leases: 1,
                        ..Held::default()
                    } && h.epoch > after,
                    "{n} holds {h:?} (waiting for an epoch after {after})"
                );
                epochs.push(h.epoch);
                self.seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(h.epoch);
            }
            epochs.dedup();
            anyhow::ensure!(epochs.len() == 1, "nodes on epochs {epochs:?}");
            Ok(epochs[0])
        })
    }

    /// Seconds from `fault` until a completion succeeds through `url`.
    fn heal(&self, url: &str, fault: Instant) -> anyhow::Result<f64> {
        eventually(Duration::from_secs(90), || completion(url, "Hi", 2, false))?;
        Ok(fault.elapsed().as_secs_f64())
    }
}

/// (a) The official `openai` client against a coordinator in the compose gets the text that
/// `shard-node generate` gives in one process.
#[test]
fn compose_serves_what_generate_gives() -> anyhow::Result<()> {
    let Some(_one) = docker() else {
        return Ok(());
    };
    let d = Demo::up("a")?;
    let out = std::process::Command::new("python3")
        .arg(workspace_root().join("tests/openai_client.py"))
        .arg(&d.coord[1])
        .output()?;
    assert!(
        out.status.success(),
        "the openai client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let want = generate(&default_model(), PROMPT, 12)?;
    assert_eq!(v["plain"].as_str(), Some(want.as_str()), "{v}");
    assert_eq!(v["streamed"].as_str(), Some(want.as_str()), "{v}");
    d.settled(&NODES, 0)?;
    Ok(())
}

/// (b) A shard node killed mid-stream: that stream ends with an error event, the node's
/// registration expires, the leader re-plans on the two left, and requests succeed again.
#[test]
fn killed_node_is_planned_around() -> anyhow::Result<()> {
    let Some(_one) = docker() else {
        return Ok(());
    };
    let d = Demo::up("b")?;
    let before = d.settled(&NODES, 0)?;
    let stream = BackgroundStream::completion(&d.coord[0], 2000, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(1500));
    let fault = Instant::now();
    d.c.kill("node-b")?;
    let (code, body) = stream.finish()?;
    assert_eq!(code, 200);
    let err = sse_text(&body).expect_err("the stream through the killed node must fail");
    assert!(err.to_string().contains("error event"), "{err}");
    let healed = d.heal(&d.coord[0], fault)?;
    eprintln!("heal: node killed -> first success after {healed:.1} s");
    // the other coordinator follows the same plan
    completion(&d.coord[1], PROMPT, 4, true)?;
    let after = d.settled(&["node-a", "node-c"], before)?;
    eprintln!("re-planned on the survivors: epoch {before} -> {after}");
    d.only_committed_epochs_served()
}

/// (e) One of the three etcd members killed, the one every process lists first (so every
/// etcd call was going to it): serving goes on, and a join still commits.
#[test]
fn losing_one_etcd_member_keeps_the_cluster_going() -> anyhow::Result<()> {
    let Some(_one) = docker() else {
        return Ok(());
    };
    let d = Demo::up("e")?;
    // node-c goes (a plan of two), then etcd-1 dies, then node-c comes back: a join
    let three = d.settled(&NODES, 0)?;
    d.c.compose(&["stop", "-t", "10", "node-c"], Duration::from_secs(60))?;
    let two = d.settled(&["node-a", "node-b"], three)?;
    d.c.kill("etcd-1")?;
    for url in &d.coord {
        assert!(!completion(url, PROMPT, 4, false)?.is_empty());
    }
    let fault = Instant::now();
    d.c.up(&["node-c"])?;
    d.settled(&NODES, two)?;
    if std::env::var_os("LLMC_COMPOSE_LOGS").is_some() {
        eprintln!("{}\n{}", d.c.logs("node-c"), d.c.logs("coordinator-1"));
    }
    eprintln!(
        "heal: join with an etcd member down committed after {:.1} s",
        fault.elapsed().as_secs_f64()
    );
    completion(&d.coord[0], PROMPT, 4, true)?;
    d.settled(&NODES, two)?;
    d.only_committed_epochs_served()
}

/// (f) Every shard node drained with `shard-node leave` and restarted in turn while a client
/// streams without pause: no request fails.
#[test]
fn rolling_restart_fails_no_request() -> anyhow::Result<()> {
    let Some(_one) = docker() else {
        return Ok(());
    };
    let d = Demo::up("f")?;
    let mut epoch = d.settled(&NODES, 0)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (url, stop) = (d.coord[0].clone(), stop.clone());
        std::thread::spawn(move || -> anyhow::Result<usize> {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                completion(&url, PROMPT, 16, true)
                    .map_err(|e| e.context(format!("request {n} failed")))?;
                n += 1;
            }
            Ok(n)
        })
    };
    for node in NODES {
        d.c.compose(
            &[
                "exec",
                "-T",
                node,
                "shard-node",
                "leave",
                "--etcd",
                "http://etcd-1:2379",
                "--node",
                node,
                "--drain-timeout",
                "30",
            ],
            Duration::from_secs(90),
        )?;
        // left and drained: restart it, and it joins again
        d.c.compose(&["restart", "-t", "10", node], Duration::from_secs(60))?;
        // it left (a plan without it), then joined again (a plan with it)
        epoch = d.planned(&NODES, epoch + 1, false)?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))?
        .map_err(|e| {
            let logs: Vec<String> = [
                "coordinator-1",
                "coordinator-2",
                "node-a",
                "node-b",
                "node-c",
            ]
            .iter()
            .map(|s| d.c.logs(s))
            .collect();
            e.context(logs.join("\n"))
        })?;
    assert!(served >= 3, "the client kept streaming ({served} requests)");
    d.settled(&NODES, epoch - 1)?;
    Ok(())
}

/// (c) A node cut off the network for longer than its registration's TTL: planned around as
/// if killed. Back on the network it registers again, the plan is redone once more, and it
/// holds exactly one slice. No node ever serves an epoch that etcd has not committed.
#[test]
fn partitioned_node_is_planned_around_and_rejoins() -> anyhow::Result<()> {
    let Some(_one) = docker() else {
        return Ok(());
    };
    let d = Demo::up("c")?;
    let before = d.settled(&NODES, 0)?;
    let fault = Instant::now();
    d.c.disconnect("node-c")?;
    let healed = d.heal(&d.coord[0], fault)?;
    let two = d.settled(&["node-a", "node-b"], before)?;
    eprintln!("heal: node cut off -> first success after {healed:.1} s (epoch {before} -> {two})");
    // well past the TTL (4 s): planned around; its slice retires once it reads etcd again
    std::thread::sleep(Duration::from_secs(6));
    let back = Instant::now();
    d.c.reconnect("node-c")?;
    let three = d.settled(&NODES, two)?;
    eprintln!(
        "heal: node reconnected -> planned back in after {:.1} s (epoch {three})",
        back.elapsed().as_secs_f64()
    );
    for url in &d.coord {
        completion(url, PROMPT, 4, true)?;
    }
    d.settled(&NODES, two)?;
    d.only_committed_epochs_served()
}

/// (d) The 2PC leader cut off from etcd: the other coordinator wins the election and drives
/// the next plan; the cut-off one drives nothing; every node stays on one epoch.
#[test]
fn cut_off_leader_hands_the_2pc_over() -> anyhow::Result<()> {
    let Some(_one) = docker() else {
        return Ok(());
    };
    let d = Demo::up("d")?;
    let before = d.settled(&NODES, 0)?;
    let leader = d
        .decision(before)?
        .map(|r| r.by)
        .ok_or_else(|| anyhow::anyhow!("no decision for epoch {before}"))?;
    let (cut, other, other_url) = if leader.starts_with("coordinator-1") {
        ("coordinator-1", "coordinator-2", d.coord[1].clone())
    } else {
        ("coordinator-2", "coordinator-1", d.coord[0].clone())
    };
    let fault = Instant::now();
    d.c.disconnect(cut)?;
    // the survivor leads once the cut-off one's election lease (4 s) has expired
    eventually(Duration::from_secs(60), || {
        anyhow::ensure!(
            d.c.logs(other).contains("elected the 2PC driver"),
            "{other} not elected yet"
        );
        Ok(())
    })?;
    eprintln!(
        "heal: leader cut off -> {other} elected after {:.1} s",
        fault.elapsed().as_secs_f64()
    );
    // a change of membership: the new leader plans it
    let kill = Instant::now();
    d.c.kill("node-c")?;
    let after = d.settled(&["node-a", "node-b"], before)?;
    let healed = d.heal(&other_url, kill)?;
    eprintln!("heal: node killed under the new leader -> first success after {healed:.1} s");
    let by = d.decision(after)?.map(|r| r.by).unwrap_or_default();
    assert!(
        by.starts_with(other),
        "epoch {after} decided by {by}, not {other}"
    );
    // back on the network, the old leader follows; nothing moves
    d.c.reconnect(cut)?;
    std::thread::sleep(Duration::from_secs(5));
    let now = d.settled(&["node-a", "node-b"], before)?;
    if now != after {
        let by = d.decision(now)?;
        panic!(
            "epoch {after} -> {now} after the old leader came back, decided {by:?}\n{}\n{}",
            d.c.logs(cut),
            d.c.logs(other)
        );
    }
    d.only_committed_epochs_served()
}

/// (h) With the `tracing` profile, Jaeger replaced by the test harness's OTLP receiver (as an
/// image): one request, sent with a known `traceparent`, yields one trace with spans from the
/// coordinator's container and from every node's.
#[test]
fn compose_exports_one_trace_per_request() -> anyhow::Result<()> {
    let Some(_one) = docker() else {
        return Ok(());
    };
    build_images()?;
    integration_tests::compose::build_sink_image()?;
    let c = Compose::new(
        "h",
        &["cluster-configs/compose.yml"],
        &[
            ("HTTP_PORT_1", "0"),
            ("HTTP_PORT_2", "0"),
            ("JAEGER_IMAGE", "llm-cluster/otlp-sink:latest"),
            ("JAEGER_UI_PORT", "0"),
            ("JAEGER_OTLP_PORT", "0"),
            ("OTLP_ENDPOINT", "http://jaeger:4317"),
        ],
    )
    .profile("tracing");
    let d = Demo::start(c)?;
    const TRACE: &str = "5b8efff798038103d269b633813fc60c";
    let body = serde_json::json!({"prompt": PROMPT, "max_tokens": 8, "temperature": 0});
    let (code, text) = integration_tests::post_with(
        &format!("{}/v1/completions", d.coord[0]),
        &body.to_string(),
        &[("traceparent", &format!("00-{TRACE}-eee19b7ec3c1b174-01"))],
    )?;
    assert_eq!(code, 200, "{text}");
    let sink = d.c.container("jaeger")?;
    let instances = eventually(Duration::from_secs(30), || {
        let logs = Compose::docker(&["logs", &sink])?;
        let mut who = std::collections::BTreeSet::new();
        for line in logs.lines().filter(|l| l.starts_with('{')) {
            let v: serde_json::Value = serde_json::from_str(line)?;
            if v["trace_id"] == TRACE {
                who.insert(format!(
                    "{}/{}",
                    v["service"].as_str().unwrap_or_default(),
                    v["instance"].as_str().unwrap_or_default()
                ));
            }
        }
        let want = [
            "coordinator/coordinator-1",
            "shard-node/node-a",
            "shard-node/node-b",
            "shard-node/node-c",
        ];
        anyhow::ensure!(
            want.iter().all(|w| who.contains(*w)),
            "the trace has spans from {who:?}"
        );
        Ok(who)
    })?;
    eprintln!("trace {TRACE}: spans from {instances:?}");
    d.settled(&NODES, 0)?;
    Ok(())
}

/// This host's address as containers on any network reach it (where published ports are).
fn host_address() -> anyhow::Result<String> {
    let out = std::process::Command::new("hostname").arg("-I").output()?;
    String::from_utf8(out.stdout)?
        .split_whitespace()
        .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no IPv4 address for this host"))
}

/// (g) Multi-host: the control compose and a node compose as two projects on separate
/// networks that reach each other only through this host's published ports, the nodes
/// advertising that address. It serves, and survives a restart of the node project.
#[test]
fn control_and_node_hosts_serve_through_published_ports() -> anyhow::Result<()> {
    let Some(_one) = docker() else {
        return Ok(());
    };
    build_images()?;
    let host = host_address()?;
    let port = || integration_tests::free_port().map(|p| p.to_string());
    let (e1, e2, e3, n1, n2) = (port()?, port()?, port()?, port()?, port()?);
    let etcd_ports = [
        ("ETCD_PORT_1", e1.as_str()),
        ("ETCD_PORT_2", e2.as_str()),
        ("ETCD_PORT_3", e3.as_str()),
    ];
    let mut env = vec![
        ("CONTROL_HOST", host.as_str()),
        ("NODE_HOSTS", host.as_str()),
        ("NODES", "h1-cpu0 h1-cpu1"),
        ("HTTP_PORT_1", "0"),
        ("HTTP_PORT_2", "0"),
    ];
    env.extend(etcd_ports);
    let control = Compose::new("gc", &["cluster-configs/compose.control.yml"], &env);
    control.up(&[])?;
    // the node host gets the certificates the control host issued (an operator copies them)
    let certs = tempfile::tempdir()?;
    let from = format!(
        "{}:/var/lib/llm-cluster/certs/.",
        control.container("certs")?
    );
    Compose::docker(&["cp", &from, &certs.path().display().to_string()])?;
    let chown = std::process::Command::new("chown")
        .args(["-R", "65532:65532"])
        .arg(certs.path())
        .status()?;
    anyhow::ensure!(chown.success(), "chown of the copied certificates");
    let certs_dir = certs.path().display().to_string();
    let mut env = vec![
        ("CONTROL_HOST", host.as_str()),
        ("NODE_HOST", host.as_str()),
        ("CERTS_DIR", certs_dir.as_str()),
        ("NODE_PORT_1", n1.as_str()),
        ("NODE_PORT_2", n2.as_str()),
    ];
    env.extend(etcd_ports);
    let nodes = Compose::new("gn", &["cluster-configs/compose.cpu-node.yml"], &env);
    nodes.up(&[])?;
    let url = control.url("coordinator-1", 8080)?;
    let want = generate(&default_model(), PROMPT, 8)?;
    let got = eventually(Duration::from_secs(120), || {
        completion(&url, PROMPT, 8, false)
    })
    .map_err(|e| {
        e.context(format!(
            "{}\n{}",
            control.logs("coordinator-1"),
            nodes.logs("cpu0")
        ))
    })?;
    assert_eq!(got, want);
    let fault = Instant::now();
    nodes.compose(&["restart", "-t", "10"], Duration::from_secs(120))?;
    eventually(Duration::from_secs(120), || {
        completion(&url, PROMPT, 8, false)
    })?;
    eprintln!(
        "heal: node host restarted -> first success after {:.1} s",
        fault.elapsed().as_secs_f64()
    );
    // The other coordinator reconnects to the restarted nodes on its own schedule (its
    // requests get 503 "retry later" until then): it serves too, the same text.
    let url2 = control.url("coordinator-2", 8080)?;
    let got2 = eventually(Duration::from_secs(60), || {
        completion(&url2, PROMPT, 8, true)
    })?;
    assert_eq!(got2, want);
    // both nodes hold one slice of the same committed plan and nothing else
    eventually(Duration::from_secs(60), || {
        let a = held(&nodes.url("cpu0", 9100)?)?;
        let b = held(&nodes.url("cpu1", 9100)?)?;
        anyhow::ensure!(
            a.weight_leases == 1
                && a == b
                && a.sessions == 0
                && a.prepared == 0
                && a.transient == 0,
            "nodes hold {a:?} and {b:?}"
        );
        Ok(())
    })
}
