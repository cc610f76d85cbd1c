//! Prefix caching for the prompt prefill.
//!
//! When the prompts of a batch share a head of token ids (the chat template and the fixed
//! opening of a prompt template), the head is run once at batch 1 and its keys/values are
//! broadcast into every row of the batch's cache; only the differing suffixes are prefilled,
//! left-padded to the longest suffix. Cache layout per row:
//!
//! ```text
//! [shared prefix, positions 0..P][pad .. pad][suffix][generated tokens ...]
//! ```
//!
//! The prefix sits at the same cache slots in every row; pad slots are marked invalid, so no
//! query attends to them, and RoPE positions count valid tokens only (row r's first suffix
//! token has position P whatever its padding), exactly as in the plain left-padded layout.
//! The numbers therefore match the plain prefill up to floating-point summation order
//! (different matmul shapes and attention masks).
//!
//! Across calls, the engine keeps the keys/values of the last heads it ran (at most
//! [`MAX_ENTRIES`] of them and [`STORE_BYTES`] together, least recently used dropped first).
//! By default ([`PrefixStore::Exact`]) a later batch reuses one only when it is exactly that
//! batch's head, so its bits are what the batch would compute: a template's fixed head runs
//! once per stage. A server ([`PrefixStore::Any`]) also keeps a single prompt's head (its whole
//! prompt but the last token), and a later batch or single prompt whose head starts with the
//! same tokens as a kept one reuses that part and runs only the rest (a single prompt only when
//! the kept part is at least half of it, e.g. a retry that repeats a prompt and appends the
//! error). Several entries let agents that alternate templates (FinAgent's intel,
//! reflection and decision prompts) each find their own head. Set `FLAG_LLM_PREFIX_CACHE=0` (or call
//! [`Engine::set_prefix_cache`](super::Engine::set_prefix_cache)) to prefill every prompt in
//! full instead; `FLAG_LLM_PREFIX_STORE=off|exact|any` sets what is kept across calls;
//! `FLAG_LLM_PREFIX_LOG=1` prints one line per prefill to stderr.

use crate::llama::KvCache;

/// A shared head shorter than this is not worth an extra forward pass.
pub const MIN_PREFIX: usize = 32;

/// Upper bound on the memory of the heads kept across calls.
pub const STORE_BYTES: usize = 64 << 20;

/// Upper bound on the number of heads kept across calls.
pub const MAX_ENTRIES: usize = 8;

/// Token counts of the prompt prefills so far (see [`Engine::prefix_stats`](super::Engine::prefix_stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefixStats {
    /// Prefills (generation calls) counted.
    pub prefills: u64,
    /// Prefills that used a shared or stored prefix.
    pub with_prefix: u64,
    /// Prompt tokens over all rows.
    pub prompt_tokens: u64,
    /// Prompt tokens actually run through the model (prefix once, suffixes per row).
    pub computed_tokens: u64,
    /// Positions run through the model, padding included (rows x padded length per pass).
    pub computed_positions: u64,
    /// Prefix tokens taken from the store kept across calls (not recomputed).
    pub reused_tokens: u64,
}

/// A head kept across calls: its token ids and its one-row cache (exactly their length).
pub(super) struct Stored {
    pub ids: Vec<u32>,
    pub kv: KvCache,
}

/// Which heads an engine keeps across calls and reuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixStore {
    /// None: every call runs its own head.
    Off,
    /// The default, what stages run with: a batch reuses a kept head only when it is exactly
    /// the batch's head, kept only when computed whole. The reused keys/values are then the
    /// bits the call would have computed itself, so a call's numbers still depend on its own
    /// prompts only (a stage rerun on a subset, or resumed in segments, gives the same bytes),
    /// and a fixed template head (the strategist's instructions) runs once per stage, not
    /// once per batch.
    Exact,
    /// Any kept head that starts the prompts, in part or whole, single prompts included (a
    /// long-lived server: `flag serve`). Numbers then depend on earlier calls, up to
    /// floating-point summation order.
    Any,
}

/// The heads kept across calls, least recently used first.
#[derive(Default)]
pub(super) struct Store {
    entries: Vec<Stored>,
}

impl Store {
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The entry sharing the longest head with `ids`, and that length (0 = none).
    pub fn best(&self, ids: &[u32]) -> (usize, usize) {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.ids, ids)))
            .max_by_key(|&(i, n)| (n, i))
            .unwrap_or((0, 0))
    }

    /// The entry whose head is exactly `ids`.
    pub fn exact(&self, ids: &[u32]) -> Option<usize> {
        self.entries.iter().position(|e| e.ids == ids)
    }

    pub fn get(&self, i: usize) -> &Stored {
        &self.entries[i]
    }

    /// Marks entry `i` as just used.
    pub fn touch(&mut self, i: usize) -> &Stored {
        let e = self.entries.remove(i);
        self.entries.push(e);
        self.entries.last().expect("just pushed")
    }

    /// Adds a head, then evicts the least recently used until the bounds hold;
    /// `bytes_per_position` is the cache's size of one position. Under [`PrefixStore::Any`]
    /// the entries the new head extends are dropped (it serves their prompts too, in part);
    /// under [`PrefixStore::Exact`] they stay, since only an exact match is reused: a batch
    /// whose head runs a token or two into its data (two stocks whose first price starts with
    /// the same digit) must not evict the template's head that the next batch needs whole.
    pub fn insert(&mut self, e: Stored, bytes_per_position: usize, mode: PrefixStore) {
        // A head over the whole budget is not kept (it would push out every entry, itself
        // last, and leave the store empty).
        if e.ids.len() * bytes_per_position > STORE_BYTES {
            return;
        }
        match mode {
            PrefixStore::Any => self
                .entries
                .retain(|old| common_prefix(&old.ids, &e.ids) < old.ids.len()),
            PrefixStore::Exact | PrefixStore::Off => self.entries.retain(|old| old.ids != e.ids),
        }
        self.entries.push(e);
        let bytes =
            |es: &[Stored]| es.iter().map(|e| e.ids.len()).sum::<usize>() * bytes_per_position;
        while !self.entries.is_empty()
            && (self.entries.len() > MAX_ENTRIES || bytes(&self.entries) > STORE_BYTES)
        {
            self.entries.remove(0);
        }
    }
}

