//! The HTTP API's request bodies into validated generation parameters.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = coordinator::http::openai::validate_completion(data);
    let _ = coordinator::http::openai::validate_chat(data);
});
