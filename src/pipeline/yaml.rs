//! Reading a pipeline file's YAML strictly, before anything else looks at it:
//!
//! - only a regular file is opened (a FIFO would block forever, a device never end), and
//!   at most [`MAX_BYTES`] of it;
//! - a UTF-8 byte order mark is dropped (editors on Windows write one);
//! - flow collections nested deeper than [`MAX_DEPTH`] are refused before the YAML parser
//!   sees them (the parser takes quadratic time on them: 37 s for 200 KB);
//! - a key given twice in one map is an error naming both lines (YAML parsers keep the last
//!   one silently: a second `stages:` block dropped the first);
//! - `.nan` and `.inf` are refused where they are written (a JSON value cannot hold them, so
//!   they read as null).
//!
//! serde_yaml gives no positions for keys, but it places an error raised while deserializing
//! a scalar at that scalar. So the converter raises one at the second key, and for the
//! first line parses again, stopping at the first occurrence of that key in that map.
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::error::{EngineError, Result};

/// The largest pipeline file read (the project's own are under 16 KB).
pub const MAX_BYTES: u64 = 1 << 20;
/// The deepest nesting of flow collections (`[...]`, `{...}`) accepted.
pub const MAX_DEPTH: usize = 32;

/// Reads a pipeline file: a regular file of at most [`MAX_BYTES`] bytes of UTF-8.
pub fn read_file(file: &Path) -> Result<String> {
    // Metadata before opening: opening a FIFO for reading blocks until a writer comes.
    let meta = std::fs::metadata(file)
        .map_err(|e| EngineError::io(format!("reading pipeline {}", file.display()), e))?;
    check_regular(file, &meta)?;
    let f = std::fs::File::open(file)
        .map_err(|e| EngineError::io(format!("reading pipeline {}", file.display()), e))?;
    // The file may have been swapped since: check what was opened.
    let meta = f
        .metadata()
        .map_err(|e| EngineError::io(format!("reading pipeline {}", file.display()), e))?;
    check_regular(file, &meta)?;
    let mut bytes = Vec::new();
    f.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| EngineError::io(format!("reading pipeline {}", file.display()), e))?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(too_big(file));
    }
    String::from_utf8(bytes).map_err(|e| {
        let before = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        EngineError::Pipeline {
            file: file.to_path_buf(),
            line: before.iter().filter(|&&b| b == b'\n').count() + 1,
            message: "not UTF-8 text: a pipeline file must be UTF-8".into(),
        }
    })
}

fn check_regular(file: &Path, meta: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() {
        if meta.len() > MAX_BYTES {
            return Err(too_big(file));
        }
        return Ok(());
    }
    let what = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    };
    Err(EngineError::Usage(format!(
        "{}: is {what}; a pipeline must be a regular file",
        file.display()
    )))
}

fn too_big(file: &Path) -> EngineError {
    EngineError::Usage(format!(
        "{}: larger than {} KB; a pipeline file is a small YAML file",
        file.display(),
        MAX_BYTES / 1024
    ))
}

