//! Every RPC request and response as a node or a client decodes it from a frame: bincode of
//! tarpc's client message (requests) and response, with the service's types.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto_types::service::{ShardNodeRequest, ShardNodeResponse};

fuzz_target!(|data: &[u8]| {
    let _ = bincode::deserialize::<tarpc::ClientMessage<ShardNodeRequest>>(data);
    let _ = bincode::deserialize::<tarpc::Response<ShardNodeResponse>>(data);
    let _ = bincode::deserialize::<proto_types::WireTensor>(data);
});
