//! A slice load that outlasts the node's lease TTL: the coordinator renews its leases while
//! the slices load, so the cluster comes up. Real models take seconds to hash and load, far
//! past a TTL of a few seconds; here the TTL is shortened below the default model's load time
//! instead (before the fix, the coordinator failed with `UnknownLease`).

use integration_tests::{completion, default_model, generate, CoordinatorProcess, ShardProcess};

#[test]
fn cluster_comes_up_when_loading_outlasts_the_lease_ttl() -> anyhow::Result<()> {
    let model = default_model();
    let dir = model.parent().ok_or_else(|| anyhow::anyhow!("no folder"))?;
    let short = ["--heartbeat-ms", "20", "--lease-ttl-ms", "60"];
    let a = ShardProcess::spawn(dir, &short)?;
    let b = ShardProcess::spawn(dir, &short)?;
    let coord = CoordinatorProcess::spawn(&model, &[&a, &b])?;
    let prompt = "The capital of France is";
    assert_eq!(
        completion(&coord.url, prompt, 8, false)?,
        generate(&model, prompt, 8)?
    );
    Ok(())
}
