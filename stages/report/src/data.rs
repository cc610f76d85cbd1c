//! Reads the report's inputs into typed rows that remember which artifact they came from.
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use flag_core::arrow::array::{
    Array, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use flag_core::{StageContext, StageError, StageResult};

/// Index into [`Inputs::sources`].
pub type SourceId = usize;

/// One (env, split, ticker, strategy) cell of the experiment grid; ordered for output.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub env: String,
    pub split: String,
    pub ticker: String,
    pub strategy: String,
}

/// The six FinAgent columns, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Arr,
    Sr,
    Cr,
    Sor,
    Mdd,
    Vol,
}

impl MetricKind {
    pub const ALL: [MetricKind; 6] = [
        MetricKind::Arr,
        MetricKind::Sr,
        MetricKind::Cr,
        MetricKind::Sor,
        MetricKind::Mdd,
        MetricKind::Vol,
    ];

    /// Header as in FinAgent's Table 4.
    pub fn label(self) -> &'static str {
        match self {
            MetricKind::Arr => "ARR%",
            MetricKind::Sr => "SR",
            MetricKind::Cr => "CR",
            MetricKind::Sor => "SoR",
            MetricKind::Mdd => "MDD%",
            MetricKind::Vol => "VOL%",
        }
    }

    pub fn column(self) -> &'static str {
        match self {
            MetricKind::Arr => "arr",
            MetricKind::Sr => "sr",
            MetricKind::Cr => "cr",
            MetricKind::Sor => "sor",
            MetricKind::Mdd => "mdd",
            MetricKind::Vol => "vol",
        }
    }

    /// Drawdown and volatility are risks: smaller is better.
    pub fn higher_is_better(self) -> bool {
        !matches!(self, MetricKind::Mdd | MetricKind::Vol)
    }

    /// The value ranked for "best": drawdowns compare by size whatever their sign convention.
    pub fn score(self, v: f64) -> f64 {
        match self {
            MetricKind::Mdd => -v.abs(),
            MetricKind::Vol => -v,
            _ => v,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Metric {
    pub start: i32,
    pub end: i32,
    /// In [`MetricKind::ALL`] order.
    pub values: [f64; 6],
    pub source: SourceId,
}

impl Metric {
    pub fn get(&self, k: MetricKind) -> f64 {
        self.values[MetricKind::ALL.iter().position(|x| *x == k).unwrap_or(0)]
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EquityPoint {
    /// Days since 1970-01-01 (arrow Date32).
    pub date: i32,
    pub price: f64,
    pub value: f64,
}

#[derive(Debug, Clone)]
pub struct Series {
    pub points: Vec<EquityPoint>,
    pub source: SourceId,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trade {
    pub date: i32,
    pub buy: bool,
    pub price: f64,
}

#[derive(Debug, Clone)]
pub struct Trades {
    pub trades: Vec<Trade>,
    pub source: SourceId,
}

/// Closes of one ticker from one `bars` artifact, sorted by date.
#[derive(Debug, Clone)]
pub struct Bars {
    pub closes: Vec<(i32, f64)>,
    pub source: SourceId,
}

#[derive(Debug, Default)]
pub struct Inputs {
    /// Input references (`stage.output`), in binding order, each once.
    pub sources: Vec<String>,
    pub metrics: BTreeMap<Key, Metric>,
    pub equity: BTreeMap<Key, Series>,
    pub trades: BTreeMap<Key, Trades>,
    /// Per ticker, one entry per `bars` artifact holding it.
    pub bars: BTreeMap<String, Vec<Bars>>,
}

/// Typed column access on one artifact, with errors naming file, row and column.
pub(crate) struct Cols<'a> {
    pub(crate) batch: &'a RecordBatch,
    pub(crate) file: PathBuf,
}

impl<'a> Cols<'a> {
    pub(crate) fn array<T: 'static>(&self, name: &str) -> StageResult<&'a T> {
        let batch: &'a RecordBatch = self.batch;
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<T>())
            .ok_or_else(|| {
                StageError::file(
                    &self.file,
                    format!("column '{name}' is missing or has another type"),
                )
            })
    }

    pub(crate) fn null(&self, row: usize, name: &str) -> StageError {
        StageError::data(&self.file, row as u64 + 1, name, "is null")
    }

    /// A getter of column `name` read with `value`, erroring on nulls with file, row, column.
    fn getter<'s, A: Array + 'static, T: 's>(
        &'s self,
        name: &str,
        value: fn(&'a A, usize) -> T,
    ) -> StageResult<impl Fn(usize) -> StageResult<T> + 's> {
        let a: &'a A = self.array(name)?;
        let name = name.to_string();
        Ok(move |row: usize| {
            if a.is_null(row) {
                Err(self.null(row, &name))
            } else {
                Ok(value(a, row))
            }
        })
    }

    pub(crate) fn str(
        &self,
        name: &str,
    ) -> StageResult<impl Fn(usize) -> StageResult<&'a str> + '_> {
        self.getter(name, |a: &'a StringArray, i| a.value(i))
    }

    /// A nullable string column (null -> None).
    pub(crate) fn opt_str(
        &self,
        name: &str,
    ) -> StageResult<impl Fn(usize) -> Option<&'a str> + '_> {
        let a: &'a StringArray = self.array(name)?;
        Ok(move |row: usize| (!a.is_null(row)).then(|| a.value(row)))
    }

    /// A nullable float column (null -> None).
    pub(crate) fn opt_f64(&self, name: &str) -> StageResult<impl Fn(usize) -> Option<f64> + '_> {
        let a: &'a Float64Array = self.array(name)?;
        Ok(move |row: usize| (!a.is_null(row)).then(|| a.value(row)))
    }

    /// A nullable integer column (null -> None).
    pub(crate) fn opt_i64(&self, name: &str) -> StageResult<impl Fn(usize) -> Option<i64> + '_> {
        let a: &'a Int64Array = self.array(name)?;
        Ok(move |row: usize| (!a.is_null(row)).then(|| a.value(row)))
    }

    pub(crate) fn f64(&self, name: &str) -> StageResult<impl Fn(usize) -> StageResult<f64> + '_> {
        self.getter(name, |a: &Float64Array, i| a.value(i))
    }

    pub(crate) fn i64(&self, name: &str) -> StageResult<impl Fn(usize) -> StageResult<i64> + '_> {
        self.getter(name, |a: &Int64Array, i| a.value(i))
    }

    pub(crate) fn bool(&self, name: &str) -> StageResult<impl Fn(usize) -> StageResult<bool> + '_> {
        self.getter(name, |a: &BooleanArray, i| a.value(i))
    }

    pub(crate) fn date(&self, name: &str) -> StageResult<impl Fn(usize) -> StageResult<i32> + '_> {
        self.getter(name, |a: &Date32Array, i| a.value(i))
    }

    pub(crate) fn key(&self) -> StageResult<impl Fn(usize) -> StageResult<Key> + '_> {
        let (s, e, t, p) = (
            self.str("strategy")?,
            self.str("env")?,
            self.str("ticker")?,
            self.str("split")?,
        );
        Ok(move |row: usize| {
            Ok(Key {
                env: e(row)?.to_string(),
                split: p(row)?.to_string(),
                ticker: t(row)?.to_string(),
                strategy: s(row)?.to_string(),
            })
        })
    }
}

