//! Anonymisation of everything shown to the model, so it cannot recall what happened next:
//! the traded company becomes "the Company", other known companies "another company",
//! calendar dates "[date]" and years "[year]". Prompts speak of days relative to the
//! decision ("day t-5") and rebase prices, so no absolute date or price level remains.
use std::collections::BTreeMap;

/// Known tickers and the names that identify them (brands and chief executives included).
/// Extended per run with the `aliases` param.
const COMPANIES: &[(&[&str], &[&str])] = &[
    (&["AAPL"], &["Apple Inc", "Apple", "iPhone", "Tim Cook"]),
    (
        &["AMZN"],
        &[
            "Amazon.com",
            "Amazon",
            "AWS",
            "Andy Jassy",
            "Jeff Bezos",
            "Bezos",
        ],
    ),
    (
        &["GOOGL", "GOOG"],
        &["Alphabet", "Google", "YouTube", "Sundar Pichai"],
    ),
    (
        &["META", "FB"],
        &[
            "Meta Platforms",
            "Meta",
            "Facebook",
            "Instagram",
            "WhatsApp",
            "Mark Zuckerberg",
            "Zuckerberg",
        ],
    ),
    (
        &["MSFT"],
        &["Microsoft", "Azure", "Satya Nadella", "Nadella"],
    ),
    (&["TSLA"], &["Tesla", "Elon Musk", "Musk"]),
    (&["NVDA"], &["Nvidia", "Jensen Huang"]),
    (&["NFLX"], &["Netflix"]),
    (&["ETH"], &["Ethereum", "Ether", "Vitalik Buterin"]),
    (&["BTC"], &["Bitcoin"]),
];

pub const TARGET: &str = "the Company";
pub const OTHER: &str = "another company";
pub const DATE: &str = "[date]";
pub const YEAR: &str = "[year]";

const MONTHS: &[&str] = &[
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
    "Sept",
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
];

/// Replaces the names of one target ticker (and of every other known company).
#[derive(Debug, Clone)]
pub struct Anonymiser {
    /// (pattern, case-sensitive, replacement), longest pattern first.
    phrases: Vec<(String, bool, &'static str)>,
}

impl Anonymiser {
    /// `aliases`: extra names per ticker (param `aliases`), e.g. {"XOM": ["Exxon"]}.
    pub fn new(target: &str, aliases: &BTreeMap<String, Vec<String>>) -> Self {
        let mut groups: Vec<(Vec<String>, Vec<String>)> = COMPANIES
            .iter()
            .map(|(t, n)| {
                (
                    t.iter().map(|s| s.to_string()).collect(),
                    n.iter().map(|s| s.to_string()).collect(),
                )
            })
            .collect();
        for (t, names) in aliases {
            match groups.iter_mut().find(|g| g.0.contains(t)) {
                Some(g) => g.1.extend(names.iter().cloned()),
                None => groups.push((vec![t.clone()], names.clone())),
            }
        }
        if !groups.iter().any(|g| g.0.iter().any(|t| t == target)) {
            groups.push((vec![target.to_string()], Vec::new()));
        }
        let mut phrases = Vec::new();
        for (tickers, names) in &groups {
            let repl = if tickers.iter().any(|t| t == target) {
                TARGET
            } else {
                OTHER
            };
            for t in tickers {
                phrases.push((format!("${t}"), false, repl));
                phrases.push((t.clone(), true, repl));
            }
            for n in names.iter().filter(|n| !n.trim().is_empty()) {
                phrases.push((n.trim().to_string(), false, repl));
            }
        }
        phrases.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Anonymiser { phrases }
    }

    /// Every name this anonymiser removes (for tests and logs).
    pub fn names(&self) -> Vec<&str> {
        self.phrases.iter().map(|p| p.0.as_str()).collect()
    }

    /// The text with names, dates and years replaced.
    pub fn apply(&self, text: &str) -> String {
        replace_dates(&self.replace_names(text))
    }

