//! Activations on the wire: raw little-endian bytes of one dtype, plus a shape.

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, ShardError};

/// Element type of a [`WireTensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireDType {
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single.
    F32,
}

impl WireDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WireDType::F16 | WireDType::BF16 => 2,
            WireDType::F32 => 4,
        }
    }
}

/// A dense tensor as bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTensor {
    /// Element type.
    pub dtype: WireDType,
    /// Dimensions, outermost first.
    pub shape: Vec<u32>,
    /// `Π shape × dtype.size()` bytes, little-endian.
    pub data: Vec<u8>,
}

impl WireTensor {
    /// Checks that the bytes match the shape (at most 4 dimensions).
    pub fn validate(&self) -> Result<(), ShardError> {
        let bad = |d: String| Err(ShardError::new(ErrorCode::InvalidArgument, d));
        if self.shape.is_empty() || self.shape.len() > 4 {
            return bad(format!("tensor rank {} is not 1..=4", self.shape.len()));
        }
        let elems = self
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize));
        match elems.and_then(|e| e.checked_mul(self.dtype.size())) {
            Some(n) if n == self.data.len() => Ok(()),
            Some(n) => bad(format!(
                "tensor {:?} of {:?} needs {n} bytes, got {}",
                self.shape,
                self.dtype,
                self.data.len()
            )),
            None => bad(format!("tensor shape {:?} overflows", self.shape)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_sizes() {
        let t = WireTensor {
            dtype: WireDType::F16,
            shape: vec![2, 3],
            data: vec![0; 12],
        };
        assert!(t.validate().is_ok());
        assert!(WireTensor {
            data: vec![0; 11],
            ..t.clone()
        }
        .validate()
        .is_err());
        assert!(WireTensor {
            shape: vec![],
            ..t.clone()
        }
        .validate()
        .is_err());
        assert!(WireTensor {
            shape: vec![u32::MAX, u32::MAX, u32::MAX],
            ..t
        }
        .validate()
        .is_err());
    }
}
