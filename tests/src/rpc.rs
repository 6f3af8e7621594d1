//! Shard-node RPC from a test: connect, status, leases kept alive.

/// Connects and handshakes as a test client.
pub async fn connect(
    addr: &str,
) -> anyhow::Result<(proto_types::ShardNodeClient, proto_types::HelloAck)> {
    Ok(proto_types::connect(addr, "test", std::time::Duration::from_secs(5)).await?)
}

/// A node's status, over a fresh connection (whose lease goes when it closes).
pub async fn node_status(addr: &str) -> anyhow::Result<proto_types::NodeStatus> {
    let (c, _) = connect(addr).await?;
    let mut ctx = tarpc::context::current();
    ctx.deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    Ok(c.status(ctx).await?)
}

/// KV cache bytes over every lease of a status.
pub fn kv_bytes(s: &proto_types::NodeStatus) -> u64 {
    s.leases.iter().map(|l| l.kv_cache).sum()
}

/// Polls `addr`'s status until `done` holds, for at most `within`; returns the last status
/// and how long it took, or fails with the last status.
pub async fn wait_status(
    addr: &str,
    within: std::time::Duration,
    done: impl Fn(&proto_types::NodeStatus) -> bool,
) -> anyhow::Result<(proto_types::NodeStatus, std::time::Duration)> {
    let start = std::time::Instant::now();
    loop {
        let s = node_status(addr).await?;
        if done(&s) {
            return Ok((s, start.elapsed()));
        }
        anyhow::ensure!(
            start.elapsed() < within,
            "{addr}: not reached within {within:?}: {s:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Renews `lease` every 400 ms until a heartbeat fails (tests whose work outlasts a short
/// TTL). It holds a clone of `client`, so the connection stays open while it runs.
pub fn keep_alive(client: proto_types::ShardNodeClient, lease: proto_types::LeaseId) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
            let mut ctx = tarpc::context::current();
            ctx.deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            match client.heartbeat(ctx, lease).await {
                Ok(Ok(_)) => {}
                other => {
                    eprintln!("keep_alive of {lease}: {other:?}");
                    return;
                }
            }
        }
    });
}

/// A greedy session on a node that is the last (or only) stage.
pub fn last_stage_session(
    session: proto_types::SessionId,
    epoch: proto_types::PlanEpoch,
    max_ctx: u32,
) -> proto_types::OpenSession {
    proto_types::OpenSession {
        session,
        epoch,
        max_ctx,
        next: None,
        sampling: proto_types::WireSampling::default(),
    }
}
