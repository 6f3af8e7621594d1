//! Typed access to GGUF metadata values, with errors that name the key.

use gguf_rs_lib::format::metadata::{Metadata, MetadataValue};

use crate::error::{Error, Result};

/// Read-only typed view of a GGUF metadata table.
#[derive(Debug, Clone, Copy)]
pub struct Meta<'a>(pub &'a Metadata);

fn bad(key: &str, reason: impl Into<String>) -> Error {
    Error::BadKey {
        key: key.to_string(),
        reason: reason.into(),
    }
}

impl<'a> Meta<'a> {
    /// The raw value, if present.
    pub fn get(&self, key: &str) -> Option<&'a MetadataValue> {
        self.0.get(key)
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&'a str> {
        match self.get(key) {
            None => Err(Error::MissingKey(key.to_string())),
            Some(MetadataValue::String(s)) => Ok(s.as_str()),
            Some(v) => Err(bad(
                key,
                format!("expected a string, found {}", type_name(v)),
            )),
        }
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.str(key).map(Some),
        }
    }

    /// A required non-negative integer of any width.
    pub fn u64(&self, key: &str) -> Result<u64> {
        let v = self
            .get(key)
            .ok_or_else(|| Error::MissingKey(key.to_string()))?;
        as_u64(v).ok_or_else(|| {
            bad(
                key,
                format!("expected a non-negative integer, found {}", show(v)),
            )
        })
    }

    /// An optional non-negative integer.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.u64(key).map(Some),
        }
    }

    /// An optional float (any numeric type).
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => as_f64(v)
                .map(Some)
                .ok_or_else(|| bad(key, format!("expected a number, found {}", show(v)))),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetadataValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => as_u64(v)
                .map(|n| Some(n != 0))
                .ok_or_else(|| bad(key, format!("expected a boolean, found {}", show(v)))),
        }
    }

    /// An array, element by element.
    pub fn array(&self, key: &str) -> Result<&'a [MetadataValue]> {
        match self.get(key) {
            None => Err(Error::MissingKey(key.to_string())),
            Some(MetadataValue::Array(a)) => Ok(a.values.as_slice()),
            Some(v) => Err(bad(
                key,
                format!("expected an array, found {}", type_name(v)),
            )),
        }
    }

    /// An array of strings.
    pub fn str_array(&self, key: &str) -> Result<Vec<&'a str>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                MetadataValue::String(s) => Ok(s.as_str()),
                v => Err(bad(
                    key,
                    format!("element {i} is {}, not a string", type_name(v)),
                )),
            })
            .collect()
    }

    /// An optional array of numbers as f32.
    pub fn opt_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        if self.get(key).is_none() {
            return Ok(None);
        }
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                as_f64(v).map(|x| x as f32).ok_or_else(|| {
                    bad(
                        key,
                        format!("element {i} is {}, not a number", type_name(v)),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An optional array of integers as i64.
    pub fn opt_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        if self.get(key).is_none() {
            return Ok(None);
        }
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                as_i64(v).ok_or_else(|| {
                    bad(
                        key,
                        format!("element {i} is {}, not an integer", type_name(v)),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

fn as_u64(v: &MetadataValue) -> Option<u64> {
    as_i64(v).and_then(|n| u64::try_from(n).ok()).or(match v {
        MetadataValue::U64(n) => Some(*n),
        _ => None,
    })
}

fn as_i64(v: &MetadataValue) -> Option<i64> {
    Some(match v {
        MetadataValue::U8(n) => i64::from(*n),
        MetadataValue::I8(n) => i64::from(*n),
        MetadataValue::U16(n) => i64::from(*n),
        MetadataValue::I16(n) => i64::from(*n),
        MetadataValue::U32(n) => i64::from(*n),
        MetadataValue::I32(n) => i64::from(*n),
        MetadataValue::U64(n) => i64::try_from(*n).ok()?,
        MetadataValue::I64(n) => *n,
        _ => return None,
    })
}

fn as_f64(v: &MetadataValue) -> Option<f64> {
    match v {
        MetadataValue::F32(x) => Some(f64::from(*x)),
        MetadataValue::F64(x) => Some(*x),
        v => as_i64(v).map(|n| n as f64),
    }
}

fn type_name(v: &MetadataValue) -> &'static str {
    match v {
        MetadataValue::U8(_) => "u8",
        MetadataValue::I8(_) => "i8",
        MetadataValue::U16(_) => "u16",
        MetadataValue::I16(_) => "i16",
        MetadataValue::U32(_) => "u32",
        MetadataValue::I32(_) => "i32",
        MetadataValue::F32(_) => "f32",
        MetadataValue::Bool(_) => "bool",
        MetadataValue::String(_) => "string",
        MetadataValue::Array(_) => "array",
        MetadataValue::U64(_) => "u64",
        MetadataValue::I64(_) => "i64",
        MetadataValue::F64(_) => "f64",
    }
}

fn show(v: &MetadataValue) -> String {
    match v {
        MetadataValue::String(s) => format!("string {:?}", s.chars().take(40).collect::<String>()),
        MetadataValue::Array(a) => format!("array of {}", a.values.len()),
        v => format!("{} {}", type_name(v), v.to_string_representation()),
    }
}
