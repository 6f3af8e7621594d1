//! Every RPC request and response as a node or a client decodes it from a frame (through the
//! transport's codec, which turns a panicking decode into an error): tarpc's client message
//! (requests) and response envelopes, with the service's types.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto_types::service::{ShardNodeRequest, ShardNodeResponse};

fuzz_target!(|data: &[u8]| {
    let _ = proto_types::codec::decode_frame::<tarpc::ClientMessage<ShardNodeRequest>>(data);
    let _ = proto_types::codec::decode_frame::<tarpc::Response<ShardNodeResponse>>(data);
    let _ = proto_types::codec::decode_frame::<proto_types::WireTensor>(data);
});
