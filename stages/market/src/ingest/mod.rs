//! Ingest stages: raw vendor files in, typed and checked tables out.
//!
//! - `ingest_ohlcv` ([`ohlcv`]): daily bars (schema `ohlcv`) and a defect report (schema
//!   `ingest_report`) from TDQN, yfinance, classic Yahoo and CoinGecko files, and the
//!   close-only InvestorBench JSON files ([`investorbench`]).
//! - `ingest_news` ([`news`]): news items (schema `news`) from stocknewsapi, gnews and
//!   CryptoTrade files, each tagged with the first trading date it may influence.

pub mod investorbench;
pub mod news;
pub mod news_formats;
pub mod ohlcv;
pub mod ohlcv_formats;
pub mod util;

pub use news::IngestNews;
pub use ohlcv::IngestOhlcv;

flag_core::stage_kinds!(IngestOhlcv, IngestNews);
