//! Stages run in worker processes. The coordinator (`flag`) writes a job file into the stage's
//! staging directory, starts `flag-worker exec JOB`, relays its progress to the terminal, and
//! commits the staged outputs only when the worker says it finished (exit 0 and a final `done`
//! message). A worker that fails, aborts or is killed leaves nothing committed; the report
//! names how it ended and quotes the tail of what it wrote.
//!
//! Protocol (worker stdout, one JSON object a line): `{"progress":[done,total,"msg"]}` while
//! it runs, then `{"done":true}` or `{"error":"..."}`. Everything on stderr goes to the
//! stage's log.

pub mod describe;
pub mod exec;
pub mod slurm;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use base64::Engine as _;
use flag_core::{InputArtifact, ProgressFn, StageError};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::pipeline::PipelineStage;

/// The job file's name inside a staging directory (no output is named with a leading dot).
pub const JOB_FILE: &str = ".flag-job.json";
/// How much of a worker's stderr is kept for its log and the failure report.
pub(crate) const STDERR_KEEP_BYTES: usize = 64 * 1024;
/// Lines of the log quoted in a failure report.
const TAIL_LINES: usize = 12;

/// Everything a worker needs to run one stage; written by the coordinator, read by the worker.
#[derive(Debug, Serialize, Deserialize)]
pub struct StageJob {
    pub stage: String,
    pub kind: String,
    pub params: BTreeMap<String, serde_json::Value>,
    /// input name -> bound upstream artifacts (reference and object paths).
    pub inputs: BTreeMap<String, Vec<JobInput>>,
    /// The prompt/SQL files the key was computed from, base64: the worker runs exactly those
    /// bytes, not whatever the files hold by the time it starts.
    pub resources: BTreeMap<String, String>,
    /// Where the stage writes its outputs.
    pub staging: PathBuf,
    /// The stage's log (the worker appends to it).
    pub log: Option<PathBuf>,
    /// First lines of the log (stage, key, reason, compute).
    pub header: String,
    /// The keyed environment (device, threads, ...): the worker checks it computes on that.
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JobInput {
    pub reference: String,
    pub files: Vec<PathBuf>,
}

/// One line of the worker's protocol.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Message {
    Progress(u64, u64, String),
    Done(bool),
    Error(String),
}

impl StageJob {
    pub fn new(
        st: &PipelineStage,
        artifacts: &BTreeMap<String, Vec<InputArtifact>>,
        resources: &BTreeMap<String, Vec<u8>>,
        staging: &Path,
        log: Option<&Path>,
        header: &str,
        env: &BTreeMap<String, String>,
    ) -> StageJob {
        StageJob {
            stage: st.name.clone(),
            kind: st.kind.clone(),
            params: st.params.0.clone(),
            inputs: artifacts
                .iter()
                .map(|(name, arts)| {
                    let v = arts
                        .iter()
                        .map(|a| JobInput {
                            reference: a.reference.clone(),
                            files: a.files.clone(),
                        })
                        .collect();
                    (name.clone(), v)
                })
                .collect(),
            resources: resources
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        base64::engine::general_purpose::STANDARD.encode(v),
                    )
                })
                .collect(),
            staging: staging.to_path_buf(),
            log: log.map(Path::to_path_buf),
            header: header.to_string(),
            env: env.clone(),
        }
    }

    /// Writes the job into its staging directory; returns the file.
    pub fn write(&self) -> Result<PathBuf> {
        let path = self.staging.join(JOB_FILE);
        let bytes = serde_json::to_vec(self).expect("a job serialises");
        std::fs::write(&path, bytes).map_err(|e| EngineError::Io {
            context: format!("writing the job file {}", path.display()),
            source: e,
        })?;
        Ok(path)
    }
}

/// libgomp's spin count for workers that keep the LLM's weights as GGUF blocks, unless the
/// user set `GOMP_SPINCOUNT` or `OMP_WAIT_POLICY`. Their row kernels run on their own
/// threads between libtorch's parallel regions, and libgomp's threads otherwise spin ~300,000
/// rounds after each region, taking the cores from them: on 2 cores that halved decode (26 ->
/// 38-55 tok/s at batch 1). libgomp reads it when it loads, before the worker's `main`, so the
/// spawner sets it. It changes timing only, never a number, so it is no part of any key.
const GGUF_SPINCOUNT: &str = "200";

