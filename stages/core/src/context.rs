//! What a running stage sees: its params, its inputs (already verified by the engine), a
//! staging directory for its outputs, its log file, progress reporting and resources.
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;

use crate::error::{StageError, StageResult};
use crate::params::Params;
use crate::parquet_io::{read_parquet_file, write_parquet_file};
use crate::schema::{Schema, SchemaRegistry};
use crate::spec::{OutputKind, OutputSpec};

/// Reports (done, total, message) to the engine's progress bar.
pub type ProgressFn = Arc<dyn Fn(u64, u64, &str) + Send + Sync>;

/// One upstream output bound to an input.
#[derive(Debug, Clone)]
pub struct InputArtifact {
    /// `stage.output` as written in the pipeline.
    pub reference: String,
    /// Files of the artifact, in the store (read-only). One for Parquet and file outputs.
    pub files: Vec<PathBuf>,
    /// The schema the engine checked it against, if the input declares one.
    pub schema: Option<&'static str>,
}

pub struct StageContext {
    pub stage: String,
    pub params: Params,
    inputs: BTreeMap<String, Vec<InputArtifact>>,
    outputs: BTreeMap<String, OutputSpec>,
    staging: PathBuf,
    resources: BTreeMap<String, Vec<u8>>,
    log: Mutex<Option<File>>,
    progress: Option<ProgressFn>,
    progress_log: Mutex<ProgressLog>,
    written: BTreeMap<String, u64>,
}

/// How often a long stage writes a progress line into its log: the log is what a user
/// reads when the run is not on a terminal (CI, a batch job, `nohup`).
pub const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(30);

/// Throttles the progress lines of the stage log.
struct ProgressLog {
    started: Instant,
    last: Option<Instant>,
}

impl ProgressLog {
    /// The line to log for this update, if one is due: the first update, one every
    /// [`PROGRESS_LOG_EVERY`], and the last (done == total).
    fn line(&mut self, done: u64, total: u64, unit: &str, now: Instant) -> Option<String> {
        let due = match self.last {
            None => true,
            Some(t) => now.duration_since(t) >= PROGRESS_LOG_EVERY || (total > 0 && done >= total),
        };
        if !due {
            return None;
        }
        self.last = Some(now);
        let elapsed = now.duration_since(self.started);
        let mut line = format!("progress: {done}/{total} {unit}");
        if total > 0 {
            line.push_str(&format!(" ({:.1}%)", done as f64 * 100.0 / total as f64));
        }
        line.push_str(&format!(", {} elapsed", human_duration(elapsed)));
        if done > 0 && done < total {
            let eta = elapsed.mul_f64((total - done) as f64 / done as f64);
            line.push_str(&format!(", ETA {}", human_duration(eta)));
        }
        Some(line)
    }
}

/// 75 s -> "1m15s"; 3700 s -> "1h01m40s".
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

