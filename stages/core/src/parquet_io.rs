//! Parquet reading and writing with fixed settings, so equal data gives equal bytes
//! (which is what lets an identical upstream rerun stop the downstream rerun).
use std::fs::File;
use std::path::Path;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::error::{StageError, StageResult};

fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by("flag".to_string())
        .build()
}

/// Writes batches (all with `schema`) to `path`, fsyncs it, and returns the row count.
pub fn write_parquet_file(
    path: &Path,
    schema: SchemaRef,
    batches: &[RecordBatch],
) -> StageResult<u64> {
    let ctx = || format!("writing {}", path.display());
    let file = File::create(path).map_err(|e| StageError::io(ctx(), e))?;
    let mut writer =
        ArrowWriter::try_new(file, schema, Some(writer_properties())).map_err(|e| {
            StageError::Parquet {
                context: ctx(),
                source: e,
            }
        })?;
    let mut rows = 0u64;
    for b in batches {
        rows += b.num_rows() as u64;
        writer.write(b).map_err(|e| StageError::Parquet {
            context: ctx(),
            source: e,
        })?;
    }
    let file = writer.into_inner().map_err(|e| StageError::Parquet {
        context: ctx(),
        source: e,
    })?;
    file.sync_all().map_err(|e| StageError::io(ctx(), e))?;
    Ok(rows)
}

/// Reads a whole Parquet file.
pub fn read_parquet_file(path: &Path) -> StageResult<(SchemaRef, Vec<RecordBatch>)> {
    let ctx = || format!("reading {}", path.display());
    let file = File::open(path).map_err(|e| StageError::io(ctx(), e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| StageError::Parquet {
            context: ctx(),
            source: e,
        })?;
    let schema = builder.schema().clone();
    let reader = builder
        .with_batch_size(64 * 1024)
        .build()
        .map_err(|e| StageError::Parquet {
            context: ctx(),
            source: e,
        })?;
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StageError::Arrow {
            context: ctx(),
            source: e,
        })?;
    Ok((schema, batches))
}
