//! An opened GGUF file: header, metadata and tensor descriptors, validated up front.
//!
//! Tensor bytes are not read here. A stage asks for the tensors it owns by name and gets
//! exactly their bytes with positioned reads, so a stage for layers 10..20 never touches
//! (or holds) the bytes of any other layer.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use gguf_rs_lib::format::metadata::Metadata;
use gguf_rs_lib::format::types::GGUFTensorType;
use gguf_rs_lib::reader::GGUFFileReader;

use super::config::ModelConfig;
use super::meta::Meta;
use crate::error::{Error, Result};

/// Where one tensor lives in the file and what it is.
#[derive(Debug, Clone)]
pub struct TensorDesc {
    /// The tensor's GGUF name, e.g. `blk.3.attn_q.weight`.
    pub name: String,
    /// Dimensions in candle order (outermost first), i.e. GGUF's reversed.
    pub dims: Vec<usize>,
    /// The storage type, or the GGUF type name when candle cannot hold it.
    pub dtype: std::result::Result<GgmlDType, String>,
    /// Absolute offset of the first byte in the file.
    pub offset: u64,
    /// Size of the data in bytes.
    pub nbytes: u64,
}

impl TensorDesc {
    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }

    /// The storage type, or an error naming the tensor and its unsupported type.
    pub fn ggml_dtype(&self) -> Result<GgmlDType> {
        self.dtype.clone().map_err(|dtype| Error::UnsupportedQuant {
            tensor: self.name.clone(),
            dtype,
        })
    }
}

/// An opened, validated GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    file: File,
    metadata: Metadata,
    tensors: HashMap<String, TensorDesc>,
}

fn to_ggml(t: GGUFTensorType) -> std::result::Result<GgmlDType, String> {
    Ok(match t {
        GGUFTensorType::F32 => GgmlDType::F32,
        GGUFTensorType::F16 => GgmlDType::F16,
        GGUFTensorType::BF16 => GgmlDType::BF16,
        GGUFTensorType::Q4_0 => GgmlDType::Q4_0,
        GGUFTensorType::Q4_1 => GgmlDType::Q4_1,
        GGUFTensorType::Q5_0 => GgmlDType::Q5_0,
        GGUFTensorType::Q5_1 => GgmlDType::Q5_1,
        GGUFTensorType::Q8_0 => GgmlDType::Q8_0,
        GGUFTensorType::Q2_K => GgmlDType::Q2K,
        GGUFTensorType::Q3_K => GgmlDType::Q3K,
        GGUFTensorType::Q4_K => GgmlDType::Q4K,
        GGUFTensorType::Q5_K => GgmlDType::Q5K,
        GGUFTensorType::Q6_K => GgmlDType::Q6K,
        other => return Err(other.name().to_string()),
    })
}

impl GgufFile {
    /// Opens and validates `path`: magic, version, counts, metadata, and that every tensor's
    /// byte range lies inside the file. Nothing of the tensor data is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let reader = GGUFFileReader::new(BufReader::new(file.try_clone().map_err(io)?)).map_err(
            |source| Error::Gguf {
                path: path.clone(),
                source,
            },
        )?;
        let base = reader.tensor_data_offset();
        let file_len = file.metadata().map_err(io)?.len();
        let mut tensors = HashMap::with_capacity(reader.tensor_count());
        for info in reader.tensor_infos() {
            let name = info.name().to_string();
            let nbytes = info
                .checked_expected_data_size()
                .map_err(|source| Error::Gguf {
                    path: path.clone(),
                    source,
                })?;
            let offset = base
                .checked_add(info.data_offset())
                .ok_or_else(|| Error::BadGguf(format!("tensor `{name}` offset overflows")))?;
            if offset.checked_add(nbytes).is_none_or(|end| end > file_len) {
                return Err(Error::BadGguf(format!(
                    "tensor `{name}` ({nbytes} bytes at {offset}) runs past the end of the file ({file_len} bytes): truncated?"
                )));
            }
            let dims = info
                .shape()
                .dims()
                .iter()
                .rev()
                .map(|&d| usize::try_from(d))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| Error::BadGguf(format!("tensor `{name}` has an absurd dimension")))?;
            tensors.insert(
                name.clone(),
                TensorDesc {
                    name,
                    dims,
                    dtype: to_ggml(info.tensor_type()),
                    offset,
                    nbytes,
                },
            );
        }
        let metadata = reader.metadata().clone();
        Ok(GgufFile {
            path,
            file,
            metadata,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Raw metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Typed metadata access.
    pub fn meta(&self) -> Meta<'_> {
        Meta(&self.metadata)
    }

    /// The typed model configuration.
    pub fn config(&self) -> Result<ModelConfig> {
        ModelConfig::try_from(&self.metadata)
    }

    /// The descriptor of a tensor, if the file has it.
    pub fn tensor(&self, name: &str) -> Option<&TensorDesc> {
        self.tensors.get(name)
    }

    /// The descriptor of a tensor the caller needs.
    pub fn require(&self, name: &str) -> Result<&TensorDesc> {
        self.tensor(name).ok_or_else(|| Error::BadTensor {
            tensor: name.to_string(),
            reason: "missing from the file".into(),
        })
    }

    /// All tensor descriptors.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorDesc> {
        self.tensors.values()
    }

    /// Reads exactly the bytes of one tensor.
    pub fn read_bytes(&self, desc: &TensorDesc) -> Result<Vec<u8>> {
        let len = usize::try_from(desc.nbytes).map_err(|_| Error::BadTensor {
            tensor: desc.name.clone(),
            reason: format!("{} bytes do not fit in memory", desc.nbytes),
        })?;
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, desc.offset)
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(buf)
    }
}
