//! Every stage kind this binary can run, by its `uses:` name.
use std::collections::BTreeMap;
use std::sync::Arc;

use flag_core::Stage;

pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn Stage>>,
}

impl Registry {
    pub fn builtin() -> Self {
        let mut kinds = BTreeMap::new();
        let all = flag_market::stages()
            .into_iter()
            .chain(flag_trading::stages())
            .chain(flag_report::stages())
            .chain(flag_rl::stages())
            .chain(flag_agents::stages())
            .chain(flag_ppo::stages());
        for s in all {
            let s: Arc<dyn Stage> = Arc::from(s);
            let prev = kinds.insert(s.kind(), s);
            assert!(prev.is_none(), "two stages share a kind name");
        }
        Registry { kinds }
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn Stage>> {
        self.kinds.get(kind).cloned()
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
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
