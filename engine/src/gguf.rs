//! A reader for GGUF files (llama.cpp's model format), versions 2 and 3.
//!
//! Layout (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>): a header
//! (`GGUF`, version, tensor count, metadata count), the metadata key/value pairs, the tensor
//! table (name, dims, type, offset), then tensor data starting at the next multiple of
//! `general.alignment` (32 by default). Everything is little-endian.
//!
//! The reader works on a byte slice so that it runs the same natively and in wasm; it never
//! panics on damaged input: every read is bounds-checked and every failure names what was
//! being read and where.

use std::collections::BTreeMap;

use half::f16;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Most elements reserved up front for a table or array whose count comes from the file; a
/// longer one grows as its elements are read.
const PREALLOC_MAX: u64 = 4096;

/// Why a GGUF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("not a GGUF file (the first four bytes are {0:?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("GGUF version {0} is not supported (only versions 2 and 3 are)")]
    UnsupportedVersion(u32),
    #[error("the file is truncated: it ends while reading {what} at byte {offset}")]
    Truncated { what: String, offset: u64 },
    #[error("{what} at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error("metadata key {key:?} has unknown value type {ty}")]
    UnknownValueType { key: String, ty: u32 },
    #[error("tensor {name:?} has tensor type {ty} ({type_name}), which is not supported")]
    UnsupportedTensorType { name: String, ty: u32, type_name: &'static str },
    #[error("tensor {name:?} has an invalid shape {dims:?}: {reason}")]
    BadShape {
        name: String,
        dims: Vec<u64>,
        reason: &'static str,
    },
    #[error("tensor {name:?} lies outside the file (bytes {start}..{end} of {len})")]
    TensorOutOfBounds { name: String, start: u64, end: u64, len: u64 },
    #[error("invalid alignment {0} (must be a power of two)")]
    BadAlignment(u64),
    #[error("metadata key {0:?} is missing")]
    MissingKey(String),
    #[error("metadata key {key:?} is a {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("tensor {0:?} is missing")]
    MissingTensor(String),
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// The value as an unsigned integer, whatever its stored width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, whatever its stored width.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float (f32 or f64).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// A metadata array, stored as a vector of its element type: a `u8` array takes one byte per
/// element in memory as in the file (no per-element [`Value`]), so memory stays proportional to
/// the file whatever the counts in it say. Arrays of arrays are not supported.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Array {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as signed integers (`None` for non-integer arrays and for a `u64` above
    /// `i64::MAX`).
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        fn widen<T: Copy + Into<i64>>(v: &[T]) -> Option<Vec<i64>> {
            Some(v.iter().map(|&x| x.into()).collect())
        }
        match self {
            Array::U8(v) => widen(v),
            Array::I8(v) => widen(v),
            Array::U16(v) => widen(v),
            Array::I16(v) => widen(v),
            Array::U32(v) => widen(v),
            Array::I32(v) => widen(v),
            Array::I64(v) => Some(v.clone()),
            Array::U64(v) => v.iter().map(|&x| i64::try_from(x).ok()).collect(),
            _ if self.is_empty() => Some(Vec::new()),
            _ => None,
        }
    }
}

/// The element type of a tensor, as numbered by ggml (`enum ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl TensorType {
    fn from_ggml(ty: u32) -> Result<Self, &'static str> {
        Ok(match ty {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            6 => return Err("Q5_0"),
            7 => return Err("Q5_1"),
            9 => return Err("Q8_1"),
            10..=15 => return Err("a k-quant"),
            16..=23 | 29 => return Err("an i-quant"),
            24..=28 => return Err("an integer type"),
            30 => return Err("BF16"),
            _ => return Err("unknown"),
        })
    }

    /// Number of elements in one block.
    pub fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
        }
    }

    /// Number of bytes in one block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            Self::Q4_0 => 18, // f16 scale + 16 bytes of nibbles
            Self::Q4_1 => 20, // f16 scale + f16 minimum + 16 bytes of nibbles
            Self::Q8_0 => 34, // f16 scale + 32 i8
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous one (a row of a matrix).
    pub dims: Vec<u64>,
    pub ty: TensorType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn len(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The parsed header, metadata and tensor table of a GGUF file.
#[derive(Debug, Clone)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset where tensor data starts.
    pub data_offset: u64,
}