/// Length of the longest common prefix of two id sequences.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The head every prompt shares, capped so that each prompt keeps at least one token of its
/// own (its last position gives the first next-token logits).
pub fn shared_len(prompts: &[Vec<u32>]) -> usize {
    let Some(first) = prompts.first() else {
        return 0;
    };
    let lcp = prompts[1..]
        .iter()
        .fold(first.len(), |n, p| n.min(common_prefix(&first[..n], p)));
    let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
    lcp.min(shortest.saturating_sub(1))
}

/// Whether `FLAG_LLM_PREFIX_CACHE` leaves prefix caching on (unset, or anything but
/// 0/false/off/no).
pub fn enabled_by_env() -> bool {
    match std::env::var("FLAG_LLM_PREFIX_CACHE") {
        Ok(v) => !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "off" | "no"
        ),
        Err(_) => true,
    }
}

/// The store mode from `FLAG_LLM_PREFIX_STORE` (`off`, `exact` or `any`; unset: `exact`).
pub fn store_by_env() -> Result<PrefixStore, String> {
    store_from(std::env::var("FLAG_LLM_PREFIX_STORE").ok().as_deref())
}

/// The store mode a value of `FLAG_LLM_PREFIX_STORE` names (None: unset).
pub fn store_from(value: Option<&str>) -> Result<PrefixStore, String> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("" | "exact") => Ok(PrefixStore::Exact),
        Some("off") => Ok(PrefixStore::Off),
        Some("any") => Ok(PrefixStore::Any),
        Some(other) => Err(format!(
            "FLAG_LLM_PREFIX_STORE: '{other}' is not off, exact or any"
        )),
    }
}

pub fn log_by_env() -> bool {
    std::env::var("FLAG_LLM_PREFIX_LOG").is_ok_and(|v| v.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_mode_reads_its_three_names_and_refuses_others() {
        assert_eq!(store_from(None), Ok(PrefixStore::Exact));
        assert_eq!(store_from(Some(" ")), Ok(PrefixStore::Exact));
        assert_eq!(store_from(Some("exact")), Ok(PrefixStore::Exact));
        assert_eq!(store_from(Some("OFF")), Ok(PrefixStore::Off));
        assert_eq!(store_from(Some(" any\n")), Ok(PrefixStore::Any));
        let e = store_from(Some("always")).unwrap_err();
        assert!(
            e.contains("FLAG_LLM_PREFIX_STORE") && e.contains("always"),
            "{e}"
        );
    }

    /// A store whose entries are empty caches: `insert` and `exact` only look at the ids.
    fn head(ids: &[u32]) -> Stored {
        Stored {
            ids: ids.to_vec(),
            kv: KvCache::empty_for_tests(),
        }
    }

    #[test]
    fn an_exact_store_keeps_the_head_a_longer_one_extends() {
        let template: Vec<u32> = (0..40).collect();
        let longer: Vec<u32> = (0..42).collect();
        let mut exact = Store::default();
        exact.insert(head(&template), 1, PrefixStore::Exact);
        exact.insert(head(&longer), 1, PrefixStore::Exact);
        assert!(
            exact.exact(&template).is_some(),
            "the template head was evicted"
        );
        assert!(exact.exact(&longer).is_some());
        // The same head twice is kept once.
        exact.insert(head(&template), 1, PrefixStore::Exact);
        assert_eq!(exact.entries.len(), 2);

        let mut any = Store::default();
        any.insert(head(&template), 1, PrefixStore::Any);
        any.insert(head(&longer), 1, PrefixStore::Any);
        assert!(any.exact(&template).is_none());
        assert_eq!(any.best(&template), (0, 40));
    }

    #[test]
    fn shared_len_leaves_every_prompt_a_token() {
        assert_eq!(shared_len(&[]), 0);
        assert_eq!(shared_len(&[vec![1, 2, 3]]), 2);
        assert_eq!(shared_len(&[vec![1, 2, 3, 4], vec![1, 2, 3, 5, 6]]), 3);
        assert_eq!(shared_len(&[vec![1, 2, 3], vec![1, 2, 3, 4, 5]]), 2);
        assert_eq!(shared_len(&[vec![1, 2], vec![3, 2]]), 0);
        assert_eq!(
            shared_len(&[vec![1, 2, 3, 4], vec![1, 2, 9], vec![1, 2, 3, 4]]),
            2
        );
    }
}
