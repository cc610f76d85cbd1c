//! GGUF (v2/v3) reader: header, metadata, tensor table, alignment, and dequantisation to f32.
//!
//! Layout (all little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count,
//! metadata key/values, tensor infos (name, n_dims, dims[ne0 first], type, offset), padding to
//! `general.alignment` (default 32), then the tensor data. Offsets in the table are relative to
//! the start of the data section and must be aligned.
//!
//! Dequantised types: F32, F16, BF16, Q4_0, Q4_1, Q8_0. Every other GGML type (the K-quants,
//! IQ*, Q5_*, integer types, ...) is recognised in the table (so a file that holds them still
//! opens and its other tensors load) but `dequantize` on it returns
//! [`LlmError::UnsupportedType`]. Malformed input always gives an error naming the byte offset,
//! never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::error::{LlmError, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;

/// A metadata value, as typed in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Any non-negative integer value as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any numeric value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// (name, elements per block, bytes per block) of each GGML type id; `None` marks ids that
/// were removed from GGML. Ids past the end are unknown and rejected when the file opens.
const GGML_TYPES: &[Option<(&str, u64, u64)>] = &[
    Some(("F32", 1, 4)),
    Some(("F16", 1, 2)),
    Some(("Q4_0", 32, 18)),
    Some(("Q4_1", 32, 20)),
    None,
    None,
    Some(("Q5_0", 32, 22)),
    Some(("Q5_1", 32, 24)),
    Some(("Q8_0", 32, 34)),
    Some(("Q8_1", 32, 36)),
    Some(("Q2_K", 256, 84)),
    Some(("Q3_K", 256, 110)),
    Some(("Q4_K", 256, 144)),
    Some(("Q5_K", 256, 176)),
    Some(("Q6_K", 256, 210)),
    Some(("Q8_K", 256, 292)),
    Some(("IQ2_XXS", 256, 66)),
    Some(("IQ2_XS", 256, 74)),
    Some(("IQ3_XXS", 256, 98)),
    Some(("IQ1_S", 256, 50)),
    Some(("IQ4_NL", 32, 18)),
    Some(("IQ3_S", 256, 110)),
    Some(("IQ2_S", 256, 82)),
    Some(("IQ4_XS", 256, 136)),
    Some(("I8", 1, 1)),
    Some(("I16", 1, 2)),
    Some(("I32", 1, 4)),
    Some(("I64", 1, 8)),
    Some(("F64", 1, 8)),
    Some(("IQ1_M", 256, 56)),
    Some(("BF16", 1, 2)),
    None,
    None,
    None,
    Some(("TQ1_0", 256, 54)),
    Some(("TQ2_0", 256, 66)),
    None,
    None,
    None,
    Some(("MXFP4", 32, 17)),
];

pub const GGML_F32: u32 = 0;
pub const GGML_F16: u32 = 1;
pub const GGML_Q4_0: u32 = 2;
pub const GGML_Q4_1: u32 = 3;
pub const GGML_Q8_0: u32 = 8;
pub const GGML_BF16: u32 = 30;

/// Name of a GGML type id ("unknown" for ids this reader does not know).
pub fn ggml_type_name(t: u32) -> &'static str {
    match GGML_TYPES.get(t as usize) {
        Some(Some((name, _, _))) => name,
        _ => "unknown",
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the fastest-varying (row length).
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Row-major shape, outermost first (what torch expects): the reverse of `dims`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn type_name(&self) -> &'static str {
        ggml_type_name(self.ggml_type)
    }
}

/// An opened, validated GGUF file. The tensor data stays memory-mapped until dequantised.
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
    map: memmap2::Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

#[allow(unsafe_code)]
fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| LlmError::io(path, e))?;
    // SAFETY: a read-only private map of a model file that this process never writes; the
    // files are installed read-only packages or user-supplied weights that are not modified
    // while a run uses them. All reads from the map are bounds-checked below.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| LlmError::io(path, e))
}

