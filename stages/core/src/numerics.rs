//! The reproducibility contract: which stages give the same bytes on every machine, and which
//! give bytes that depend on the float kernels that computed them.
//!
//! - [`Numerics::Portable`]: plain Rust arithmetic in a fixed order (IEEE 754, no vendor
//!   kernels, no reduction whose order depends on the thread count or the CPU; the CPU DDQN's
//!   f32 products are one fused multiply-add chain per output whatever the tiling). Same key,
//!   same bytes on any machine; the kernel path is recorded in the manifest but is not part
//!   of the key.
//! - [`Numerics::KernelPath`]: the stage computes through libtorch (and so MKL / oneDNN /
//!   cuBLAS). Its bytes are identical for the same seed on the same *kernel path* and only
//!   statistically equal across kernel paths. The kernel path ([`kernel_path`]: libtorch
//!   version, ATen's CPU dispatch level, MKL's code path, and the device and thread count the
//!   stage reports in `environment()`) is part of the cache key, so another machine class
//!   reruns the stage with a reason that names the difference instead of silently reusing
//!   bytes it would not have produced.
//! - [`Numerics::Remote`]: an external service computes the result (the OpenAI-compatible
//!   backend); its URL and model are params, nothing about this machine is keyed.
//!
//! Pinning: `ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2` on every machine makes the recorded
//! kernel path (and so the key) the same on any AVX2-capable x86-64 CPU; that is how a team
//! shares one store across machine classes.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a stage's output bytes relate to the machine that computed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Numerics {
    /// Bit-identical on every machine for the same key.
    Portable,
    /// Bit-identical on the same kernel path (in the key); statistically equal elsewhere.
    KernelPath,
    /// Computed by an external service named in the params (an OpenAI-compatible endpoint):
    /// as reproducible as that service is; nothing about this machine is keyed.
    Remote,
}

impl Numerics {
    pub fn label(self) -> &'static str {
        match self {
            Numerics::Portable => "portable",
            Numerics::KernelPath => "kernel-path",
            Numerics::Remote => "remote",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Numerics::Portable => "same key, same bytes on any machine",
            Numerics::KernelPath => {
                "same bytes on the same kernel path (libtorch, CPU dispatch, BLAS path, \
                 device, threads: all in the key); statistically equal elsewhere"
            }
            Numerics::Remote => {
                "computed by the service named in the params; as reproducible as it is"
            }
        }
    }
}

/// Environment variables that change which float kernels libtorch and MKL run. Each one that
/// is set is recorded verbatim.
pub const KERNEL_ENV_VARS: &[&str] = &[
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
];

/// The CPU features ATen's dispatcher looks at (x86-64), detected once.
#[derive(Debug, Clone, Copy, Default)]
struct CpuFeatures {
    avx2: bool,
    fma: bool,
    avx512f: bool,
    avx512vl: bool,
    avx512bw: bool,
    avx512dq: bool,
}

fn cpu_features() -> CpuFeatures {
    #[cfg(target_arch = "x86_64")]
    {
        CpuFeatures {
            avx2: std::is_x86_feature_detected!("avx2"),
            fma: std::is_x86_feature_detected!("fma"),
            avx512f: std::is_x86_feature_detected!("avx512f"),
            avx512vl: std::is_x86_feature_detected!("avx512vl"),
            avx512bw: std::is_x86_feature_detected!("avx512bw"),
            avx512dq: std::is_x86_feature_detected!("avx512dq"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        CpuFeatures::default()
    }
}

/// The dispatch levels this CPU can run, lowest first (`default` always; `avx2`, `avx512`
/// when the CPU has what ATen requires for them). Tests use it to run under every level.
pub fn supported_cpu_capabilities() -> Vec<&'static str> {
    let f = cpu_features();
    let mut levels = vec!["default"];
    if cfg!(target_arch = "x86_64") {
        if f.avx2 && f.fma {
            levels.push("avx2");
        }
        if f.avx512f && f.avx512vl && f.avx512bw && f.avx512dq && f.fma {
            levels.push("avx512");
        }
    }
    levels
}

/// ATen's CPU dispatch level as libtorch resolves it (`at::get_cpu_capability`): a valid
/// `ATEN_CPU_CAPABILITY` wins, an invalid one is ignored (ATen warns), else the best level the
/// CPU supports. The test suite checks this against `torch.backends.cpu.get_cpu_capability()`.
pub fn cpu_capability() -> String {
    let best = *supported_cpu_capabilities()
        .last()
        .expect("default is always supported");
    if !cfg!(target_arch = "x86_64") {
        return std::env::consts::ARCH.to_string();
    }
    match std::env::var("ATEN_CPU_CAPABILITY").ok().as_deref() {
        Some(v @ ("default" | "avx2" | "avx512")) => v.to_string(),
        _ => best.to_string(),
    }
}

fn cpu_vendor() -> String {
    cpuinfo_field("vendor_id").unwrap_or_else(|| "unknown".into())
}

fn cpu_model() -> String {
    cpuinfo_field("model name").unwrap_or_else(|| std::env::consts::ARCH.into())
}

fn cpuinfo_field(name: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().to_string())
}