/// Adds [`GGUF_SPINCOUNT`] to a command that starts `flag-worker` for work that decodes with
/// block weights (`gguf`: a stage job whose key says `weights=gguf`, or `flag llm`/`serve`
/// without `FLAG_LLM_WEIGHTS=dense`). Other jobs keep libgomp's default: dense libtorch work
/// (PPO, DDQN) has no other threads to give the cores to.
pub fn worker_env(cmd: &mut Command, gguf: bool) -> &mut Command {
    if let Some((k, v)) = spin_env(gguf, |k| std::env::var(k).ok()) {
        cmd.env(k, v);
    }
    cmd
}

/// The variable [`worker_env`] adds, given the environment `get` reads.
fn spin_env(
    gguf: bool,
    get: impl Fn(&str) -> Option<String>,
) -> Option<(&'static str, &'static str)> {
    let set = |k: &str| get(k).is_some_and(|v| !v.is_empty());
    (gguf && !set("GOMP_SPINCOUNT") && !set("OMP_WAIT_POLICY"))
        .then_some(("GOMP_SPINCOUNT", GGUF_SPINCOUNT))
}

/// Whether a `flag llm`/`flag serve` worker loads block weights: unless `FLAG_LLM_WEIGHTS`
/// says dense (the engine's own default is gguf).
fn gguf_by_env(get: impl Fn(&str) -> Option<String>) -> bool {
    !matches!(
        get("FLAG_LLM_WEIGHTS").as_deref().map(str::trim),
        Some("dense" | "f32")
    )
}

/// Whether a stage job decodes with block weights: its keyed environment names a format other
/// than dense (`gguf`, `gguf-int8`; dense adds no `weights` entry), as [`gguf_by_env`] reads
/// `FLAG_LLM_WEIGHTS`.
pub fn job_uses_gguf(job: &StageJob) -> bool {
    job.env
        .get("weights")
        .is_some_and(|w| !matches!(w.as_str(), "dense" | "f32"))
}

/// The `flag-worker` binary: `FLAG_WORKER` when set, else the one beside this executable.
pub fn worker_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FLAG_WORKER").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().map_err(|e| EngineError::Io {
        context: "finding this executable".into(),
        source: e,
    })?;
    let worker = me.with_file_name("flag-worker");
    if worker.is_file() {
        Ok(worker)
    } else {
        Err(EngineError::Usage(format!(
            "the stage worker {} is missing: build it with `just build` (or point FLAG_WORKER \
             at it)",
            worker.display()
        )))
    }
}

/// Where stage jobs run.
#[derive(Debug, Clone, Default)]
pub enum Executor {
    /// Child processes of this coordinator (`--jobs` at a time).
    #[default]
    Local,
    /// One Slurm batch job per stage (`sbatch`, polled with `squeue`, `scancel` on Ctrl-C).
    Slurm(slurm::SlurmSettings),
}

/// The program and subcommand that run a job of this kind: the kinds this binary links run
/// in a copy of it (milliseconds to start), the others in the worker, which loads libtorch.
fn program_for(kind: &str) -> Result<(PathBuf, &'static str)> {
    if exec::is_local(kind) {
        let me = std::env::current_exe().map_err(|e| EngineError::Io {
            context: "finding this executable".into(),
            source: e,
        })?;
        Ok((me, "stage-exec"))
    } else {
        Ok((worker_binary()?, "exec"))
    }
}

fn stage_failure(st: &PipelineStage, message: String) -> EngineError {
    EngineError::Stage {
        stage: st.name.clone(),
        kind: st.kind.clone(),
        source: Box::new(StageError::Invalid(message)),
    }
}

/// Runs a job where the executor says and waits for it. `Ok` only when the worker reported
/// `done` and ended well; the outputs are then complete in the staging directory. The
/// duration is how long the job waited for its CPUs before it started (not the stage's time).
pub fn run(
    st: &PipelineStage,
    job: &StageJob,
    progress: Option<ProgressFn>,
    executor: &Executor,
) -> Result<std::time::Duration> {
    let job_file = job.write()?;
    let (program, command) = program_for(&job.kind)?;
    match executor {
        Executor::Local => run_local(st, job, progress, &program, command, &job_file),
        Executor::Slurm(s) => slurm::run(s, st, job, progress, &program, command, &job_file)
            .map(|()| std::time::Duration::ZERO),
    }
}

/// The local workers running now, so an interrupted run can end them (std has no way to
/// signal a pid; a `Child` can be killed). Spawned under the lock: once `interrupted` is set,
/// no new worker starts.
struct Running {
    interrupted: bool,
    children: BTreeMap<u32, std::process::Child>,
}

