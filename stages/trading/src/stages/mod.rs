//! The stage kinds of this crate: `baselines`, `metrics` and `finagent_tools`.
use std::collections::BTreeMap;
use std::sync::Arc;

use flag_core::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, StringArray,
};
use flag_core::{ParamKind, ParamSpec, Params, StageError, StageResult};
use serde_json::{Value, json};

use crate::backtest::{EnvKind, EnvSettings};

pub mod baselines;
pub mod finagent_tools;
pub mod metrics;

/// The four split dates every backtesting stage (baselines, ddqn, ...) takes.
pub fn split_date_params() -> [ParamSpec; 4] {
    [
        ParamSpec::required(
            "train_start",
            ParamKind::Date,
            "First day of the train split",
        ),
        ParamSpec::required("train_end", ParamKind::Date, "Last day of the train split"),
        ParamSpec::required("test_start", ParamKind::Date, "First day of the test split"),
        ParamSpec::required("test_end", ParamKind::Date, "Last day of the test split"),
    ]
}

/// The environment params every trading stage takes: capital, cost and the TDQN ε.
pub fn env_params() -> [ParamSpec; 3] {
    [
        ParamSpec::with_default(
            "initial_capital",
            ParamKind::Float,
            json!(100000.0),
            "Capital at the start of each split",
        ),
        ParamSpec::with_default(
            "cost",
            ParamKind::Float,
            json!(0.001),
            "Transaction cost rate (0.001 = 0.1 %)",
        ),
        ParamSpec::with_default(
            "epsilon",
            ParamKind::Float,
            json!(0.1),
            "TDQN short-exposure price move",
        ),
    ]
}

/// Reads and validates [`env_params`] for environment `kind`.
pub fn env_settings(p: &Params, kind: EnvKind) -> StageResult<EnvSettings> {
    let initial_capital = p.capital("initial_capital")?;
    let cost = p.f64("cost")?;
    if !(0.0..1.0).contains(&cost) {
        return Err(StageError::param(
            "cost",
            format!("must be in [0, 1), got {cost}"),
        ));
    }
    let epsilon = p.f64("epsilon")?;
    if epsilon <= 0.0 {
        return Err(StageError::param("epsilon", "must be > 0"));
    }
    Ok(EnvSettings {
        kind,
        initial_capital,
        cost,
        epsilon,
    })
}

pub(crate) const VERSION: &str = concat!(env!("CARGO_PKG_NAME"), "@", env!("CARGO_PKG_VERSION"));

/// Periods per year for annualisation: a default and per-ticker overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct PeriodsPerYear {
    pub default: i64,
    pub overrides: BTreeMap<String, i64>,
}

impl PeriodsPerYear {
    /// Reads param `name`: an integer (`252`) or a map (`{default: 252, ETH: 365}`; a map
    /// without `default` keeps 252).
    pub fn from_params(params: &Params, name: &str) -> StageResult<Self> {
        let positive = |key: &str, v: &Value| -> StageResult<i64> {
            v.as_i64().filter(|&n| n > 0).ok_or_else(|| {
                StageError::param(name, format!("{key}: must be a whole number > 0, got {v}"))
            })
        };
        let mut out = PeriodsPerYear {
            default: 252,
            overrides: BTreeMap::new(),
        };
        match params.get(name) {
            None => {}
            Some(Value::Object(map)) => {
                for (k, v) in map {
                    if k == "default" {
                        out.default = positive(k, v)?;
                    } else {
                        out.overrides.insert(k.clone(), positive(k, v)?);
                    }
                }
            }
            Some(v) => out.default = positive("value", v)?,
        }
        Ok(out)
    }

    pub fn for_ticker(&self, ticker: &str) -> i64 {
        self.overrides.get(ticker).copied().unwrap_or(self.default)
    }
}

pub(crate) fn utf8<S: AsRef<str>>(v: impl IntoIterator<Item = S>) -> ArrayRef {
    // Collected first: arrow needs an exact length, which flat_map cannot report.
    let v: Vec<S> = v.into_iter().collect();
    Arc::new(StringArray::from_iter_values(v))
}
pub(crate) fn date32(v: Vec<i32>) -> ArrayRef {
    Arc::new(Date32Array::from(v))
}
pub(crate) fn float64(v: Vec<f64>) -> ArrayRef {
    Arc::new(Float64Array::from(v))
}
pub(crate) fn int64(v: Vec<i64>) -> ArrayRef {
    Arc::new(Int64Array::from(v))
}
pub(crate) fn boolean(v: Vec<bool>) -> ArrayRef {
    Arc::new(BooleanArray::from(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: Value) -> Params {
        Params::new([("periods_per_year".to_string(), v)].into_iter().collect())
    }

    #[test]
    fn periods_per_year_forms() {
        let p = PeriodsPerYear::from_params(&Params::default(), "periods_per_year").unwrap();
        assert_eq!(p.for_ticker("AAPL"), 252);
        let p = PeriodsPerYear::from_params(&params(serde_json::json!(365)), "periods_per_year")
            .unwrap();
        assert_eq!(p.for_ticker("ETH"), 365);
        let p = PeriodsPerYear::from_params(
            &params(serde_json::json!({"ETH": 365})),
            "periods_per_year",
        )
        .unwrap();
        assert_eq!((p.for_ticker("ETH"), p.for_ticker("AAPL")), (365, 252));
        let e =
            PeriodsPerYear::from_params(&params(serde_json::json!({"ETH": 0})), "periods_per_year")
                .unwrap_err();
        assert_eq!(
            e.to_string(),
            "param 'periods_per_year': ETH: must be a whole number > 0, got 0"
        );
    }

    #[test]
    fn env_settings_are_validated_by_name() {
        let with = |name: &str, v: Value| {
            let mut m: BTreeMap<String, Value> = env_params()
                .iter()
                .map(|s| (s.name.to_string(), s.default.clone().unwrap()))
                .collect();
            m.insert(name.to_string(), v);
            env_settings(&Params::new(m), EnvKind::Tdqn)
        };
        let ok = with("cost", json!(0.002)).unwrap();
        assert_eq!(
            (ok.initial_capital, ok.cost, ok.epsilon),
            (100000.0, 0.002, 0.1)
        );
        for (name, bad) in [
            ("initial_capital", json!(0.0)),
            ("cost", json!(1.0)),
            ("epsilon", json!(-0.1)),
        ] {
            let e = with(name, bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("param '{name}'")), "{e}");
        }
    }
}
