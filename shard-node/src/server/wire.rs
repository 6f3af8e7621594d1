//! Conversions between wire types and domain types, at the edge.

use crate::node::NodeError;
use candle_core::{DType, Device, Tensor};
use common::grammar::Grammar;
use common::model::LayerRange;
use common::sampling::{Pick, SamplingParams};
use proto_types::{
    ErrorCode, ShardError, WireDType, WireGrammar, WireLayerRange, WirePick, WireSampling,
    WireTensor,
};

/// A domain error as a wire error (details logged by the caller).
pub fn shard_err(e: common::Error) -> ShardError {
    use common::Error as E;
    let code = match &e {
        E::ContextOverflow { .. } => ErrorCode::ResourceExhausted,
        E::PositionMismatch { .. } | E::InvalidInput(_) | E::BadLayerRange(_) | E::Config(_) => {
            ErrorCode::InvalidArgument
        }
        E::Io { .. }
        | E::Gguf { .. }
        | E::BadGguf(_)
        | E::MissingKey(_)
        | E::BadKey { .. }
        | E::UnsupportedArchitecture(_) => ErrorCode::ModelUnavailable,
        _ => ErrorCode::Internal,
    };
    ShardError::new(code, e.to_string())
}

impl From<NodeError> for ShardError {
    fn from(e: NodeError) -> Self {
        use NodeError as E;
        let code = match &e {
            E::Config(_)
            | E::Left
            | E::EpochTaken(_)
            | E::OtherSlice { .. }
            | E::Committed(_)
            | E::SessionOpen(_) => ErrorCode::InvalidArgument,
            E::UnknownLease(_) => ErrorCode::UnknownLease,
            E::NotNewer { .. }
            | E::Behind { .. }
            | E::Replaced(_)
            | E::NoSuchEpoch(_)
            | E::ServesOther { .. } => ErrorCode::EpochMismatch,
            E::NotPrepared(_) | E::NotCommitted(_) => ErrorCode::NoSlice,
            E::SliceDoesNotFit { .. } | E::SessionDoesNotFit { .. } | E::TooManySessions(_) => {
                ErrorCode::ResourceExhausted
            }
            E::UnknownSession { .. } => ErrorCode::UnknownSession,
        };
        ShardError::new(code, e.to_string())
    }
}

/// The wire type of activations sent on at `a`'s precision.
pub fn activation_dtype(a: crate::node::Activations) -> WireDType {
    match a {
        crate::node::Activations::F32 => WireDType::F32,
        crate::node::Activations::F16 => WireDType::F16,
        crate::node::Activations::Bf16 => WireDType::BF16,
    }
}

/// A candle error as a wire error.
pub fn candle_err(e: candle_core::Error) -> ShardError {
    shard_err(common::Error::Candle(e))
}

/// Checked layer range.
pub fn layer_range(r: WireLayerRange) -> Result<LayerRange, ShardError> {
    LayerRange::new(r.start, r.end).map_err(shard_err)
}

/// Layer range to the wire.
pub fn wire_range(r: LayerRange) -> WireLayerRange {
    WireLayerRange {
        start: r.start(),
        end: r.end(),
    }
}

/// Sampling parameters from the wire, validated.
pub fn sampling(s: &WireSampling) -> Result<SamplingParams, ShardError> {
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        min_p: s.min_p,
        seed: s.seed,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        repetition_penalty: s.repetition_penalty,
        logit_bias: s.logit_bias.clone(),
        logprobs: s.logprobs,
    }
    .validate()
    .map_err(shard_err)
}

/// A grammar from the wire.
pub fn grammar(g: &WireGrammar) -> Grammar {
    match g {
        WireGrammar::JsonObject => Grammar::JsonObject,
        WireGrammar::JsonSchema(s) => Grammar::JsonSchema(s.clone()),
        WireGrammar::Regex(s) => Grammar::Regex(s.clone()),
        WireGrammar::Lark(s) => Grammar::Lark(s.clone()),
    }
}

/// A pick to the wire.
pub fn wire_pick(p: Pick) -> WirePick {
    WirePick {
        token: p.token,
        logprobs: p.logprobs.map(|l| (l.logprob, l.top)),
    }
}

/// A wire tensor to an f32 candle tensor on `device`.
pub fn to_tensor(w: &WireTensor, device: &Device) -> Result<Tensor, ShardError> {
    w.validate()?;
    let shape: Vec<usize> = w.shape.iter().map(|&d| d as usize).collect();
    let t = match w.dtype {
        WireDType::F32 => {
            let v: Vec<f32> = w
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Tensor::from_vec(v, shape, device)
        }
        WireDType::F16 => {
            let v: Vec<half::f16> = w
                .data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
                .collect();
            Tensor::from_vec(v, shape, device).and_then(|t| t.to_dtype(DType::F32))
        }
        WireDType::BF16 => {
            let v: Vec<half::bf16> = w
                .data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]))
                .collect();
            Tensor::from_vec(v, shape, device).and_then(|t| t.to_dtype(DType::F32))
        }
    };
    t.map_err(candle_err)
}

fn half_bytes<T: candle_core::WithDType>(
    flat: &Tensor,
    dtype: DType,
    le: impl Fn(&T) -> [u8; 2],
) -> Result<Vec<u8>, ShardError> {
    let v = flat
        .to_dtype(dtype)
        .and_then(|x| x.to_vec1::<T>())
        .map_err(candle_err)?;
    Ok(v.iter().flat_map(le).collect())
}

/// A tensor to the wire as `dtype`.
pub fn to_wire(t: &Tensor, dtype: WireDType) -> Result<WireTensor, ShardError> {
    let shape = t.dims().iter().map(|&d| d as u32).collect();
    let flat = t.flatten_all().map_err(candle_err)?;
    let data = match dtype {
        WireDType::F32 => flat
            .to_vec1::<f32>()
            .map_err(candle_err)?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        WireDType::F16 => half_bytes(&flat, DType::F16, |x: &half::f16| x.to_le_bytes())?,
        WireDType::BF16 => half_bytes(&flat, DType::BF16, |x: &half::bf16| x.to_le_bytes())?,
    };
    Ok(WireTensor { dtype, shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype() -> Result<(), ShardError> {
        let t = Tensor::new(&[[1.0f32, -2.5], [0.125, 3.0]], &Device::Cpu).map_err(candle_err)?;
        for dt in [WireDType::F32, WireDType::F16, WireDType::BF16] {
            let w = to_wire(&t, dt)?;
            assert_eq!(w.shape, [2, 2]);
            let back = to_tensor(&w, &Device::Cpu)?
                .to_vec2::<f32>()
                .map_err(candle_err)?;
            assert_eq!(back, [[1.0, -2.5], [0.125, 3.0]]);
        }
        let bad = WireTensor {
            dtype: WireDType::F16,
            shape: vec![3],
            data: vec![0; 4],
        };
        assert!(to_tensor(&bad, &Device::Cpu).is_err());
        Ok(())
    }
}
