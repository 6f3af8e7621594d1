//! Every RPC request and response as a node or a client decodes it from a frame (through the
//! transport's codec, which turns a panicking decode into an error): tarpc's client message
//! (requests) and response envelopes, with the service's types.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto_types::service::{ShardNodeRequest, ShardNodeResponse};

fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys aborts on any panic, caught or not; the transport catches the ones that
    // tarpc's deserializer raises (see proto_types::codec), so only a panic that escapes
    // `decode_frame` must end the run: libfuzzer-sys still aborts on those.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let _ = proto_types::codec::decode_frame::<tarpc::ClientMessage<ShardNodeRequest>>(data);
    let _ = proto_types::codec::decode_frame::<tarpc::Response<ShardNodeResponse>>(data);
    let _ = proto_types::codec::decode_frame::<proto_types::WireTensor>(data);
});
