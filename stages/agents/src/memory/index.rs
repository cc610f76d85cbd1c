//! Retrieval over embedded memory: the [`VectorIndex`] interface, the brute-force
//! [`ExactIndex`] behind it, and FinAgent's diversified result ([`diversify`]).
//!
//! Scores are cosine similarities of L2-normalised f32 vectors, i.e. dot products. The
//! [`ExactIndex`] computes each one in f64: every f32 x f32 product is exact in f64, and the
//! 384 products are summed in a fixed order (four running sums over `i % 4`, then
//! `(s0 + s1) + (s2 + s3)`; no FMA), so a score is a pure function of the two vectors' bytes:
//! the same on every machine, thread count and build. Hits are ordered by score (descending),
//! then date (ascending: the older of two equally similar items first), then item id
//! (ascending), so ties have one answer.
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};

/// Which items a search may return: those of one group (a ticker) dated strictly before a
/// day (the decision day: items dated on it or later are the future). `None` = no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filter<'a> {
    pub group: Option<&'a str>,
    /// date32 (days since 1970-01-01): only items with `date < before`.
    pub before: Option<i32>,
}

impl<'a> Filter<'a> {
    /// FinAgent's memory at decision day `day`: the ticker's items dated before it.
    pub fn memory(ticker: &'a str, day: i32) -> Self {
        Filter {
            group: Some(ticker),
            before: Some(day),
        }
    }
}

/// One retrieved item.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The item's position in the entries the index was built from.
    pub row: usize,
    pub item_id: String,
    /// date32 of the item.
    pub date: i32,
    /// Cosine similarity to the query (dot product of unit vectors).
    pub score: f64,
}

/// The order of hits: score descending, then date, then item id (ascending).
pub fn hit_order(a: &Hit, b: &Hit) -> Ordering {
    b.score
        .total_cmp(&a.score)
        .then(a.date.cmp(&b.date))
        .then_with(|| a.item_id.cmp(&b.item_id))
}

/// A searchable set of embedded items. Implementations return at most `k` hits passing
/// `filter`, ordered by [`hit_order`]; an exact index returns the true top k, an approximate
/// one (HNSW) may miss some and says so in its docs.
pub trait VectorIndex {
    /// Vector width every query must have.
    fn dim(&self) -> usize;
    /// Items held.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The best `k` items for `query` (a unit vector of `dim()` floats) that pass `filter`.
    fn search(&self, query: &[f32], k: usize, filter: &Filter) -> Vec<Hit>;
    /// How many items pass `filter` (0: the query has no memory to search).
    fn count(&self, filter: &Filter) -> usize;
}

/// One item to index.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub item_id: String,
    pub group: String,
    pub date: i32,
    pub vector: Vec<f32>,
}

/// Why entries cannot be indexed; `row` is the 0-based position in the entries given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexError {
    /// A vector of another width than the first one (or than the dim asked for).
    Dim { row: usize, got: usize, want: usize },
    /// A NaN or infinite component.
    NotFinite { row: usize, at: usize },
    /// An item id given twice.
    Duplicate {
        item_id: String,
        first: usize,
        row: usize,
    },
}

impl std::fmt::Display for IndexError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IndexError::Dim { row, got, want } => write!(
                f,
                "row {}: embedding has {got} values, expected {want}",
                row + 1
            ),
            IndexError::NotFinite { row, at } => {
                write!(f, "row {}: embedding[{at}] is not a finite number", row + 1)
            }
            IndexError::Duplicate {
                item_id,
                first,
                row,
            } => write!(
                f,
                "rows {} and {}: item_id '{item_id}' appears twice",
                first + 1,
                row + 1
            ),
        }
    }
}

impl std::error::Error for IndexError {}

/// One group's items, sorted by (date, item id): the items before a day are a prefix.
#[derive(Debug, Default)]
struct Group {
    dates: Vec<i32>,
    ids: Vec<String>,
    rows: Vec<usize>,
    /// Row-major, `dim` floats per item.
    vectors: Vec<f32>,
}

/// Brute force: every candidate's dot product with the query. Memory is the vectors
/// themselves (4 bytes x dim per item); a search costs one pass over the candidates.
#[derive(Debug)]
pub struct ExactIndex {
    dim: usize,
    len: usize,
    groups: BTreeMap<String, Group>,
}

