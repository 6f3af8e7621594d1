//! The registry's client with several etcd endpoints, against real etcd servers:
//! (a) endpoints that refuse connections, listed first, are skipped: every call, reads and
//!     writes, the lease's keep-alive and the election's campaign, reaches the live one;
//! (b) the member every call goes to is killed in a cluster of three: after the two others
//!     elect a leader, no call fails (etcd-client alone keeps sending a share of the calls to
//!     the dead member, and about a third of them fail).

use std::time::{Duration, Instant};

use cluster_registry::Registry;
use integration_tests::*;
use proto_types::registry::NodeRecord;

fn record(id: &str) -> NodeRecord {
    NodeRecord {
        id: id.to_string(),
        addr: format!("{id}:7070"),
        device: "cpu".into(),
        capacity_bytes: 1 << 30,
    }
}

/// A URL on which nothing listens.
fn dead_url() -> anyhow::Result<String> {
    Ok(format!("http://127.0.0.1:{}", free_port()?))
}

/// Calls of every kind the cluster makes, `round` naming this round's keys.
async fn every_kind_of_call(reg: &Registry, round: usize) -> anyhow::Result<()> {
    let lease = reg.grant(10).await?;
    let id = format!("n{round}");
    reg.register(&record(&id), lease).await?;
    let (members, bad) = reg.members().await?;
    anyhow::ensure!(
        members.iter().any(|m| m.id == id) && bad.is_empty(),
        "round {round}: members {members:?}, bad {bad:?}"
    );
    let (mut keeper, mut stream) = reg.keep_alive(lease).await?;
    keeper.keep_alive().await?;
    let answer = tokio::time::timeout(Duration::from_secs(5), stream.message()).await??;
    anyhow::ensure!(
        answer.is_some_and(|a| a.ttl() > 0),
        "round {round}: no renewal"
    );
    let epoch = reg.next_epoch().await?;
    reg.put_raw(&format!("probe/{round}"), format!("{epoch}").as_bytes())
        .await?;
    reg.deregister(&id).await?;
    anyhow::ensure!(
        reg.node(&id).await?.is_none(),
        "round {round}: still registered"
    );
    reg.revoke(lease).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_refusing_connections_are_skipped() -> anyhow::Result<()> {
    let etcd = EtcdProcess::start()?;
    let urls = format!("{},{},{}", dead_url()?, dead_url()?, etcd.url);
    let reg = Registry::connect(&urls, "failover-a").await?;
    for round in 0..3 {
        every_kind_of_call(&reg, round).await?;
    }
    let lease = reg.grant(5).await?;
    tokio::time::timeout(Duration::from_secs(10), reg.campaign("me", lease)).await??;
    let shown = format!("{reg:?}");
    anyhow::ensure!(
        shown.contains(&etcd.url),
        "the calls should be pinned to the live member: {shown}"
    );
    // only dead endpoints: a clear error, not a hang
    let start = Instant::now();
    let err = Registry::connect(&format!("{},{}", dead_url()?, dead_url()?), "x")
        .await
        .expect_err("nothing listens");
    anyhow::ensure!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let text = err.to_string();
    anyhow::ensure!(
        text.contains("no etcd member answered at http://127.0.0.1:")
            && text.contains("(Unavailable)")
            && !text.contains("MetadataMap"),
        "{text}"
    );
    // no endpoint at all
    let err = Registry::connect(" , ", "x")
        .await
        .expect_err("no endpoint");
    anyhow::ensure!(err.to_string().contains("no etcd endpoint"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_member_in_use_fails_no_call() -> anyhow::Result<()> {
    let mut cluster = EtcdCluster::start(3)?;
    let reg = Registry::connect(&cluster.urls(), "failover-b").await?;
    every_kind_of_call(&reg, 0).await?;
    anyhow::ensure!(format!("{reg:?}").contains(cluster.url(0)));
    cluster.kill(0);
    // the two left may be electing a leader (if the lost one led): calls fail until then
    let start = Instant::now();
    while let Err(e) = reg.members().await {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "no leader after 20 s: {e}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let shown = format!("{reg:?}");
    anyhow::ensure!(
        !shown.contains(cluster.url(0)),
        "still pinned to the dead member: {shown}"
    );
    let stats = reg.etcd_stats();
    // once off the dead member; an election among the two left answers `Unavailable`,
    // which is retried but moves nothing
    assert!(stats.failovers >= 1, "{stats:?}");
    assert!(stats.not_sent >= 1, "{stats:?}");
    assert!(!stats.members[0].1, "{stats:?}");
    for round in 1..=20 {
        every_kind_of_call(&reg, round)
            .await
            .map_err(|e| e.context(format!("round {round}, with one member of three dead")))?;
    }
    Ok(())
}
