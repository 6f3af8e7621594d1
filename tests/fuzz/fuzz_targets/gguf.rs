//! GGUF parsing from hostile bytes: header, metadata, tensor descriptors, then the typed
//! model configuration and the tokenizer built from the metadata. Any input must give a
//! value or an error, never a panic, a hang or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // GgufFile reads a path: one file per fuzzing process, on tmpfs when there is one.
    let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
    let path = format!("{dir}/fuzz-gguf-{}.gguf", std::process::id());
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(f) = common::gguf::GgufFile::open(&path) {
        let _ = f.config();
        if let Ok(tok) = common::tokenizer::TextTokenizer::from_gguf(&f) {
            let _ = tok.encode("Hello, world");
            let _ = tok.apply_chat_template(&[common::tokenizer::ChatMessage::new("user", "hi")]);
        }
    }
});