impl Gguf {
    /// Parses the header, metadata and tensor table of `bytes` (a whole GGUF file), and checks
    /// that every tensor's data lies inside it.
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        let mut r = Reader { bytes, pos: 0 };
        let magic: [u8; 4] = r.take(4, "the magic number")?.try_into().unwrap_or([0; 4]);
        if &magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let tensor_count = r.u64("the tensor count")?;
        let kv_count = r.u64("the metadata count")?;
        // A key/value pair takes at least 8 (key length) + 4 (type) + 1 bytes.
        r.ensure_count(kv_count, 13, "the metadata")?;

        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&format!("the type of metadata {key:?}"))?;
            let value = r.value(&key, ty)?;
            metadata.insert(key, value);
        }

        let alignment = match metadata.get("general.alignment") {
            Some(v) => v.as_u64().unwrap_or(0),
            None => DEFAULT_ALIGNMENT,
        };
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(GgufError::BadAlignment(alignment));
        }

        // Each table entry takes at least 8 (name length) + 4 (rank) + 8 (one dim) + 4 (type) +
        // 8 (offset) bytes: refuse absurd counts before reading on. The table grows as entries
        // are read, so memory follows the bytes actually parsed, not the count.
        r.ensure_count(tensor_count, 32, "the tensor table")?;
        let mut raw = Vec::with_capacity(tensor_count.min(PREALLOC_MAX) as usize);
        for i in 0..tensor_count {
            let name = r.string(&format!("the name of tensor #{i}"))?;
            let n_dims = r.u32(&format!("the rank of tensor {name:?}"))?;
            if n_dims == 0 || n_dims > 4 {
                return Err(GgufError::BadShape {
                    name,
                    dims: vec![],
                    reason: "rank must be 1 to 4",
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&format!("the dims of tensor {name:?}"))?);
            }
            let ty_raw = r.u32(&format!("the type of tensor {name:?}"))?;
            let offset = r.u64(&format!("the offset of tensor {name:?}"))?;
            raw.push((name, dims, ty_raw, offset));
        }

        let data_offset = r.pos.div_ceil(alignment).saturating_mul(alignment);
        let file_len = bytes.len() as u64;
        // Sum of all tensor sizes: must fit in the data section, so that tensors cannot alias
        // one another to make a small file load as a huge model.
        let mut total_size = 0u64;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ty_raw, rel) in raw {
            let ty = TensorType::from_ggml(ty_raw).map_err(|type_name| GgufError::UnsupportedTensorType {
                name: name.clone(),
                ty: ty_raw,
                type_name,
            })?;
            let len = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| GgufError::BadShape {
                    name: name.clone(),
                    dims: dims.clone(),
                    reason: "element count overflows",
                })?;
            if dims[0] % ty.block_len() as u64 != 0 {
                return Err(GgufError::BadShape {
                    name,
                    dims,
                    reason: "the row length is not a multiple of the block length",
                });
            }
            let size = (len / ty.block_len() as u64)
                .checked_mul(ty.block_bytes() as u64)
                .ok_or_else(|| GgufError::BadShape {
                    name: name.clone(),
                    dims: dims.clone(),
                    reason: "byte size overflows",
                })?;
            total_size = total_size.saturating_add(size);
            if total_size > file_len.saturating_sub(data_offset) {
                return Err(GgufError::TensorOutOfBounds {
                    name,
                    start: data_offset.saturating_add(rel),
                    end: data_offset.saturating_add(rel).saturating_add(size),
                    len: file_len,
                });
            }
            let start = data_offset.checked_add(rel);
            let end = start.and_then(|s| s.checked_add(size));
            match (start, end) {
                (Some(start), Some(end)) if end <= file_len => tensors.push(TensorInfo {
                    name,
                    dims,
                    ty,
                    offset: start,
                    size,
                }),
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        name,
                        start: data_offset.saturating_add(rel),
                        end: data_offset.saturating_add(rel).saturating_add(size),
                        len: file_len,
                    });
                }
            }
        }

        Ok(Self {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    /// A metadata value, or a [`GgufError::MissingKey`] error.
    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey(key.to_owned()))
    }

    fn wrong(&self, key: &str, expected: &'static str) -> GgufError {
        let found = self.metadata.get(key).map_or("missing value", Value::kind);
        GgufError::WrongType {
            key: key.to_owned(),
            expected,
            found,
        }
    }

    /// An unsigned integer metadata value.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)?.as_u64().ok_or_else(|| self.wrong(key, "an unsigned integer"))
    }

    /// A floating-point metadata value.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)?.as_f64().ok_or_else(|| self.wrong(key, "a float"))
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            _ => Err(self.wrong(key, "a string")),
        }
    }

    /// A boolean metadata value.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.get(key)? {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.wrong(key, "a bool")),
        }
    }

    /// An array-of-strings metadata value.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        match self.get(key)? {
            Value::Array(Array::String(items)) => Ok(items.iter().map(String::as_str).collect()),
            Value::Array(a) if a.is_empty() => Ok(Vec::new()),
            _ => Err(self.wrong(key, "an array of strings")),
        }
    }

    /// An array-of-integers metadata value.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        match self.get(key)? {
            Value::Array(a) => a.to_i64().ok_or_else(|| self.wrong(key, "an array of integers")),
            _ => Err(self.wrong(key, "an array of integers")),
        }
    }

    /// The tensor table entry named `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_owned()))
    }
}