    fn replace_names(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        'scan: while i < text.len() {
            if at_word_start(text, i) {
                for (pat, case, repl) in &self.phrases {
                    if let Some(n) = match_at(text, i, pat, *case)
                        && !is_word_byte(text.as_bytes().get(i + n).copied())
                    {
                        out.push_str(repl);
                        i += n;
                        continue 'scan;
                    }
                }
            }
            let ch = text[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
        out
    }
}

fn is_word_byte(b: Option<u8>) -> bool {
    // Non-ASCII bytes (curly quotes, dashes) end a word: names are ASCII.
    b.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn at_word_start(text: &str, i: usize) -> bool {
    i == 0 || !is_word_byte(text.as_bytes().get(i - 1).copied())
}

/// Byte length of `pat` matched at `text[i..]`, if it matches.
fn match_at(text: &str, i: usize, pat: &str, case_sensitive: bool) -> Option<usize> {
    let cand = text.get(i..i + pat.len())?;
    let ok = if case_sensitive {
        cand == pat
    } else {
        cand.eq_ignore_ascii_case(pat)
    };
    ok.then_some(pat.len())
}

fn digits_at(b: &[u8], i: usize) -> usize {
    b[i.min(b.len())..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .count()
}

/// Length of a numeric date at `i`: 2024-01-31, 2024/01/31, 1/31/2024, 01-31-24.
fn numeric_date_at(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i;
    let mut groups = Vec::new();
    loop {
        let n = digits_at(b, j);
        if n == 0 || n > 4 {
            return None;
        }
        groups.push(n);
        j += n;
        if groups.len() == 3 {
            break;
        }
        match b.get(j) {
            Some(b'-' | b'/') => j += 1,
            _ => return None,
        }
    }
    let shape_ok = matches!(groups.as_slice(), [4, 1..=2, 1..=2] | [1..=2, 1..=2, 2 | 4]);
    (shape_ok && !is_word_byte(b.get(j).copied())).then_some(j - i)
}

/// Length of a 4-digit year 1900..2099 at `i` (not part of a longer number).
fn year_at(b: &[u8], i: usize) -> Option<usize> {
    if digits_at(b, i) != 4 || is_word_byte(b.get(i + 4).copied()) {
        return None;
    }
    let y = std::str::from_utf8(&b[i..i + 4])
        .ok()?
        .parse::<u32>()
        .ok()?;
    // "1,2024" or "3.2024" are numbers, not years.
    let prev_num = i >= 2 && matches!(b[i - 1], b',' | b'.') && b[i - 2].is_ascii_digit();
    ((1900..2100).contains(&y) && !prev_num).then_some(4)
}

/// Length of a month-name date at `i`: "March 3, 2023", "Mar. 3", "Oct 2022", "December".
/// A bare month name counts only when written out in full (and "May" never does alone).
fn month_date_at(text: &str, i: usize) -> Option<usize> {
    let b = text.as_bytes();
    let m = MONTHS.iter().find(|m| {
        text.get(i..i + m.len()) == Some(**m) && !is_word_byte(b.get(i + m.len()).copied())
    })?;
    let mut j = i + m.len();
    if b.get(j) == Some(&b'.') {
        j += 1;
    }
    let mut end = None;
    if b.get(j) == Some(&b' ') {
        let d = digits_at(b, j + 1);
        if d == 4 && year_at(b, j + 1).is_some() {
            return Some(j + 5 - i);
        }
        if (1..=2).contains(&d) {
            let mut k = j + 1 + d;
            for suf in ["st", "nd", "rd", "th"] {
                if text.get(k..k + 2) == Some(suf) {
                    k += 2;
                    break;
                }
            }
            if !is_word_byte(b.get(k).copied()) {
                end = Some(k);
                let mut y = k;
                if b.get(y) == Some(&b',') {
                    y += 1;
                }
                if b.get(y) == Some(&b' ') && year_at(b, y + 1).is_some() {
                    end = Some(y + 5);
                }
            }
        }
    }
    match end {
        Some(e) => Some(e - i),
        None if m.len() >= 5 || matches!(*m, "March" | "April" | "June" | "July") => Some(m.len()),
        None => None,
    }
}

/// Replaces calendar dates with "[date]" and years with "[year]".
pub fn replace_dates(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if at_word_start(text, i) {
            if let Some(n) = numeric_date_at(b, i).or_else(|| month_date_at(text, i)) {
                out.push_str(DATE);
                i += n;
                continue;
            }
            if let Some(n) = year_at(b, i) {
                out.push_str(YEAR);
                i += n;
                continue;
            }
            // Fiscal-year shorthands: FY23, FY2023, Q3'22.
            if text.get(i..i + 2) == Some("FY") && matches!(digits_at(b, i + 2), 2 | 4) {
                let n = digits_at(b, i + 2);
                if !is_word_byte(b.get(i + 2 + n).copied()) {
                    out.push_str("FY");
                    out.push_str(YEAR);
                    i += 2 + n;
                    continue;
                }
            }
        }
        if b[i] == b'\'' && digits_at(b, i + 1) == 2 && !is_word_byte(b.get(i + 3).copied()) {
            out.push_str(YEAR);
            i += 3;
            continue;
        }
        let ch = text[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon(t: &str) -> Anonymiser {
        Anonymiser::new(t, &BTreeMap::new())
    }

    #[test]
    fn names_and_tickers_are_replaced_by_role() {
        let a = anon("AAPL");
        assert_eq!(
            a.apply("Apple's (NASDAQ:AAPL) iPhone sales beat; $MSFT and Microsoft lag, apple pie ok? APPLE!"),
            "the Company's (NASDAQ:the Company) the Company sales beat; another company and another company lag, the Company pie ok? the Company!"
        );
        // Word boundaries: "Metaverse", "Teslas" and "AAPLX" are other words.
        assert_eq!(
            anon("META").apply("Metaverse Meta Teslas AAPLX"),
            "Metaverse the Company Teslas AAPLX"
        );
        // Google news is GOOG; the traded ticker is GOOGL: same company.
        assert_eq!(
            anon("GOOGL").apply("GOOG, Alphabet"),
            "the Company, the Company"
        );
    }

    #[test]
    fn aliases_extend_and_add_companies() {
        let mut al = BTreeMap::new();
        al.insert(
            "XOM".to_string(),
            vec!["Exxon Mobil".to_string(), "Exxon".to_string()],
        );
        al.insert("AAPL".to_string(), vec!["Cupertino giant".to_string()]);
        let a = Anonymiser::new("XOM", &al);
        assert_eq!(
            a.apply("Exxon Mobil and Exxon; the Cupertino giant"),
            "the Company and the Company; the another company"
        );
    }

    #[test]
    fn dates_and_years_are_replaced() {
        let cases = [
            (
                "On 2022-10-14 and 10/14/2022 or 2022/10/14",
                "On [date] and [date] or [date]",
            ),
            ("Oct. 14, 2022 earnings", "[date] earnings"),
            (
                "March 3rd results, in December",
                "[date] results, in [date]",
            ),
            ("May 5 but may rise in May", "[date] but may rise in May"),
            (
                "Q3 2022 and fiscal 2023, FY23 and Q4'22",
                "Q3 [year] and fiscal [year], FY[year] and Q4[year]",
            ),
            ("Oct 2022", "[date]"),
            (
                "revenue 12,2024 units, 1.2023 and 20250 and 3000",
                "revenue 12,2024 units, 1.2023 and 20250 and 3000",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(replace_dates(input), want, "{input}");
        }
    }

    #[test]
    fn non_ascii_text_survives() {
        assert_eq!(
            anon("TSLA").apply("Tesla’s “Model Y” — €5 Musk"),
            "the Company’s “Model Y” — €5 the Company"
        );
    }
}
