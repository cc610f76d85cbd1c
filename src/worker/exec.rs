//! The worker side of a stage job: `flag-worker exec JOB` (every kind) or `flag stage-exec JOB`
//! (the kinds the coordinator links, which need no libtorch and so start in milliseconds)
//! runs one stage and reports on stdout.
use std::collections::BTreeMap;
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use flag_core::{InputArtifact, Params, RunStage, StageContext};

use super::{Message, StageJob};
use crate::cache;

/// A job file larger than this is not one the coordinator wrote.
const MAX_JOB_BYTES: u64 = 64 * 1024 * 1024;
/// Progress lines are sent at most this often (plus the last of each total).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Stage kinds with their work, by `uses:` name.
pub type Runners = BTreeMap<&'static str, Box<dyn RunStage>>;

/// The kinds whose work needs no libtorch: the coordinator runs these itself
/// (`flag stage-exec`).
pub fn local_runners() -> Runners {
    flag_market::runners()
        .into_iter()
        .chain(flag_trading::runners())
        .chain(flag_report::runners())
        .map(|r| (r.kind(), r))
        .collect()
}

/// Kinds the coordinator links and runs in a `flag stage-exec` process.
pub fn is_local(kind: &str) -> bool {
    crate::registry::local_stages()
        .iter()
        .any(|s| s.kind() == kind)
}

fn send(msg: &Message) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, msg);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Runs the job; the exit status and the last protocol line say how it went.
/// `prepare` runs after the job is read and its environment checked, before the stage (the
/// worker sets libtorch's threads there).
pub fn main(job_file: &Path, runners: &Runners, prepare: &dyn Fn(&StageJob)) -> ExitCode {
    match run(job_file, runners, prepare) {
        Ok(()) => {
            send(&Message::Done(true));
            ExitCode::SUCCESS
        }
        Err(e) => {
            send(&Message::Error(e));
            ExitCode::from(1)
        }
    }
}

fn read_job(path: &Path) -> Result<StageJob, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("reading the job file {}: {e}", path.display()))?
        .len();
    if len > MAX_JOB_BYTES {
        return Err(format!(
            "the job file {} is {len} bytes: not a job",
            path.display()
        ));
    }
    let bytes =
        std::fs::read(path).map_err(|e| format!("reading the job file {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| format!("the job file {} is not a job: {e}", path.display()))
}

/// Ends this process when the coordinator that started it is gone (killed with -9, say): a
/// stage nobody will commit must not go on using the machine.
fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(200));
            if std::os::unix::process::parent_id() != parent {
                std::process::exit(3);
            }
        }
    });
}

/// The coordinator's heartbeat beside the job file (see `slurm::HEARTBEAT`): a batch job's
/// parent is Slurm, not the coordinator, so a coordinator killed with -9 is noticed by its
/// heartbeat going still (or its staging folder vanishing) for `FLAG_HEARTBEAT_SECS` (60 s).
/// Elapsed time is measured on this node's clock only, so the nodes' clocks need not agree.
fn exit_without_heartbeat(job_file: &Path) {
    let Some(beat) = job_file.parent().map(|d| d.join(super::slurm::HEARTBEAT)) else {
        return;
    };
    let read = |p: &Path| {
        let m = std::fs::metadata(p).ok()?.modified().ok();
        Some((m, std::fs::read(p).ok()?))
    };
    let Some(mut last) = read(&beat) else {
        return; // not a batch job of a coordinator that beats
    };
    let limit = Duration::from_secs(
        std::env::var("FLAG_HEARTBEAT_SECS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|s| *s >= 1)
            .unwrap_or(60),
    );
    std::thread::spawn(move || {
        let mut changed = std::time::Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            match read(&beat) {
                Some(now) if now != last => {
                    last = now;
                    changed = std::time::Instant::now();
                }
                Some(_) if changed.elapsed() < limit => {}
                gone_or_still => {
                    eprintln!(
                        "the coordinator stopped: {} for {} s; exiting",
                        if gone_or_still.is_none() {
                            "its staging folder is gone"
                        } else {
                            "no heartbeat"
                        },
                        changed.elapsed().as_secs()
                    );
                    std::process::exit(3);
                }
            }
        }
    });
}

fn run(job_file: &Path, runners: &Runners, prepare: &dyn Fn(&StageJob)) -> Result<(), String> {
    exit_with_parent();
    exit_without_heartbeat(job_file);
    let job = read_job(job_file)?;
    let imp = runners
        .get(job.kind.as_str())
        .ok_or_else(|| format!("this worker has no stage kind '{}'", job.kind))?;
    let params = Params::new(job.params.clone());
    check_environment(imp.as_ref(), &params, &job.env)?;
    prepare(&job);
    let spec = imp.spec();
    let inputs: BTreeMap<String, Vec<InputArtifact>> = job
        .inputs
        .iter()
        .map(|(name, arts)| {
            let schema = spec
                .inputs
                .iter()
                .find(|i| i.name == name)
                .and_then(|i| i.schema);
            let v = arts
                .iter()
                .map(|a| InputArtifact {
                    reference: a.reference.clone(),
                    files: a.files.clone(),
                    schema,
                })
                .collect();
            (name.clone(), v)
        })
        .collect();
    let mut resources = BTreeMap::new();
    for (name, b64) in &job.resources {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("the job file's resource {name} is not base64: {e}"))?;
        resources.insert(name.clone(), bytes);
    }
    let log = match &job.log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(p)
                .map_err(|e| format!("opening the stage log {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let last_sent = Mutex::new(None::<Instant>);
    let progress: flag_core::ProgressFn = Arc::new(move |done, total, msg: &str| {
        let now = Instant::now();
        let mut last = last_sent.lock().unwrap_or_else(|p| p.into_inner());
        if done >= total || last.is_none_or(|t| now.duration_since(t) >= PROGRESS_EVERY) {
            *last = Some(now);
            send(&Message::Progress(done, total, msg.to_string()));
        }
    });
    let mut ctx = StageContext::new(
        job.stage.clone(),
        params,
        inputs,
        spec.outputs,
        job.staging.clone(),
        resources,
        log,
        Some(progress),
    );
    ctx.log(format!(
        "{}\nparams: {}\nworker: pid {}",
        job.header,
        serde_json::to_string(&job.params).unwrap_or_default(),
        std::process::id()
    ));
    let outcome = catch_unwind(AssertUnwindSafe(|| imp.run(&mut ctx)));
    let result = match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("the stage panicked: {msg}"))
        }
    };
    if let Err(e) = &result {
        ctx.log(format!("FAILED: {e}"));
    }
    // Closes the log (its held tail is written).
    drop(ctx);
    result
}

/// The keyed environment must be this worker's: another device, thread count or kernel path
/// (a cluster node of another CPU class) would store bytes under a key that does not describe
/// them.
fn check_environment(
    imp: &dyn RunStage,
    params: &Params,
    keyed: &BTreeMap<String, String>,
) -> Result<(), String> {
    let here = cache::environment_of(imp, params);
    let diffs: Vec<String> = keyed
        .iter()
        .filter_map(|(k, v)| match here.get(k) {
            Some(h) if h == v => None,
            Some(h) => Some(format!("{k} is '{h}' here but '{v}' in the key")),
            None => Some(format!("{k} '{v}' is in the key but not known here")),
        })
        .collect();
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "this worker does not compute on the environment the stage was keyed with: {}; \
             run the stage where that environment holds, or pin it (see `flag env`)",
            diffs.join("; ")
        ))
    }
}