/// MKL's code path: the pinned branch (`MKL_CBWR`, capped by `MKL_ENABLE_INSTRUCTIONS`) when
/// set, else MKL's own choice, which depends on the CPU vendor and instruction set.
fn blas_path() -> String {
    let var = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
    if let Some(cbwr) = var("MKL_CBWR") {
        return format!("mkl cbwr={}", cbwr.trim().to_ascii_uppercase());
    }
    let f = cpu_features();
    let isa = if f.avx512f && f.avx512vl && f.avx512bw && f.avx512dq {
        "avx512"
    } else if f.avx2 && f.fma {
        "avx2"
    } else {
        "sse"
    };
    let cap = var("MKL_ENABLE_INSTRUCTIONS")
        .map(|v| format!(" max={}", v.trim().to_ascii_uppercase()))
        .unwrap_or_default();
    format!("mkl auto {} {isa}{cap}", cpu_vendor())
}

/// The kernel path of this process: the part of the environment that changes the bytes of a
/// [`Numerics::KernelPath`] stage. Keyed; the device and thread count come from the stage.
pub fn kernel_path(libtorch: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("libtorch".into(), libtorch.to_string());
    m.insert("cpu_capability".into(), cpu_capability());
    m.insert("blas".into(), blas_path());
    // The oneDNN caps; ATEN_CPU_CAPABILITY and the MKL variables are resolved above.
    for v in ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"] {
        if let Ok(x) = std::env::var(v) {
            m.insert(v.to_ascii_lowercase(), x);
        }
    }
    m
}

/// The GPU models of this machine (NVIDIA driver's /proc entries), for CUDA stages' keys.
pub fn gpu_models() -> Option<String> {
    let dir = std::fs::read_dir("/proc/driver/nvidia/gpus").ok()?;
    let mut models: Vec<String> = dir
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("information")).ok())
        .filter_map(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string()))
        })
        .collect();
    models.sort();
    (!models.is_empty()).then(|| models.join(", "))
}

/// Whether this machine shows a CUDA GPU to the processes started here (an NVIDIA driver with
/// at least one GPU, not hidden by `CUDA_VISIBLE_DEVICES`). Read without libtorch, so the
/// coordinator, which never loads it, resolves `device: auto` for the key as a worker here
/// will; the worker checks that libtorch can use the GPU before it computes.
pub fn cuda_present() -> bool {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        let v = v.trim();
        if v.is_empty() || v == "-1" || v.starts_with("-1,") {
            return false;
        }
    }
    std::fs::read_dir("/proc/driver/nvidia/gpus").is_ok_and(|d| d.flatten().next().is_some())
}

/// The intra-op thread count libtorch starts with, as the key records it when a stage does not
/// set one: `OMP_NUM_THREADS`, else `MKL_NUM_THREADS`, else the physical cores this process
/// may use. The worker sets libtorch to the keyed count, so the key is what computes.
pub fn default_threads() -> usize {
    for var in ["OMP_NUM_THREADS", "MKL_NUM_THREADS"] {
        if let Some(n) = std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n > 0)
        {
            return n;
        }
    }
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let physical = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .map(|text| {
            let mut cores = std::collections::BTreeSet::new();
            let (mut package, mut core) = (None, None);
            for line in text.lines().chain(std::iter::once("")) {
                match line.split_once(':').map(|(k, v)| (k.trim(), v.trim())) {
                    Some(("physical id", v)) => package = Some(v.to_string()),
                    Some(("core id", v)) => core = Some(v.to_string()),
                    None if line.trim().is_empty() => {
                        if let (Some(p), Some(c)) = (package.take(), core.take()) {
                            cores.insert((p, c));
                        }
                    }
                    _ => {}
                }
            }
            cores.len()
        })
        .filter(|n| *n > 0)
        .unwrap_or(logical);
    physical.min(logical).max(1)
}

/// What the manifest records about the machine for every stage run (not keyed by itself).
pub fn machine() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert(
        "arch".into(),
        format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
    );
    m.insert("cpu".into(), cpu_model());
    m.insert(
        "cores".into(),
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .to_string(),
    );
    for v in KERNEL_ENV_VARS {
        if let Ok(x) = std::env::var(v) {
            m.insert(format!("env {v}"), x);
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_always_supported_and_first() {
        let levels = supported_cpu_capabilities();
        assert_eq!(levels[0], "default");
        assert!(levels.contains(&cpu_capability().as_str()) || !cfg!(target_arch = "x86_64"));
    }

    #[test]
    fn kernel_path_names_libtorch_capability_and_blas() {
        let k = kernel_path("2.11.0");
        assert_eq!(k["libtorch"], "2.11.0");
        assert!(k.contains_key("cpu_capability"));
        assert!(k["blas"].starts_with("mkl "), "{}", k["blas"]);
    }
}
