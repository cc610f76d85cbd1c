//! The `report` stage: turns metrics, equity paths and trades into a Markdown and a
//! self-contained HTML report with FinAgent/TDQN-style tables and SVG charts.
//!
//! Every number printed comes from an input artifact; the report only formats it (and
//! derives presentation such as drawdown curves from the equity path). Output bytes depend
//! only on the inputs and params, so an unchanged upstream gives an identical report.

use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use serde_json::json;

pub mod charts;
pub mod data;
pub mod finagent;
pub mod flag_trader;
pub mod guided;
pub mod quality;
pub mod render;
pub mod stats;
pub mod tables;

/// Bumped whenever the report's bytes change for the same inputs.
const REVISION: &str = "1";
/// Schema of the ingest stage's defect report.
const INGEST_SCHEMA: &str = "ingest_report";

flag_core::stage_kinds!(
    ReportStage,
    guided::GuidedReport,
    flag_trader::FlagTraderReport,
    finagent::FinAgentReport
);

/// Resolved params of one report run.
#[derive(Debug, Clone)]
pub struct ReportParams {
    pub title: String,
    pub splits: Vec<String>,
    pub decimals: usize,
    pub sharpe_split: String,
}

impl ReportParams {
    pub fn from_params(p: &Params) -> StageResult<Self> {
        let title = p.opt_str("title")?.unwrap_or_else(|| "flag report".into());
        let splits = match p.get("splits") {
            Some(_) => p.str_list("splits")?,
            None => vec!["test".into()],
        };
        if splits.is_empty() {
            return Err(StageError::param("splits", "must name at least one split"));
        }
        let decimals = match p.get("decimals") {
            Some(_) => p.usize("decimals")?,
            None => 2,
        };
        if decimals > 8 {
            return Err(StageError::param(
                "decimals",
                format!("must be 0..=8, got {decimals}"),
            ));
        }
        let sharpe_split = p.opt_str("sharpe_split")?.unwrap_or_else(|| "test".into());
        Ok(ReportParams {
            title,
            splits,
            decimals,
            sharpe_split,
        })
    }
}

pub struct ReportStage;

impl Stage for ReportStage {
    fn kind(&self) -> &'static str {
        "report"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        ReportParams::from_params(p).map(drop)
    }

    fn spec(&self) -> StageSpec {
        StageSpec {
            doc: "Markdown + self-contained HTML report: FinAgent Table 4 and TDQN Table 6 style \
                  tables, equity/drawdown/trade charts (SVG), data quality from the ingest report",
            inputs: vec![
                InputSpec::many("metrics", "metrics", "Performance tables of every strategy"),
                InputSpec::many("equity", "equity", "Daily portfolio paths"),
                InputSpec::many("trades", "trades", "Executed trades"),
                InputSpec::many("bars", "ohlcv", "Daily bars for the price charts").optional(),
                InputSpec::many(
                    "ingest",
                    INGEST_SCHEMA,
                    "Ingest reports (defect counts per ticker and file) for the data-quality section",
                )
                .optional(),
            ],
            outputs: vec![OutputSpec::dir(
                "report",
                "report.md, report.html and charts/*.svg",
            )],
            params: vec![
                ParamSpec::with_default("title", ParamKind::Str, json!("flag report"), "Report title"),
                ParamSpec::with_default(
                    "splits",
                    ParamKind::List,
                    json!(["test"]),
                    "Splits to show, in this order (train, test)",
                ),
                ParamSpec::with_default(
                    "decimals",
                    ParamKind::Int,
                    json!(2),
                    "Decimals printed for metric values (0..=8)",
                ),
                ParamSpec::with_default(
                    "sharpe_split",
                    ParamKind::Str,
                    json!("test"),
                    "Split of the Sharpe-ratio table (TDQN Table 6 uses test)",
                ),
            ],
        }
    }

    fn fingerprint(&self, _params: &Params) -> Fingerprint {
        Fingerprint::new(format!(
            "{}@{}+r{REVISION}",
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION")
        ))
    }
}

impl flag_core::RunStage for ReportStage {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let params = ReportParams::from_params(&ctx.params)?;
        ctx.progress(0, 3, "reading inputs");
        let inputs = data::Inputs::read(ctx)?;
        inputs.check_splits(&params.splits)?;
        let quality = if ctx.has_input("ingest") {
            Some(quality::Quality::read(ctx)?)
        } else {
            None
        };
        ctx.progress(1, 3, "drawing charts");
        let report = render::build(&params, &inputs, quality.as_ref())?;
        ctx.progress(2, 3, "writing files");
        render::write_files(&ctx.output_dir("report")?, &report)?;
        ctx.log(format!(
            "report: {} tables, {} charts, {} bytes of HTML",
            report.tables,
            report.charts.len(),
            report.html.len()
        ));
        ctx.progress(3, 3, "done");
        Ok(())
    }
}
