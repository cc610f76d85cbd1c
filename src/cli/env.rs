//! `flag env [--json]`: this machine's compute environment as the manifests record it, and the
//! kernel path that keys kernel-path stages (libtorch, ATen CPU dispatch level, MKL path).
use std::process::ExitCode;

use clap::Args;
use flag_core::numerics;

use crate::cache::LIBTORCH_VERSION;

#[derive(Args, Debug)]
pub struct EnvArgs {
    /// As JSON: {"machine": {...}, "kernel_path": {...}, "cpu_capabilities": [...]}
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EnvArgs) -> anyhow::Result<ExitCode> {
    let machine = numerics::machine();
    let kernel = numerics::kernel_path(LIBTORCH_VERSION);
    let levels = numerics::supported_cpu_capabilities();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "machine": machine,
                "kernel_path": kernel,
                "cpu_capabilities": levels,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("machine (recorded in every manifest):");
    for (k, v) in &machine {
        println!("  {k:<16} {v}");
    }
    println!("kernel path (in the cache key of kernel-path stages):");
    for (k, v) in &kernel {
        println!("  {k:<16} {v}");
    }
    println!("CPU dispatch levels this CPU runs: {}", levels.join(", "));
    println!(
        "Pin ATEN_CPU_CAPABILITY and MKL_CBWR (e.g. avx2 / AVX2) on every machine to share \
         kernel-path results across machine classes."
    );
    Ok(ExitCode::SUCCESS)
}
