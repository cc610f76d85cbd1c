//! GGUF reader: the real SmolLM2 file's header, metadata and tensor table against the known
//! facts, dequantisation checked block by block against the raw bytes, and synthetic files for
//! every error path (truncation at every byte, bad magic, unknown/unsupported types, shape
//! mismatches, misalignment).

use std::collections::HashMap;
use std::io::Write;
use std::time::Instant;

use flag_llm::LlmError;
use flag_llm::gguf::{GgufFile, GgufValue};
use half::f16;

fn model_path() -> std::path::PathBuf {
    flag_llm::models::smollm2_gguf(None).expect("SmolLM2 GGUF must be installed (just setup)")
}

#[test]
fn real_file_header_metadata_and_tensor_table() {
    let t0 = Instant::now();
    let g = GgufFile::open(model_path()).unwrap();
    eprintln!("open: {:?}", t0.elapsed());
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.data_offset() % 32, 0);
    assert_eq!(g.metadata_entries().len(), 33);
    assert_eq!(g.meta_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.meta_u64("llama.block_count").unwrap(), 30);
    assert_eq!(g.meta_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(g.meta_u64("llama.attention.head_count").unwrap(), 9);
    assert_eq!(g.meta_u64("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(g.meta_u64("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(g.meta_u64("llama.vocab_size").unwrap(), 49152);
    assert_eq!(g.meta_f64("llama.rope.freq_base").unwrap(), 100000.0);
    let eps = g
        .meta_f64("llama.attention.layer_norm_rms_epsilon")
        .unwrap();
    assert!((eps - 1e-5).abs() < 1e-12, "eps {eps}");
    assert_eq!(g.meta_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(g.meta_str("tokenizer.ggml.pre").unwrap(), "smollm");
    let tokens = g
        .metadata("tokenizer.ggml.tokens")
        .unwrap()
        .as_array()
        .unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[1], GgufValue::String("<|im_start|>".into()));
    assert_eq!(tokens[2], GgufValue::String("<|im_end|>".into()));
    assert!(
        g.meta_str("tokenizer.chat_template")
            .unwrap()
            .contains("<|im_start|>")
    );

    let infos = g.tensor_infos();
    assert_eq!(infos.len(), 272);
    let mut by_type: HashMap<&str, usize> = HashMap::new();
    for t in infos {
        *by_type.entry(t.type_name()).or_default() += 1;
        assert_eq!(t.offset % 32, 0, "{} misaligned", t.name);
    }
    assert_eq!(by_type.get("Q4_1"), Some(&210));
    assert_eq!(by_type.get("F32"), Some(&61));
    assert_eq!(by_type.get("Q8_0"), Some(&1));
    let emb = g.tensor_info("token_embd.weight").unwrap();
    assert_eq!(emb.type_name(), "Q8_0");
    assert_eq!(emb.shape(), vec![49152, 576]);
    assert_eq!(
        g.tensor_info("blk.0.attn_k.weight").unwrap().shape(),
        vec![192, 576]
    );
    assert_eq!(
        g.tensor_info("blk.29.ffn_down.weight").unwrap().shape(),
        vec![576, 1536]
    );
    // Tied output: no separate output matrix.
    assert!(g.tensor_info("output.weight").is_none());
    // The data section ends exactly at the end of the file (last tensor + padding).
    let end = infos
        .iter()
        .map(|t| g.data_offset() + t.offset + t.n_bytes)
        .max()
        .unwrap();
    let len = std::fs::metadata(model_path()).unwrap().len();
    assert!(end <= len && len - end < 32, "data end {end}, file {len}");
}

#[test]
fn real_file_dequantisation_matches_raw_blocks() {
    let g = GgufFile::open(model_path()).unwrap();
    // Q8_0: block = f16 d, 32 x i8.
    let raw = g.tensor_bytes("token_embd.weight").unwrap();
    let t0 = Instant::now();
    let (emb, shape) = g.dequantize("token_embd.weight").unwrap();
    eprintln!(
        "dequantise Q8_0 token_embd (28.3M values): {:?}",
        t0.elapsed()
    );
    assert_eq!(shape, vec![49152, 576]);
    for blk in [0usize, 1, 12345, emb.len() / 32 - 1] {
        let b = &raw[blk * 34..blk * 34 + 34];
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        for j in 0..32 {
            assert_eq!(
                emb[blk * 32 + j],
                (b[2 + j] as i8) as f32 * d,
                "block {blk} elem {j}"
            );
        }
    }
    // Q4_1: block = f16 d, f16 m, 16 bytes (low nibbles first half, high nibbles second).
    let name = "blk.7.ffn_up.weight";
    let raw = g.tensor_bytes(name).unwrap();
    let (w, shape) = g.dequantize(name).unwrap();
    assert_eq!(shape, vec![1536, 576]);
    for blk in [0usize, 999, w.len() / 32 - 1] {
        let b = &raw[blk * 20..blk * 20 + 20];
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
        for j in 0..16 {
            assert_eq!(w[blk * 32 + j], (b[4 + j] & 15) as f32 * d + m);
            assert_eq!(w[blk * 32 + j + 16], (b[4 + j] >> 4) as f32 * d + m);
        }
    }
    // F32 norm weights are copied bit for bit.
    let raw = g.tensor_bytes("output_norm.weight").unwrap();
    let (n, _) = g.dequantize("output_norm.weight").unwrap();
    for (i, x) in n.iter().enumerate() {
        assert_eq!(x.to_le_bytes(), raw[i * 4..i * 4 + 4]);
    }
    // Whole-model dequantisation time (what every load pays).
    let t0 = Instant::now();
    let mut total = 0usize;
    for t in g.tensor_infos() {
        total += g.dequantize(&t.name).unwrap().0.len();
    }
    eprintln!("dequantise all {total} values: {:?}", t0.elapsed());
    assert!(
        total > 134_000_000 && total < 136_000_000,
        "{total} parameters"
    );
}

/// Builds GGUF files in memory: metadata and tensors with explicit types and raw data.
struct Builder {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    alignment: u64,
}

fn gstr(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Builder {
    fn new() -> Self {
        Builder {
            kv: Vec::new(),
            n_kv: 0,
            tensors: Vec::new(),
            alignment: 32,
        }
    }

    fn kv_u32(mut self, k: &str, v: u32) -> Self {
        gstr(&mut self.kv, k);
        self.kv.extend(4u32.to_le_bytes());
        self.kv.extend(v.to_le_bytes());
        self.n_kv += 1;
        self
    }

    fn kv_str(mut self, k: &str, v: &str) -> Self {
        gstr(&mut self.kv, k);
        self.kv.extend(8u32.to_le_bytes());
        gstr(&mut self.kv, v);
        self.n_kv += 1;
        self
    }

    fn kv_str_array(mut self, k: &str, v: &[&str]) -> Self {
        gstr(&mut self.kv, k);
        self.kv.extend(9u32.to_le_bytes());
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for s in v {
            gstr(&mut self.kv, s);
        }
        self.n_kv += 1;
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }

    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            gstr(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(self.alignment) * self.alignment;
        }
        while !(out.len() as u64).is_multiple_of(self.alignment) {
            out.push(0);
        }
        let base = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(base + off as usize, 0);
            out.extend(data);
        }
        out
    }
}

fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    f
}

