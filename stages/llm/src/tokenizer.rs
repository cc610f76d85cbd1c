//! Tokenizer built from a GGUF file's vocabulary and merges on the `tokenizers` crate.
//!
//! Supports `tokenizer.ggml.model = "gpt2"` (byte-level BPE). The pre-tokenizer follows the
//! reference for `tokenizer.ggml.pre`: for "smollm" (and the other llama.cpp pre-types that
//! split digits) digits are isolated one by one, then the GPT-2 byte-level regex applies
//! (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`). Tokens whose
//! GGUF type is "control" (3) or "user defined" (4) are added tokens, recognised in text when
//! special-token parsing is on. Chat templates are the Jinja text in `tokenizer.chat_template`,
//! rendered with minijinja using the same whitespace options as transformers.

use std::collections::BTreeMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::error::{LlmError, Result};
use crate::gguf::{GgufFile, GgufValue};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// llama.cpp pre-tokenizer names whose regex isolates each digit before the GPT-2 pattern.
const DIGIT_SPLIT_PRE: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
];

/// One chat message for the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage::new("user", content)
    }

    pub fn system(content: impl Into<String>) -> Self {
        ChatMessage::new("system", content)
    }
}

#[derive(Clone)]
pub struct LlmTokenizer {
    /// Special tokens in the text become their ids.
    special: Tokenizer,
    /// Special tokens in the text are plain text (`encode_special_tokens`).
    plain: Tokenizer,
    tokens: Vec<String>,
    special_ids: Vec<u32>,
    /// Control and user-defined tokens: their vocabulary entry is raw text, not byte-level.
    added: Vec<bool>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl std::fmt::Debug for LlmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmTokenizer")
            .field("vocab", &self.tokens.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

fn meta_err(key: &str, message: impl Into<String>) -> LlmError {
    LlmError::Metadata {
        key: key.into(),
        message: message.into(),
    }
}

fn string_array(gguf: &GgufFile, key: &str) -> Result<Vec<String>> {
    let arr = gguf
        .metadata(key)
        .ok_or_else(|| meta_err(key, "missing"))?
        .as_array()
        .ok_or_else(|| meta_err(key, "expected an array"))?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| meta_err(key, format!("element {i} is not a string")))
        })
        .collect()
}

fn optional_id(gguf: &GgufFile, key: &str, vocab: usize) -> Result<Option<u32>> {
    match gguf.metadata(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
            _ => Err(meta_err(
                key,
                format!("{v:?} is not a token id below {vocab}"),
            )),
        },
    }
}