/// Decodes `bytes` of type `ty` into f32 values.
///
/// `bytes.len()` must be a whole number of blocks (the reader guarantees this for tensors it
/// returned).
pub fn dequantize(ty: TensorType, bytes: &[u8]) -> Vec<f32> {
    let n_blocks = bytes.len() / ty.block_bytes();
    let mut out = Vec::with_capacity(n_blocks * ty.block_len());
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    for block in bytes.chunks_exact(ty.block_bytes()) {
        match ty {
            TensorType::F32 => out.push(f32::from_le_bytes(block.try_into().unwrap())),
            TensorType::F16 => out.push(f16_at(block, 0)),
            TensorType::Q8_0 => {
                let d = f16_at(block, 0);
                out.extend(block[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
            // Nibble layout (ggml `dequantize_row_q4_0/1`): byte j holds weight j in its low
            // nibble and weight j + 16 in its high nibble.
            TensorType::Q4_0 => {
                let d = f16_at(block, 0);
                let qs = &block[2..18];
                out.extend(qs.iter().map(|&q| (f32::from(q & 0x0f) - 8.0) * d));
                out.extend(qs.iter().map(|&q| (f32::from(q >> 4) - 8.0) * d));
            }
            TensorType::Q4_1 => {
                let (d, m) = (f16_at(block, 0), f16_at(block, 2));
                let qs = &block[4..20];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
    }
    out
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: u64,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let truncated = || GgufError::Truncated {
            what: what.to_owned(),
            offset: self.pos,
        };
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        if end > self.bytes.len() as u64 {
            return Err(truncated());
        }
        let slice = &self.bytes[self.pos as usize..end as usize];
        self.pos = end;
        Ok(slice)
    }

    /// Fails early when `count` items of at least `min_size` bytes cannot fit in the rest of the
    /// file, so that a corrupt count never triggers a huge allocation.
    fn ensure_count(&self, count: u64, min_size: u64, what: &str) -> Result<(), GgufError> {
        let remaining = (self.bytes.len() as u64).saturating_sub(self.pos);
        if count.saturating_mul(min_size) > remaining {
            return Err(GgufError::Truncated {
                what: what.to_owned(),
                offset: self.pos,
            });
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        Ok(self.take(N as u64, what)?.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let start = self.pos;
        let bytes = self.take(len, what)?;
        // Checked before copying: a damaged length over binary data fails without allocating.
        let text = std::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 {
            what: what.to_owned(),
            offset: start,
        })?;
        Ok(text.to_owned())
    }

    fn value(&mut self, key: &str, ty: u32) -> Result<Value, GgufError> {
        let what = || format!("the value of metadata {key:?}");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what())?[0]),
            1 => Value::I8(self.array::<1>(&what())?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what())?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what())?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what())?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what())?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what())?)),
            7 => Value::Bool(self.array::<1>(&what())?[0] != 0),
            8 => Value::String(self.string(&what())?),
            9 => {
                let elem_ty = self.u32(&what())?;
                let count = self.u64(&what())?;
                Value::Array(self.array_of(key, elem_ty, count)?)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(&what())?)),
            11 => Value::I64(i64::from_le_bytes(self.array(&what())?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what())?)),
            _ => return Err(GgufError::UnknownValueType { key: key.to_owned(), ty }),
        })
    }

    /// `count` elements of type `elem_ty`, checked against the bytes left before anything is
    /// allocated for them.
    fn array_of(&mut self, key: &str, elem_ty: u32, count: u64) -> Result<Array, GgufError> {
        let what = format!("the value of metadata {key:?}");
        let width: u64 = match elem_ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            // A string takes at least its 8-byte length.
            8 => {
                self.ensure_count(count, 8, &what)?;
                let mut items = Vec::with_capacity(count.min(PREALLOC_MAX) as usize);
                for _ in 0..count {
                    items.push(self.string(&what)?);
                }
                return Ok(Array::String(items));
            }
            _ => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_owned(),
                    ty: elem_ty,
                });
            }
        };
        self.ensure_count(count, width, &what)?;
        // In bounds: `ensure_count` checked count × width against the bytes left.
        let bytes = self.take(count * width, &what)?;
        fn le<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            bytes
                .chunks_exact(N)
                .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
                .collect()
        }
        Ok(match elem_ty {
            0 => Array::U8(bytes.to_vec()),
            1 => Array::I8(le(bytes, i8::from_le_bytes)),
            2 => Array::U16(le(bytes, u16::from_le_bytes)),
            3 => Array::I16(le(bytes, i16::from_le_bytes)),
            4 => Array::U32(le(bytes, u32::from_le_bytes)),
            5 => Array::I32(le(bytes, i32::from_le_bytes)),
            6 => Array::F32(le(bytes, f32::from_le_bytes)),
            7 => Array::Bool(bytes.iter().map(|&b| b != 0).collect()),
            10 => Array::U64(le(bytes, u64::from_le_bytes)),
            11 => Array::I64(le(bytes, i64::from_le_bytes)),
            _ => Array::F64(le(bytes, f64::from_le_bytes)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a small valid GGUF file: two metadata keys and one F32 tensor.
    fn tiny_file(tensor_type: u32) -> Vec<u8> {
        let mut b = Vec::new();
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(2u64.to_le_bytes()); // metadata
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "numbers");
        b.extend(9u32.to_le_bytes());
        b.extend(5u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend((-1i32).to_le_bytes());
        b.extend(7i32.to_le_bytes());
        s(&mut b, "w");
        b.extend(1u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(tensor_type.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for i in 0..32 {
            b.extend((i as f32).to_le_bytes());
        }
        b
    }

    #[test]
    fn parses_a_valid_file() {
        let bytes = tiny_file(0);
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_i64_array("numbers").unwrap(), vec![-1, 7]);
        let t = g.tensor("w").unwrap();
        let data = &bytes[t.offset as usize..(t.offset + t.size) as usize];
        assert_eq!(dequantize(t.ty, data)[31], 31.0);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = tiny_file(0);
        for len in 0..bytes.len() {
            let err = Gguf::parse(&bytes[..len]).unwrap_err();
            assert!(
                matches!(
                    err,
                    GgufError::Truncated { .. } | GgufError::TensorOutOfBounds { .. } | GgufError::BadMagic(_)
                ),
                "{len}: {err}"
            );
        }
    }

    #[test]
    fn damaged_bytes_never_panic() {
        let bytes = tiny_file(0);
        // Flip every byte to a few values: the reader must answer with Ok or a clear error.
        for i in 0..bytes.len() {
            for v in [0x00, 0xff, 0x7f, 0x80] {
                let mut damaged = bytes.clone();
                damaged[i] = v;
                let _ = Gguf::parse(&damaged);
            }
        }
    }

    #[test]
    fn unsupported_tensor_type_is_named() {
        let err = Gguf::parse(&tiny_file(12)).unwrap_err();
        assert!(err.to_string().contains("\"w\"") && err.to_string().contains("k-quant"), "{err}");
    }

    #[test]
    fn wrong_magic_and_version() {
        let mut bytes = tiny_file(0);
        bytes[0] = b'X';
        assert!(matches!(Gguf::parse(&bytes), Err(GgufError::BadMagic(_))));
        let mut bytes = tiny_file(0);
        bytes[4] = 9;
        assert!(matches!(Gguf::parse(&bytes), Err(GgufError::UnsupportedVersion(9))));
    }

    #[test]
    fn dequantizes_q4_1_q4_0_q8_0() {
        // Q4_1: d = 0.5, m = -1, nibbles j -> (j, 15 - j)
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.5).to_le_bytes());
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v = dequantize(TensorType::Q4_1, &b);
        assert_eq!(v[3], 3.0 * 0.5 - 1.0);
        assert_eq!(v[16 + 3], 12.0 * 0.5 - 1.0);
        // Q4_0 uses the same nibbles minus 8.
        let mut b0 = f16::from_f32(2.0).to_le_bytes().to_vec();
        b0.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v0 = dequantize(TensorType::Q4_0, &b0);
        assert_eq!((v0[0], v0[16]), (-16.0, 14.0));
        // Q8_0
        let mut b8 = f16::from_f32(0.25).to_le_bytes().to_vec();
        b8.extend((0..32).map(|j: i32| (j - 16) as i8 as u8));
        let v8 = dequantize(TensorType::Q8_0, &b8);
        assert_eq!((v8[0], v8[31]), (-4.0, 3.75));
    }
}