impl Inputs {
    /// Reads every bound input. A (env, split, ticker, strategy) found in two artifacts of
    /// the same input is an error: the report could not say which number it shows.
    pub fn read(ctx: &StageContext) -> StageResult<Inputs> {
        let mut inputs = Inputs::default();
        for (reference, batch, file) in read_all(ctx, "metrics")? {
            let src = inputs.source(&reference);
            inputs.add_metrics(
                &Cols {
                    batch: &batch,
                    file,
                },
                src,
            )?;
        }
        for (reference, batch, file) in read_all(ctx, "equity")? {
            let src = inputs.source(&reference);
            inputs.add_equity(
                &Cols {
                    batch: &batch,
                    file,
                },
                src,
            )?;
        }
        for (reference, batch, file) in read_all(ctx, "trades")? {
            let src = inputs.source(&reference);
            inputs.add_trades(
                &Cols {
                    batch: &batch,
                    file,
                },
                src,
            )?;
        }
        if ctx.has_input("bars") {
            for (reference, batch, file) in read_all(ctx, "bars")? {
                let src = inputs.source(&reference);
                inputs.add_bars(
                    &Cols {
                        batch: &batch,
                        file,
                    },
                    src,
                )?;
            }
        }
        Ok(inputs)
    }

    fn source(&mut self, reference: &str) -> SourceId {
        match self.sources.iter().position(|s| s == reference) {
            Some(i) => i,
            None => {
                self.sources.push(reference.to_string());
                self.sources.len() - 1
            }
        }
    }

