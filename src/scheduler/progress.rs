//! indicatif progress: one overall bar and one bar per running stage. Hidden when stderr is
//! not a terminal (CI, tests, --json), where the per-stage lines are the whole story.
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::StageReport;

pub struct Progress {
    multi: MultiProgress,
    overall: ProgressBar,
    enabled: bool,
}

#[derive(Clone)]
pub struct StageBar(Option<ProgressBar>);

impl StageBar {
    pub fn update(&self, done: u64, total: u64, msg: &str) {
        if let Some(b) = &self.0 {
            if total > 0 {
                if b.length() != Some(total) {
                    b.set_length(total);
                    b.set_style(
                        ProgressStyle::with_template(
                            "  {prefix:>18} [{bar:30}] {pos}/{len} {msg} {elapsed} ETA {eta}",
                        )
                        .unwrap()
                        .progress_chars("=> "),
                    );
                }
                b.set_position(done);
            }
            b.set_message(msg.to_string());
        }
    }
    pub fn done(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl Progress {
    pub fn new(enabled: bool) -> Self {
        let enabled = enabled && std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if enabled {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(
            ProgressStyle::with_template("{prefix:>20} [{bar:30}] {pos}/{len} stages {elapsed}")
                .unwrap()
                .progress_chars("##-"),
        );
        overall.set_prefix("pipeline");
        Progress {
            multi,
            overall,
            enabled,
        }
    }

    pub fn set_total(&self, n: u64) {
        self.overall.set_length(n);
    }

    pub fn stage_bar(&self, stage: &str) -> StageBar {
        if !self.enabled {
            return StageBar(None);
        }
        let b = self.multi.add(ProgressBar::new_spinner());
        b.set_style(
            ProgressStyle::with_template("  {prefix:>18} {spinner} {elapsed} {msg}").unwrap(),
        );
        b.set_prefix(stage.to_string());
        b.enable_steady_tick(Duration::from_millis(120));
        StageBar(Some(b))
    }

    pub fn finish_stage(&self, _r: &StageReport) {
        self.overall.inc(1);
    }

    /// Prints a line above the bars (or plainly when they are hidden).
    pub fn println(&self, line: &str) {
        self.multi.suspend(|| println!("{line}"));
    }

    pub fn warn(&self, line: &str) {
        self.multi.suspend(|| eprintln!("warning: {line}"));
    }

    pub fn finish(&self) {
        self.overall.finish_and_clear();
    }
}
