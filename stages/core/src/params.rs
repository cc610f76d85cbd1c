//! Resolved stage params: interpolated, defaults filled, checked against the spec by the engine.
use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::NaiveDate;
use serde_json::Value;

use crate::error::{StageError, StageResult};

/// The largest starting capital a stage accepts (see [`Params::capital`]).
pub const MAX_CAPITAL: f64 = 1e15;

/// A stage's params after `${...}` interpolation and defaults. Keys are sorted so the
/// canonical encoding (and so the cache key) does not depend on YAML order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params(pub BTreeMap<String, Value>);

impl Params {
    pub fn new(map: BTreeMap<String, Value>) -> Self {
        Params(map)
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn required(&self, name: &str) -> StageResult<&Value> {
        self.get(name)
            .ok_or_else(|| StageError::param(name, "is required but not set"))
    }

    pub fn str(&self, name: &str) -> StageResult<String> {
        match self.required(name)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(type_err(name, "a string", other)),
        }
    }

    pub fn opt_str(&self, name: &str) -> StageResult<Option<String>> {
        self.get(name).map(|_| self.str(name)).transpose()
    }

    pub fn f64(&self, name: &str) -> StageResult<f64> {
        let v = self.required(name)?;
        v.as_f64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            .filter(|x: &f64| x.is_finite())
            .ok_or_else(|| type_err(name, "a finite number", v))
    }

    /// A starting capital: positive and at most [`MAX_CAPITAL`], so equity stays finite over
    /// any price path ingest accepts (prices in (1e-6, 1e12): a growth of at most 1e18).
    pub fn capital(&self, name: &str) -> StageResult<f64> {
        let c = self.f64(name)?;
        if c > 0.0 && c <= MAX_CAPITAL {
            Ok(c)
        } else {
            Err(StageError::param(
                name,
                format!("must be > 0 and at most {MAX_CAPITAL:e}, got {c:e}"),
            ))
        }
    }

    pub fn i64(&self, name: &str) -> StageResult<i64> {
        let v = self.required(name)?;
        v.as_i64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            .ok_or_else(|| type_err(name, "an integer", v))
    }

    pub fn usize(&self, name: &str) -> StageResult<usize> {
        let n = self.i64(name)?;
        usize::try_from(n).map_err(|_| StageError::param(name, format!("must be >= 0, got {n}")))
    }

    pub fn bool(&self, name: &str) -> StageResult<bool> {
        let v = self.required(name)?;
        v.as_bool()
            .or_else(|| match v.as_str() {
                Some("true") => Some(true),
                Some("false") => Some(false),
                _ => None,
            })
            .ok_or_else(|| type_err(name, "true or false", v))
    }

    pub fn date(&self, name: &str) -> StageResult<NaiveDate> {
        let s = self.str(name)?;
        NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
            .map_err(|e| StageError::param(name, format!("'{s}' is not a YYYY-MM-DD date: {e}")))
    }

    pub fn path(&self, name: &str) -> StageResult<PathBuf> {
        Ok(PathBuf::from(self.str(name)?))
    }

    /// A list of strings; a single string is accepted as a one-element list.
    pub fn str_list(&self, name: &str) -> StageResult<Vec<String>> {
        match self.required(name)? {
            Value::String(s) => Ok(vec![s.clone()]),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    other => Err(type_err(&format!("{name}[{i}]"), "a string", other)),
                })
                .collect(),
            other => Err(type_err(name, "a list of strings", other)),
        }
    }

    pub fn f64_list(&self, name: &str) -> StageResult<Vec<f64>> {
        match self.required(name)? {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_f64()
                        .ok_or_else(|| type_err(&format!("{name}[{i}]"), "a number", v))
                })
                .collect(),
            other => Err(type_err(name, "a list of numbers", other)),
        }
    }

    pub fn usize_list(&self, name: &str) -> StageResult<Vec<usize>> {
        match self.required(name)? {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| type_err(&format!("{name}[{i}]"), "a whole number >= 0", v))
                })
                .collect(),
            other => Err(type_err(name, "a list of whole numbers", other)),
        }
    }

    /// The raw JSON value, for params with a structure of their own (maps, nested lists).
    pub fn value(&self, name: &str) -> StageResult<&Value> {
        self.required(name)
    }
}

fn type_err(name: &str, want: &str, got: &Value) -> StageError {
    StageError::param(name, format!("must be {want}, got {got}"))
}
