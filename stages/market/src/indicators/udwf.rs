//! The recursive indicators as DataFusion user-defined window functions, so the SQL can say
//! `ta_ema(close, 12) OVER (PARTITION BY ticker ORDER BY date)`. Each one sees a whole
//! partition (one ticker, in date order) at once and runs a kernel from [`super::talib`].
//!
//! | SQL                               | TA-Lib                      |
//! |-----------------------------------|-----------------------------|
//! | `ta_ema(x, n)`                    | `EMA(x, n)`                 |
//! | `ta_macd_line(x, fast, slow)`     | `MACD` line before the signal trim |
//! | `ta_rsi(x, n)`                    | `RSI(x, n)`                 |
//! | `ta_atr(high, low, close, n)`     | `ATR(high, low, close, n)`  |
//! | `ta_macd_signal(x, fast, slow, signal)` | `MACD` signal         |
//! | `ta_stoch_k(high, low, close, fastk, slowk, slowd)` | `STOCH` slow %K (EMA smoothing) |
//! | `ta_stoch_d(high, low, close, fastk, slowk, slowd)` | `STOCH` slow %D (EMA smoothing) |
//! | `ta_sma(x, n)`, `ta_stddev(x, n)` | `SMA`, `STDDEV(x, n, 1)`    |
//! | `ta_sum`, `ta_max`, `ta_min`, `ta_stddev_samp`, `ta_zscore` (x, n) | rolling, see [`super::rolling`] |
//!
//! Periods must be integer literals >= 2. Every function is evaluated once per partition
//! (`evaluate_all`), never row by row.
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Float64Type};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::function::{PartitionEvaluatorArgs, WindowUDFFieldArgs};
use datafusion::logical_expr::{
    PartitionEvaluator, Signature, Volatility, WindowUDF, WindowUDFImpl,
};
use datafusion::physical_expr::expressions::Literal;
use datafusion::prelude::SessionContext;

use super::rolling::{self, Stat};
use super::talib;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Ema,
    MacdLine,
    MacdSignal,
    Rsi,
    Atr,
    StochK,
    StochD,
    Rolling(Stat),
}

