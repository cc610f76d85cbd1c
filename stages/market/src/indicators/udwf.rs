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
//!
//! Periods must be integer literals >= 2.
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

use super::talib;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Ema,
    MacdLine,
    Rsi,
    Atr,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ema => "ta_ema",
            Kind::MacdLine => "ta_macd_line",
            Kind::Rsi => "ta_rsi",
            Kind::Atr => "ta_atr",
        }
    }

    /// (number of Float64 series, number of integer periods)
    fn arity(self) -> (usize, usize) {
        match self {
            Kind::Ema | Kind::Rsi => (1, 1),
            Kind::MacdLine => (1, 2),
            Kind::Atr => (3, 1),
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
        let x = values[..series]
            .iter()
            .map(to_options)
            .collect::<Result<Vec<_>>>()?;
        let p = &self.periods;
        let out = match self.kind {
            Kind::Ema => talib::ema(&x[0], p[0]),
            Kind::MacdLine => talib::macd_line(&x[0], p[0], p[1]),
            Kind::Rsi => talib::rsi(&x[0], p[0]),
            Kind::Atr => talib::atr(&x[0], &x[1], &x[2], p[0]),
        };
        debug_assert_eq!(out.len(), num_rows);
        Ok(Arc::new(Float64Array::from(out)))
    }
}

/// Registers `ta_ema`, `ta_macd_line`, `ta_rsi` and `ta_atr` on `ctx`.
pub fn register(ctx: &SessionContext) {
    for kind in [Kind::Ema, Kind::MacdLine, Kind::Rsi, Kind::Atr] {
        ctx.register_udwf(WindowUDF::from(TaWindow::new(kind)));
    }
}