/// The text without a leading UTF-8 byte order mark.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Refuses text a pipeline never needs and the YAML parser is slow on: more than
/// [`MAX_BYTES`], or flow collections nested deeper than [`MAX_DEPTH`] (brackets in comments
/// are not counted; those in quoted strings are, which only matters past 32 of them).
pub fn check_size_and_depth(file: &Path, text: &str) -> Result<()> {
    if text.len() as u64 > MAX_BYTES {
        return Err(too_big(file));
    }
    let mut depth = 0usize;
    for (i, line) in text.lines().enumerate() {
        let mut prev_space = true;
        for c in line.chars() {
            match c {
                '#' if prev_space => break,
                '[' | '{' => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Err(EngineError::Pipeline {
                            file: file.to_path_buf(),
                            line: i + 1,
                            message: format!(
                                "collections nested more than {MAX_DEPTH} deep; a pipeline \
                                 needs a few levels"
                            ),
                        });
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
            prev_space = c.is_whitespace();
        }
    }
    Ok(())
}

/// Why the strict parse failed.
pub enum YamlError {
    /// Not YAML (or not one document): serde_yaml's error.
    Syntax(serde_yaml::Error),
    /// `key` twice in the map at `path`.
    Duplicate {
        path: Vec<String>,
        key: String,
        first: usize,
        again: usize,
    },
    /// `.nan` / `.inf` at `path`.
    NonFinite {
        path: Vec<String>,
        value: f64,
        line: usize,
    },
}

impl YamlError {
    /// 1-based line of the error.
    pub fn line(&self) -> usize {
        match self {
            YamlError::Syntax(e) => e.location().map(|l| l.line()).unwrap_or(1),
            YamlError::Duplicate { again, .. } => *again,
            YamlError::NonFinite { line, .. } => *line,
        }
    }
}

fn show_path(path: &[String]) -> String {
    path.join(".")
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            YamlError::Syntax(e) => write!(f, "invalid YAML: {e}"),
            YamlError::Duplicate {
                path,
                key,
                first,
                again,
            } => {
                if path.is_empty() {
                    write!(f, "duplicate top-level key '{key}'")?;
                } else {
                    write!(f, "duplicate key '{key}' in '{}'", show_path(path))?;
                }
                write!(
                    f,
                    " (first at line {first}, again at line {again}): YAML would keep only the \
                     last one; remove or rename one of them"
                )
            }
            YamlError::NonFinite { path, value, .. } => {
                let spelled = if value.is_nan() {
                    ".nan"
                } else if *value > 0.0 {
                    ".inf"
                } else {
                    "-.inf"
                };
                write!(
                    f,
                    "'{}' is {spelled}, which is not a finite number; a pipeline value must be \
                     finite (quote it for the text \"{spelled}\")",
                    show_path(path)
                )
            }
        }
    }
}

/// What the converter stopped at.
enum Found {
    Duplicate(Vec<String>, String),
    /// The first occurrence of the key asked for by `Ctx::stop_at`.
    First,
    NonFinite(Vec<String>, f64),
}

struct Ctx {
    /// Stop at the first occurrence of this key in the map at this path.
    stop_at: Option<(Vec<String>, String)>,
    found: RefCell<Option<Found>>,
}

/// Parses one YAML document into a JSON value, refusing duplicate keys and non-finite
/// numbers. Otherwise the same value `serde_yaml::from_str::<serde_json::Value>` gives.
pub fn parse(text: &str) -> std::result::Result<Value, YamlError> {
    let ctx = Ctx {
        stop_at: None,
        found: RefCell::new(None),
    };
    let err = match run(text, &ctx) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let line = err.location().map(|l| l.line()).unwrap_or(1);
    match ctx.found.into_inner() {
        Some(Found::Duplicate(path, key)) => {
            let again_ctx = Ctx {
                stop_at: Some((path.clone(), key.clone())),
                found: RefCell::new(None),
            };
            let first = match run(text, &again_ctx) {
                Err(e) if matches!(*again_ctx.found.borrow(), Some(Found::First)) => {
                    e.location().map(|l| l.line()).unwrap_or(line)
                }
                _ => line,
            };
            Err(YamlError::Duplicate {
                path,
                key,
                first,
                again: line,
            })
        }
        Some(Found::NonFinite(path, value)) => Err(YamlError::NonFinite { path, value, line }),
        Some(Found::First) | None => Err(YamlError::Syntax(err)),
    }
}

fn run(text: &str, ctx: &Ctx) -> std::result::Result<Value, serde_yaml::Error> {
    ValueSeed {
        ctx,
        path: Vec::new(),
    }
    .deserialize(serde_yaml::Deserializer::from_str(text))
}

