//! Grammar-constrained decoding on llguidance: the token trie is built here from the GGUF
//! vocabulary over the project's own tokenizer (no second `tokenizers` enters the build), a
//! constraint (JSON Schema, regex or Lark grammar) is compiled once per batch, and every
//! sequence of a batch gets its own matcher. The generation loop asks a matcher for the
//! allowed-token mask before each sampling step and feeds it the chosen token after.
//!
//! JSON answers are compact and canonical: no free whitespace, `", "` between items and
//! `": "` after keys (llguidance's `x-guidance` options, set here unless the schema sets its
//! own), so the model cannot spend its token budget on blank space.
use std::path::Path;
use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::Value;

use crate::error::{LlmError, Result};
use crate::tokenizer::LlmTokenizer;

/// What the answer must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON Schema (draft 2020-12 subset that llguidance supports).
    JsonSchema(Value),
    /// A regular expression the whole answer must match.
    Regex(String),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
}

impl Constraint {
    /// Reads a constraint file by its extension: `.json` is a JSON Schema, `.lark` a Lark
    /// grammar, `.regex` a regular expression (surrounding whitespace trimmed).
    pub fn from_file(path: &Path) -> Result<Constraint> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            LlmError::Invalid(format!("reading constraint {}: {e}", path.display()))
        })?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "json" => {
                let v: Value = serde_json::from_str(&text).map_err(|e| {
                    LlmError::Invalid(format!(
                        "{}:{}:{}: not JSON: {e}",
                        path.display(),
                        e.line(),
                        e.column()
                    ))
                })?;
                Ok(Constraint::JsonSchema(v))
            }
            "lark" => Ok(Constraint::Lark(text)),
            "regex" => Ok(Constraint::Regex(text.trim().to_string())),
            _ => Err(LlmError::Invalid(format!(
                "{}: a constraint file ends in .json (JSON Schema), .lark or .regex",
                path.display()
            ))),
        }
    }

    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Constraint::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Some(obj) = schema.as_object_mut() {
                    obj.entry("x-guidance").or_insert_with(|| {
                        serde_json::json!({
                            "whitespace_flexible": false,
                            "item_separator": ", ",
                            "key_separator": ": ",
                        })
                    });
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Constraint::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }
}

/// The vocabulary as llguidance sees it: raw bytes per token, control tokens marked with
/// 0xFF; tokenisation of forced text goes through the project's tokenizer.
struct VocabEnv {
    trie: TokTrie,
    tok: LlmTokenizer,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Grammar text is UTF-8; a split character falls back to the trie's greedy pass.
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tok
                .encode(text, false)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// The bytes of every token as the trie stores them (`vocab` long; ids past the tokenizer's
/// vocabulary, padding rows of the model, are empty and never allowed). Control tokens carry
/// llguidance's 0xFF marker so grammar text can never produce them.
pub fn trie_words(tok: &LlmTokenizer, vocab: usize) -> Result<Vec<Vec<u8>>> {
    let mut words = Vec::with_capacity(vocab);
    for id in 0..vocab as u32 {
        if id as usize >= tok.vocab_size() {
            words.push(Vec::new());
            continue;
        }
        let bytes = tok.token_bytes(id).ok_or_else(|| {
            LlmError::Tokenizer(format!(
                "token {id} {:?} has a character outside the byte-level alphabet",
                tok.token(id).unwrap_or("")
            ))
        })?;
        if tok.special_ids().contains(&id) {
            let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            marked.extend(bytes);
            words.push(marked);
        } else {
            words.push(bytes);
        }
    }
    Ok(words)
}

/// Compiles constraints against one model's vocabulary.
pub struct ConstraintCompiler {
    factory: ParserFactory,
    eos: u32,
}

impl std::fmt::Debug for ConstraintCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintCompiler")
            .field("eos", &self.eos)
            .finish()
    }
}

impl ConstraintCompiler {
    /// `vocab` is the model's logit width; `eos` the token that ends a finished answer.
    pub fn new(tok: &LlmTokenizer, vocab: usize, eos: u32) -> Result<Self> {
        let words = trie_words(tok, vocab)?;
        let mut info = TokRxInfo::new(vocab as u32, eos);
        info.tok_bos = tok.bos_id();
        info.tok_pad = tok.pad_id();
        info.tok_end_of_turn = Some(eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(VocabEnv {
            trie,
            tok: tok.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| LlmError::Invalid(format!("building the constraint engine: {e}")))?;
        factory.quiet();
        Ok(ConstraintCompiler { factory, eos })
    }

    /// The token bytes the trie holds for `id` (control tokens with their 0xFF marker).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.factory.tok_env().tok_trie().token(id).to_vec()
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Compiles `c`; an invalid schema or grammar is an error naming llguidance's reason.
    pub fn compile(&self, c: &Constraint) -> Result<CompiledConstraint> {
        let parser = self
            .factory
            .create_parser(c.grammar())
            .map_err(|e| LlmError::Invalid(format!("compiling the constraint: {e}")))?;
        Ok(CompiledConstraint {
            parser,
            eos: self.eos,
        })
    }
}

/// A compiled constraint; [`matcher`](Self::matcher) gives each sequence its own state.
pub struct CompiledConstraint {
    parser: TokenParser,
    eos: u32,
}

impl CompiledConstraint {
    pub fn matcher(&self) -> SequenceMatcher {
        SequenceMatcher {
            inner: Matcher::new(Ok(self.parser.deep_clone())),
            eos: self.eos,
        }
    }
}

/// What the grammar says after a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchState {
    /// More tokens are needed or allowed; the mask for the next step is ready.
    Open,
    /// The answer is complete: the grammar allows nothing but the end.
    Complete,
}

/// One sequence's grammar state.
pub struct SequenceMatcher {
    inner: Matcher,
    eos: u32,
}

impl SequenceMatcher {
    /// The tokens allowed at the next step (EOS among them when the answer may end here).
    pub fn mask(&mut self) -> std::result::Result<SimpleVob, String> {
        let m = self.inner.compute_mask().map_err(|e| e.to_string())?;
        if m.is_zero() {
            return Err("the grammar allows no further token".into());
        }
        Ok(m)
    }

