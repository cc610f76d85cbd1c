//! Embeds an rpath to the libtorch that tch was linked against, so `flag` and its test
//! binaries run without LD_LIBRARY_PATH. torch-sys (links = "tch") exports the directory.
//! Also records that libtorch's version (torch/version.py beside lib/) for the kernel path
//! that keys libtorch-computed stages.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let mut version = String::from("unknown (tch 0.24)");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        let file = std::path::Path::new(&dir).join("../version.py");
        println!("cargo:rerun-if-changed={}", file.display());
        if let Ok(text) = std::fs::read_to_string(&file) {
            let field = |name: &str| {
                text.lines().find_map(|l| l.strip_prefix(name)).map(|v| {
                    v.trim()
                        .trim_start_matches('=')
                        .trim()
                        .trim_matches('\'')
                        .to_string()
                })
            };
            if let Some(v) = field("__version__") {
                version = match field("git_version") {
                    Some(g) if g.len() >= 8 => format!("{v} ({})", &g[..8]),
                    _ => v,
                };
            }
        }
    }
    println!("cargo:rustc-env=FLAG_LIBTORCH_VERSION={version}");
}
