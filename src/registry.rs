//! Every stage kind, by its `uses:` name: those whose work is plain Rust and DataFusion
//! (market, trading, report) are linked into this binary; those that compute through libtorch
//! are declared by the worker binary ([`crate::worker::describe`]), which alone links them.
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use flag_core::{Params, Stage};

use crate::worker::describe::{Query, RemoteStage, WorkerClient};

pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn Stage>>,
    remote: BTreeMap<&'static str, Arc<RemoteStage>>,
    client: Option<Arc<WorkerClient>>,
}

/// The kinds this binary links (no libtorch): declared here, run by `flag stage-exec`.
pub fn local_stages() -> Vec<Box<dyn Stage>> {
    flag_market::stages()
        .into_iter()
        .chain(flag_trading::stages())
        .chain(flag_report::stages())
        .collect()
}

/// Why the worker's kinds are missing (printed once).
static WORKER_WARNING: OnceLock<()> = OnceLock::new();

impl Registry {
    pub fn builtin() -> Self {
        let mut kinds: BTreeMap<&'static str, Arc<dyn Stage>> = BTreeMap::new();
        for s in local_stages() {
            let s: Arc<dyn Stage> = Arc::from(s);
            let prev = kinds.insert(s.kind(), s);
            assert!(prev.is_none(), "two stages share a kind name");
        }
        let mut remote = BTreeMap::new();
        let client = match crate::worker::worker_binary() {
            Ok(bin) => Some(Arc::new(WorkerClient::new(bin))),
            Err(e) => {
                warn_once(&e.to_string());
                None
            }
        };
        if let Some(c) = &client {
            match c.catalogue() {
                Ok(decls) => {
                    for d in &decls {
                        if kinds.contains_key(d.kind.as_str()) {
                            continue;
                        }
                        let s = Arc::new(RemoteStage::new(d, c.clone()));
                        remote.insert(s.kind(), s.clone());
                        kinds.insert(s.kind(), s);
                    }
                }
                Err(e) => warn_once(&format!("the stage worker could not list its kinds: {e}")),
            }
        }
        Registry {
            kinds,
            remote,
            client,
        }
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn Stage>> {
        self.kinds.get(kind).cloned()
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }

    /// Asks the worker about all these stages at once (one process, or none when every
    /// answer is cached), so the per-stage questions that follow are answered from memory.
    /// Best effort: a failure here is met again, with its message, where the answer is used.
    pub fn prefetch(&self, stages: &[(&str, &Params, Vec<&str>)]) {
        let Some(client) = &self.client else { return };
        let queries: Vec<Query> = stages
            .iter()
            .filter_map(|(kind, params, bound)| {
                let r = self.remote.get(kind)?;
                // The declaration questions are asked without bound inputs, the check with.
                Some([r.query(params, &[]), r.query(params, bound)])
            })
            .flatten()
            .collect();
        if !queries.is_empty() {
            let _ = client.answers(&queries);
        }
    }
}

fn warn_once(msg: &str) {
    if WORKER_WARNING.set(()).is_ok() {
        eprintln!("warning: {msg}; the libtorch stage kinds are unavailable");
    }
}
/// Levenshtein distance, for "did you mean" suggestions.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// " (did you mean 'x'?)" when a candidate is close enough, else "".
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min()
        .map(|(_, c)| format!(" (did you mean '{c}'?)"))
        .unwrap_or_default()
}
