//! Arrow column helpers and small readers shared by the stages.
use std::sync::Arc;

use flag_core::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, ListBuilder, StringArray,
    StringBuilder,
};
use flag_core::{StageError, StageResult};

pub fn utf8<S: AsRef<str>>(v: impl IntoIterator<Item = S>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(v))
}
pub fn opt_utf8(v: Vec<Option<String>>) -> ArrayRef {
    Arc::new(StringArray::from(v))
}
pub fn date32(v: Vec<i32>) -> ArrayRef {
    Arc::new(Date32Array::from(v))
}
pub fn float64(v: Vec<f64>) -> ArrayRef {
    Arc::new(Float64Array::from(v))
}
pub fn opt_float64(v: Vec<Option<f64>>) -> ArrayRef {
    Arc::new(Float64Array::from(v))
}
pub fn int64(v: Vec<i64>) -> ArrayRef {
    Arc::new(Int64Array::from(v))
}
pub fn opt_int64(v: Vec<Option<i64>>) -> ArrayRef {
    Arc::new(Int64Array::from(v))
}
pub fn boolean(v: Vec<bool>) -> ArrayRef {
    Arc::new(BooleanArray::from(v))
}
pub fn list_utf8(v: &[Vec<String>]) -> ArrayRef {
    let mut b = ListBuilder::new(StringBuilder::new());
    for row in v {
        for s in row {
            b.values().append_value(s);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

pub use flag_trading::series::column;

/// Error for a null where a value is required, naming the 1-based row.
pub fn null_err(input: &str, row: usize, name: &str) -> StageError {
    StageError::Input {
        input: input.into(),
        message: format!("row {}: column '{name}' is null", row + 1),
    }
}

/// The `tickers` param: None = every ticker of the input.
pub fn ticker_filter(p: &flag_core::Params) -> StageResult<Option<Vec<String>>> {
    p.get("tickers").map(|_| p.str_list("tickers")).transpose()
}

/// The `aliases` param: ticker -> extra names to anonymise.
pub fn aliases(
    p: &flag_core::Params,
) -> StageResult<std::collections::BTreeMap<String, Vec<String>>> {
    let mut out = std::collections::BTreeMap::new();
    let Some(v) = p.get("aliases") else {
        return Ok(out);
    };
    let obj = v.as_object().ok_or_else(|| {
        StageError::param(
            "aliases",
            format!("must be a map ticker -> [names], got {v}"),
        )
    })?;
    for (t, names) in obj {
        let list = match names {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) => a
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        StageError::param("aliases", format!("{t}: names must be strings, got {x}"))
                    })
                })
                .collect::<StageResult<Vec<_>>>()?,
            other => {
                return Err(StageError::param(
                    "aliases",
                    format!("{t}: must be a list of names, got {other}"),
                ));
            }
        };
        out.insert(t.clone(), list);
    }
    Ok(out)
}

/// Optional date param as date32 days.
pub fn opt_date(p: &flag_core::Params, name: &str) -> StageResult<Option<i32>> {
    p.get(name)
        .map(|_| p.date(name).map(flag_trading::series::to_days))
        .transpose()
}