/// Bounds-checked little-endian reader; every failure names the byte offset.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, message: impl Into<String>) -> LlmError {
        LlmError::Gguf {
            path: self.path.to_path_buf(),
            offset: self.pos as u64,
            message: message.into(),
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(self.err(format!(
                "file truncated reading {what}: need {n} bytes, {remaining} left"
            )));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let start = self.pos;
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| LlmError::Gguf {
            path: self.path.to_path_buf(),
            offset: start as u64,
            message: format!("{what} is not valid UTF-8"),
        })
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.arr(what)?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.arr(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => match self.arr::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.err(format!("{what}: invalid bool byte {b}"))),
            },
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth > 8 {
                    return Err(self.err(format!("{what}: arrays nested too deeply")));
                }
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: a larger count is a corrupt file,
                // rejected before allocating.
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(self.err(format!(
                        "{what}: array of {n} elements exceeds the file size"
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, what, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.arr(what)?)),
            t => return Err(self.err(format!("{what}: unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file: header, metadata, tensor table, alignment and that
    /// every tensor's data lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let map = map_file(path)?;
        let (version, metadata, tensors, alignment, data_offset) = parse(&map, path)?;
        let meta_index = metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// All metadata in file order.
    pub fn metadata_entries(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// Integer metadata, with an error naming the key when absent or mistyped.
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        let v = self.metadata(key).ok_or_else(|| LlmError::Metadata {
            key: key.into(),
            message: "missing".into(),
        })?;
        v.as_u64().ok_or_else(|| LlmError::Metadata {
            key: key.into(),
            message: format!("expected an unsigned integer, found {v:?}"),
        })
    }

    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        let v = self.metadata(key).ok_or_else(|| LlmError::Metadata {
            key: key.into(),
            message: "missing".into(),
        })?;
        v.as_f64().ok_or_else(|| LlmError::Metadata {
            key: key.into(),
            message: format!("expected a number, found {v:?}"),
        })
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        let v = self.metadata(key).ok_or_else(|| LlmError::Metadata {
            key: key.into(),
            message: "missing".into(),
        })?;
        v.as_str().ok_or_else(|| LlmError::Metadata {
            key: key.into(),
            message: "expected a string".into(),
        })
    }

    /// The raw bytes of a tensor's data.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| LlmError::MissingTensor(name.into()))?;
        // Bounds were checked in `open`.
        let start = (self.data_offset + t.offset) as usize;
        Ok(&self.map[start..start + t.n_bytes as usize])
    }

    /// Drops the file's pages of tensor `name` from this process's resident memory, once a
    /// loader has copied it out: with weights kept as blocks, the copies and the mapped file
    /// both counted, and loading peaked at 357 MiB for 97 MB of weights. Pages come back from
    /// the file if the tensor is read again. Best effort: an error changes nothing else.
    pub fn release(&self, name: &str) {
        let Some(t) = self.tensor_info(name) else {
            return;
        };
        let start = (self.data_offset + t.offset) as usize;
        #[allow(unsafe_code)]
        // SAFETY: MADV_DONTNEED on a read-only private file mapping this process never writes:
        // the next access reads the file's bytes again, so no reference into the map changes.
        let _ = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start,
                t.n_bytes as usize,
            )
        };
    }

    /// Dequantises a tensor to f32; returns the data and its row-major shape.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| LlmError::MissingTensor(name.into()))?;
        let bytes = self.tensor_bytes(name)?;
        let mut out = vec![0f32; t.n_elements() as usize];
        if !dequantize_into(t.ggml_type, bytes, &mut out) {
            return Err(LlmError::UnsupportedType {
                tensor: name.into(),
                ggml_type: t.ggml_type,
                name: t.type_name(),
            });
        }
        Ok((out, t.shape()))
    }

    /// Like [`dequantize`](Self::dequantize) but checks the row-major shape first.
    pub fn dequantize_shaped(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| LlmError::MissingTensor(name.into()))?;
        let shape = t.shape();
        if shape != expected {
            return Err(LlmError::Shape {
                tensor: name.into(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        Ok(self.dequantize(name)?.0)
    }
}

type Parsed = (u32, Vec<(String, GgufValue)>, Vec<TensorInfo>, u64, u64);

fn parse(buf: &[u8], path: &Path) -> Result<Parsed> {
    let mut c = Cursor { buf, pos: 0, path };
    let magic = c.arr::<4>("magic")?;
    if &magic != MAGIC {
        c.pos = 0;
        return Err(c.err(format!("bad magic {magic:02x?}, expected \"GGUF\"")));
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        c.pos = 4;
        return Err(c.err(format!(
            "unsupported GGUF version {version} (2 and 3 are read)"
        )));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    // A key/value takes at least 12 bytes and a tensor info at least 28: larger counts are
    // corrupt headers, rejected before any allocation.
    if n_kv > buf.len() as u64 / 12 || n_tensors > buf.len() as u64 / 28 {
        c.pos = 8;
        return Err(c.err(format!(
            "header counts ({n_tensors} tensors, {n_kv} metadata) exceed the file size"
        )));
    }
    let mut metadata = Vec::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key #{i}"))?;
        let ty = c.u32(&format!("type of '{key}'"))?;
        let v = c.value(ty, &format!("metadata '{key}'"), 0)?;
        metadata.push((key, v));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(c.err(format!("general.alignment {v:?} is not a power of two"))),
        },
    };
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut seen = std::collections::HashSet::new();
    for i in 0..n_tensors {
        let name = c.string(&format!("tensor #{i} name"))?;
        let n_dims = c.u32(&format!("tensor '{name}' n_dims"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(c.err(format!("tensor '{name}': {n_dims} dims (1..=4 allowed)")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&format!("tensor '{name}' dims"))?);
        }
        let ggml_type = c.u32(&format!("tensor '{name}' type"))?;
        let offset = c.u64(&format!("tensor '{name}' offset"))?;
        let Some(Some((tname, block, block_bytes))) = GGML_TYPES.get(ggml_type as usize) else {
            return Err(c.err(format!("tensor '{name}': unknown GGML type {ggml_type}")));
        };
        let n_el = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n > 0 && n < (1 << 40))
            .ok_or_else(|| c.err(format!("tensor '{name}': invalid dims {dims:?}")))?;
        if !dims[0].is_multiple_of(*block) {
            return Err(c.err(format!(
                "tensor '{name}': row length {} is not a multiple of the {tname} block size {block}",
                dims[0]
            )));
        }
        if !offset.is_multiple_of(alignment) {
            return Err(c.err(format!(
                "tensor '{name}': data offset {offset} is not aligned to {alignment}"
            )));
        }
        if !seen.insert(name.clone()) {
            return Err(c.err(format!("duplicate tensor name '{name}'")));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_bytes: n_el / block * block_bytes,
        });
    }
    let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
    for t in &tensors {
        let end = data_offset + t.offset + t.n_bytes;
        if end > buf.len() as u64 {
            return Err(LlmError::Gguf {
                path: path.to_path_buf(),
                offset: data_offset + t.offset,
                message: format!(
                    "file truncated: tensor '{}' needs bytes up to {end}, file has {}",
                    t.name,
                    buf.len()
                ),
            });
        }
    }
    Ok((version, metadata, tensors, alignment, data_offset))
}