const KINDS: [Kind; 14] = [
    Kind::Ema,
    Kind::MacdLine,
    Kind::MacdSignal,
    Kind::Rsi,
    Kind::Atr,
    Kind::StochK,
    Kind::StochD,
    Kind::Rolling(Stat::Mean),
    Kind::Rolling(Stat::Sum),
    Kind::Rolling(Stat::StdPop),
    Kind::Rolling(Stat::StdSamp),
    Kind::Rolling(Stat::Max),
    Kind::Rolling(Stat::Min),
    Kind::Rolling(Stat::ZScore),
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ema => "ta_ema",
            Kind::MacdLine => "ta_macd_line",
            Kind::MacdSignal => "ta_macd_signal",
            Kind::Rsi => "ta_rsi",
            Kind::Atr => "ta_atr",
            Kind::StochK => "ta_stoch_k",
            Kind::StochD => "ta_stoch_d",
            Kind::Rolling(Stat::Mean) => "ta_sma",
            Kind::Rolling(Stat::Sum) => "ta_sum",
            Kind::Rolling(Stat::StdPop) => "ta_stddev",
            Kind::Rolling(Stat::StdSamp) => "ta_stddev_samp",
            Kind::Rolling(Stat::Max) => "ta_max",
            Kind::Rolling(Stat::Min) => "ta_min",
            Kind::Rolling(Stat::ZScore) => "ta_zscore",
        }
    }

    /// (number of Float64 series, number of integer periods)
    fn arity(self) -> (usize, usize) {
        match self {
            Kind::Ema | Kind::Rsi | Kind::Rolling(_) => (1, 1),
            Kind::MacdLine => (1, 2),
            Kind::MacdSignal => (1, 3),
            Kind::Atr => (3, 1),
            Kind::StochK | Kind::StochD => (3, 3),
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct TaWindow {
    kind: Kind,
    signature: Signature,
}

impl TaWindow {
    fn new(kind: Kind) -> Self {
        let (series, periods) = kind.arity();
        let mut types = vec![DataType::Float64; series];
        types.extend(std::iter::repeat_n(DataType::Int64, periods));
        TaWindow {
            kind,
            signature: Signature::exact(types, Volatility::Immutable),
        }
    }
}

impl WindowUDFImpl for TaWindow {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn partition_evaluator(
        &self,
        args: PartitionEvaluatorArgs,
    ) -> Result<Box<dyn PartitionEvaluator>> {
        let (series, periods) = self.kind.arity();
        let exprs = args.input_exprs();
        if exprs.len() != series + periods {
            return plan_err!(
                "{} takes {} arguments, got {}",
                self.name(),
                series + periods,
                exprs.len()
            );
        }
        let mut values = Vec::with_capacity(periods);
        for (i, e) in exprs[series..].iter().enumerate() {
            let period = match e.downcast_ref::<Literal>().map(Literal::value) {
                Some(&ScalarValue::Int64(Some(p))) if p >= 2 => p as usize,
                _ => {
                    return plan_err!(
                        "{}: argument {} must be an integer literal >= 2, got {e}",
                        self.name(),
                        series + i + 1
                    );
                }
            };
            values.push(period);
        }
        Ok(Box::new(TaEvaluator {
            kind: self.kind,
            periods: values,
        }))
    }

    fn field(&self, field_args: WindowUDFFieldArgs) -> Result<FieldRef> {
        Ok(Arc::new(Field::new(
            field_args.name(),
            DataType::Float64,
            true,
        )))
    }
}

#[derive(Debug)]
struct TaEvaluator {
    kind: Kind,
    periods: Vec<usize>,
}

fn to_options(a: &ArrayRef) -> Result<Vec<Option<f64>>> {
    match a.as_primitive_opt::<Float64Type>() {
        Some(a) => Ok(a.iter().collect()),
        None => exec_err!("expected a Float64 input, got {}", a.data_type()),
    }
}

impl PartitionEvaluator for TaEvaluator {
    fn evaluate_all(&mut self, values: &[ArrayRef], num_rows: usize) -> Result<ArrayRef> {
        let (series, _) = self.kind.arity();
        if values.len() < series {
            return exec_err!(
                "{}: {} inputs, expected {series}",
                self.kind.name(),
                values.len()
            );
        }
        let p = &self.periods;
        if let Kind::Rolling(stat) = self.kind {
            let Some(x) = values[0].as_primitive_opt::<Float64Type>() else {
                return exec_err!("expected a Float64 input, got {}", values[0].data_type());
            };
            return Ok(Arc::new(rolling::rolling(x, p[0], stat)));
        }
        let x = values[..series]
            .iter()
            .map(to_options)
            .collect::<Result<Vec<_>>>()?;
        let out = match self.kind {
            Kind::Ema => talib::ema(&x[0], p[0]),
            Kind::MacdLine => talib::macd_line(&x[0], p[0], p[1]),
            Kind::MacdSignal => talib::macd_signal(&x[0], p[0], p[1], p[2]),
            Kind::Rsi => talib::rsi(&x[0], p[0]),
            Kind::Atr => talib::atr(&x[0], &x[1], &x[2], p[0]),
            Kind::StochK => talib::stoch(&x[0], &x[1], &x[2], p[0], p[1], p[2]).0,
            Kind::StochD => talib::stoch(&x[0], &x[1], &x[2], p[0], p[1], p[2]).1,
            Kind::Rolling(_) => unreachable!("handled above"),
        };
        debug_assert_eq!(out.len(), num_rows);
        Ok(Arc::new(Float64Array::from(out)))
    }
}

/// Registers the functions of the module doc on `ctx`.
pub fn register(ctx: &SessionContext) {
    for kind in KINDS {
        ctx.register_udwf(WindowUDF::from(TaWindow::new(kind)));
    }
}