    /// Advances by the chosen token; then tells whether the answer is complete.
    pub fn advance(&mut self, token: u32) -> std::result::Result<MatchState, String> {
        self.inner
            .consume_token(token)
            .map_err(|e| format!("token {token} rejected: {e}"))?;
        if self.inner.is_stopped() {
            return Ok(MatchState::Complete);
        }
        Ok(MatchState::Open)
    }

    /// Whether the only token left is the end (nothing to generate, no forward pass needed).
    pub fn only_end_allowed(mask: &SimpleVob, eos: u32) -> bool {
        mask.num_set() == 1 && mask.is_allowed(eos)
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }
}

/// The byte-level parser factory of [`TextChecker`]: one token per byte value, and an end
/// token (id 256) so the grammar can say where the answer may stop.
fn byte_factory() -> std::result::Result<&'static ParserFactory, String> {
    static FACTORY: OnceLock<std::result::Result<ParserFactory, String>> = OnceLock::new();
    FACTORY
        .get_or_init(|| {
            let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
            words.push(b"\xFF<|end|>".to_vec());
            let info = TokRxInfo::new(words.len() as u32, BYTE_END);
            let env: TokEnv = Arc::new(ByteEnv {
                trie: TokTrie::from(&info, &words),
            });
            let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
            f.quiet();
            Ok(f)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The end token of the byte-level vocabulary.
const BYTE_END: u32 = 256;

struct ByteEnv {
    trie: TokTrie,
}

impl TokenizerEnv for ByteEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        s.iter().map(|&b| TokenId::from(b)).collect()
    }

    fn tokenize_is_canonical(&self) -> bool {
        true
    }
}

/// Checks text against a constraint byte by byte, with no model vocabulary: how an answer
/// from a backend that does not enforce the constraint itself (an HTTP server) is validated,
/// and how the tokens it could have chosen at each step are told apart from those it could
/// not.
pub struct TextChecker {
    inner: Matcher,
    consumed: usize,
}

/// A copy in the same state, grammar included: compile once, then check each answer on a
/// clone of the unfed checker.
impl Clone for TextChecker {
    fn clone(&self) -> Self {
        TextChecker {
            inner: self.inner.deep_clone(),
            consumed: self.consumed,
        }
    }
}

impl TextChecker {
    pub fn new(c: &Constraint) -> Result<Self> {
        let factory = byte_factory()
            .map_err(|e| LlmError::Invalid(format!("building the byte-level checker: {e}")))?;
        let parser = factory
            .create_parser(c.grammar())
            .map_err(|e| LlmError::Invalid(format!("compiling the constraint: {e}")))?;
        Ok(TextChecker {
            inner: Matcher::new(Ok(parser)),
            consumed: 0,
        })
    }

    fn ids(bytes: &[u8]) -> Vec<TokenId> {
        bytes.iter().map(|&b| TokenId::from(b)).collect()
    }

    /// Whether `bytes` may follow what was fed so far (nothing is consumed).
    pub fn allows(&mut self, bytes: &[u8]) -> bool {
        let ids = Self::ids(bytes);
        !self.inner.is_error()
            && self
                .inner
                .validate_tokens(&ids)
                .is_ok_and(|n| n == ids.len())
    }

    /// Feeds `bytes`; an error names the byte offset (from the start of the text) where the
    /// text left the grammar.
    pub fn feed(&mut self, bytes: &[u8]) -> std::result::Result<(), String> {
        let ids = Self::ids(bytes);
        let n = self
            .inner
            .try_consume_tokens(&ids)
            .map_err(|e| format!("at byte {}: {e}", self.consumed))?;
        self.consumed += n;
        if n < ids.len() {
            return Err(format!(
                "at byte {}: {:?} is not allowed there",
                self.consumed,
                String::from_utf8_lossy(&bytes[n..n + 1])
            ));
        }
        Ok(())
    }

    /// Bytes accepted so far.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// Whether the text fed so far is a complete answer.
    pub fn is_complete(&mut self) -> bool {
        self.inner.is_stopped() || self.inner.is_accepting().unwrap_or(false) || self.allows_end()
    }

    fn allows_end(&mut self) -> bool {
        !self.inner.is_error()
            && self
                .inner
                .validate_tokens(&[BYTE_END])
                .is_ok_and(|n| n == 1)
    }
}

/// Writes the allowed tokens of `mask` as booleans (`out.len()` = the logit width).
pub fn mask_to_bools(mask: &SimpleVob, out: &mut [bool]) {
    out.iter_mut().for_each(|b| *b = false);
    let n = out.len();
    mask.iter_set_entries(|i| {
        if i < n {
            out[i] = true;
        }
    });
}
