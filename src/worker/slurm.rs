//! The Slurm executor: each stage job becomes one batch job. `sbatch` submits a two-line
//! script that runs the worker on the job file (stdout, the protocol, into the staging
//! directory; Slurm's own messages into the store's logs); the coordinator polls `squeue`,
//! follows the protocol file for progress, reads the final state with `scontrol`, and commits
//! only a job that COMPLETED with a `done` message. Ctrl-C cancels every job it submitted.
//!
//! The store (and the project, for prompt and SQL files) must be on a file system the nodes
//! share; the worker checks on the node that it computes on the environment the key names.
use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use flag_core::ProgressFn;

use super::{Message, StageJob, conclude, handle_line, stage_failure};
use crate::error::Result;
use crate::pipeline::PipelineStage;

#[derive(Debug, Clone)]
pub struct SlurmSettings {
    /// How often `squeue` is asked about a running job.
    pub poll: Duration,
}

impl Default for SlurmSettings {
    fn default() -> Self {
        SlurmSettings {
            poll: Duration::from_millis(250),
        }
    }
}

/// The coordinator's heartbeat in a job's staging folder: rewritten about every second while it
/// follows the job; the worker exits when it goes still (see `exec::exit_without_heartbeat`).
pub const HEARTBEAT: &str = ".flag-heartbeat";

/// Jobs submitted and not yet finished, for `cancel_all`.
static ACTIVE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// `scancel`s every job this process submitted that is still active (Ctrl-C).
pub fn cancel_all() -> usize {
    let ids: Vec<String> = ACTIVE
        .lock()
        .map(|a| a.iter().cloned().collect())
        .unwrap_or_default();
    if !ids.is_empty() {
        let _ = Command::new("scancel").args(&ids).status();
    }
    ids.len()
}

/// A word for /bin/sh, quoted.
fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"))
}

fn output(cmd: &mut Command) -> std::result::Result<(bool, String), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("running {:?}: {e}", cmd.get_program()))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Ok((
        out.status.success(),
        if text.is_empty() { err } else { text },
    ))
}

/// `JobState` and `ExitCode` (code:signal) of a job slurmctld still knows.
fn final_state(id: &str) -> (String, String) {
    let field = |text: &str, name: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or("UNKNOWN")
            .to_string()
    };
    match output(Command::new("scontrol").args(["show", "-o", "job", id])) {
        Ok((true, text)) => (field(&text, "JobState="), field(&text, "ExitCode=")),
        _ => ("UNKNOWN".into(), "?".into()),
    }
}

/// Reads whole new lines of a growing file from `offset` on.
fn read_new_lines(path: &Path, offset: &mut u64, mut each: impl FnMut(&[u8])) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return;
    };
    if f.seek(SeekFrom::Start(*offset)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return;
    }
    let Some(last_newline) = buf.iter().rposition(|b| *b == b'\n') else {
        return;
    };
    for line in buf[..last_newline].split(|b| *b == b'\n') {
        each(line);
    }
    *offset += last_newline as u64 + 1;
}

pub fn run(
    settings: &SlurmSettings,
    st: &PipelineStage,
    job: &StageJob,
    progress: Option<ProgressFn>,
    program: &Path,
    command: &str,
    job_file: &Path,
) -> Result<()> {
    let fail = |m: String| stage_failure(st, m);
    let protocol = job.staging.join(".flag-protocol");
    let stderr_file = job.staging.join(".flag-stderr");
    let script = job.staging.join(".flag-job.sh");
    let text = format!(
        "#!/bin/sh\n# flag stage {} ({})\nexec {} {command} {} > {} 2> {}\n",
        st.name,
        st.kind,
        sh_quote(program),
        sh_quote(job_file),
        sh_quote(&protocol),
        sh_quote(&stderr_file)
    );
    std::fs::write(&script, text)
        .map_err(|e| fail(format!("writing {}: {e}", script.display())))?;
    let slurm_log = match &job.log {
        Some(l) => l.with_extension("slurm.log"),
        None => job.staging.join(".flag-slurm.log"),
    };
    let short = job
        .staging
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .split('.')
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let name = format!("flag-{}-{short}", st.name);
    let heartbeat = job.staging.join(HEARTBEAT);
    let mut beats = 0u64;
    let beat = |n: u64| {
        let _ = std::fs::write(&heartbeat, format!("{} {n}\n", std::process::id()));
    };
    beat(beats);
    let mut last_beat = std::time::Instant::now();
    let cwd = std::env::current_dir().map_err(|e| fail(format!("the working directory: {e}")))?;
    // sbatch passes its environment on to the job (--export=ALL, Slurm's default).
    let mut sbatch = Command::new("sbatch");
    super::worker_env(&mut sbatch, super::job_uses_gguf(job))
        .arg("--parsable")
        .arg(format!("--job-name={name}"))
        .arg(format!("--output={}", slurm_log.display()))
        .arg(format!("--chdir={}", cwd.display()))
        .args(st.resources.sbatch_args())
        .arg(&script);
    let id = match output(&mut sbatch) {
        Ok((true, out)) => out.split(';').next().unwrap_or("").trim().to_string(),
        Ok((false, err)) => return Err(fail(format!("sbatch refused the job: {err}"))),
        Err(e) => return Err(fail(format!("could not submit to Slurm: {e}"))),
    };
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(fail(format!("sbatch answered '{id}', not a job id")));
    }
    if let Ok(mut a) = ACTIVE.lock() {
        a.insert(id.clone());
    }
    if let Some(log) = &job.log {
        super::append(
            log,
            &format!(
                "submitted as slurm job {id} ({name}; {}); slurm's own log: {}",
                st.resources.sbatch_args().join(" "),
                slurm_log.display()
            ),
        );
    }
    let mut offset = 0u64;
    let mut outcome: Option<Message> = None;
    loop {
        std::thread::sleep(settings.poll);
        if last_beat.elapsed() >= Duration::from_secs(1) {
            beats += 1;
            beat(beats);
            last_beat = std::time::Instant::now();
        }
        read_new_lines(&protocol, &mut offset, |l| {
            handle_line(l, &progress, &mut outcome)
        });
        // Gone from the queue (or unknown): it has ended.
        match output(Command::new("squeue").args(["-h", "-j", &id, "-o", "%T"])) {
            Ok((true, state)) if !state.is_empty() => continue,
            _ => break,
        }
    }
    read_new_lines(&protocol, &mut offset, |l| {
        handle_line(l, &progress, &mut outcome)
    });
    let (state, exit) = final_state(&id);
    if let Ok(mut a) = ACTIVE.lock() {
        a.remove(&id);
    }
    let stderr = std::fs::File::open(&stderr_file)
        .map(|f| super::keep_tail(f, super::STDERR_KEEP_BYTES))
        .unwrap_or_default();
    let how = if state == "COMPLETED" && exit == "0:0" {
        None
    } else {
        Some(format!("slurm job {id} ended {state} (exit code {exit})"))
    };
    conclude(st, job, outcome, how, &stderr)
}