/// Dequantises `bytes` of GGML type `ty` into `out` (whose length is the element count).
/// Returns false when the type is not supported. Large tensors are split over threads: this
/// runs for every weight at every model load.
fn dequantize_into(ty: u32, bytes: &[u8], out: &mut [f32]) -> bool {
    let (block, block_bytes): (usize, usize) = match ty {
        GGML_F32 => (1, 4),
        GGML_F16 | GGML_BF16 => (1, 2),
        GGML_Q4_0 => (32, 18),
        GGML_Q4_1 => (32, 20),
        GGML_Q8_0 => (32, 34),
        _ => return false,
    };
    debug_assert_eq!(out.len() / block * block_bytes, bytes.len());
    let n_blocks = out.len() / block;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Below ~1M elements thread start-up costs more than it saves.
    let per_thread = if out.len() < (1 << 20) || threads == 1 {
        n_blocks.max(1)
    } else {
        n_blocks.div_ceil(threads)
    };
    std::thread::scope(|s| {
        for (o, b) in out
            .chunks_mut(per_thread * block)
            .zip(bytes.chunks(per_thread * block_bytes))
        {
            s.spawn(move || dequant_blocks(ty, b, o));
        }
    });
    true
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Expands whole blocks of a supported type (see [`GgufFile::dequantize`]) into `out`; also the
/// row expansion of `quant`'s kernels, inlined there so it compiles with their CPU features.
#[inline(always)]
pub(crate) fn dequant_blocks(ty: u32, bytes: &[u8], out: &mut [f32]) {
    match ty {
        GGML_F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GGML_F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GGML_BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        // Block of 32: f16 scale d, 16 bytes of nibbles; low nibbles are elements 0..16,
        // high nibbles 16..32; x = (q - 8) * d.
        GGML_Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(18)) {
                let d = f16_at(b, 0);
                let (lo, hi) = o.split_at_mut(16);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[2..18]) {
                    *l = ((q & 0x0f) as i32 - 8) as f32 * d;
                    *h = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        // Block of 32: f16 scale d, f16 minimum m, 16 bytes of nibbles; x = q * d + m.
        GGML_Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(20)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let (lo, hi) = o.split_at_mut(16);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[4..20]) {
                    *l = (q & 0x0f) as f32 * d + m;
                    *h = (q >> 4) as f32 * d + m;
                }
            }
        }
        // Block of 32: f16 scale d, 32 signed bytes; x = q * d.
        GGML_Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (x, &q) in o.iter_mut().zip(&b[2..34]) {
                    *x = (q as i8) as f32 * d;
                }
            }
        }
        _ => unreachable!("type checked by dequantize_into"),
    }
}