/// Dot product of two equally long f32 slices, summed in f64 in the fixed order described in
/// the module docs.
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut s = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..4 {
            s[j] += f64::from(x[j]) * f64::from(y[j]);
        }
    }
    for (j, (x, y)) in ra.iter().zip(rb).enumerate() {
        s[j] += f64::from(*x) * f64::from(*y);
    }
    (s[0] + s[1]) + (s[2] + s[3])
}

impl ExactIndex {
    /// Indexes `entries`: every vector of width `dim` (None: the first entry's) and finite,
    /// item ids unique. Vectors are used as given (callers store unit vectors).
    pub fn build(dim: Option<usize>, entries: Vec<Entry>) -> Result<Self, IndexError> {
        let want = dim.unwrap_or_else(|| entries.first().map_or(0, |e| e.vector.len()));
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (row, e) in entries.iter().enumerate() {
            if e.vector.len() != want {
                return Err(IndexError::Dim {
                    row,
                    got: e.vector.len(),
                    want,
                });
            }
            if let Some(at) = e.vector.iter().position(|x| !x.is_finite()) {
                return Err(IndexError::NotFinite { row, at });
            }
            if let Some(&first) = seen.get(e.item_id.as_str()) {
                return Err(IndexError::Duplicate {
                    item_id: e.item_id.clone(),
                    first,
                    row,
                });
            }
            seen.insert(&e.item_id, row);
        }
        drop(seen);
        let len = entries.len();
        let mut order: Vec<usize> = (0..len).collect();
        order.sort_by(|&a, &b| {
            let (x, y) = (&entries[a], &entries[b]);
            (&x.group, x.date, &x.item_id).cmp(&(&y.group, y.date, &y.item_id))
        });
        let mut slots: Vec<Option<Entry>> = entries.into_iter().map(Some).collect();
        let mut groups: BTreeMap<String, Group> = BTreeMap::new();
        for row in order {
            let e = slots[row].take().expect("each row once");
            let g = groups.entry(e.group).or_default();
            g.dates.push(e.date);
            g.ids.push(e.item_id);
            g.rows.push(row);
            g.vectors.extend_from_slice(&e.vector);
        }
        Ok(ExactIndex {
            dim: want,
            len,
            groups,
        })
    }

    /// The groups (and how many items each prefix date range holds) a filter selects.
    fn candidates<'s>(&'s self, filter: &Filter) -> Vec<(&'s Group, usize)> {
        let prefix = |g: &Group| match filter.before {
            Some(d) => g.dates.partition_point(|&x| x < d),
            None => g.dates.len(),
        };
        match filter.group {
            Some(name) => self
                .groups
                .get(name)
                .map(|g| vec![(g, prefix(g))])
                .unwrap_or_default(),
            None => self.groups.values().map(|g| (g, prefix(g))).collect(),
        }
    }
}

/// Keeps the best `k` hits seen, in [`hit_order`].
struct TopK {
    k: usize,
    best: Vec<Hit>,
}

impl TopK {
    fn worse_than_all(&self, score: f64) -> bool {
        self.best.len() == self.k && self.best.last().is_some_and(|w| score < w.score)
    }

    fn offer(&mut self, hit: Hit) {
        let at = self
            .best
            .partition_point(|h| hit_order(h, &hit) != Ordering::Greater);
        if at < self.k {
            self.best.insert(at, hit);
            self.best.truncate(self.k);
        }
    }
}

impl VectorIndex for ExactIndex {
    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.len
    }

    fn count(&self, filter: &Filter) -> usize {
        self.candidates(filter).iter().map(|(_, n)| n).sum()
    }

    /// # Panics
    /// When `query.len() != self.dim()` (a caller bug: queries come from the same embedder).
    fn search(&self, query: &[f32], k: usize, filter: &Filter) -> Vec<Hit> {
        assert_eq!(query.len(), self.dim, "query width");
        let mut top = TopK {
            k,
            best: Vec::with_capacity(k + 1),
        };
        if k == 0 {
            return top.best;
        }
        for (g, n) in self.candidates(filter) {
            for (i, v) in g.vectors.chunks_exact(self.dim.max(1)).take(n).enumerate() {
                let score = dot_f64(query, v);
                // Cheap reject; equal scores still go through the full tie-break.
                if top.worse_than_all(score) {
                    continue;
                }
                top.offer(Hit {
                    row: g.rows[i],
                    item_id: g.ids[i].clone(),
                    date: g.dates[i],
                    score,
                });
            }
        }
        top.best
    }
}

