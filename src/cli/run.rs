//! `flag run PIPELINE`: run what is stale, with one line per stage saying why.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;

use crate::pipeline;
use crate::registry::Registry;
use crate::scheduler::{self, Progress, RunOptions, StageReport, Status};
use crate::worker::Executor;
use crate::worker::slurm::SlurmSettings;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Pipeline file (YAML)
    pub pipeline: PathBuf,
    /// Run only these stages (and whatever stale upstream they need)
    #[arg(long = "only", value_name = "STAGE")]
    pub only: Vec<String>,
    /// Run this stage and everything downstream of it
    #[arg(long, value_name = "STAGE")]
    pub from: Option<String>,
    /// Recompute the selected stages even when cached
    #[arg(long)]
    pub force: bool,
    /// Print the plan (what would run and why) and stop
    #[arg(long)]
    pub dry_run: bool,
    /// Override a param: KEY=VALUE (pipeline param) or STAGE.PARAM=VALUE
    #[arg(long = "set", value_name = "K=V")]
    pub set: Vec<String>,
    /// Stages run at the same time [default: number of CPUs]
    #[arg(long)]
    pub jobs: Option<usize>,
    /// One JSON record per stage on stdout
    #[arg(long)]
    pub json: bool,
    /// Fail instead of waiting when another run holds the store
    #[arg(long)]
    pub no_wait: bool,
    /// Where stages run: local (child processes, --jobs at a time) or slurm (one batch job per
    /// stage: sbatch with the stage's `resources:`, squeue, scancel on Ctrl-C)
    #[arg(long, value_enum, default_value = "local", env = "FLAG_EXECUTOR")]
    pub executor: ExecutorName,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutorName {
    Local,
    Slurm,
}

pub fn line(r: &StageReport) -> String {
    let rows: u64 = r.outputs.values().filter_map(|o| o.rows).sum();
    let extra = if r.status == Status::Ran || r.status == Status::Cached {
        if rows > 0 {
            format!(" [{rows} rows]")
        } else {
            String::new()
        }
    } else {
        String::new()
    };
    format!(
        "{:<7} {:<22} {:>8.2}s  {}{extra}",
        r.status.label(),
        r.stage,
        r.seconds,
        r.reason
    )
}

pub fn print_report(r: &StageReport, json: bool, progress: &Progress) {
    if json {
        progress.println(&serde_json::to_string(r).expect("report serialises"));
    } else {
        progress.println(&line(r));
        if let Some(e) = &r.error {
            progress.println(&format!("        error: {e}"));
            if let Some(l) = &r.log {
                progress.println(&format!("        log:   {l}"));
            }
        }
    }
}

pub fn run(
    args: RunArgs,
    cli_store: &Option<PathBuf>,
    cli_root: &Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let registry = Registry::builtin();
    let p = pipeline::load(&args.pipeline, cli_root.as_deref(), &args.set, &registry)?;
    let store = super::open_store(cli_store, &p.root, true)?;
    let opts = RunOptions {
        only: args.only.clone(),
        from: args.from.clone(),
        force: args.force,
        jobs: args.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        }),
        executor: match args.executor {
            ExecutorName::Local => Executor::Local,
            ExecutorName::Slurm => Executor::Slurm(SlurmSettings::default()),
        },
    };
    let progress = Arc::new(Progress::new(!args.json));
    if args.dry_run {
        for r in scheduler::plan(&p, &store, &opts)? {
            print_report(&r, args.json, &progress);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let waited = std::cell::Cell::new(false);
    let _lock = store.lock(!args.no_wait, |holder| {
        waited.set(true);
        eprintln!(
            "waiting for another flag run ({holder}) to release the lock of {}",
            store.location()
        );
    })?;
    if waited.get() {
        eprintln!("store lock acquired");
    }
    store.clean_tmp()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(opts.jobs.max(1) + 2)
        .enable_all()
        .build()?;
    let (p, store) = (Arc::new(p), Arc::new(store));
    let slurm = args.executor == ExecutorName::Slurm;
    {
        // Ctrl-C or SIGTERM: the running stages are stopped and nothing of them is stored
        // (their workers are ended, local ones killed and Slurm jobs cancelled, and their
        // staging removed); stages already committed stay. The bucket's lease is given back
        // rather than left to expire. Exit 130 (SIGINT) or 143 (SIGTERM), as a shell does.
        use tokio::signal::unix::{SignalKind, signal};
        let store = store.clone();
        // Installed here, before any stage starts, not when the task is first polled.
        let _in_runtime = runtime.enter();
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        runtime.spawn(async move {
            let code = tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            };
            let workers = crate::worker::stop_local_workers();
            if slurm {
                let n = crate::worker::slurm::cancel_all();
                eprintln!("interrupted: cancelled {n} slurm job(s)");
            }
            let staged = store.clean_tmp().unwrap_or(0);
            eprintln!(
                "interrupted: stopped {workers} stage worker(s) and removed {staged} staging \
                 folder(s); stages that had not finished stored nothing"
            );
            if store.remote().is_some() {
                store.release_lease();
                eprintln!("interrupted: gave the lease of {} back", store.location());
            }
            std::process::exit(code);
        });
    }
    let pr = progress.clone();
    let json = args.json;
    let reports = runtime.block_on(scheduler::run(
        p.clone(),
        store.clone(),
        opts,
        progress.clone(),
        move |r| print_report(r, json, &pr),
    ))?;
    progress.finish();
    let count = |s: Status| reports.iter().filter(|r| r.status == s).count();
    if !args.json {
        eprintln!(
            "{}: {} ran, {} cached, {} failed, {} skipped in {:.2}s (store {})",
            p.name,
            count(Status::Ran),
            count(Status::Cached),
            count(Status::Failed),
            count(Status::Skipped),
            started.elapsed().as_secs_f64(),
            store.root.display()
        );
    }
    Ok(if count(Status::Failed) > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
