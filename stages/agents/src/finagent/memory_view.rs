//! Reflection memories inside the agent stage: earlier low- and high-level reflections of one
//! ticker, keyed by the embedding of their query, searched with today's query over entries
//! dated strictly before today (FinAgent: top 5). Low-level entries come from the whole
//! `finagent_low_reflection` table (so a train-window pass fills the memory); high-level
//! ones are added as the run makes them, after that day's retrieval.
use std::collections::BTreeMap;

use flag_core::{StageError, StageResult};
use flag_llm::backend::LlmBackend;

use crate::memory::index::{Entry, ExactIndex, Filter, VectorIndex};

/// One retrieved reflection.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieved {
    pub rank: usize,
    pub id: String,
    pub date: i32,
    pub score: f64,
    pub text: String,
}

/// The reflections of every ticker, with their key embeddings. The index is rebuilt when
/// entries were added since the last search (reflection memories hold hundreds of entries).
pub struct ReflectionMemory {
    entries: Vec<Entry>,
    texts: BTreeMap<String, String>,
    index: Option<ExactIndex>,
}

/// How many texts one embedding call takes.
const EMBED_CHUNK: usize = 64;

pub fn embed_all(backend: &dyn LlmBackend, texts: &[String]) -> StageResult<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(EMBED_CHUNK) {
        out.extend(backend.embed(chunk)?);
    }
    Ok(out)
}

impl ReflectionMemory {
    pub fn new() -> Self {
        ReflectionMemory {
            entries: Vec::new(),
            texts: BTreeMap::new(),
            index: None,
        }
    }

    /// Adds an entry (`id` unique) dated `date` for `ticker`.
    pub fn add(&mut self, ticker: &str, date: i32, id: String, text: String, key: Vec<f32>) {
        self.entries.push(Entry {
            item_id: id.clone(),
            group: ticker.to_string(),
            date,
            vector: key,
        });
        self.texts.insert(id, text);
        self.index = None;
    }

    /// Every entry with its text, in the order added (the agent's state keeps them).
    pub fn records(&self) -> Vec<super::agent_state::MemoryRecord> {
        self.entries
            .iter()
            .map(|e| super::agent_state::MemoryRecord {
                ticker: e.group.clone(),
                date: e.date,
                id: e.item_id.clone(),
                text: self.texts.get(&e.item_id).cloned().unwrap_or_default(),
                vector: e.vector.clone(),
            })
            .collect()
    }

    /// Builds the index over the entries added so far (searches before this rebuild it
    /// each time).
    pub fn build(&mut self) -> StageResult<()> {
        self.index = Some(self.make_index()?);
        Ok(())
    }

    fn make_index(&self) -> StageResult<ExactIndex> {
        ExactIndex::build(None, self.entries.clone())
            .map_err(|e| StageError::Invalid(format!("reflection memory: {e}")))
    }

    /// The `k` entries of `ticker` dated before `date` nearest to `query`.
    pub fn search(
        &self,
        ticker: &str,
        date: i32,
        query: &[f32],
        k: usize,
    ) -> StageResult<Vec<Retrieved>> {
        if self.entries.is_empty() {
            return Ok(Vec::new());
        }
        let owned;
        let index = match &self.index {
            Some(i) => i,
            None => {
                owned = self.make_index()?;
                &owned
            }
        };
        Ok(index
            .search(query, k, &Filter::memory(ticker, date))
            .into_iter()
            .enumerate()
            .map(|(r, h)| Retrieved {
                rank: r + 1,
                text: self.texts.get(&h.item_id).cloned().unwrap_or_default(),
                id: h.item_id,
                date: h.date,
                score: h.score,
            })
            .collect())
    }
}

impl Default for ReflectionMemory {
    fn default() -> Self {
        Self::new()
    }
}
