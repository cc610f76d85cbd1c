//! Market data stages: OHLCV and news ingest, and indicators in DataFusion SQL.

pub mod indicators;
pub mod ingest;

use flag_core::Stage;

/// Every stage kind this crate provides.
pub fn stages() -> Vec<Box<dyn Stage>> {
    let mut all = ingest::stages();
    all.extend(indicators::stages());
    all
}

/// The stage kinds of this crate with their work, for the worker process.
pub fn runners() -> Vec<Box<dyn flag_core::RunStage>> {
    let mut all = ingest::runners();
    all.extend(indicators::runners());
    all
}
