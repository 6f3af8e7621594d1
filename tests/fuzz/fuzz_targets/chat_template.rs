//! Chat templates as a hostile GGUF could carry them: compiled and rendered within the
//! renderer's fuel, so that none loops forever or renders without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = common::tokenizer::ChatTemplate::new(source, "<s>", "</s>") {
        let messages = [
            common::tokenizer::ChatMessage::new("system", "Be brief."),
            common::tokenizer::ChatMessage::new("user", "Hi {{ there }}"),
        ];
        let _ = t.render(&messages, true);
    }
});
