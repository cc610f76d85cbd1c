//! `flag bench-store` (hidden): throughput of the store's hashing and commit path, measured
//! on the real code used by `flag run` and `flag verify`.
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;

use crate::store::{Store, hash_file};

#[derive(Args, Debug)]
pub struct BenchStoreArgs {
    /// Size of the test file in MiB
    #[arg(long, default_value_t = 1024)]
    pub size_mib: usize,
    /// Directory for the scratch store [default: a temp dir]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Instead: commit every run of this local store into the store of --store (s3://…),
    /// twice (the second pass finds everything there), and report objects/s and MB/s
    #[arg(long, value_name = "STORE_DIR")]
    pub push_from: Option<PathBuf>,
}

pub fn run(args: BenchStoreArgs, cli_store: &Option<PathBuf>) -> anyhow::Result<ExitCode> {
    if let Some(from) = &args.push_from {
        return push(from, cli_store);
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("flag-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    let store = Store::open(&dir.join("store"))?;
    let staging = store.staging_dir("0000000000000000")?;
    let file = staging.join("blob.bin");
    {
        // Incompressible, deterministic bytes (xorshift), written once.
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file)?);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..args.size_mib {
            for chunk in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            f.write_all(&buf)?;
        }
    }
    let bytes = (args.size_mib as f64) * 1024.0 * 1024.0;
    // Warm the page cache, then time hashing as verify does it.
    hash_file(&file)?;
    let t = Instant::now();
    let reps = 3;
    for _ in 0..reps {
        hash_file(&file)?;
    }
    let hash_s = t.elapsed().as_secs_f64() / reps as f64;
    let t = Instant::now();
    let rec = store.commit_output(
        &staging,
        "blob",
        &flag_core::OutputKind::File { ext: "bin" },
    )?;
    let commit_s = t.elapsed().as_secs_f64();
    let obj = store.object_path(&rec.files[0]);
    let t = Instant::now();
    let bad = store.verify(&crate::store::Manifest {
        format: crate::store::STORE_FORMAT,
        key: "bench".into(),
        pipeline: "bench".into(),
        stage: "bench".into(),
        kind: "bench".into(),
        parts: serde_json::Value::Null,
        outputs: [("blob".to_string(), rec)].into_iter().collect(),
        seconds: 0.0,
        created: String::new(),
        log: String::new(),
        compute: Default::default(),
    })?;
    let verify_s = t.elapsed().as_secs_f64();
    assert!(bad.is_empty());
    let result = serde_json::json!({
        "file_mib": args.size_mib,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "hash_gib_per_s": bytes / hash_s / (1u64 << 30) as f64,
        "commit_seconds": commit_s,
        "commit_gib_per_s": bytes / commit_s / (1u64 << 30) as f64,
        "verify_gib_per_s": bytes / verify_s / (1u64 << 30) as f64,
        "object": obj.display().to_string(),
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if args.dir.is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Store commits to object storage: every run of `from` committed into `--store`.
fn push(from: &std::path::Path, cli_store: &Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let source = Store::existing(from)?;
    let target = super::open_store(cli_store, std::path::Path::new("."), true)?;
    anyhow::ensure!(
        target.remote().is_some(),
        "--push-from needs --store s3://BUCKET/PREFIX"
    );
    let _lock = target.lock(true, |h| eprintln!("waiting for another flag run ({h})"))?;
    let runs = source.manifests()?;
    let mut passes = Vec::new();
    for pass in ["new", "present"] {
        let t = Instant::now();
        let (mut objects, mut bytes) = (0usize, 0u64);
        for m in &runs {
            let (n, b) = target.push_run_from(&source, m)?;
            objects += n;
            bytes += b;
        }
        let s = t.elapsed().as_secs_f64();
        passes.push(serde_json::json!({
            "pass": pass,
            "runs": runs.len(),
            "objects": objects,
            "bytes": bytes,
            "seconds": s,
            "runs_per_s": runs.len() as f64 / s,
            "objects_per_s": objects as f64 / s,
            "mb_per_s": bytes as f64 / 1e6 / s,
        }));
    }
    let result = serde_json::json!({
        "from": from.display().to_string(),
        "to": target.location(),
        "passes": passes,
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(ExitCode::SUCCESS)
}
