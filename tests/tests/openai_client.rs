//! The official Python `openai` client parses our SSE and JSON (scripts/test.sh installs it).

use std::process::Command;

use integration_tests::{default_model, workspace_root, CoordinatorProcess, ShardProcess};

#[test]
fn python_openai_client_reads_the_api() -> anyhow::Result<()> {
    let model = default_model();
    let dir = model.parent().ok_or_else(|| anyhow::anyhow!("no folder"))?;
    let nodes: Vec<ShardProcess> = (0..2)
        .map(|_| ShardProcess::spawn(dir, &[]))
        .collect::<Result<_, _>>()?;
    let coord = CoordinatorProcess::spawn(&model, &nodes.iter().collect::<Vec<_>>())?;
    let out = Command::new("python3")
        .arg(workspace_root().join("tests/openai_client.py"))
        .arg(&coord.url)
        .output()?;
    assert!(
        out.status.success(),
        "the openai client failed (is `pip install openai` done? scripts/test.sh does it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["streamed"], v["plain"], "SSE and JSON give the same text");
    assert!(
        v["plain"].as_str().is_some_and(|t| t.starts_with(" Paris")),
        "{v}"
    );
    assert_eq!(v["usage"], 12);
    assert!(v["chat"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(v["bad_status"], 400);
    // text parts joined: the same answer as the plain string's (streamed above)
    assert_eq!(v["parts"], v["chat"], "{v}");
    assert_eq!(v["refused"][0], 400, "{v}");
    assert!(
        v["refused"][1]
            .as_str()
            .is_some_and(|m| m.contains("`functions`")),
        "{v}"
    );
    // n: three choices, the same again with the same seed, not all alike
    let sampled = &v["sampled"];
    assert_eq!(sampled[0].as_array().map(Vec::len), Some(3), "{v}");
    assert_eq!(
        sampled[0], sampled[1],
        "a seed reproduces every choice: {v}"
    );
    assert!(
        sampled[0]
            .as_array()
            .is_some_and(|c| c.iter().any(|t| t != &c[0])),
        "choices differ: {v}"
    );
    // several prompts: one choice each, in order; the first is the greedy answer above
    assert_eq!(v["prompts"][0], v["plain"], "{v}");
    assert!(
        v["prompts"][1].as_str().is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    // n streamed: both choices, each the greedy text
    assert_eq!(
        v["streamed_n"],
        serde_json::json!([v["plain"], v["plain"]]),
        "{v}"
    );
    // echo: the prompt, then the completion
    assert_eq!(
        v["echoed"].as_str(),
        v["plain"]
            .as_str()
            .map(|p| format!("The capital of France is{p}"))
            .as_deref(),
        "{v}"
    );
    // suffix on a model without fill-in-the-middle tokens: 400 naming it
    assert_eq!(v["suffix"][0], 400, "{v}");
    assert!(
        v["suffix"][1]
            .as_str()
            .is_some_and(|m| m.contains("`suffix`")),
        "{v}"
    );
    // best_of: the two likeliest of four candidates, best first, without log-probabilities
    // (not asked for); all four candidates' tokens are counted
    let b = &v["best_of"];
    assert_eq!(b["got"], b["want"], "{b}");
    assert_eq!(b["no_logprobs"], true, "{b}");
    assert_eq!(b["usage"], 32, "{b}");
    // tools on a model whose template shows none: 400 saying so
    assert_eq!(v["no_tools"][0], 400, "{v}");
    assert!(
        v["no_tools"][1]
            .as_str()
            .is_some_and(|m| m.contains("does not show the model any tools")),
        "{v}"
    );
    assert_eq!(v["retrieved"], v["served"]);
    assert_eq!(v["missing"][0], 404, "{v}");
    assert_eq!(v["missing"][1], "model_not_found", "{v}");
    let trips = v["round_trip"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(trips, 20, "{v}");
    assert!(
        v["round_trip"]
            .as_array()
            .is_some_and(|a| a.iter().all(|b| b == true)),
        "tokenize then detokenize: {v}"
    );
    assert_eq!(v["by_ids"], v["plain"], "a prompt of token ids");
    // include_usage: a last chunk with no choices and the counts; none before it
    assert_eq!(v["with_usage"], serde_json::json!([0, 12, 0]), "{v}");
    assert_eq!(v["without_usage"], 0, "{v}");
    // log-probabilities: one entry per token; at temperature 0 the chosen token is the top
    // one; the entries spell the text; streamed the same; completions' lists line up
    let lp = &v["logprobs"];
    assert_eq!(lp["count"], lp["tokens"], "{lp}");
    assert!(lp["count"].as_u64().is_some_and(|n| n > 0), "{lp}");
    for k in ["top_is_chosen", "text", "stream"] {
        assert_eq!(lp[k], true, "{k}: {lp}");
    }
    assert_eq!(
        lp["completion"],
        serde_json::json!([12, 12, true, true, true]),
        "{lp}"
    );
    // logit_bias -100 on the greedy first token: another first token, and it never appears
    let bias = &v["bias"];
    assert_ne!(bias[0], bias[1], "{bias}");
    assert_eq!(bias[2], false, "{bias}");
    // structured output: five schemas, each answer valid (jsonschema), finished by the
    // grammar (not by max_tokens), the same streamed
    let st = v["structured"].as_array().cloned().unwrap_or_default();
    assert_eq!(st.len(), 5, "{v}");
    for s in &st {
        assert_eq!(s[0], true, "{s}");
        assert_eq!(s[1], "stop", "{s}");
        assert_eq!(s[2], true, "streamed the same: {s}");
    }
    let obj: serde_json::Value =
        serde_json::from_str(v["json_object"].as_str().unwrap_or("")).unwrap_or_default();
    assert!(obj.is_object(), "{v}");
    let year = v["regex"].as_str().unwrap_or("");
    assert!(
        year.len() == 4 && year.bytes().all(|b| b.is_ascii_digit()),
        "{v}"
    );
    assert_eq!(v["bad_schema"][0], 400, "{v}");
    assert!(
        v["bad_schema"][1]
            .as_str()
            .is_some_and(|m| m.contains("does not compile")),
        "{v}"
    );
    // penalties: the most repeated token repeats less than without them
    let p = &v["penalties"];
    let plain = p[0][0].as_u64().unwrap_or(0);
    for with in [&p[1], &p[2]] {
        assert!(with[0].as_u64().is_some_and(|n| n < plain), "{p}");
    }
    Ok(())
}

/// A synthetic qwen2 model (random weights, the default model's vocabulary) whose chat
/// template shows it tools, in `dir`.
fn tool_model(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let out = dir.join("tools-qwen2.gguf");
    let status = Command::new(integration_tests::shard_node_bin())
        .args([
            "synth-model",
            "--arch",
            "qwen2",
            "--layers",
            "2",
            "--hidden",
            "64",
        ])
        .args([
            "--ffn",
            "128",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--quant",
            "q8_0",
        ])
        .args(["--context", "2048", "--tokenizer-from"])
        .arg(default_model())
        .arg("--chat-template")
        .arg(workspace_root().join("tests/fixtures/tool-template.jinja"))
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "synth-model failed");
    Ok(out)
}

#[test]
fn python_openai_client_calls_tools() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tool_model(dir.path())?;
    let node = ShardProcess::spawn(dir.path(), &[])?;
    let coord = CoordinatorProcess::spawn(&model, &[&node])?;
    let out = Command::new("python3")
        .arg(workspace_root().join("tests/openai_tools.py"))
        .arg(&coord.url)
        .output()?;
    assert!(
        out.status.success(),
        "the tools script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    // required, one call: a valid call of one of the tools (the script checks the schema)
    let req = &v["required"];
    assert_eq!(req["finish"], "tool_calls", "{v}");
    assert_eq!(req["calls"].as_array().map(Vec::len), Some(1), "{v}");
    assert!(req["content"].is_null(), "{v}");
    // named: that function
    assert_eq!(v["named"][0][0], "get_weather", "{v}");
    // streamed: the same call as whole
    assert_eq!(v["streamed"]["calls"], req["calls"], "{v}");
    assert_eq!(v["streamed"]["finish"], "tool_calls", "{v}");
    // the call and its answer render back into the conversation
    assert!(v["follow_up"].is_string(), "{v}");
    assert!(v["auto"].is_string(), "{v}");
    assert_eq!(v["bad_choice"][0], 400, "{v}");
    assert!(
        v["bad_choice"][1]
            .as_str()
            .is_some_and(|m| m.contains("`nope`")),
        "{v}"
    );
    assert_eq!(v["with_format"][0], 400, "{v}");
    Ok(())
}