/// One hit chosen by [`diversify`]: which query type (`kind`, the index into the lists
/// given) and rank (0-based) it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Chosen {
    pub kind: usize,
    pub rank: usize,
    pub hit: Hit,
}

/// FinAgent's diversified retrieval: the first `k` hits of each query type's list (lists in
/// the caller's type order, each in rank order), de-duplicated by item id keeping the first
/// occurrence (earlier type, then better rank), returned in date order, then item id.
pub fn diversify(per_type: &[Vec<Hit>], k: usize) -> Vec<Chosen> {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut out = Vec::new();
    for (kind, hits) in per_type.iter().enumerate() {
        for (rank, hit) in hits.iter().take(k).enumerate() {
            if seen.insert(hit.item_id.as_str()) {
                out.push(Chosen {
                    kind,
                    rank,
                    hit: hit.clone(),
                });
            }
        }
    }
    out.sort_by(|a, b| {
        (a.hit.date, &a.hit.item_id, a.kind, a.rank).cmp(&(
            b.hit.date,
            &b.hit.item_id,
            b.kind,
            b.rank,
        ))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, group: &str, date: i32, v: &[f32]) -> Entry {
        Entry {
            item_id: id.into(),
            group: group.into(),
            date,
            vector: v.to_vec(),
        }
    }

    #[test]
    fn exact_search_filters_group_and_strictly_earlier_dates() {
        let idx = ExactIndex::build(
            None,
            vec![
                entry("a", "X", 10, &[1.0, 0.0]),
                entry("b", "X", 11, &[0.8, 0.6]),
                entry("c", "X", 12, &[1.0, 0.0]),
                entry("d", "Y", 1, &[1.0, 0.0]),
            ],
        )
        .unwrap();
        let q = [1.0, 0.0];
        let ids = |f: Filter| -> Vec<String> {
            idx.search(&q, 5, &f)
                .into_iter()
                .map(|h| h.item_id)
                .collect()
        };
        assert_eq!(ids(Filter::memory("X", 12)), ["a", "b"]);
        assert_eq!(ids(Filter::memory("X", 10)), Vec::<String>::new());
        assert_eq!(ids(Filter::memory("X", 13)), ["a", "c", "b"]);
        assert_eq!(ids(Filter::memory("Z", 13)), Vec::<String>::new());
        // Equal scores: the older item first, whatever its group.
        assert_eq!(ids(Filter::default()), ["d", "a", "c", "b"]);
        assert_eq!(idx.count(&Filter::memory("X", 12)), 2);
        assert_eq!(idx.search(&q, 1, &Filter::memory("X", 13))[0].row, 0);
    }

    #[test]
    fn build_rejects_bad_vectors_and_duplicate_ids() {
        let e = ExactIndex::build(Some(2), vec![entry("a", "X", 1, &[1.0])]).unwrap_err();
        assert_eq!(e.to_string(), "row 1: embedding has 1 values, expected 2");
        let e = ExactIndex::build(None, vec![entry("a", "X", 1, &[1.0, f32::NAN])]).unwrap_err();
        assert_eq!(e.to_string(), "row 1: embedding[1] is not a finite number");
        let e = ExactIndex::build(
            None,
            vec![entry("a", "X", 1, &[1.0]), entry("a", "Y", 2, &[1.0])],
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "rows 1 and 2: item_id 'a' appears twice");
    }

    #[test]
    fn dot_is_exact_products_in_a_fixed_order() {
        let a: Vec<f32> = (0..7).map(|i| 0.1 * i as f32).collect();
        let b: Vec<f32> = (0..7).map(|i| 1.0 - 0.05 * i as f32).collect();
        let want: f64 = {
            let p: Vec<f64> = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .collect();
            ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + p[3])
        };
        assert_eq!(dot_f64(&a, &b), want);
    }
}
