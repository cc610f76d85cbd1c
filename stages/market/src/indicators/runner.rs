//! [`IndicatorRunner`]: the indicators SQL planned once in a DataFusion session and run on
//! one in-memory batch of whole tickers at a time.
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take};
use datafusion::arrow::datatypes::{Date32Type, SchemaRef};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::prelude::{SessionConfig, SessionContext, col};
use flag_core::schema::schema;
use flag_core::{Schema, StageError, StageResult};

use super::engine::{INPUT_TABLE, NEED_OHLCV, df_err, first_null_price};
use super::udwf;

/// A DataFusion session with the TA-Lib window functions registered and the SQL planned once:
/// each batch re-executes the same physical plan. Planning the ~25 window expressions took
/// ~13 ms a call, which made small groups (the way to bounded memory) slow.
pub struct IndicatorRunner {
    runtime: tokio::runtime::Runtime,
    ctx: SessionContext,
    plan: Arc<dyn ExecutionPlan>,
    input: Arc<InputSlot>,
    output: &'static Schema,
}

/// The table `bars`: whatever batch the runner put here when the plan executes.
#[derive(Debug)]
struct InputSlot {
    schema: SchemaRef,
    batch: Mutex<Option<RecordBatch>>,
}

impl PartitionStream for InputSlot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        // Cloned, not taken: a plan that scanned the table twice must see it twice.
        let batch = self.batch.lock().map(|b| b.clone()).unwrap_or(None);
        let stream = MemoryStream::try_new(batch.into_iter().collect(), self.schema.clone(), None)
            .expect("a memory stream without projection");
        Box::pin(stream)
    }
}

impl IndicatorRunner {
    /// `sql`: the text of `stages/market/sql/indicators.sql` (or a variant of it), planned
    /// here (a SQL error surfaces now). A batch runs as one sorted partition (no repartition,
    /// no sort; the window functions are evaluated once per ticker and partition), and
    /// [`compute_parquet`] runs groups of tickers on parallel runners.
    pub fn new(sql: &str) -> StageResult<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| StageError::io("indicators: starting the DataFusion runtime", e))?;
        let config = SessionConfig::new()
            .with_target_partitions(1)
            .with_batch_size(64 * 1024);
        let ctx = SessionContext::new_with_config(config);
        udwf::register(&ctx);
        let input = Arc::new(InputSlot {
            schema: schema("ohlcv")?.arrow(),
            batch: Mutex::new(None),
        });
        // Declared sorted by (ticker, date) (run_batch checks it or makes it so): DataFusion
        // then plans no SortExec for the windows or the final ORDER BY.
        let table = StreamingTable::try_new(
            input.schema.clone(),
            vec![input.clone() as Arc<dyn PartitionStream>],
        )
        .map_err(|e| df_err("registering the input", e))?
        .with_sort_order(vec![
            col("ticker").sort(true, false),
            col("date").sort(true, false),
        ]);
        ctx.register_table(INPUT_TABLE, Arc::new(table))
            .map_err(|e| df_err("registering the input", e))?;
        let plan = runtime.block_on(async {
            let df = ctx
                .sql(sql)
                .await
                .map_err(|e| df_err("planning the SQL", e))?;
            df.create_physical_plan()
                .await
                .map_err(|e| df_err("planning the SQL", e))
        })?;
        let output = schema("indicators")?;
        output.check(&plan.schema(), "indicators SQL output")?;
        Ok(IndicatorRunner {
            runtime,
            ctx,
            plan,
            input,
            output,
        })
    }

    /// The physical plan every batch runs, one operator a line (DataFusion's EXPLAIN form).
    pub fn plan_text(&self) -> String {
        datafusion::physical_plan::displayable(self.plan.as_ref())
            .indent(false)
            .to_string()
    }

    /// Indicators for `bars` (schema ohlcv, whole tickers: a ticker must not be split across
    /// calls). Returns one batch in schema `indicators`, sorted by ticker then date.
    pub fn run_batch(&self, bars: RecordBatch) -> StageResult<RecordBatch> {
        let batches = self.run_batches(bars)?;
        let all =
            concat_batches(&self.output.arrow(), &batches).map_err(|e| StageError::Arrow {
                context: "indicators: joining the SQL output".into(),
                source: e,
            })?;
        Ok(all)
    }

    /// As [`Self::run_batch`], in the batches the plan produced (no joining copy).
    pub fn run_batches(&self, bars: RecordBatch) -> StageResult<Vec<RecordBatch>> {
        let ohlcv = schema("ohlcv")?;
        ohlcv.check(&bars.schema(), "indicators input")?;
        if let Some((row, column)) = first_null_price(&bars) {
            return Err(StageError::Invalid(format!(
                "indicators input row {}: column '{column}' is null; {NEED_OHLCV}",
                row + 1
            )));
        }
        let bars = sorted(bars)?;
        // In the registry's schema (the table's): same columns, declared nullability.
        let bars = ohlcv.batch(bars.columns().to_vec())?;
        *self
            .input
            .batch
            .lock()
            .map_err(|_| StageError::Invalid("indicators: input slot poisoned".into()))? =
            Some(bars);
        // A fresh copy of the plan's state (its metrics) for each run: executing the same
        // nodes again appended to their metrics, which grew without bound (~50 KB a group).
        let plan =
            reset_plan_states(self.plan.clone()).map_err(|e| df_err("preparing the plan", e))?;
        let batches = self.runtime.block_on(collect(plan, self.ctx.task_ctx()));
        if let Ok(mut slot) = self.input.batch.lock() {
            *slot = None;
        }
        let batches = batches.map_err(|e| df_err("running the SQL", e))?;
        // Rebuilt in the registry's schema: same columns, declared nullability, checked nulls.
        batches
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| self.output.batch(b.columns().to_vec()))
            .collect()
    }
}

/// `bars` sorted by (ticker, date): as given when it already is (the stage's input always is),
/// else sorted here, so callers may pass any order.
fn sorted(bars: RecordBatch) -> StageResult<RecordBatch> {
    let tickers = bars.column(0).as_string::<i32>();
    let dates = bars.column(1).as_primitive::<Date32Type>();
    let in_order = (1..bars.num_rows()).all(|i| {
        let (a, b) = (tickers.value(i - 1), tickers.value(i));
        a < b || (a == b && dates.value(i - 1) <= dates.value(i))
    });
    for (column, nulls) in [
        ("ticker", tickers.null_count()),
        ("date", dates.null_count()),
    ] {
        if nulls > 0 {
            return Err(StageError::Invalid(format!(
                "indicators input: column '{column}' has {nulls} null(s)"
            )));
        }
    }
    if in_order {
        return Ok(bars);
    }
    let arrow = |e| StageError::Arrow {
        context: "indicators: sorting the input by ticker, date".into(),
        source: e,
    };
    let keys = [0, 1].map(|c| SortColumn {
        values: bars.column(c).clone(),
        options: None,
    });
    let idx = lexsort_to_indices(&keys, None).map_err(arrow)?;
    let columns = bars
        .columns()
        .iter()
        .map(|c| take(c, &idx, None))
        .collect::<Result<Vec<_>, _>>()
        .map_err(arrow)?;
    RecordBatch::try_new(bars.schema(), columns).map_err(arrow)
}
