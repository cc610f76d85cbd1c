//! `flag`: the coordinator. Plans, keys, locks and commits; every stage runs in a
//! `flag-worker` process, and the subcommands that need libtorch (`llm`, `serve`) are handed to
//! it whole, so this binary never loads libtorch.
use std::process::ExitCode;

use clap::Parser;

use flag::cli::{self, Cli, Command};

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
        Command::Llm(a) => flag::worker::forward("llm", a.args),
        Command::Serve(a) => flag::worker::forward("serve", a.args),
        Command::BenchStore(a) => cli::bench::run(a, &cli.store),
        Command::StageExec { job } => {
            let runners = flag::worker::exec::local_runners();
            return flag::worker::exec::main(&job, &runners, &|_| {});
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", flag::error_text(&e));
            ExitCode::from(2)
        }
    }
}
