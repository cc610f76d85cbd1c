//! What a running stage sees: its params, its inputs (already verified by the engine), a
//! staging directory for its outputs, its log file, progress reporting and resources.
use std::collections::{BTreeMap, VecDeque};
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
    log: Mutex<Option<StageLog>>,
    progress: Option<ProgressFn>,
    progress_log: Mutex<ProgressLog>,
    written: BTreeMap<String, u64>,
}

/// The most of a stage log kept from its start, and from its end: a stage that logs without
/// bound (a huge error, a loop) gives a log of at most about the sum of the two, with a line
/// where the middle was left out saying how much.
pub const LOG_HEAD_BYTES: usize = 1 << 20;
pub const LOG_TAIL_BYTES: usize = 1 << 20;

/// A stage's log file, capped: lines go straight to the file until [`LOG_HEAD_BYTES`] are
/// written; after that the latest lines (at most [`LOG_TAIL_BYTES`], one line at most a
/// quarter of that) are held and written, after a line saying how much was dropped, when the
/// log is closed (the context dropped). A log that never reaches the head cap is the plain
/// sequence of its lines.
struct StageLog {
    file: File,
    head_left: usize,
    tail_max: usize,
    tail: VecDeque<String>,
    tail_bytes: usize,
    dropped_lines: u64,
    dropped_bytes: u64,
    /// Lines were cut to fit (bytes left out of them).
    cut_bytes: u64,
}

impl StageLog {
    fn new(file: File, head_max: usize, tail_max: usize) -> StageLog {
        StageLog {
            file,
            head_left: head_max,
            tail_max,
            tail: VecDeque::new(),
            tail_bytes: 0,
            dropped_lines: 0,
            dropped_bytes: 0,
            cut_bytes: 0,
        }
    }

    fn line(&mut self, msg: &str) {
        let len = msg.len() + 1;
        if len <= self.head_left {
            self.head_left -= len;
            let _ = writeln!(self.file, "{msg}");
            return;
        }
        // From here on every line goes to the tail, so the order of lines is kept.
        self.head_left = 0;
        let most = (self.tail_max / 4).max(1);
        let line = if msg.len() > most {
            let mut end = most;
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            self.cut_bytes += (msg.len() - end) as u64;
            format!(
                "{}...[line cut: {end} of {} bytes kept]",
                &msg[..end],
                msg.len()
            )
        } else {
            msg.to_string()
        };
        self.tail_bytes += line.len() + 1;
        self.tail.push_back(line);
        while self.tail_bytes > self.tail_max && self.tail.len() > 1 {
            let Some(old) = self.tail.pop_front() else {
                break;
            };
            self.tail_bytes -= old.len() + 1;
            self.dropped_lines += 1;
            self.dropped_bytes += old.len() as u64 + 1;
        }
    }
}

impl Drop for StageLog {
    fn drop(&mut self) {
        if self.dropped_lines > 0 {
            let _ = writeln!(
                self.file,
                "[log cut: {} lines ({} bytes) dropped here; a stage log keeps its first {} \
                 and last {} bytes]",
                self.dropped_lines, self.dropped_bytes, LOG_HEAD_BYTES, LOG_TAIL_BYTES
            );
        }
        for l in &self.tail {
            let _ = writeln!(self.file, "{l}");
        }
        if self.cut_bytes > 0 {
            let _ = writeln!(
                self.file,
                "[log: {} bytes cut out of overlong lines]",
                self.cut_bytes
            );
        }
    }
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
            log: Mutex::new(log.map(|f| StageLog::new(f, LOG_HEAD_BYTES, LOG_TAIL_BYTES))),
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

    /// Appends a line to this stage's log file in the store (capped: see [`LOG_HEAD_BYTES`]).
    pub fn log(&self, msg: impl AsRef<str>) {
        if let Ok(mut guard) = self.log.lock()
            && let Some(f) = guard.as_mut()
        {
            f.line(msg.as_ref());
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
        let mut first_row = 0;
        for b in batches {
            schema
                .check(&b.schema(), &format!("output '{name}'"))
                .map_err(|e| StageError::Output {
                    output: name.into(),
                    message: e.to_string(),
                })?;
            // NaN or an infinity where the schema says finite: refused, nothing written.
            schema
                .check_finite(b, first_row)
                .map_err(|message| StageError::Output {
                    output: name.into(),
                    message,
                })?;
            first_row += b.num_rows();
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
    fn a_log_keeps_its_head_and_tail_and_says_what_it_dropped() {
        let path = std::env::temp_dir().join(format!("flag-log-test-{}", std::process::id()));
        {
            let mut log = StageLog::new(File::create(&path).unwrap(), 20, 40);
            for i in 0..100 {
                log.line(&format!("line {i:02}"));
            }
            log.line(&"x".repeat(1000));
        }
        let text = fs::read_to_string(&path).unwrap();
        let _ = fs::remove_file(&path);
        // Head: "line 00\nline 01\n" (16 bytes) fits in 20; the tail (40 bytes, lines of at
        // most 10) ends with the long line cut to 10 bytes, which pushes out every other.
        let cut_line = "xxxxxxxxxx...[line cut: 10 of 1000 bytes kept]";
        assert_eq!(
            text,
            format!(
                "line 00\nline 01\n[log cut: 98 lines (784 bytes) dropped here; a stage log keeps \
                 its first {LOG_HEAD_BYTES} and last {LOG_TAIL_BYTES} bytes]\n{cut_line}\n\
                 [log: 990 bytes cut out of overlong lines]\n"
            )
        );
    }

    #[test]
    fn a_small_log_is_its_lines() {
        let path = std::env::temp_dir().join(format!("flag-log-test2-{}", std::process::id()));
        {
            let mut log = StageLog::new(File::create(&path).unwrap(), 10, 100);
            for i in 0..3 {
                log.line(&format!("line {i}"));
            }
        }
        let text = fs::read_to_string(&path).unwrap();
        let _ = fs::remove_file(&path);
        assert_eq!(text, "line 0\nline 1\nline 2\n");
    }

    #[test]
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(human_duration(Duration::from_secs(59)), "59s");
        assert_eq!(human_duration(Duration::from_secs(75)), "1m15s");
        assert_eq!(human_duration(Duration::from_secs(3700)), "1h01m40s");
    }
}
