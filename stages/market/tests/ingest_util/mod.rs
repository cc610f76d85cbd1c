//! Shared helpers for the ingest integration tests: run a stage through a real
//! `StageContext` (staging dir in a tempdir) and read back the Parquet it wrote.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use flag_core::arrow::array::{
    Array, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use flag_core::arrow::compute::concat_batches;
use flag_core::parquet_io::read_parquet_file;
use flag_core::{InputArtifact, Params, StageContext, StageResult};

/// The shared data directory: `FLAG_DATA_DIR`, else `<repo>/../shared/data`.
pub fn data_dir() -> PathBuf {
    std::env::var_os("FLAG_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

/// What a stage run left behind.
pub struct Run {
    pub dir: tempfile::TempDir,
    pub outputs: BTreeMap<String, RecordBatch>,
    pub files: BTreeMap<String, PathBuf>,
    pub log: String,
}

impl Run {
    pub fn out(&self, name: &str) -> &RecordBatch {
        &self.outputs[name]
    }
    /// An output as an input binding for a downstream stage.
    pub fn artifact(&self, name: &str, schema: &'static str) -> InputArtifact {
        InputArtifact {
            reference: format!("test.{name}"),
            files: vec![self.files[name].clone()],
            schema: Some(schema),
        }
    }
}

pub fn run_stage(
    stage: &dyn flag_core::RunStage,
    params: Params,
    inputs: BTreeMap<String, Vec<InputArtifact>>,
) -> StageResult<Run> {
    let dir = tempfile::tempdir().expect("tempdir");
    let staging = dir.path().join("staging");
    fs::create_dir_all(&staging).expect("staging dir");
    let log_path = dir.path().join("stage.log");
    let log = File::create(&log_path).expect("log file");
    let spec = stage.spec();
    let mut ctx = StageContext::new(
        stage.kind(),
        params,
        inputs,
        spec.outputs.clone(),
        staging,
        BTreeMap::new(),
        Some(log),
        None,
    );
    stage.run(&mut ctx)?;
    let mut outputs = BTreeMap::new();
    let mut files = BTreeMap::new();
    for o in &spec.outputs {
        let path = ctx.output_file(o.name)?;
        let (schema, batches) = read_parquet_file(&path)?;
        outputs.insert(
            o.name.to_string(),
            concat_batches(&schema, &batches).expect("concat"),
        );
        files.insert(o.name.to_string(), path);
    }
    drop(ctx);
    let log = fs::read_to_string(&log_path).expect("log");
    Ok(Run {
        dir,
        outputs,
        files,
        log,
    })
}

pub fn strs(b: &RecordBatch, col: &str) -> Vec<Option<String>> {
    let a = b.column_by_name(col).expect(col);
    let a = a.as_any().downcast_ref::<StringArray>().expect("utf8");
    (0..a.len())
        .map(|i| a.is_valid(i).then(|| a.value(i).to_string()))
        .collect()
}

pub fn str_col(b: &RecordBatch, col: &str) -> Vec<String> {
    strs(b, col)
        .into_iter()
        .map(|s| s.expect("non-null"))
        .collect()
}

pub fn f64s(b: &RecordBatch, col: &str) -> Vec<Option<f64>> {
    let a = b.column_by_name(col).expect(col);
    let a = a.as_any().downcast_ref::<Float64Array>().expect("float64");
    (0..a.len())
        .map(|i| a.is_valid(i).then(|| a.value(i)))
        .collect()
}

pub fn f64_col(b: &RecordBatch, col: &str) -> Vec<f64> {
    f64s(b, col)
        .into_iter()
        .map(|s| s.expect("non-null"))
        .collect()
}

pub fn i64_col(b: &RecordBatch, col: &str) -> Vec<i64> {
    let a = b.column_by_name(col).expect(col);
    let a = a.as_any().downcast_ref::<Int64Array>().expect("int64");
    a.values().to_vec()
}

pub fn dates(b: &RecordBatch, col: &str) -> Vec<Option<NaiveDate>> {
    let a = b.column_by_name(col).expect(col);
    let a = a.as_any().downcast_ref::<Date32Array>().expect("date32");
    (0..a.len())
        .map(|i| a.is_valid(i).then(|| a.value_as_date(i).expect("date")))
        .collect()
}

pub fn date_col(b: &RecordBatch, col: &str) -> Vec<NaiveDate> {
    dates(b, col)
        .into_iter()
        .map(|s| s.expect("non-null"))
        .collect()
}

pub fn ts_col(b: &RecordBatch, col: &str) -> Vec<chrono::DateTime<chrono::Utc>> {
    let a = b.column_by_name(col).expect(col);
    let a = a
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .expect("timestamp");
    a.values()
        .iter()
        .map(|&us| chrono::DateTime::from_timestamp_micros(us).expect("ts"))
        .collect()
}

pub fn ymd(s: &str) -> NaiveDate {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("date")
}
