//! The frame codec: bincode, as tarpc's `Bincode`, except that a frame whose decoding panics
//! is an error of that connection, not a panic of the task reading it. Fuzzing found one: a
//! request context whose deadline lies past what `Instant` can hold panics inside tarpc's
//! own deserializer (`overflow when adding duration to instant`).

use std::io;
use std::marker::PhantomData;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_serde::{Deserializer, Serializer};

/// Bincode with decoding panics caught. Like tarpc's `Bincode`, it holds no state.
#[derive(Debug)]
pub struct SafeBincode<In, Out> {
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> Default for SafeBincode<In, Out> {
    fn default() -> Self {
        SafeBincode {
            _types: PhantomData,
        }
    }
}

/// Decodes one frame as the transport does; a panic while decoding is an `InvalidData`
/// error.
pub fn decode_frame<T>(frame: &[u8]) -> io::Result<T>
where
    T: for<'de> Deserialize<'de>,
{
    let src = BytesMut::from(frame);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let codec = std::pin::pin!(Bincode::<T, ()>::default());
        Deserializer::<T>::deserialize(codec, &src)
    }))
    .unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a frame that cannot be decoded (its decoding panicked)",
        ))
    })
}

impl<In, Out> Deserializer<In> for SafeBincode<In, Out>
where
    In: for<'de> Deserialize<'de>,
{
    type Error = io::Error;

    fn deserialize(self: Pin<&mut Self>, src: &BytesMut) -> Result<In, Self::Error> {
        decode_frame(src)
    }
}

impl<In, Out> Serializer<Out> for SafeBincode<In, Out>
where
    Out: Serialize,
{
    type Error = io::Error;

    fn serialize(self: Pin<&mut Self>, item: &Out) -> Result<Bytes, Self::Error> {
        let codec = std::pin::pin!(Bincode::<In, Out>::default());
        Serializer::<Out>::serialize(codec, item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::ShardNodeRequest;

    /// Found by `scripts/fuzz.sh` (target `rpc_decode`): a request envelope whose context
    /// deadline overflows `Instant`. tarpc's deserializer panics on it.
    const DEADLINE_OVERFLOW: &[u8] = &[
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x5b, 0x00, 0xa5, 0xb7, 0x00, 0x00,
        0x44, 0x00, 0x00,
    ];

    #[test]
    fn a_frame_whose_decoding_panics_is_an_error() {
        let r = decode_frame::<tarpc::ClientMessage<ShardNodeRequest>>(DEADLINE_OVERFLOW);
        assert_eq!(r.err().map(|e| e.kind()), Some(io::ErrorKind::InvalidData));
    }

    #[test]
    fn frames_round_trip() {
        let msg = tarpc::ClientMessage::<ShardNodeRequest>::Cancel {
            trace_context: Default::default(),
            request_id: 7,
        };
        let codec =
            std::pin::pin!(SafeBincode::<(), tarpc::ClientMessage<ShardNodeRequest>>::default());
        let bytes = Serializer::serialize(codec, &msg).expect("encodes");
        let back = decode_frame::<tarpc::ClientMessage<ShardNodeRequest>>(&bytes).expect("decodes");
        assert!(matches!(
            back,
            tarpc::ClientMessage::Cancel { request_id: 7, .. }
        ));
    }
}