    fn duplicate(&self, what: &str, key: &Key, a: SourceId, b: SourceId) -> StageError {
        StageError::Input {
            input: what.into(),
            message: format!(
                "strategy '{}' env '{}' ticker '{}' split '{}' appears in both {} and {}",
                key.strategy, key.env, key.ticker, key.split, self.sources[a], self.sources[b]
            ),
        }
    }

    fn add_metrics(&mut self, c: &Cols, src: SourceId) -> StageResult<()> {
        let key = c.key()?;
        let (start, end) = (c.date("start_date")?, c.date("end_date")?);
        let cols = MetricKind::ALL.map(|k| c.f64(k.column()));
        let mut getters = Vec::with_capacity(6);
        for g in cols {
            getters.push(g?);
        }
        for row in 0..c.batch.num_rows() {
            let k = key(row)?;
            let mut values = [0.0; 6];
            for (v, g) in values.iter_mut().zip(&getters) {
                *v = g(row)?;
            }
            let m = Metric {
                start: start(row)?,
                end: end(row)?,
                values,
                source: src,
            };
            if let Some(old) = self.metrics.get(&k) {
                if old.source == src {
                    return Err(StageError::data(
                        &c.file,
                        row as u64 + 1,
                        "strategy",
                        format!(
                            "second row for {} / {} / {} / {}",
                            k.strategy, k.env, k.ticker, k.split
                        ),
                    ));
                }
                return Err(self.duplicate("metrics", &k, old.source, src));
            }
            self.metrics.insert(k, m);
        }
        Ok(())
    }

    fn add_equity(&mut self, c: &Cols, src: SourceId) -> StageResult<()> {
        let key = c.key()?;
        let (date, price, value) = (c.date("date")?, c.f64("price")?, c.f64("value")?);
        let mut new: BTreeMap<Key, Vec<EquityPoint>> = BTreeMap::new();
        for row in 0..c.batch.num_rows() {
            let p = EquityPoint {
                date: date(row)?,
                price: price(row)?,
                value: value(row)?,
            };
            new.entry(key(row)?).or_default().push(p);
        }
        for (k, mut points) in new {
            if let Some(old) = self.equity.get(&k) {
                return Err(self.duplicate("equity", &k, old.source, src));
            }
            points.sort_by_key(|p| p.date);
            if let Some(w) = points.windows(2).find(|w| w[0].date == w[1].date) {
                return Err(StageError::file(
                    &c.file,
                    format!(
                        "{} / {} / {} / {}: two rows for date {}",
                        k.strategy,
                        k.env,
                        k.ticker,
                        k.split,
                        fmt_date(w[0].date)
                    ),
                ));
            }
            self.equity.insert(
                k,
                Series {
                    points,
                    source: src,
                },
            );
        }
        Ok(())
    }

