//! The request checks.

use super::*;

#[test]
fn bodies_are_checked() {
    let ok = validate_chat(
        br#"{"messages": [{"role": "user", "content": "hi"}], "stop": ["\n"], "temperature": 0}"#,
    )
    .expect("valid");
    assert_eq!((ok.max_tokens, ok.stop.len()), (16, 1));
    let many: Vec<String> = (0..MAX_STOP + 1).map(|i| format!("s{i}")).collect();
    let body = serde_json::json!({"prompt": "x", "stop": many}).to_string();
    assert!(matches!(validate_completion(body.as_bytes()), Err(e) if e.contains("at most")));
    let body = serde_json::json!({"prompt": "x", "stop": ""}).to_string();
    assert!(validate_completion(body.as_bytes()).is_err());
    let msgs: Vec<_> = (0..MAX_MESSAGES + 1)
        .map(|_| serde_json::json!({"role": "user", "content": "a"}))
        .collect();
    let body = serde_json::json!({ "messages": msgs }).to_string();
    assert!(matches!(validate_chat(body.as_bytes()), Err(e) if e.contains("messages")));
    assert!(validate_chat(br#"{"messages": []}"#).is_err());
    assert!(validate_completion(br#"{"prompt": "x", "temperature": -1}"#).is_err());
    assert!(validate_completion(b"\xff").is_err());
}

#[test]
fn fields_not_done_yet_are_refused_by_name_unless_at_their_default() {
    for (field, value) in [
        (
            "tools",
            r#"[{"type": "function", "function": {"name": "f"}}]"#,
        ),
        ("tool_choice", r#""required""#),
    ] {
        let body = format!(r#"{{"prompt": "x", "{field}": {value}}}"#);
        let e = validate_completion(body.as_bytes()).expect_err(field);
        assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
        assert!(e.contains("/v1/chat/completions"), "{field}: {e}");
    }
    for (field, value) in [
        ("n", "1"),
        ("echo", "true"),
        ("suffix", r#""""#),
        ("logprobs", "false"),
        ("logprobs", "null"),
        ("presence_penalty", "0"),
        ("logit_bias", "{}"),
        ("response_format", r#"{"type": "text"}"#),
        ("tools", "[]"),
        ("tool_choice", r#""none""#),
        ("best_of", "3"),
        ("stream_options", r#"{"include_usage": true}"#),
        ("user", r#""someone""#),
        ("my_own_extension", "42"),
    ] {
        let body = format!(r#"{{"prompt": "x", "{field}": {value}}}"#);
        assert!(
            validate_completion(body.as_bytes()).is_ok(),
            "{field}: {value}"
        );
    }
    let r: CompletionRequest =
        serde_json::from_str(r#"{"prompt": "x", "user": "u", "my_own_extension": 1}"#)
            .expect("parses");
    assert_eq!(r.common.ignored_fields(), ["my_own_extension"]);
    let c = validate_completion(br#"{"prompt": "x", "max_completion_tokens": 7}"#);
    assert_eq!(c.map(|c| c.max_tokens), Ok(7));
    assert!(validate_completion(
        br#"{"prompt": "x", "max_tokens": 7, "max_completion_tokens": 8}"#
    )
    .is_err());
}

#[test]
fn prompts_come_in_four_forms() {
    let all = |body: &str| -> Result<Vec<OnePrompt>, String> {
        serde_json::from_str::<CompletionRequest>(body)
            .map_err(|e| e.to_string())?
            .prompt
            .all()
    };
    let text = |t: &str| OnePrompt::Text(t.into());
    assert_eq!(all(r#"{"prompt": "a"}"#), Ok(vec![text("a")]));
    assert_eq!(all(r#"{"prompt": ["a"]}"#), Ok(vec![text("a")]));
    assert_eq!(
        all(r#"{"prompt": ["a", "b"]}"#),
        Ok(vec![text("a"), text("b")])
    );
    assert_eq!(
        all(r#"{"prompt": [1, 2]}"#),
        Ok(vec![OnePrompt::Ids(vec![1, 2])])
    );
    assert_eq!(
        all(r#"{"prompt": [[3], [4, 5]]}"#),
        Ok(vec![OnePrompt::Ids(vec![3]), OnePrompt::Ids(vec![4, 5])])
    );
    assert!(all(r#"{"prompt": []}"#).is_err());
    assert!(all(r#"{"prompt": [-1]}"#).is_err());
    let n = |body: &str| serde_json::from_str::<CompletionRequest>(body).map(|r| r.common.n());
    assert!(matches!(n(r#"{"prompt": "a", "n": 3}"#), Ok(Ok(3))));
    assert!(matches!(n(r#"{"prompt": "a"}"#), Ok(Ok(1))));
    assert!(matches!(n(r#"{"prompt": "a", "n": 0}"#), Ok(Err(e)) if e.contains("`n`")));
    assert!(matches!(n(r#"{"prompt": "a", "n": 17}"#), Ok(Err(e)) if e.contains("`n`")));
}

#[test]
fn content_parts_are_joined_and_other_parts_and_roles_refused() {
    let r: ChatRequest = serde_json::from_str(
        r#"{"messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {"role": "user", "name": "ann", "content": "hi"},
            {"role": "assistant", "content": null}]}"#,
    )
    .expect("parses");
    let m = r.chat_messages().expect("text only");
    assert_eq!(m[0].content, "Be brief.");
    assert_eq!(m[1].name.as_deref(), Some("ann"));
    assert_eq!(m[2].content, "");
    let image = r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}"#;
    assert!(matches!(validate_chat(image.as_bytes()), Err(e) if e.contains("`image_url`")));
    let role = r#"{"messages": [{"role": "wizard", "content": "hi"}]}"#;
    assert!(matches!(validate_chat(role.as_bytes()), Err(e) if e.contains("`wizard`")));
}

#[test]
fn sampling_fields_are_checked_per_endpoint() {
    let completion =
        |extra: &str| validate_completion(format!(r#"{{"prompt": "x", {extra}}}"#).as_bytes());
    let chat = |extra: &str| {
        validate_chat(
            format!(r#"{{"messages": [{{"role": "user", "content": "hi"}}], {extra}}}"#).as_bytes(),
        )
    };
    let s = completion(
        r#""logprobs": 3, "presence_penalty": 0.5, "frequency_penalty": -1, "min_p": 0.1,
           "repetition_penalty": 1.2, "logit_bias": {"50256": -100, "7": 2.5}"#,
    )
    .expect("valid")
    .sampling;
    assert_eq!(s.logprobs, Some(3));
    assert_eq!((s.presence_penalty, s.frequency_penalty), (0.5, -1.0));
    assert_eq!((s.min_p, s.repetition_penalty), (0.1, 1.2));
    let mut bias = s.logit_bias.clone();
    bias.sort_by_key(|b| b.0);
    assert_eq!(bias, [(7, 2.5), (50256, -100.0)]);
    assert_eq!(
        chat(r#""logprobs": true, "top_logprobs": 2"#).map(|c| c.sampling.logprobs),
        Ok(Some(2))
    );
    assert_eq!(
        chat(r#""logprobs": true"#).map(|c| c.sampling.logprobs),
        Ok(Some(0))
    );
    assert_eq!(
        chat(r#""logprobs": false"#).map(|c| c.sampling.logprobs),
        Ok(None)
    );
    for (bad, field) in [
        (completion(r#""logprobs": true"#), "logprobs"),
        (completion(r#""logprobs": 21"#), "log-probabilities"),
        (completion(r#""top_logprobs": 2"#), "top_logprobs"),
        (chat(r#""top_logprobs": 2"#), "top_logprobs"),
        (chat(r#""logprobs": 3"#), "logprobs"),
        (completion(r#""presence_penalty": 3"#), "presence_penalty"),
        (
            completion(r#""frequency_penalty": -2.5"#),
            "frequency_penalty",
        ),
        (completion(r#""min_p": 1.5"#), "min_p"),
        (
            completion(r#""repetition_penalty": 0"#),
            "repetition_penalty",
        ),
        (completion(r#""logit_bias": {"abc": 1}"#), "logit_bias"),
        (completion(r#""logit_bias": {"1": 200}"#), "logit_bias"),
        (
            completion(r#""response_format": {"type": "xml"}"#),
            "response_format",
        ),
        (
            completion(r#""response_format": {"type": "regex"}"#),
            "regex",
        ),
        (
            chat(r#""response_format": {"type": "json_schema", "json_schema": {"schema": 3}}"#),
            "schema",
        ),
    ] {
        let e = bad.expect_err(field);
        assert!(e.contains(field), "{field}: {e}");
    }
}

#[test]
fn best_of_is_at_least_n_and_not_streamed() {
    let ok = |body: &str| validate_completion(body.as_bytes());
    assert!(ok(r#"{"prompt": "x", "best_of": 4, "n": 2}"#).is_ok());
    assert!(ok(r#"{"prompt": "x", "best_of": 2, "n": 2, "stream": true}"#).is_ok());
    for (body, want) in [
        (r#"{"prompt": "x", "best_of": 1, "n": 2}"#, "at least `n`"),
        (r#"{"prompt": "x", "best_of": 17}"#, "at most 16"),
        (
            r#"{"prompt": "x", "best_of": 3, "stream": true}"#,
            "cannot be streamed",
        ),
    ] {
        let e = ok(body).expect_err(body);
        assert!(e.contains(want), "{body}: {e}");
    }
    let e = validate_chat(br#"{"messages": [{"role": "user", "content": "x"}], "best_of": 2}"#)
        .expect_err("a completions field");
    assert!(
        e.contains("`best_of`") && e.contains("/v1/completions"),
        "{e}"
    );
}
