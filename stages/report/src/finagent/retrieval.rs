//! Retrieval diagnostics over `memory_hits` rows: score and age distributions per query
//! type, overlap between the query types of a day, and queries that found no memory.
use std::collections::{BTreeMap, BTreeSet};

use super::read::Hit;

/// Query types in the order the paper names them; others follow alphabetically.
const ORDER: [&str; 5] = [
    "short",
    "medium",
    "long",
    "low_reflection",
    "high_reflection",
];

pub fn type_order(t: &str) -> (usize, &str) {
    (ORDER.iter().position(|x| *x == t).unwrap_or(ORDER.len()), t)
}

/// Quantile `q` of sorted values with linear interpolation between the closest ranks
/// (numpy's default); NaN for no values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let h = (n - 1) as f64 * q;
            let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
            sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
        }
    }
}

/// Min, 25 %, median, 75 %, max.
pub fn five(mut xs: Vec<f64>) -> [f64; 5] {
    xs.sort_by(f64::total_cmp);
    [0.0, 0.25, 0.5, 0.75, 1.0].map(|q| quantile(&xs, q))
}

/// One query type's hits in one artifact.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeStats {
    pub query_type: String,
    /// Distinct (ticker, date) with at least one hit of this type.
    pub queries: usize,
    pub hits: usize,
    pub kept: usize,
    pub mean_score: f64,
    /// Min, 25 %, median, 75 %, max of the cosine scores.
    pub scores: [f64; 5],
    /// Min, 25 %, median, 75 %, max of decision date - item date, days.
    pub ages: [f64; 5],
    /// Hits whose item another query type also retrieved for the same ticker and day.
    pub shared: usize,
}

/// Items retrieved on a (ticker, day) by more than one query type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overlap {
    /// Distinct (ticker, day, item) retrieved by any type.
    pub items: usize,
    /// Of those, retrieved by two types or more.
    pub multi: usize,
}

impl Overlap {
    pub fn fraction(&self) -> f64 {
        if self.items == 0 {
            f64::NAN
        } else {
            self.multi as f64 / self.items as f64
        }
    }
}

/// Per-type statistics (in [`type_order`]) and the day overlap of one artifact's hits.
pub fn stats(hits: &[Hit]) -> (Vec<TypeStats>, Overlap) {
    // (ticker, date, item) -> query types that retrieved it.
    let mut by_item: BTreeMap<(&str, i32, &str), BTreeSet<&str>> = BTreeMap::new();
    for h in hits {
        by_item
            .entry((&h.ticker, h.date, &h.item_id))
            .or_default()
            .insert(&h.query_type);
    }
    let overlap = Overlap {
        items: by_item.len(),
        multi: by_item.values().filter(|t| t.len() > 1).count(),
    };
    let mut types: Vec<&str> = hits
        .iter()
        .map(|h| h.query_type.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    types.sort_by_key(|t| type_order(t));
    let out = types
        .into_iter()
        .map(|t| {
            let mine: Vec<&Hit> = hits.iter().filter(|h| h.query_type == t).collect();
            let scores: Vec<f64> = mine.iter().map(|h| h.score).collect();
            TypeStats {
                query_type: t.to_string(),
                queries: mine
                    .iter()
                    .map(|h| (&h.ticker, h.date))
                    .collect::<BTreeSet<_>>()
                    .len(),
                hits: mine.len(),
                kept: mine.iter().filter(|h| h.kept).count(),
                mean_score: scores.iter().sum::<f64>() / scores.len() as f64,
                scores: five(scores),
                ages: five(mine.iter().map(|h| (h.date - h.item_date) as f64).collect()),
                shared: mine
                    .iter()
                    .filter(|h| by_item[&(h.ticker.as_str(), h.date, h.item_id.as_str())].len() > 1)
                    .count(),
            }
        })
        .collect();
    (out, overlap)
}

/// For each query type, (queries asked, queries with no hit row): `asked` lists the
/// (ticker, date, query type) of the queries made; a query is empty when no artifact has a
/// hit row for it (memory_search writes no rows for a query with no memory before its day).
pub fn empty_queries(
    asked: &BTreeSet<(String, i32, String)>,
    hits: &[(String, Vec<Hit>)],
) -> Vec<(String, usize, usize)> {
    let answered: BTreeSet<(&str, i32, &str)> = hits
        .iter()
        .flat_map(|(_, rows)| rows.iter())
        .map(|h| (h.ticker.as_str(), h.date, h.query_type.as_str()))
        .collect();
    let mut per: BTreeMap<(usize, &str), (usize, usize)> = BTreeMap::new();
    for (ticker, date, t) in asked {
        let e = per.entry(type_order(t)).or_default();
        e.0 += 1;
        if !answered.contains(&(ticker.as_str(), *date, t.as_str())) {
            e.1 += 1;
        }
    }
    per.into_iter()
        .map(|((_, t), (n, empty))| (t.to_string(), n, empty))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(date: i32, t: &str, item: &str, item_date: i32, score: f64) -> Hit {
        Hit {
            ticker: "MSFT".into(),
            date,
            query_type: t.into(),
            rank: 1,
            item_id: item.into(),
            item_date,
            score,
            kept: true,
        }
    }

    #[test]
    fn quantiles_interpolate_linearly() {
        assert_eq!(five(vec![4.0, 1.0, 3.0, 2.0]), [1.0, 1.75, 2.5, 3.25, 4.0]);
        assert_eq!(quantile(&[7.0], 0.3), 7.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn overlap_counts_items_shared_by_types_on_the_same_day() {
        // Day 10: a by short and long, b by medium. Day 11: a by short only (not the same
        // day as the long hit, so not shared).
        let hits = [
            hit(10, "short", "a", 8, 0.9),
            hit(10, "long", "a", 8, 0.5),
            hit(10, "medium", "b", 2, 0.7),
            hit(11, "short", "a", 8, 0.3),
        ];
        let (types, o) = stats(&hits);
        assert_eq!(o, Overlap { items: 3, multi: 1 });
        let names: Vec<&str> = types.iter().map(|t| t.query_type.as_str()).collect();
        assert_eq!(names, ["short", "medium", "long"]);
        assert_eq!(
            (types[0].hits, types[0].queries, types[0].shared),
            (2, 2, 1)
        );
        assert_eq!(types[0].ages, [2.0, 2.25, 2.5, 2.75, 3.0]);
        assert_eq!(types[1].ages, [8.0; 5]);
        assert!((types[0].mean_score - 0.6).abs() < 1e-12);
    }
}