    fn add_trades(&mut self, c: &Cols, src: SourceId) -> StageResult<()> {
        let key = c.key()?;
        let (date, side, price) = (c.date("date")?, c.str("side")?, c.f64("price")?);
        let mut new: BTreeMap<Key, Vec<Trade>> = BTreeMap::new();
        for row in 0..c.batch.num_rows() {
            let buy = match side(row)? {
                "BUY" => true,
                "SELL" => false,
                other => {
                    return Err(StageError::data(
                        &c.file,
                        row as u64 + 1,
                        "side",
                        format!("'{other}' is neither BUY nor SELL"),
                    ));
                }
            };
            let t = Trade {
                date: date(row)?,
                buy,
                price: price(row)?,
            };
            new.entry(key(row)?).or_default().push(t);
        }
        for (k, mut trades) in new {
            if let Some(old) = self.trades.get(&k) {
                return Err(self.duplicate("trades", &k, old.source, src));
            }
            // Stable: same-day trades keep their file order.
            trades.sort_by_key(|t| t.date);
            self.trades.insert(
                k,
                Trades {
                    trades,
                    source: src,
                },
            );
        }
        Ok(())
    }

    fn add_bars(&mut self, c: &Cols, src: SourceId) -> StageResult<()> {
        let (ticker, date, close) = (c.str("ticker")?, c.date("date")?, c.f64("close")?);
        let mut new: BTreeMap<String, Vec<(i32, f64)>> = BTreeMap::new();
        for row in 0..c.batch.num_rows() {
            new.entry(ticker(row)?.to_string())
                .or_default()
                .push((date(row)?, close(row)?));
        }
        for (t, mut closes) in new {
            closes.sort_by_key(|x| x.0);
            closes.dedup_by_key(|x| x.0);
            self.bars.entry(t).or_default().push(Bars {
                closes,
                source: src,
            });
        }
        Ok(())
    }

    /// Every requested split must exist somewhere in the metrics: a typo would otherwise
    /// give a silently empty report.
    pub fn check_splits(&self, splits: &[String]) -> StageResult<()> {
        let have: BTreeSet<&str> = self.metrics.keys().map(|k| k.split.as_str()).collect();
        for s in splits {
            if !have.contains(s.as_str()) {
                return Err(StageError::param(
                    "splits",
                    format!(
                        "split '{s}' is in no metrics input (they have: {})",
                        have.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn envs(&self) -> BTreeSet<&str> {
        self.metrics.keys().map(|k| k.env.as_str()).collect()
    }

    /// Metric rows of one env and split.
    pub fn metrics_of<'a>(
        &'a self,
        env: &'a str,
        split: &'a str,
    ) -> impl Iterator<Item = (&'a Key, &'a Metric)> + 'a {
        self.metrics
            .iter()
            .filter(move |(k, _)| k.env == env && k.split == split)
    }

    /// Closes of `ticker` between two dates from the `bars` artifact covering most of them.
    pub fn closes(&self, ticker: &str, from: i32, to: i32) -> Option<(Vec<(i32, f64)>, SourceId)> {
        let sets = self.bars.get(ticker)?;
        let in_range = |b: &Bars| -> Vec<(i32, f64)> {
            b.closes
                .iter()
                .copied()
                .filter(|(d, _)| (from..=to).contains(d))
                .collect()
        };
        sets.iter()
            .map(|b| (in_range(b), b.source))
            .filter(|(c, _)| !c.is_empty())
            // max_by_key keeps the last maximum; reversing makes ties go to the first source.
            .rev()
            .max_by_key(|(c, _)| c.len())
    }
}

/// Each binding of a `many` input, with the file path used in error messages.
pub(crate) fn read_all(
    ctx: &StageContext,
    input: &str,
) -> StageResult<Vec<(String, RecordBatch, PathBuf)>> {
    let files: Vec<PathBuf> = ctx
        .inputs(input)?
        .iter()
        .map(|a| {
            a.files
                .first()
                .cloned()
                .unwrap_or_else(|| PathBuf::from(&a.reference))
        })
        .collect();
    Ok(ctx
        .read_inputs(input)?
        .into_iter()
        .zip(files)
        .map(|((r, b), f)| (r, b, f))
        .collect())
}

/// `YYYY-MM-DD` of an arrow Date32.
pub fn fmt_date(days: i32) -> String {
    date_of(days)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| format!("day {days}"))
}

pub fn date_of(days: i32) -> Option<chrono::NaiveDate> {
    chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?
        .checked_add_signed(chrono::Duration::days(days as i64))
}
