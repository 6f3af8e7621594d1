//! The prefix cache, with real processes on the CPU:
//! (a) a request whose prompt begins like an earlier one's copies that prefix's keys and
//!     values on every stage: the same output as computed in full, `cached_tokens` says how
//!     much was reused, and the prompt is ready at least 5 times sooner;
//! (b) under 200 requests of random prefixes the cache never holds more than its budget on
//!     any node, and hits happen;
//! (c) the coordinator killed: every node frees its entries with its lease;
//! (d) a node restarted: the entries it held are computed again.

use std::time::{Duration, Instant};

use integration_tests::*;

/// About 1,000 tokens of text that no other prompt begins with.
fn long_prefix(tag: &str) -> String {
    let mut s = format!("Notes {tag}. ");
    for i in 0..45 {
        s.push_str(&format!(
            "Item {i} of list {tag}: the quick brown fox jumps over the lazy dog near river {i}. "
        ));
    }
    s
}

fn ask(prompt: &str, n: u32) -> serde_json::Value {
    serde_json::json!({"prompt": prompt, "max_tokens": n, "temperature": 0})
}

/// The text, prompt tokens and cached tokens of a completion, and how long it took.
fn complete(url: &str, body: &serde_json::Value) -> anyhow::Result<(String, u64, u64, Duration)> {
    let t = Instant::now();
    let (code, text) = post(&format!("{url}/v1/completions"), &body.to_string())?;
    let took = t.elapsed();
    anyhow::ensure!(code == 200, "status {code}: {text}");
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok((
        v["choices"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        v["usage"]["prompt_tokens"].as_u64().unwrap_or_default(),
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or_default(),
        took,
    ))
}

/// Prefix-cache bytes a node holds.
async fn cache_bytes(addr: &str) -> anyhow::Result<u64> {
    let s = node_status(addr).await?;
    Ok(s.leases.iter().map(|l| l.prefix_cache).sum())
}

fn two_nodes() -> anyhow::Result<(Vec<ShardProcess>, String)> {
    let nodes: Vec<ShardProcess> = (0..2)
        .map(|_| ShardProcess::spawn(&models_dir(), &[]))
        .collect::<Result<_, _>>()?;
    let list = format!("{},{}", nodes[0].addr, nodes[1].addr);
    Ok((nodes, list))
}

/// (a)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_is_computed_once() -> anyhow::Result<()> {
    let (nodes, list) = two_nodes()?;
    let coord =
        CoordinatorProcess::spawn_with(&default_model(), &["--nodes", &list, "--max-ctx", "2048"])?;
    // the same nodes without a cache: the reference computed in full
    let plain = CoordinatorProcess::spawn_with(
        &default_model(),
        &[
            "--nodes",
            &list,
            "--max-ctx",
            "2048",
            "--prefix-cache-bytes",
            "0",
        ],
    )?;
    let prefix = long_prefix("a");
    let first = format!("{prefix}Question: which animal jumps?");
    let second = format!("{prefix}Question: which river is named last?");

    // cold: nothing cached
    let (_, tokens, cached, cold) = complete(&coord.url, &ask(&first, 1))?;
    assert!(tokens >= 1000, "a prompt of {tokens} tokens");
    assert_eq!(cached, 0);
    // its prompt is kept on both stages once it has answered, and the request's session is
    // closed: entries are not sessions (else this would never hold)
    for n in &nodes {
        let (s, _) = wait_status(&n.addr, Duration::from_secs(10), |s| {
            s.leases.iter().map(|l| l.prefix_cache).sum::<u64>() > 0 && s.sessions == 0
        })
        .await?;
        assert!(s.leases.iter().all(|l| l.kv_cache == 0), "{s:?}");
    }

    // warm: the same prefix, another question
    let (text, tokens2, cached, warm) = complete(&coord.url, &ask(&second, 16))?;
    assert!(
        cached >= tokens - 12 && cached < tokens2,
        "{cached} of {tokens2} cached"
    );
    // Another coordinator on the same nodes opens sessions while this one's entries stay
    // open: session ids must not collide (they are keyed by id alone on a node).
    for i in 0..6 {
        complete(&plain.url, &ask(&format!("Hello number {i}"), 1))?;
    }
    let (alone, _, none, _) = complete(&plain.url, &ask(&second, 16))?;
    assert_eq!(none, 0);
    assert_eq!(text, alone, "the same output as computed in full");
    // the same prompt again: all but its last token cached, the same output
    let (again, _, cached, _) = complete(&coord.url, &ask(&second, 16))?;
    assert_eq!(cached, tokens2 - 1);
    assert_eq!(again, alone);

    // time to the first token: a prompt of the same length with nothing cached, against one
    // that shares the prefix (one token each, so the time is the prompt's)
    let other = format!("{}Question: which animal jumps?", long_prefix("b"));
    let (_, _, _, cold2) = complete(&coord.url, &ask(&other, 1))?;
    let third = format!("{prefix}Question: how many items are there?");
    let (_, _, cached, warm2) = complete(&coord.url, &ask(&third, 1))?;
    assert!(cached > 900);
    let cold = cold.min(cold2);
    let warm = warm.min(warm2);
    eprintln!("time to the first token: cold {cold:?}, from the cache {warm:?}");
    assert!(
        cold >= warm * 5,
        "cold {cold:?} against {warm:?} with the prefix cached"
    );
    Ok(())
}