fn f16b(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// One synthetic file with every supported type and known values.
fn sample_builder() -> Builder {
    let f32s: Vec<u8> = [1.5f32, -2.0, 0.25, 1e-3]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let f16s: Vec<u8> = [0.5f32, -1.0, 3.0, 65504.0]
        .iter()
        .flat_map(|&x| f16b(x))
        .collect();
    // Q4_0, d = 0.5: nibble q -> (q - 8) * 0.5. Byte j = low nibble j%16, high nibble 15 - j%16.
    let mut q40 = f16b(0.5).to_vec();
    q40.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    // Q4_1, d = 0.25, m = -1: q -> q * 0.25 - 1.
    let mut q41 = f16b(0.25).to_vec();
    q41.extend(f16b(-1.0));
    q41.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    // Q8_0, d = 0.125: q -> q * 0.125 for q in -16..16.
    let mut q80 = f16b(0.125).to_vec();
    q80.extend((-16i8..16).map(|q| q as u8));
    Builder::new()
        .kv_str("general.architecture", "test")
        .kv_u32("test.count", 7)
        .kv_str_array("test.words", &["a", "bc", ""])
        .tensor("f32", &[2, 2], 0, f32s)
        .tensor("f16", &[4], 1, f16s)
        .tensor("q4_0", &[32], 2, q40)
        .tensor("q4_1", &[32], 3, q41)
        .tensor("q8_0", &[32], 8, q80)
}

#[test]
fn synthetic_file_dequantises_every_supported_type() {
    let f = write(&sample_builder().build());
    let g = GgufFile::open(f.path()).unwrap();
    assert_eq!(g.metadata("test.count"), Some(&GgufValue::U32(7)));
    let words = g.metadata("test.words").unwrap().as_array().unwrap();
    assert_eq!(words.len(), 3);
    assert_eq!(words[1].as_str(), Some("bc"));
    assert_eq!(
        g.dequantize("f32").unwrap(),
        (vec![1.5, -2.0, 0.25, 1e-3], vec![2, 2])
    );
    assert_eq!(
        g.dequantize("f16").unwrap().0,
        vec![0.5, -1.0, 3.0, 65504.0]
    );
    let q40 = g.dequantize("q4_0").unwrap().0;
    let want: Vec<f32> = (0..16)
        .map(|j| (j as f32 - 8.0) * 0.5)
        .chain((0..16).map(|j| ((15 - j) as f32 - 8.0) * 0.5))
        .collect();
    assert_eq!(q40, want);
    let q41 = g.dequantize("q4_1").unwrap().0;
    let want: Vec<f32> = (0..16)
        .map(|j| j as f32 * 0.25 - 1.0)
        .chain((0..16).map(|j| (15 - j) as f32 * 0.25 - 1.0))
        .collect();
    assert_eq!(q41, want);
    let q80 = g.dequantize("q8_0").unwrap().0;
    assert_eq!(q80, (-16..16).map(|q| q as f32 * 0.125).collect::<Vec<_>>());
    assert!(matches!(
        g.dequantize("nope"),
        Err(LlmError::MissingTensor(_))
    ));
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let bytes = sample_builder().build();
    for len in 0..bytes.len() {
        let f = write(&bytes[..len]);
        match GgufFile::open(f.path()) {
            Err(LlmError::Gguf { message, .. }) => {
                assert!(
                    message.contains("truncated") || message.contains("exceed"),
                    "len {len}: {message}"
                );
            }
            Err(e) => panic!("len {len}: unexpected error {e}"),
            Ok(_) => panic!("len {len} of {} opened", bytes.len()),
        }
    }
}

fn open_err(bytes: &[u8]) -> String {
    let f = write(bytes);
    GgufFile::open(f.path()).unwrap_err().to_string()
}

#[test]
fn bad_magic_version_and_corrupt_counts() {
    let mut b = sample_builder().build();
    b[0..4].copy_from_slice(b"GGML");
    let e = open_err(&b);
    assert!(e.contains("bad magic") && e.contains("byte 0"), "{e}");

    let mut b = sample_builder().build();
    b[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(open_err(&b).contains("unsupported GGUF version 9"));

    // A metadata count far beyond what the file could hold is rejected before allocating.
    let mut b = sample_builder().build();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err(&b).contains("exceed the file size"));

    // Unknown metadata value type.
    let mut kv = Vec::new();
    gstr(&mut kv, "x");
    kv.extend(77u32.to_le_bytes());
    let mut b = Builder::new();
    b.kv = kv;
    b.n_kv = 1;
    assert!(open_err(&b.build()).contains("unknown metadata value type 77"));
}

#[test]
fn unknown_and_unsupported_tensor_types() {
    let b = Builder::new().tensor("w", &[32], 99, vec![0; 32]).build();
    let e = open_err(&b);
    assert!(e.contains("tensor 'w': unknown GGML type 99"), "{e}");

    // Q6_K (14) is a known layout (so the file opens) that this reader does not dequantise.
    let f = write(&Builder::new().tensor("k", &[256], 14, vec![0; 210]).build());
    let g = GgufFile::open(f.path()).unwrap();
    let e = g.dequantize("k").unwrap_err();
    assert!(matches!(
        e,
        LlmError::UnsupportedType {
            ggml_type: 14,
            name: "Q6_K",
            ..
        }
    ));
    assert!(
        e.to_string()
            .contains("supported: F32, F16, Q4_0, Q4_1, Q8_0"),
        "{e}"
    );
}

#[test]
fn shape_mismatches_and_misalignment() {
    // A Q4_1 row of 20 elements is not a whole number of 32-element blocks.
    let e = open_err(&Builder::new().tensor("w", &[20], 3, vec![0; 20]).build());
    assert!(
        e.contains("not a multiple of the Q4_1 block size 32"),
        "{e}"
    );

    // The loader asks for a shape; a different one in the file is a clear error.
    let f = write(&sample_builder().build());
    let g = GgufFile::open(f.path()).unwrap();
    match g.dequantize_shaped("f32", &[4, 1]) {
        Err(LlmError::Shape {
            tensor,
            expected,
            found,
        }) => {
            assert_eq!(
                (tensor.as_str(), expected, found),
                ("f32", vec![4, 1], vec![2, 2])
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(g.dequantize_shaped("f32", &[2, 2]).unwrap().len(), 4);

    // Offsets must respect the alignment.
    let mut b = sample_builder().build();
    let pos = b
        .windows(5)
        .position(|w| w == b"f32\x02\0")
        .expect("tensor entry")
        + 3
        + 4
        + 16
        + 4;
    b[pos..pos + 8].copy_from_slice(&3u64.to_le_bytes());
    assert!(open_err(&b).contains("not aligned to 32"));

    // Zero dims, too many dims.
    let e = open_err(&Builder::new().tensor("z", &[0], 0, vec![]).build());
    assert!(e.contains("invalid dims"), "{e}");
    let e = open_err(
        &Builder::new()
            .tensor("d", &[1, 1, 1, 1, 1], 0, vec![0; 4])
            .build(),
    );
    assert!(e.contains("5 dims"), "{e}");
}
