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