struct ValueSeed<'a> {
    ctx: &'a Ctx,
    path: Vec<String>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Value, E> {
        if !v.is_finite() {
            *self.ctx.found.borrow_mut() = Some(Found::NonFinite(self.path, v));
            return Err(E::custom("not a finite number"));
        }
        Ok(v.into())
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut out = Vec::new();
        loop {
            let mut path = self.path.clone();
            path.push(format!("[{}]", out.len()));
            match seq.next_element_seed(ValueSeed {
                ctx: self.ctx,
                path,
            })? {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        let mut seen = BTreeSet::new();
        while let Some(key) = map.next_key_seed(KeySeed {
            ctx: self.ctx,
            path: &self.path,
            seen: &seen,
        })? {
            let mut path = self.path.clone();
            path.push(key.clone());
            let v = map.next_value_seed(ValueSeed {
                ctx: self.ctx,
                path,
            })?;
            seen.insert(key.clone());
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// A map key, as text (as serde_json's own value reads YAML keys). Errors at the key itself,
/// so serde_yaml places the error on its line.
struct KeySeed<'a> {
    ctx: &'a Ctx,
    path: &'a [String],
    seen: &'a BTreeSet<String>,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = String;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> std::result::Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map key")
    }
    fn visit_str<E: de::Error>(self, k: &str) -> std::result::Result<String, E> {
        if let Some((path, key)) = &self.ctx.stop_at
            && path.as_slice() == self.path
            && key == k
        {
            *self.ctx.found.borrow_mut() = Some(Found::First);
            return Err(E::custom("first occurrence"));
        }
        if self.seen.contains(k) {
            *self.ctx.found.borrow_mut() = Some(Found::Duplicate(self.path.to_vec(), k.into()));
            return Err(E::custom(format!("duplicate key '{k}'")));
        }
        Ok(k.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dup(text: &str) -> (String, usize, usize) {
        match parse(text) {
            Err(YamlError::Duplicate {
                key, first, again, ..
            }) => (key, first, again),
            Err(e) => panic!("{e}"),
            Ok(v) => panic!("parsed: {v}"),
        }
    }

    #[test]
    fn duplicate_keys_name_both_lines() {
        assert_eq!(dup("a: 1\nb: 2\na: 3\n"), ("a".into(), 1, 3));
        assert_eq!(
            dup("s:\n  x:\n    p: 1\n    q: 2\n    p: 3\n"),
            ("p".into(), 3, 5)
        );
        assert_eq!(dup("s: {a: 1,\n  a: 2}\n"), ("a".into(), 1, 2));
        // The same key in two different maps is fine.
        assert!(parse("a: {x: 1}\nb: {x: 1}\nl: [{x: 1}, {x: 2}]\n").is_ok());
        // Quoted and plain spellings are one key.
        assert_eq!(dup("a: 1\n\"a\": 2\n"), ("a".into(), 1, 2));
    }

    #[test]
    fn values_are_what_serde_yaml_gives() {
        let text = "a: 1\nb: -2\nc: 1.5\nd: [x, \"y\", ~]\ne: {f: true}\n1: one\n";
        let want: Value = serde_yaml::from_str(text).unwrap();
        assert_eq!(parse(text).ok().unwrap(), want);
    }

    #[test]
    fn non_finite_numbers_are_refused_where_written() {
        match parse("p:\n  cost: .nan\n") {
            Err(e @ YamlError::NonFinite { .. }) => {
                assert_eq!(e.line(), 2);
                assert!(e.to_string().contains("'p.cost' is .nan"), "{e}");
            }
            _ => panic!(),
        }
        assert!(parse("p: '.nan'\n").is_ok());
    }

    #[test]
    fn depth_is_capped_before_parsing() {
        let deep = "a: ".to_string() + &"[".repeat(40) + &"]".repeat(40);
        assert!(check_size_and_depth(Path::new("f"), &deep).is_err());
        let ok = "a: [[1, 2], {b: [3]}]  # [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n";
        assert!(check_size_and_depth(Path::new("f"), ok).is_ok());
    }
}
