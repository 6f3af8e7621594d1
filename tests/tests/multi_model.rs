//! Several models at once: SmolLM2 and Gemma 3 served by one coordinator over the same two
//! nodes, each on a plan of its own; requests routed by `model`.

use std::time::Duration;

use integration_tests::{
    all_at_once, call_with, completion_with, coordinator_bin, default_model, gemma3_model,
    generate, get, get_json, node_status, post, post_with, BackgroundStream, CoordinatorProcess,
    ShardProcess,
};

fn id(p: &std::path::Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Two nodes serving the models folder of `model`, and their addresses as `--nodes` takes them.
fn two_nodes(model: &std::path::Path) -> anyhow::Result<(Vec<ShardProcess>, String)> {
    let dir = model.parent().ok_or_else(|| anyhow::anyhow!("no folder"))?;
    let nodes: Vec<ShardProcess> = (0..2)
        .map(|_| ShardProcess::spawn(dir, &[]))
        .collect::<Result<_, _>>()?;
    let list = format!("{},{}", nodes[0].addr, nodes[1].addr);
    Ok((nodes, list))
}

#[test]
fn two_models_serve_at_once_each_as_alone() -> anyhow::Result<()> {
    let (smol, gemma) = (default_model(), gemma3_model());
    let (_nodes, list) = two_nodes(&smol)?;
    let gemma_arg = gemma.to_string_lossy().into_owned();
    let coord = CoordinatorProcess::spawn_with(&smol, &["--model", &gemma_arg, "--nodes", &list])?;
    let url = &coord.url;

    // both listed; each retrievable; an unknown one is OpenAI's 404
    let models = get_json(&format!("{url}/v1/models"))?;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, [id(&smol), id(&gemma)], "{models}");
    let (code, body) = get(&format!("{url}/v1/models/{}", id(&gemma)))?;
    assert_eq!(code, 200, "{body}");
    let ask = |model: &str| {
        serde_json::json!({"model": model, "prompt": "The capital of France is", "max_tokens": 4})
            .to_string()
    };
    let (code, body) = post(&format!("{url}/v1/completions"), &ask("no-such-model"))?;
    assert_eq!(code, 404, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(err["error"]["code"], "model_not_found", "{body}");

    // a stream on each model at once, each what that model gives alone
    let prompts = [
        (&smol, "The three primary colors are"),
        (&gemma, "The capital of Japan is"),
    ];
    let got = all_at_once(
        prompts
            .iter()
            .map(|(m, p)| {
                let body = serde_json::json!({"model": id(m), "prompt": p, "max_tokens": 16,
                                              "temperature": 0, "stream": true});
                Box::new(move || completion_with(url, body)) as Box<_>
            })
            .collect(),
    )?;
    for ((m, p), text) in prompts.iter().zip(&got) {
        assert_eq!(text, &generate(m, p, 16)?, "{}", id(m));
    }
    // a request that names no model goes to the first
    let plain = completion_with(
        url,
        serde_json::json!({"prompt": prompts[0].1, "max_tokens": 16, "temperature": 0}),
    )?;
    assert_eq!(plain, got[0]);

    // each model's plan over both nodes, epochs 1 and 2; the nodes serve both at once
    let cluster = get_json(&format!("{url}/v1/cluster"))?;
    let plans = cluster["models"].as_array().cloned().unwrap_or_default();
    assert_eq!(plans.len(), 2, "{cluster}");
    for (plan, (m, epoch)) in plans.iter().zip([(&smol, 1), (&gemma, 2)]) {
        assert_eq!(plan["model"], id(m), "{cluster}");
        assert_eq!(plan["epoch"], epoch, "{cluster}");
        let nodes = plan["nodes"].as_array().cloned().unwrap_or_default();
        assert_eq!(nodes.len(), 2, "{cluster}");
        assert!(nodes.iter().all(|n| n["up"] == true), "{cluster}");
    }
    assert_eq!(
        cluster["epoch"], 1,
        "the default model's plan at the top: {cluster}"
    );
    Ok(())
}

/// The weights every node holds, summed over them.
fn weights(nodes: &[ShardProcess]) -> anyhow::Result<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut total = 0;
    for n in nodes {
        let s = rt.block_on(node_status(&n.addr))?;
        total += s.leases.iter().map(|l| l.weights).sum::<u64>();
    }
    Ok(total)
}

