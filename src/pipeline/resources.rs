//! What a stage asks of a cluster node (`resources:` in a pipeline file, top level for every
//! stage, per stage to override): used by the Slurm executor as sbatch options, ignored by the
//! local one, and never part of a cache key (where a stage runs does not change its bytes: the
//! worker checks it computes on the keyed environment).
use serde_json::Value;

/// The resource keys, with what each becomes.
pub const RESOURCE_KEYS: &[&str] = &["partition", "cpus", "mem", "time", "gres"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// `--partition`
    pub partition: Option<String>,
    /// `--cpus-per-task`
    pub cpus: Option<u32>,
    /// `--mem` (e.g. 4G, 500M; a bare number is MB, as Slurm reads it)
    pub mem: Option<String>,
    /// `--time` (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)
    pub time: Option<String>,
    /// `--gres` (e.g. gpu:1)
    pub gres: Option<String>,
}

fn all(s: &str, ok: impl Fn(char) -> bool) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(ok)
}

fn text(key: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.trim().to_string()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!("'{key}' must be a string or a number, got {other}")),
    }
}

impl Resources {
    /// Parses one `resources:` map; an error names the key.
    pub fn parse(v: &Value) -> Result<Resources, (Option<String>, String)> {
        let Value::Object(m) = v else {
            return Err((
                None,
                "'resources' must be a map (partition, cpus, mem, time, gres)".into(),
            ));
        };
        let mut r = Resources::default();
        for (k, v) in m {
            let bad = |msg: String| (Some(k.clone()), format!("resources: '{k}' {msg}"));
            match k.as_str() {
                "partition" => {
                    let s = text(k, v).map_err(bad)?;
                    if !all(&s, |c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
                        return Err(bad(format!("'{s}' is not a partition name")));
                    }
                    r.partition = Some(s);
                }
                "cpus" => {
                    let n = v
                        .as_u64()
                        .filter(|n| (1..=4096).contains(n))
                        .ok_or_else(|| {
                            bad(format!(
                                "must be a whole number of CPUs (1..=4096), got {v}"
                            ))
                        })?;
                    r.cpus = Some(n as u32);
                }
                "mem" => {
                    let s = text(k, v).map_err(bad)?;
                    let digits = s.trim_end_matches(['K', 'M', 'G', 'T']);
                    if digits.is_empty()
                        || !all(digits, |c| c.is_ascii_digit())
                        || s.len() - digits.len() > 1
                    {
                        return Err(bad(format!("'{s}' is not a memory size (e.g. 500M, 4G)")));
                    }
                    r.mem = Some(s);
                }
                "time" => {
                    let s = text(k, v).map_err(bad)?;
                    let (days, rest) = s.split_once('-').unwrap_or(("0", &s));
                    let parts: Vec<&str> = rest.split(':').collect();
                    if !all(days, |c| c.is_ascii_digit())
                        || parts.len() > 3
                        || !parts.iter().all(|p| all(p, |c| c.is_ascii_digit()))
                    {
                        return Err(bad(format!(
                            "'{s}' is not a Slurm time (minutes, HH:MM:SS or D-HH:MM)"
                        )));
                    }
                    r.time = Some(s);
                }
                "gres" => {
                    let s = text(k, v).map_err(bad)?;
                    if !all(&s, |c| c.is_ascii_alphanumeric() || "_:,.-".contains(c)) {
                        return Err(bad(format!("'{s}' is not a gres (e.g. gpu:1)")));
                    }
                    r.gres = Some(s);
                }
                _ => {
                    return Err(bad(format!(
                        "is not a resource (allowed: {})",
                        RESOURCE_KEYS.join(", ")
                    )));
                }
            }
        }
        Ok(r)
    }

    /// This stage's own values over the pipeline's defaults.
    pub fn over(self, defaults: &Resources) -> Resources {
        Resources {
            partition: self.partition.or_else(|| defaults.partition.clone()),
            cpus: self.cpus.or(defaults.cpus),
            mem: self.mem.or_else(|| defaults.mem.clone()),
            time: self.time.or_else(|| defaults.time.clone()),
            gres: self.gres.or_else(|| defaults.gres.clone()),
        }
    }

    /// The sbatch options (each one argument; no shell sees them).
    pub fn sbatch_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(p) = &self.partition {
            a.push(format!("--partition={p}"));
        }
        if let Some(c) = self.cpus {
            a.push(format!("--cpus-per-task={c}"));
        }
        if let Some(m) = &self.mem {
            a.push(format!("--mem={m}"));
        }
        if let Some(t) = &self.time {
            a.push(format!("--time={t}"));
        }
        if let Some(g) = &self.gres {
            a.push(format!("--gres={g}"));
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_and_merges_and_refuses_what_sbatch_would_misread() {
        let d = Resources::parse(&json!({"partition": "debug", "mem": "1G"})).unwrap();
        let s = Resources::parse(&json!({"cpus": 2, "gres": "gpu:1", "time": "0-01:30"}))
            .unwrap()
            .over(&d);
        assert_eq!(
            s.sbatch_args(),
            [
                "--partition=debug",
                "--cpus-per-task=2",
                "--mem=1G",
                "--time=0-01:30",
                "--gres=gpu:1"
            ]
        );
        for bad in [
            json!({"cpus": 0}),
            json!({"cpus": "2"}),
            json!({"mem": "4GB"}),
            json!({"mem": "--wrap=x"}),
            json!({"time": "1h"}),
            json!({"partition": "a b"}),
            json!({"gres": "gpu;rm"}),
            json!({"nodes": 2}),
            json!([1]),
        ] {
            assert!(Resources::parse(&bad).is_err(), "{bad}");
        }
    }
}