impl LlmTokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.meta_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(meta_err(
                "tokenizer.ggml.model",
                format!("'{model}' is not supported (only byte-level BPE 'gpt2')"),
            ));
        }
        let tokens = string_array(gguf, "tokenizer.ggml.tokens")?;
        let merges_raw = string_array(gguf, "tokenizer.ggml.merges")?;
        let types: Vec<u64> = match gguf.metadata("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(GgufValue::Array(a)) if a.len() == tokens.len() => {
                a.iter().map(|v| v.as_u64().unwrap_or(1)).collect()
            }
            Some(_) => {
                return Err(meta_err(
                    "tokenizer.ggml.token_type",
                    "not an array as long as the vocabulary",
                ));
            }
        };
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        if vocab.len() != tokens.len() {
            return Err(meta_err("tokenizer.ggml.tokens", "duplicate tokens"));
        }
        let mut merges: Merges = Vec::with_capacity(merges_raw.len());
        for (i, m) in merges_raw.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                meta_err(
                    "tokenizer.ggml.merges",
                    format!("merge {i} '{m}' is not two space-separated parts"),
                )
            })?;
            merges.push((a.to_owned(), b.to_owned()));
        }
        let unk = optional_id(gguf, "tokenizer.ggml.unknown_token_id", tokens.len())?;
        let mut builder = BPE::builder().vocab_and_merges(vocab, merges);
        if let Some(u) = unk {
            builder = builder.unk_token(tokens[u as usize].clone());
        }
        let bpe = builder
            .build()
            .map_err(|e| LlmError::Tokenizer(format!("building BPE: {e}")))?;

        let pre = gguf
            .metadata("tokenizer.ggml.pre")
            .and_then(GgufValue::as_str)
            .unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tok: PreTokenizerWrapper = if DIGIT_SPLIT_PRE.contains(&pre) {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        } else {
            byte_level.into()
        };
        let mut tok = Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(pre_tok));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        let mut special_ids = Vec::new();
        let mut added = Vec::new();
        let mut is_added = vec![false; tokens.len()];
        for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
            if *ty == TOKEN_TYPE_CONTROL || *ty == TOKEN_TYPE_USER_DEFINED {
                is_added[i] = true;
                added.push(AddedToken::from(t.clone(), *ty == TOKEN_TYPE_CONTROL));
                if *ty == TOKEN_TYPE_CONTROL {
                    special_ids.push(i as u32);
                }
            }
        }
        tok.add_special_tokens(&added);
        let mut plain = tok.clone();
        plain.set_encode_special_tokens(true);

        let add_bos = gguf
            .metadata("tokenizer.ggml.add_bos_token")
            .and_then(GgufValue::as_bool)
            .unwrap_or(false);
        Ok(LlmTokenizer {
            special: tok,
            plain,
            bos_id: optional_id(gguf, "tokenizer.ggml.bos_token_id", tokens.len())?,
            eos_id: optional_id(gguf, "tokenizer.ggml.eos_token_id", tokens.len())?,
            pad_id: optional_id(gguf, "tokenizer.ggml.padding_token_id", tokens.len())?,
            add_bos,
            chat_template: gguf
                .metadata("tokenizer.chat_template")
                .and_then(GgufValue::as_str)
                .map(str::to_owned),
            tokens,
            special_ids,
            added: is_added,
        })
    }

    /// Token ids of `text`. With `parse_special`, special-token text such as `<|im_start|>`
    /// becomes its id; otherwise it is tokenised as ordinary text. No BOS is added here (see
    /// [`add_bos`](Self::add_bos)).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tok = if parse_special {
            &self.special
        } else {
            &self.plain
        };
        let enc = tok
            .encode_fast(text, false)
            .map_err(|e| LlmError::Tokenizer(format!("encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Like [`encode`](Self::encode) but prepends BOS when the GGUF says `add_bos_token`.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend(self.encode(text, true)?);
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.tokens.len()) {
            return Err(LlmError::Tokenizer(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.tokens.len()
            )));
        }
        self.special
            .decode(ids, skip_special)
            .map_err(|e| LlmError::Tokenizer(format!("decode: {e}")))
    }

    /// Renders the GGUF chat template (Jinja, as transformers does: trim_blocks and
    /// lstrip_blocks on) with `messages`, `add_generation_prompt`, `bos_token`, `eos_token`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            LlmError::Template("the model file has no tokenizer.chat_template".into())
        })?;
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| LlmError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let msgs: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| {
                let mut map = BTreeMap::new();
                map.insert("role".to_string(), m.role.clone());
                map.insert("content".to_string(), m.content.clone());
                minijinja::Value::from(map)
            })
            .collect();
        let tok_text = |id: Option<u32>| {
            id.map(|i| self.tokens[i as usize].clone())
                .unwrap_or_default()
        };
        let ctx = minijinja::context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => tok_text(self.bos_id),
            eos_token => tok_text(self.eos_id),
        };
        env.render_str(template, ctx)
            .map_err(|e| LlmError::Template(format!("rendering: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The vocabulary entry of `id` (byte-level form, e.g. "Ġthe").
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The bytes token `id` stands for: a byte-level BPE entry mapped back through GPT-2's
    /// byte alphabet, an added (control or user-defined) token as its UTF-8 text. None for an
    /// id outside the vocabulary or a byte-level entry with a character outside the alphabet.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let piece = self.tokens.get(id as usize)?;
        if self.added[id as usize] {
            return Some(piece.as_bytes().to_vec());
        }
        piece.chars().map(byte_of_char).collect()
    }

    /// The most bytes of text one token stands for (at least 1). Byte-level BPE tokens cover
    /// exactly their bytes, so a text of `n` bytes is at least `ceil(n / max_token_bytes)`
    /// tokens: a bound on a prompt's length known before tokenizing it.
    pub fn max_token_bytes(&self) -> usize {
        (0..self.tokens.len() as u32)
            .map(|id| {
                self.token_bytes(id)
                    .map_or(self.tokens[id as usize].len(), |b| b.len())
            })
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// Whether `id` is a control or user-defined token (raw text in the vocabulary).
    pub fn is_added(&self, id: u32) -> bool {
        self.added.get(id as usize).copied().unwrap_or(false)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.special.token_to_id(token)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Ids of control tokens (`<|im_start|>`, `<|im_end|>`, ...).
    pub fn special_ids(&self) -> &[u32] {
        &self.special_ids
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}

/// GPT-2's `bytes_to_unicode` alphabet: printable Latin-1 bytes stand for themselves, the other
/// 68 bytes are shifted to U+0100.. in byte order. `[byte] -> char`.
fn byte_alphabet() -> &'static [char; 256] {
    static TABLE: std::sync::OnceLock<[char; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u32| {
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
        };
        let mut table = ['\0'; 256];
        let mut shifted = 0;
        for b in 0u32..256 {
            let code = if printable(b) {
                b
            } else {
                shifted += 1;
                255 + shifted
            };
            table[b as usize] = char::from_u32(code).expect("below U+0200");
        }
        table
    })
}

/// The byte a byte-level vocabulary character stands for (None outside the alphabet).
pub fn byte_of_char(c: char) -> Option<u8> {
    static INVERSE: std::sync::OnceLock<[Option<u8>; 0x200]> = std::sync::OnceLock::new();
    let inverse = INVERSE.get_or_init(|| {
        let mut t = [None; 0x200];
        for (b, &c) in byte_alphabet().iter().enumerate() {
            t[c as usize] = Some(b as u8);
        }
        t
    });
    inverse.get(c as usize).copied().flatten()
}

/// The character byte `b` is written as in a byte-level vocabulary (inverse of
/// [`byte_of_char`]).
pub fn char_of_byte(b: u8) -> char {
    byte_alphabet()[b as usize]
}