#[test]
fn models_load_and_unload_at_run_time() -> anyhow::Result<()> {
    let (smol, gemma) = (default_model(), gemma3_model());
    let (nodes, list) = two_nodes(&smol)?;
    let key = "admin-key-0123456789";
    let coord = CoordinatorProcess::spawn_with(&smol, &["--nodes", &list, "--admin-key", key])?;
    let url = &coord.url;
    let auth = format!("Bearer {key}");
    let with_key = [("authorization", auth.as_str())];
    let admin = format!("{url}/admin/models");
    let only_smol = weights(&nodes)?;
    assert!(only_smol > 0);

    // the key is required
    assert_eq!(call_with("GET", &admin, &[])?.0, 401);
    let (code, body) = call_with("GET", &admin, &with_key)?;
    assert_eq!(code, 200, "{body}");
    // files that are not there, or not file names, are refused and load nothing
    for file in ["nope.gguf", "../x.gguf", "model.bin"] {
        let body = serde_json::json!({ "file": file }).to_string();
        let (code, text) = post_with(&admin, &body, &with_key)?;
        assert_eq!(code, 400, "{file}: {text}");
    }
    assert_eq!(weights(&nodes)?, only_smol);

    // load Gemma 3 beside SmolLM2: both served, Gemma's output as alone
    let file = gemma
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let gemma_id = id(&gemma);
    let load = serde_json::json!({ "file": file }).to_string();
    let (code, text) = post_with(&admin, &load, &with_key)?;
    assert_eq!(code, 201, "{text}");
    let (code, _) = post_with(&admin, &load, &with_key)?;
    assert_eq!(code, 409, "loaded twice");
    let prompt = "The capital of Japan is";
    let ask = |model: &str, n: u32| serde_json::json!({"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0});
    assert_eq!(
        completion_with(url, ask(&gemma_id, 12))?,
        generate(&gemma, prompt, 12)?
    );
    let both = weights(&nodes)?;
    assert!(both > only_smol, "{both} against {only_smol}");
    // each node reports a served slice of each model, with its bytes
    let cluster = get_json(&format!("{url}/v1/cluster"))?;
    for plan in cluster["models"].as_array().into_iter().flatten() {
        for n in plan["nodes"].as_array().into_iter().flatten() {
            let models: Vec<&str> = n["slices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|x| x["state"] == "serving" && x["bytes"].as_u64() > Some(0))
                .filter_map(|x| x["model"].as_str())
                .collect();
            assert_eq!(models.len(), 2, "{n}");
            assert!(models.contains(&file.as_str()), "{n}");
        }
    }

    // unload SmolLM2 while a Gemma stream runs: the stream ends well, SmolLM2 is gone
    let mut body = ask(&gemma_id, 48);
    body["stream"] = true.into();
    body["ignore_eos"] = true.into();
    let stream = BackgroundStream::start(
        &format!("{url}/v1/completions"),
        &body,
        Duration::from_secs(120),
    );
    let (code, text) = call_with("DELETE", &format!("{admin}/{}", id(&smol)), &with_key)?;
    assert_eq!(code, 200, "{text}");
    let (code, text) = stream.finish()?;
    assert_eq!(code, 200);
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    let (code, text) = post(
        &format!("{url}/v1/completions"),
        &ask(&id(&smol), 4).to_string(),
    )?;
    assert_eq!(code, 404, "{text}");
    // the only model left cannot be unloaded
    let (code, _) = call_with("DELETE", &format!("{admin}/{gemma_id}"), &with_key)?;
    assert_eq!(code, 409);

    // SmolLM2 back, Gemma out: the nodes hold what they held with SmolLM2 alone
    let smol_file = smol
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (code, text) = post_with(
        &admin,
        &serde_json::json!({ "file": smol_file }).to_string(),
        &with_key,
    )?;
    assert_eq!(code, 201, "{text}");
    let (code, text) = call_with("DELETE", &format!("{admin}/{gemma_id}"), &with_key)?;
    assert_eq!(code, 200, "{text}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while weights(&nodes)? != only_smol && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(weights(&nodes)?, only_smol, "Gemma's slices are freed");
    let (code, _) = post(
        &format!("{url}/v1/completions"),
        &ask(&id(&smol), 4).to_string(),
    )?;
    assert_eq!(code, 200);

    // the CLI: a switch (both fit: the new one loads first), then the list
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new(coordinator_bin())
            .args(["models", "--url", url.as_str()])
            .args(args)
            .env("LLMC_ADMIN_KEY", key)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "coordinator models {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let switched = cli(&["switch", &id(&smol), &file])?;
    assert!(switched.contains("load, then unload"), "{switched}");
    let listed: serde_json::Value = serde_json::from_str(&cli(&["list"])?)?;
    assert_eq!(
        listed["models"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    assert_eq!(listed["models"][0]["id"], gemma_id, "{listed}");
    assert_eq!(
        completion_with(url, ask(&gemma_id, 12))?,
        generate(&gemma, prompt, 12)?
    );
    Ok(())
}

/// Each node's resident set, once it holds slices of `file` only and no session, and the
/// figure has settled (the node hands freed heap back to the OS from its reaper, a moment
/// after the free): two reads 700 ms apart within 256 KiB.
fn settled_rss(nodes: &[ShardProcess], file: &str) -> anyhow::Result<Vec<i64>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut out = Vec::new();
    for n in nodes {
        let only = |s: &proto_types::NodeStatus| {
            s.sessions == 0 && !s.slices.is_empty() && s.slices.iter().all(|x| x.model == file)
        };
        let (s, _) = rt.block_on(integration_tests::wait_status(
            &n.addr,
            Duration::from_secs(15),
            only,
        ))?;
        let mut last = s.process_rss_bytes as i64;
        let start = std::time::Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(700));
            let now = rt.block_on(node_status(&n.addr))?.process_rss_bytes as i64;
            if (now - last).abs() <= 256 << 10 || start.elapsed() > Duration::from_secs(10) {
                out.push(now);
                break;
            }
            last = now;
        }
    }
    Ok(out)
}

#[test]
fn ten_switches_leave_every_node_where_it_was() -> anyhow::Result<()> {
    const MIB: i64 = 1 << 20;
    let (smol, gemma) = (default_model(), gemma3_model());
    let (nodes, list) = two_nodes(&smol)?;
    let key = "admin-key-switches-0123";
    let coord = CoordinatorProcess::spawn_with(&smol, &["--nodes", &list, "--admin-key", key])?;
    let url = &coord.url;
    let auth = format!("Bearer {key}");
    let models = [&smol, &gemma];
    let files: Vec<String> = models
        .iter()
        .map(|m| {
            m.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    let prompt = "The capital of Japan is";
    let alone: Vec<String> = models
        .iter()
        .map(|m| generate(m, prompt, 8))
        .collect::<Result<_, _>>()?;
    let ask = |i: usize| serde_json::json!({"model": id(models[i]), "prompt": prompt, "max_tokens": 8, "temperature": 0});
    assert_eq!(completion_with(url, ask(0))?, alone[0]);
    // A round trip first, so that state set up once by the first loads is not counted. Then
    // each model's level is its resident set the first time it is served after that, and
    // every switch after must come back to it.
    const WARM_UP: usize = 2;
    let mut levels: Vec<Option<Vec<i64>>> = vec![None, None];
    let mut served = 0;
    for i in 1..=WARM_UP + 10 {
        let to = 1 - served;
        let body = serde_json::json!({"from": id(models[served]), "to": files[to]}).to_string();
        let (code, text) = post_with(
            &format!("{url}/admin/models/switch"),
            &body,
            &[("authorization", auth.as_str())],
        )?;
        assert_eq!(code, 200, "switch {i}: {text}");
        assert!(text.contains("load, then unload"), "switch {i}: {text}");
        served = to;
        assert_eq!(
            completion_with(url, ask(served))?,
            alone[served],
            "switch {i}"
        );
        if i < WARM_UP {
            continue;
        }
        let rss = settled_rss(&nodes, &files[served])?;
        match &levels[served] {
            None => {
                eprintln!("level with {} served: {rss:?} bytes", files[served]);
                levels[served] = Some(rss);
            }
            Some(level) => {
                for (n, (now, was)) in rss.iter().zip(level).enumerate() {
                    assert!(
                        (now - was).abs() <= 2 * MIB,
                        "switch {i}, node {n}: {} KiB resident with {} served, {} KiB at its level",
                        now / 1024,
                        files[served],
                        was / 1024
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn a_switch_that_does_not_fit_beside_unloads_first() -> anyhow::Result<()> {
    let (smol, gemma) = (default_model(), gemma3_model());
    let dir = smol.parent().ok_or_else(|| anyhow::anyhow!("no folder"))?;
    // one node with room for either model alone, not for both (a model's need as the planner
    // counts it: every tensor, and a tied head as a second copy of the embedding)
    let need = |p: &std::path::Path| -> anyhow::Result<u64> {
        let f = common::gguf::GgufFile::open(p)?;
        let all: u64 = f.tensors().map(|t| t.nbytes).sum();
        let tied = match (f.tensor("output.weight"), f.tensor("token_embd.weight")) {
            (None, Some(e)) => e.nbytes,
            _ => 0,
        };
        Ok(all + tied)
    };
    let (a, b) = (need(&smol)?, need(&gemma)?);
    let limit = a.max(b) + (16 << 20);
    assert!(
        limit < a + b,
        "the test needs models that do not fit together"
    );
    let limit = limit.to_string();
    let node = ShardProcess::spawn(dir, &["--memory-limit", &limit])?;
    let key = "admin-key-unload-first-0";
    let coord =
        CoordinatorProcess::spawn_with(&smol, &["--nodes", &node.addr, "--admin-key", key])?;
    let url = &coord.url;
    let gemma_file = gemma
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let body = serde_json::json!({"from": id(&smol), "to": gemma_file}).to_string();
    let auth = format!("Bearer {key}");
    let (code, text) = post_with(
        &format!("{url}/admin/models/switch"),
        &body,
        &[("authorization", auth.as_str())],
    )?;
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text)?;
    assert_eq!(v["order"], "unload, then load", "{text}");
    let prompt = "The capital of Japan is";
    assert_eq!(
        completion_with(
            url,
            serde_json::json!({"model": id(&gemma), "prompt": prompt, "max_tokens": 8, "temperature": 0})
        )?,
        generate(&gemma, prompt, 8)?
    );
    let (code, _) = post(
        &format!("{url}/v1/completions"),
        &serde_json::json!({"model": id(&smol), "prompt": prompt, "max_tokens": 2}).to_string(),
    )?;
    assert_eq!(code, 404);
    Ok(())
}