static RUNNING: std::sync::Mutex<Running> = std::sync::Mutex::new(Running {
    interrupted: false,
    children: BTreeMap::new(),
});

/// Ends every local worker of this process (SIGKILL, then reaps it) and lets no new one
/// start; returns how many were running. What they staged is the caller's to remove.
pub fn stop_local_workers() -> usize {
    let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    running.interrupted = true;
    let n = running.children.len();
    for (_, mut child) in std::mem::take(&mut running.children) {
        let _ = child.kill();
        let _ = child.wait();
    }
    n
}

/// The CPUs of this machine that local workers share. Each libtorch worker has its own
/// thread pool (its keyed thread count, usually every core); two of them at once on the same
/// cores spin against each other (OpenMP) and both slow down several-fold, so a worker waits
/// until its CPUs are free. One worker always runs, whatever it asks for.
struct CpuBudget {
    used: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

static CPU_BUDGET: CpuBudget = CpuBudget {
    used: std::sync::Mutex::new(0),
    freed: std::sync::Condvar::new(),
};

struct CpuGrant(usize);

impl CpuBudget {
    fn capacity() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    fn acquire(&'static self, want: usize) -> CpuGrant {
        let want = want.clamp(1, Self::capacity());
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used > 0 && *used + want > Self::capacity() {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += want;
        CpuGrant(want)
    }
}

impl Drop for CpuGrant {
    fn drop(&mut self) {
        let mut used = CPU_BUDGET.used.lock().unwrap_or_else(|p| p.into_inner());
        *used -= self.0;
        CPU_BUDGET.freed.notify_all();
    }
}

/// The CPUs a job keeps busy: the stage's `resources: cpus`, else its keyed thread count,
/// else one for the kinds without libtorch and every core for the others (their own thread
/// pools, e.g. the DDQN's parallel runs).
fn cpus_wanted(st: &PipelineStage, job: &StageJob) -> usize {
    if let Some(c) = st.resources.cpus {
        return c as usize;
    }
    if let Some(t) = job.env.get("threads").and_then(|t| t.parse().ok()) {
        return t;
    }
    if exec::is_local(&job.kind) {
        1
    } else {
        CpuBudget::capacity()
    }
}

fn run_local(
    st: &PipelineStage,
    job: &StageJob,
    progress: Option<ProgressFn>,
    program: &Path,
    command: &str,
    job_file: &Path,
) -> Result<std::time::Duration> {
    let fail = |message: String| stage_failure(st, message);
    let queued = std::time::Instant::now();
    let wanted = cpus_wanted(st, job);
    let _cpus = CPU_BUDGET.acquire(wanted);
    let queued = queued.elapsed();
    if let Some(log) = &job.log
        && queued.as_secs_f64() >= 0.01
    {
        append(
            log,
            &format!(
                "waited {:.2}s for {wanted} CPU(s) held by other stages of this run",
                queued.as_secs_f64()
            ),
        );
    }
    let (pid, stdout, stderr) = {
        let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        if running.interrupted {
            return Err(fail("interrupted before its worker started".into()));
        }
        let mut child = worker_env(&mut Command::new(program), job_uses_gguf(job))
            .arg(command)
            .arg(job_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("could not start the stage worker: {e}")))?;
        let out = (
            child.id(),
            child.stdout.take().expect("piped"),
            child.stderr.take().expect("piped"),
        );
        running.children.insert(child.id(), child);
        out
    };
    let stderr_reader = std::thread::spawn(move || keep_tail(stderr, STDERR_KEEP_BYTES));
    let mut outcome: Option<Message> = None;
    for line in BufReader::new(stdout).split(b'\n') {
        let Ok(line) = line else { break };
        handle_line(&line, &progress, &mut outcome);
    }
    let child = RUNNING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .children
        .remove(&pid);
    // None: `stop_local_workers` took and ended it (the run is being interrupted).
    let Some(mut child) = child else {
        return Err(fail("interrupted: its worker was stopped".into()));
    };
    let status = child
        .wait()
        .map_err(|e| fail(format!("waiting for the stage worker: {e}")))?;
    let stderr = stderr_reader.join().unwrap_or_default();
    let how = if status.success() {
        None
    } else {
        Some(format!("the stage worker {}", exit_description(&status)))
    };
    conclude(st, job, outcome, how, &stderr).map(|()| queued)
}

/// One protocol line: progress goes to the bar, the last `done`/`error` is the outcome.
/// Anything else (stray output of stage code) is ignored.
fn handle_line(line: &[u8], progress: &Option<ProgressFn>, outcome: &mut Option<Message>) {
    match serde_json::from_slice::<Message>(line) {
        Ok(Message::Progress(done, total, msg)) => {
            if let Some(p) = progress {
                p(done, total, &msg);
            }
        }
        Ok(m) => *outcome = Some(m),
        Err(_) => {}
    }
}

/// The verdict on a finished job: `how` is None when the process ended well, else how it
/// ended (for the report). The worker's stderr goes into the stage log.
fn conclude(
    st: &PipelineStage,
    job: &StageJob,
    outcome: Option<Message>,
    how: Option<String>,
    stderr: &[u8],
) -> Result<()> {
    if let Some(log) = &job.log
        && !stderr.is_empty()
    {
        append(
            log,
            &format!("worker stderr:\n{}", String::from_utf8_lossy(stderr)),
        );
    }
    match (outcome, how) {
        (Some(Message::Done(true)), None) => Ok(()),
        (Some(Message::Error(e)), _) => Err(stage_failure(st, e)),
        (_, how) => {
            let how = how.unwrap_or_else(|| "the stage worker ended without a result".into());
            if let Some(log) = &job.log {
                append(log, &format!("FAILED: {how}"));
            }
            let tail = job.log.as_deref().map(log_tail).unwrap_or_default();
            let tail = if tail.is_empty() {
                String::new()
            } else {
                format!("; last lines of its log:\n{tail}")
            };
            Err(stage_failure(
                st,
                format!("{how} before it finished; nothing was committed{tail}"),
            ))
        }
    }
}

fn exit_description(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = match sig {
            6 => " (SIGABRT: aborted)",
            9 => " (SIGKILL: killed)",
            11 => " (SIGSEGV: crashed)",
            15 => " (SIGTERM)",
            2 => " (SIGINT)",
            _ => "",
        };
        format!("was ended by signal {sig}{name}")
    } else {
        format!("exited with status {}", status.code().unwrap_or(-1))
    }
}