impl StageContext {
    /// Built by the engine (and by stage unit tests).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stage: impl Into<String>,
        params: Params,
        inputs: BTreeMap<String, Vec<InputArtifact>>,
        outputs: Vec<OutputSpec>,
        staging: PathBuf,
        resources: BTreeMap<String, Vec<u8>>,
        log: Option<File>,
        progress: Option<ProgressFn>,
    ) -> Self {
        StageContext {
            stage: stage.into(),
            params,
            inputs,
            outputs: outputs
                .into_iter()
                .map(|o| (o.name.to_string(), o))
                .collect(),
            staging,
            resources,
            log: Mutex::new(log),
            progress,
            progress_log: Mutex::new(ProgressLog {
                started: Instant::now(),
                last: None,
            }),
            written: BTreeMap::new(),
        }
    }

    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }

    /// Appends a line to this stage's log file in the store.
    pub fn log(&self, msg: impl AsRef<str>) {
        if let Ok(mut guard) = self.log.lock()
            && let Some(f) = guard.as_mut()
        {
            let _ = writeln!(f, "{}", msg.as_ref());
        }
    }

    /// Reports `done` of `total` units (`msg` names the unit, e.g. "decisions"): to the
    /// terminal's progress bar, and as a periodic line with the ETA in the stage log.
    pub fn progress(&self, done: u64, total: u64, msg: &str) {
        if let Some(p) = &self.progress {
            p(done, total, msg);
        }
        let line = self
            .progress_log
            .lock()
            .ok()
            .and_then(|mut l| l.line(done, total, msg, Instant::now()));
        if let Some(line) = line {
            self.log(line);
        }
    }

    /// Bytes of a fingerprinted resource file (SQL, prompt), exactly as hashed into the key.
    pub fn resource(&self, root_relative_path: &str) -> StageResult<&[u8]> {
        self.resources
            .get(root_relative_path)
            .map(Vec::as_slice)
            .ok_or_else(|| {
                StageError::Invalid(format!(
                    "resource '{root_relative_path}' is not in the stage fingerprint"
                ))
            })
    }

    pub fn resource_str(&self, root_relative_path: &str) -> StageResult<&str> {
        std::str::from_utf8(self.resource(root_relative_path)?).map_err(|e| {
            StageError::Invalid(format!("resource '{root_relative_path}' is not UTF-8: {e}"))
        })
    }

    /// True when the optional input `name` is bound.
    pub fn has_input(&self, name: &str) -> bool {
        self.inputs.get(name).is_some_and(|v| !v.is_empty())
    }

    /// The artifacts bound to input `name` (several for a `many` input).
    pub fn inputs(&self, name: &str) -> StageResult<&[InputArtifact]> {
        self.inputs
            .get(name)
            .map(Vec::as_slice)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| StageError::Input {
                input: name.to_string(),
                message: "is not bound in the pipeline".into(),
            })
    }

    /// The single artifact bound to input `name`.
    pub fn input(&self, name: &str) -> StageResult<&InputArtifact> {
        Ok(&self.inputs(name)?[0])
    }

    /// Reads input `name` (its first binding) as one batch, checked against its schema.
    pub fn read_input(&self, name: &str) -> StageResult<RecordBatch> {
        read_artifact(name, self.input(name)?)
    }

    /// Reads every binding of a `many` input, each as one batch, with its reference.
    pub fn read_inputs(&self, name: &str) -> StageResult<Vec<(String, RecordBatch)>> {
        self.inputs(name)?
            .iter()
            .map(|a| Ok((a.reference.clone(), read_artifact(name, a)?)))
            .collect()
    }

    fn output_spec(&self, name: &str) -> StageResult<&OutputSpec> {
        self.outputs.get(name).ok_or_else(|| StageError::Output {
            output: name.to_string(),
            message: format!("is not declared by stage '{}'", self.stage),
        })
    }

    /// Path to write a single-file output to (Parquet or File kinds).
    pub fn output_file(&self, name: &str) -> StageResult<PathBuf> {
        let spec = self.output_spec(name)?;
        let ext = match &spec.kind {
            OutputKind::Parquet { .. } => "parquet",
            OutputKind::File { ext } => ext,
            OutputKind::Dir => {
                return Err(StageError::Output {
                    output: name.into(),
                    message: "is a directory output; use output_dir".into(),
                });
            }
        };
        Ok(self.staging.join(format!("{name}.{ext}")))
    }

    /// Directory to write a directory output into (created).
    pub fn output_dir(&self, name: &str) -> StageResult<PathBuf> {
        let spec = self.output_spec(name)?;
        if spec.kind != OutputKind::Dir {
            return Err(StageError::Output {
                output: name.into(),
                message: "is not a directory output".into(),
            });
        }
        let dir = self.staging.join(name);
        fs::create_dir_all(&dir)
            .map_err(|e| StageError::io(format!("creating {}", dir.display()), e))?;
        Ok(dir)
    }

    /// Writes a Parquet output after checking every batch against the output's schema.
    pub fn write_parquet(&mut self, name: &str, batches: &[RecordBatch]) -> StageResult<u64> {
        let spec = self.output_spec(name)?.clone();
        let OutputKind::Parquet { schema } = spec.kind else {
            return Err(StageError::Output {
                output: name.into(),
                message: "is not a Parquet output".into(),
            });
        };
        let schema: &Schema = SchemaRegistry::global().get(schema)?;
        for b in batches {
            schema
                .check(&b.schema(), &format!("output '{name}'"))
                .map_err(|e| StageError::Output {
                    output: name.into(),
                    message: e.to_string(),
                })?;
        }
        let path = self.output_file(name)?;
        let rows = write_parquet_file(&path, schema.arrow(), batches)?;
        self.written.insert(name.to_string(), rows);
        Ok(rows)
    }

    /// Writes a whole single-file output.
    pub fn write_file(&mut self, name: &str, bytes: &[u8]) -> StageResult<()> {
        let path = self.output_file(name)?;
        fs::write(&path, bytes)
            .map_err(|e| StageError::io(format!("writing {}", path.display()), e))?;
        Ok(())
    }

    /// Row counts of the Parquet outputs written so far (for the manifest).
    pub fn rows_written(&self) -> &BTreeMap<String, u64> {
        &self.written
    }
}

fn read_artifact(input: &str, art: &InputArtifact) -> StageResult<RecordBatch> {
    let mut all = Vec::new();
    let mut schema_ref = None;
    for f in &art.files {
        let (schema, batches) = read_parquet_file(f)?;
        if let Some(name) = art.schema {
            SchemaRegistry::global()
                .get(name)?
                .check(&schema, &format!("{} ({})", art.reference, f.display()))
                .map_err(|e| StageError::Input {
                    input: input.to_string(),
                    message: e.to_string(),
                })?;
        }
        schema_ref.get_or_insert(schema);
        all.extend(batches);
    }
    let schema = schema_ref.ok_or_else(|| StageError::Input {
        input: input.into(),
        message: format!("{} has no files", art.reference),
    })?;
    concat_batches(&schema, &all).map_err(|e| StageError::Arrow {
        context: format!("input '{input}'"),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_are_throttled_and_carry_an_eta() {
        let t0 = Instant::now();
        let mut log = ProgressLog {
            started: t0,
            last: None,
        };
        let first = log
            .line(0, 100, "decisions", t0)
            .expect("first update logs");
        assert_eq!(first, "progress: 0/100 decisions (0.0%), 0s elapsed");
        assert_eq!(
            log.line(10, 100, "decisions", t0 + Duration::from_secs(5)),
            None
        );
        let at = t0 + PROGRESS_LOG_EVERY + Duration::from_secs(10);
        // 25 of 100 in 40 s: 75 more at the same rate take 120 s.
        let mid = log
            .line(25, 100, "decisions", at)
            .expect("due after the interval");
        assert_eq!(
            mid,
            "progress: 25/100 decisions (25.0%), 40s elapsed, ETA 2m00s"
        );
        let last = log
            .line(100, 100, "decisions", at + Duration::from_secs(1))
            .expect("the last update always logs");
        assert_eq!(last, "progress: 100/100 decisions (100.0%), 41s elapsed");
    }

    #[test]
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(human_duration(Duration::from_secs(59)), "59s");
        assert_eq!(human_duration(Duration::from_secs(75)), "1m15s");
        assert_eq!(human_duration(Duration::from_secs(3700)), "1h01m40s");
    }
}
