//! `flag`: the pipeline engine and its command line.
//!
//! pipeline YAML -> validated DAG (pipeline/) -> cache keys (cache/) -> content-addressed
//! store (store/) -> scheduler (scheduler/) -> CLI (cli/).
mod cache;
mod cli;
mod error;
#[cfg(test)]
mod fuzz;
mod pipeline;
mod registry;
mod scheduler;
mod store;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => cli::run::run(a, &cli.store, &cli.root),
        Command::Status(a) => cli::status::run(a, &cli.store, &cli.root),
        Command::Show(a) => cli::show::run(a, &cli.store, &cli.root),
        Command::Path(a) => cli::path::run(a, &cli.store, &cli.root),
        Command::Verify(a) => cli::verify::run(a, &cli.store, &cli.root),
        Command::Stages(a) => cli::stages::run(a),
        Command::Env(a) => cli::env::run(a),
        Command::Gc(a) => cli::gc::run(a, &cli.store, &cli.root),
        Command::Llm(a) => cli::llm::run(a).map(|_| ExitCode::SUCCESS),
        Command::Serve(a) => cli::serve::run(a).map(|_| ExitCode::SUCCESS),
        Command::BenchStore(a) => cli::bench::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes on one line, each cause once: most of the engine's errors already
/// say their source in their own text (`reading x: No such file or directory`), and anyhow's
/// `{:#}` would add it again.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}
