//! A model file may carry any chat template. One that loops forever, recurses without end or
//! renders without bound must fail the request with a typed error, quickly, and leave the
//! tokenizer usable.

use std::time::{Duration, Instant};

use common::error::Error;
use common::gguf::GgufFile;
use common::testing::default_model;
use common::tokenizer::{ChatMessage, TextTokenizer};
use gguf_rs_lib::builder::GGUFBuilder;
use gguf_rs_lib::format::metadata::MetadataValue;

/// The default model's tokenizer metadata with `template` as its chat template, as a GGUF
/// with no tensors.
fn tokenizer_with(template: &str, dir: &std::path::Path) -> anyhow::Result<TextTokenizer> {
    let src = GgufFile::open(default_model())?;
    let mut b = GGUFBuilder::new().add_metadata(
        "general.architecture",
        MetadataValue::String("llama".into()),
    );
    for (k, v) in src.metadata().iter() {
        if k.starts_with("tokenizer.") && k != "tokenizer.chat_template" {
            b = b.add_metadata(k.clone(), v.clone());
        }
    }
    b = b.add_metadata(
        "tokenizer.chat_template",
        MetadataValue::String(template.into()),
    );
    let path = dir.join("hostile.gguf");
    b.build_to_file(&path)
        .map_err(|e| anyhow::anyhow!("writing the GGUF: {e:?}"))?;
    Ok(TextTokenizer::from_gguf(&GgufFile::open(&path)?)?)
}

#[test]
fn a_chat_template_that_never_ends_is_a_typed_error_within_a_second() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for template in [
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% for a in range(100000) %}{{ messages[0].content * 1000 }}{% endfor %}",
    ] {
        let tok = tokenizer_with(template, dir.path())?;
        let started = Instant::now();
        let r = tok.apply_chat_template(&[ChatMessage::new("user", "hello")]);
        assert!(matches!(r, Err(Error::Template(_))), "{template}: {r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{template}: {:?}",
            started.elapsed()
        );
        // the tokenizer itself still works
        assert!(!tok.encode("hello")?.is_empty());
    }
    Ok(())
}