/// (b), (c)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_keeps_its_budget_and_goes_with_the_coordinator() -> anyhow::Result<()> {
    const BUDGET: u64 = 6_000_000;
    let (nodes, list) = two_nodes()?;
    let mut coord = CoordinatorProcess::spawn_with(
        &default_model(),
        &[
            "--nodes",
            &list,
            "--prefix-cache-bytes",
            &BUDGET.to_string(),
        ],
    )?;
    let url = coord.url.clone();
    // 200 requests, 4 at a time: one of 4 openings (40 to 70 words), then a random tail
    let words = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    ];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut prompts = Vec::new();
    for _ in 0..200 {
        let opening = rand() % 4;
        let mut p = format!("Opening {opening}: ");
        for w in 0..(40 + opening * 10) {
            p.push_str(words[((opening * 5 + w) % 16) as usize]);
            p.push(' ');
        }
        for _ in 0..(5 + rand() % 25) {
            p.push_str(words[(rand() % 16) as usize]);
            p.push(' ');
        }
        prompts.push(p);
    }
    let mut hits = 0;
    let mut most = 0;
    for chunk in prompts.chunks(4) {
        let got = all_at_once(
            chunk
                .iter()
                .map(|p| {
                    let (url, body) = (url.clone(), ask(p, 1));
                    Box::new(move || complete(&url, &body).map(|(_, _, cached, _)| cached))
                        as Box<dyn FnOnce() -> anyhow::Result<u64> + Send>
                })
                .collect(),
        )?;
        hits += got.iter().filter(|&&c| c > 0).count();
        for n in &nodes {
            let b = cache_bytes(&n.addr).await?;
            most = most.max(b);
            assert!(b <= BUDGET, "{b} bytes of prefix cache on {}", n.addr);
        }
    }
    eprintln!("{hits} hits in 200 requests; at most {most} bytes on a node");
    assert!(hits > 50, "{hits} hits");
    assert!(most > BUDGET / 2, "the cache was used: {most}");

    // kill -9: the nodes free the entries with the coordinator's lease
    coord.kill();
    for n in &nodes {
        let (s, _) = wait_status(&n.addr, Duration::from_secs(15), |s| {
            s.leases.iter().all(|l| l.prefix_cache == 0) && s.attributed_bytes == 0
        })
        .await?;
        assert_eq!(s.sessions, 0);
    }
    Ok(())
}

/// (d) a node restarts: the entries it held are gone; the next request with the prefix is
/// computed in full, the same, and its prompt is kept again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_lost_with_a_restarted_node_are_computed_again() -> anyhow::Result<()> {
    let (mut nodes, list) = two_nodes()?;
    let coord =
        CoordinatorProcess::spawn_with(&default_model(), &["--nodes", &list, "--max-ctx", "2048"])?;
    let prompt = format!("{}Question: which animal jumps?", long_prefix("r"));
    let kept = |addr: String| async move {
        wait_status(&addr, Duration::from_secs(10), |s| {
            s.leases.iter().map(|l| l.prefix_cache).sum::<u64>() > 0
        })
        .await
    };
    let (first, tokens, _, _) = complete(&coord.url, &ask(&prompt, 8))?;
    kept(nodes[1].addr.clone()).await?;

    let addr = nodes[1].addr.clone();
    nodes[1].kill();
    nodes[1] = ShardProcess::spawn_at(&addr, &models_dir(), &[])?;
    let start = Instant::now();
    let (again, _, cached, _) = loop {
        match complete(&coord.url, &ask(&prompt, 8)) {
            Ok(r) => break r,
            Err(e) => anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "not serving again: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(cached, 0, "the restarted node lost the entry");
    assert_eq!(again, first);
    kept(nodes[1].addr.clone()).await?;
    let (third, _, cached, _) = complete(&coord.url, &ask(&prompt, 8))?;
    assert_eq!(cached, tokens - 1);
    assert_eq!(third, first);
    Ok(())
}