/// Reads a stream to its end, keeping only its last `keep` bytes.
pub(crate) fn keep_tail(mut r: impl Read, keep: usize) -> Vec<u8> {
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2 * keep {
            tail.drain(..tail.len() - keep);
        }
    }
    if tail.len() > keep {
        tail.drain(..tail.len() - keep);
    }
    tail
}

/// Appends a line to a log file (best effort: a log must never fail a stage).
pub fn append(path: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

/// The last lines of a log, each cut to 300 bytes.
fn log_tail(path: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    use std::io::{Seek, SeekFrom};
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..]
        .iter()
        .map(|l| {
            let mut end = l.len().min(300);
            while !l.is_char_boundary(end) {
                end -= 1;
            }
            format!("  | {}", &l[..end])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `flag llm ...` / `flag serve ...`: becomes `flag-worker` with the same arguments (exec: the
/// same process, so signals, the pid and the exit status are the command's own). The worker
/// links libtorch; the coordinator does not.
pub fn forward(subcommand: &str, args: Vec<OsString>) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let worker = worker_binary()?;
    let gguf = gguf_by_env(|k| std::env::var(k).ok());
    let err = worker_env(&mut Command::new(&worker), gguf)
        .arg(subcommand)
        .args(&args)
        .exec();
    Err(anyhow::anyhow!("starting {}: {err}", worker.display()))
}

#[cfg(test)]
mod tests {
    use super::{gguf_by_env, spin_env};

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_short_spin_applies_to_gguf_workers_unless_the_user_chose_one() {
        assert_eq!(spin_env(true, env(&[])), Some(("GOMP_SPINCOUNT", "200")));
        assert_eq!(spin_env(false, env(&[])), None);
        assert_eq!(spin_env(true, env(&[("GOMP_SPINCOUNT", "5000")])), None);
        assert_eq!(spin_env(true, env(&[("OMP_WAIT_POLICY", "active")])), None);
        // Set but empty counts as not set.
        assert_eq!(
            spin_env(true, env(&[("GOMP_SPINCOUNT", "")])),
            Some(("GOMP_SPINCOUNT", "200"))
        );
        // `flag llm`/`serve`: gguf unless the user asks for dense.
        assert!(gguf_by_env(env(&[])));
        assert!(gguf_by_env(env(&[("FLAG_LLM_WEIGHTS", "gguf")])));
        assert!(!gguf_by_env(env(&[("FLAG_LLM_WEIGHTS", " dense")])));
        assert!(!gguf_by_env(env(&[("FLAG_LLM_WEIGHTS", "f32")])));
    }
}
