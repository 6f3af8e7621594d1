//! Syntax detection, parsing whole and streamed answers, and the calls' grammar.

use super::*;

/// A template in the style of Qwen's (tests/fixtures/tool-template.jinja): tools listed in
/// the system turn, calls as tagged blocks, tool answers as `tool` turns.
fn tagged() -> String {
    let p = crate::testing::workspace_root().join("tests/fixtures/tool-template.jinja");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn template(source: &str) -> ChatTemplate {
    ChatTemplate::new(source, "", "<|im_end|>").expect("compiles")
}

#[test]
fn detects_the_syntax_or_says_why_not() {
    assert_eq!(template(&tagged()).tool_syntax(), Ok(ToolSyntax::Tagged));
    let llama = r#"{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}Respond as {"name": function name, "parameters": dictionary}.{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"#;
    assert_eq!(template(llama).tool_syntax(), Ok(ToolSyntax::BareJson));
    let none = "{% for m in messages %}{{ m.content }}{% endfor %}";
    let e = template(none).tool_syntax().expect_err("no tools shown");
    assert!(e.contains("does not show the model any tools"), "{e}");
    let odd = "{% for t in tools %}{{ t.function.name }}{% endfor %}{{ messages[0].content }}";
    let e = template(odd).tool_syntax().expect_err("unknown syntax");
    assert!(e.contains("not one this server reads"), "{e}");
}

#[test]
fn history_with_calls_and_answers_renders() {
    let t = template(&tagged());
    let mut call = ChatMessage::new("assistant", "");
    call.tool_calls = Some(json!([{"id": "call_1", "type": "function",
        "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]));
    let mut answer = ChatMessage::new("tool", "-3 C");
    answer.tool_call_id = Some("call_1".into());
    let out = t
        .render_with_tools(
            &[ChatMessage::new("user", "Weather in Oslo?"), call, answer],
            Some(&json!([{"type": "function", "function": {"name": "weather"}}])),
            true,
        )
        .expect("renders");
    assert!(
        out.contains(r#"{"name": "weather", "arguments": {"city":"Oslo"}}"#),
        "{out}"
    );
    assert!(out.contains("<|im_start|>tool\n-3 C"), "{out}");
}

#[test]
fn parses_calls_and_keeps_the_text_around_them() {
    let s = ToolSyntax::Tagged;
    let p = s.parse(
        "Let me look.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n\
         <tool_call>{\"name\": \"b\", \"arguments\": \"{\\\"y\\\": 2}\"}</tool_call>",
    );
    assert_eq!(p.content, "Let me look.");
    assert_eq!(
        p.calls,
        vec![
            ToolCall {
                name: "a".into(),
                arguments: r#"{"x":1}"#.into()
            },
            ToolCall {
                name: "b".into(),
                arguments: r#"{"y": 2}"#.into()
            },
        ]
    );
    // a block that is not a call stays text; an unclosed last block is read to the end
    let p = s.parse("<tool_call>not json</tool_call> ok <tool_call>{\"name\": \"c\"}");
    assert_eq!(p.content, "<tool_call>not json</tool_call> ok");
    assert_eq!(
        p.calls,
        vec![ToolCall {
            name: "c".into(),
            arguments: "{}".into()
        }]
    );
    assert_eq!(s.parse("plain").calls, vec![]);

    let b = ToolSyntax::BareJson;
    let p = b.parse("<|python_tag|>{\"name\": \"w\", \"parameters\": {\"q\": \"x\"}}");
    assert_eq!(
        p.calls,
        vec![ToolCall {
            name: "w".into(),
            arguments: r#"{"q":"x"}"#.into()
        }]
    );
    assert_eq!(p.content, "");
    let p = b.parse(" The answer is {1}.");
    assert!(p.calls.is_empty());
    assert_eq!(p.content, "The answer is {1}.");
}

/// Feeds `text` to a stream in pieces of `n` bytes (on character boundaries).
fn streamed(syntax: ToolSyntax, text: &str, n: usize) -> (String, Parsed) {
    let mut s = ToolStream::new(syntax);
    let mut shown = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut at = n.min(rest.len());
        while !rest.is_char_boundary(at) {
            at += 1;
        }
        shown.push_str(&s.push(&rest[..at]));
        rest = &rest[at..];
    }
    (shown, s.finish())
}

#[test]
fn a_stream_shows_text_and_holds_calls() {
    let text = "Sure — checking.<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>";
    for n in [1, 2, 3, 5, 64] {
        let (shown, end) = streamed(ToolSyntax::Tagged, text, n);
        assert_eq!(shown, "Sure — checking.", "pieces of {n}");
        assert_eq!(
            end.calls,
            vec![ToolCall {
                name: "a".into(),
                arguments: "{}".into()
            }]
        );
        assert_eq!(end.content, "");
        // text with a `<` that starts no tag is all shown in the end
        let (shown, end) = streamed(ToolSyntax::Tagged, "a < b <tool", n);
        assert_eq!(
            format!("{shown}{}", end.content),
            "a < b <tool",
            "pieces of {n}"
        );
        assert!(end.calls.is_empty());
    }
    for n in [1, 4, 100] {
        let (shown, end) = streamed(
            ToolSyntax::BareJson,
            "<|python_tag|>{\"name\": \"w\", \"parameters\": {}}",
            n,
        );
        assert_eq!(shown, "");
        assert_eq!(end.calls.len(), 1);
        let (shown, end) = streamed(ToolSyntax::BareJson, "  Hello there", n);
        assert_eq!(format!("{shown}{}", end.content), "  Hello there");
        // held as a possible call, then not one: shown at the end as it was
        let (shown, end) = streamed(ToolSyntax::BareJson, "{not a call}", n);
        assert_eq!(format!("{shown}{}", end.content), "{not a call}");
    }
}

#[test]
fn the_grammar_names_every_tool_and_its_schema() {
    let tools = [
        ToolDef {
            name: "a".into(),
            parameters: json!({"type": "object"}),
        },
        ToolDef {
            name: "b".into(),
            parameters: json!({"type": "object", "properties": {"x": {"type": "integer"}}}),
        },
    ];
    let g = ToolSyntax::Tagged.grammar(&tools, true);
    assert!(g.starts_with("start: call (\"\\n\" call)*\n"), "{g}");
    assert!(g.contains(r#"{"const":"b"}"#), "{g}");
    let g = ToolSyntax::BareJson.grammar(&tools, false);
    assert!(g.contains(r#""required":["name","parameters"]"#), "{g}");
}
