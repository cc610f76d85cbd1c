//! `flag-worker`: runs one stage of a plan in its own process (`flag-worker exec JOB`),
//! describes the libtorch stage kinds to the coordinator (`catalogue`, `describe`), and runs
//! the libtorch commands `flag llm` and `flag serve` hand over to it. The only binary that
//! links the stages' work and libtorch.
mod llm;
mod serve;

use std::io::Read;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flag::worker::describe::{self, Query};
use flag::worker::exec::{self, Runners};

#[derive(Parser, Debug)]
#[command(
    name = "flag",
    version,
    about = "Worker of the flag engine: runs stages and the embedded language models"
)]
struct WorkerCli {
    #[command(subcommand)]
    command: WorkerCommand,
}

#[derive(Subcommand, Debug)]
enum WorkerCommand {
    /// Run the stage job described by a job file the coordinator wrote (internal)
    #[command(hide = true)]
    Exec {
        /// The job file (JSON) in the stage's staging directory
        job: std::path::PathBuf,
    },
    /// Print the declarations of the stage kinds only this worker links, as JSON (internal)
    #[command(hide = true)]
    Catalogue,
    /// Answer the coordinator's questions about stages (JSON queries on stdin; internal)
    #[command(hide = true)]
    Describe,
    /// The embedded language models (tokenize, logits, generate, embed, bench)
    Llm(llm::LlmArgs),
    /// Serve the embedded models over an OpenAI-compatible HTTP API (chat, embeddings)
    Serve(serve::ServeArgs),
}

/// Every stage kind with its work.
fn runners() -> Runners {
    exec::local_runners()
        .into_iter()
        .chain(worker_only_kinds().into_iter().map(|r| (r.kind(), r)))
        .collect()
}

/// The kinds the coordinator links itself are not described (it asks only for the others).
fn worker_only_kinds() -> Vec<Box<dyn flag_core::RunStage>> {
    flag_rl::runners()
        .into_iter()
        .chain(flag_agents::runners())
        .chain(flag_ppo::runners())
        .collect()
}

fn catalogue() -> anyhow::Result<()> {
    let decls: Vec<describe::KindDecl> = worker_only_kinds()
        .iter()
        .map(|s| describe::kind_decl(s.kind(), &s.spec()))
        .collect();
    println!("{}", serde_json::to_string(&decls)?);
    Ok(())
}

fn answer_queries() -> anyhow::Result<()> {
    let mut input = Vec::new();
    std::io::stdin()
        .take(64 * 1024 * 1024)
        .read_to_end(&mut input)?;
    let queries: Vec<Query> = serde_json::from_slice(&input)?;
    let kinds = runners();
    let answers = queries
        .iter()
        .map(|q| {
            let imp = kinds
                .get(q.kind.as_str())
                .ok_or_else(|| anyhow::anyhow!("no stage kind '{}' in this worker", q.kind))?;
            Ok(describe::answer(imp.as_ref(), q))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!("{}", serde_json::to_string(&answers)?);
    Ok(())
}

fn main() -> ExitCode {
    let cli = WorkerCli::parse();
    let result = match cli.command {
        WorkerCommand::Exec { job } => {
            return exec::main(&job, &runners(), &|job| {
                // The keyed thread count is the one libtorch computes with (a stage that sets
                // its own keys that one).
                if let Some(n) = job.env.get("threads").and_then(|t| t.parse::<i32>().ok()) {
                    tch::set_num_threads(n);
                }
            });
        }
        WorkerCommand::Catalogue => catalogue(),
        WorkerCommand::Describe => answer_queries(),
        WorkerCommand::Llm(a) => llm::run(a),
        WorkerCommand::Serve(a) => serve::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", flag::error_text(&e));
            ExitCode::from(2)
        }
    }
}
