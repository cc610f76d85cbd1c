//! A small fuzzing harness on stable Rust (cargo-fuzz needs nightly): seeded, structure-aware
//! mutation of real inputs, driven by an iteration- or time-bounded loop, with outcome
//! feedback instead of coverage feedback.
//!
//! - Each target takes bytes, runs the code under test, and returns an [`Outcome`]: the
//!   properties it checks (no panic, errors name their source, round trips hold) fail as
//!   `Outcome::Violation`. A panic is caught and is a finding too; an execution that runs past
//!   [`Config::hang_secs`] is saved by a watchdog thread and aborts the process (a loop that
//!   never returns cannot be caught any other way).
//! - Mutations (byte flips, interesting bytes, dictionary splices, line edits, number and
//!   token swaps, truncations, splices of two corpus entries, multi-byte characters) are
//!   chosen through [`arbitrary::Unstructured`] over bytes from a seeded generator, so a run is
//!   a pure function of (seed, target, iteration count).
//! - An input whose outcome signature (the error message with numbers and quoted text blanked)
//!   was not seen before joins the corpus: new error paths get explored further.
//! - Findings are written to `artifacts/fuzz/<target>/<kind>-<hash>.bin` (the input) with a
//!   `.txt` beside it (message, seed, iteration); replay one with `FLAG_FUZZ_REPLAY=<file>`.
//!
//! `tests.rs` runs every target for a fixed number of iterations with a fixed seed in
//! `just test`; `just fuzz SECS` runs them for a time with a fresh seed (printed).
mod targets;
mod tests;

use std::collections::BTreeSet;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use arbitrary::Unstructured;

/// What one execution of a target saw.
pub enum Outcome {
    /// Every property held; the signature classifies the path taken (e.g. which error).
    Pass(String),
    /// A property failed: the message says which and why.
    Violation(String),
}

pub struct Target {
    pub name: &'static str,
    /// Real inputs (files, answers) the mutator starts from.
    pub seeds: Vec<Vec<u8>>,
    /// Tokens worth splicing in (keys, keywords, delimiters, odd numbers).
    pub dict: Vec<Vec<u8>>,
    /// Inputs are cut to this many bytes (bounded input size: no target is fed more).
    pub max_len: usize,
    pub run: RunFn,
}

/// One execution of a target on an input.
pub type RunFn = Box<dyn FnMut(&[u8]) -> Outcome>;

pub struct Config {
    pub seed: u64,
    /// Stop after this many executions ...
    pub iters: Option<u64>,
    /// ... or after this long, whichever comes first.
    pub time: Option<Duration>,
    /// An execution running this long is a hang: saved, then the process aborts.
    pub hang_secs: u64,
    /// An execution running this long is reported (not a failure: timing varies by machine).
    pub slow_ms: u64,
    /// Where findings are written (`<dir>/<target>/`); none: not written.
    pub artifacts: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub kind: &'static str,
    pub message: String,
    pub iteration: u64,
    pub input: Vec<u8>,
    pub saved: Option<PathBuf>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub target: &'static str,
    pub seed: u64,
    pub execs: u64,
    pub corpus: usize,
    pub signatures: usize,
    pub slowest_ms: u128,
    pub elapsed: Duration,
    pub findings: Vec<Finding>,
    pub slow: Vec<Finding>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: seed {} execs {} in {:.1} s, corpus {}, outcome signatures {}, slowest {} ms, findings {}, slow {}",
            self.target,
            self.seed,
            self.execs,
            self.elapsed.as_secs_f64(),
            self.corpus,
            self.signatures,
            self.slowest_ms,
            self.findings.len(),
            self.slow.len()
        )?;
        for x in self.findings.iter().chain(&self.slow) {
            write!(
                f,
                "\n  {} at iteration {}: {}",
                x.kind,
                x.iteration,
                first_line(&x.message, 300)
            )?;
            if let Some(p) = &x.saved {
                write!(f, " [{}]", p.display())?;
            }
        }
        Ok(())
    }
}

fn first_line(s: &str, max: usize) -> String {
    let l = s.lines().next().unwrap_or("");
    let mut out: String = l.chars().take(max).collect();
    if out.len() < l.len() || s.lines().nth(1).is_some() {
        out.push_str(" ...");
    }
    out
}

/// splitmix64: the byte source of the mutator (any seed gives a full-period stream).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// A stable per-target seed, so one target's stream does not depend on which others run.
pub fn target_seed(seed: u64, name: &str) -> u64 {
    let h = blake3::hash(name.as_bytes());
    seed ^ u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

const INTERESTING_BYTES: &[u8] = b"\0\xff\n\r\t \"'\\{}[]:,-#&*!|>%@`.0123456789eE+";
const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "-0",
    "-1",
    "1e308",
    "1e-320",
    "-1e308",
    "NaN",
    "nan",
    "inf",
    "-inf",
    ".inf",
    ".nan",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "4294967296",
    "1.7976931348623157e308",
    "0.1",
    "00",
    "1_000",
    "0x10",
    "1e",
    "",
];

fn line_spans(b: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        if c == b'\n' {
            out.push((start, i + 1));
            start = i + 1;
        }
    }
    if start < b.len() {
        out.push((start, b.len()));
    }
    out
}

/// Spans of runs of `class` bytes (digits-ish or word-ish).
fn runs(b: &[u8], class: fn(u8) -> bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if class(b[i]) {
            let s = i;
            while i < b.len() && class(b[i]) {
                i += 1;
            }
            out.push((s, i));
        } else {
            i += 1;
        }
    }
    out
}

fn is_num(c: u8) -> bool {
    c.is_ascii_digit() || c == b'.' || c == b'-' || c == b'e' || c == b'E' || c == b'+'
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// One structure-aware or byte-level edit of `data`, chosen through `u`.
fn mutate_once(
    u: &mut Unstructured,
    data: &mut Vec<u8>,
    other: &[u8],
    dict: &[Vec<u8>],
) -> arbitrary::Result<()> {
    let len = data.len();
    let pos = |u: &mut Unstructured, n: usize| -> arbitrary::Result<usize> {
        if n == 0 { Ok(0) } else { u.int_in_range(0..=n) }
    };
    match u.int_in_range(0u8..=14)? {
        // bit flip
        0 if len > 0 => {
            let i = u.int_in_range(0..=len - 1)?;
            data[i] ^= 1 << u.int_in_range(0u8..=7)?;
        }
        // interesting byte, overwritten or inserted
        1 | 2 => {
            let b = *u.choose(INTERESTING_BYTES)?;
            let i = pos(u, len)?;
            if i < len && u.arbitrary::<bool>()? {
                data[i] = b;
            } else {
                data.insert(i, b);
            }
        }
        // dictionary token inserted
        3 | 4 if !dict.is_empty() => {
            let t = u.choose(dict)?.clone();
            let i = pos(u, len)?;
            data.splice(i..i, t);
        }
        // delete a range
        5 if len > 0 => {
            let a = u.int_in_range(0..=len - 1)?;
            let n = u.int_in_range(1..=(len - a).min(64))?;
            data.drain(a..a + n);
        }
        // duplicate a range elsewhere
        6 if len > 0 => {
            let a = u.int_in_range(0..=len - 1)?;
            let n = u.int_in_range(1..=(len - a).min(256))?;
            let chunk = data[a..a + n].to_vec();
            let i = pos(u, len)?;
            data.splice(i..i, chunk);
        }
        // truncate
        7 if len > 0 => {
            let n = u.int_in_range(0..=len - 1)?;
            data.truncate(n);
        }
        // splice: a prefix of this, a suffix of another corpus entry (at line starts if any)
        8 if !other.is_empty() => {
            let a = pos(u, len)?;
            let b = u.int_in_range(0..=other.len() - 1)?;
            let b = other[..b]
                .iter()
                .rposition(|&c| c == b'\n')
                .map_or(b, |p| p + 1);
            data.truncate(a);
            data.extend_from_slice(&other[b..]);
        }
        // line edits: delete, duplicate, swap, or take a line from another entry
        9 | 10 => {
            let lines = line_spans(data);
            if lines.is_empty() {
                return Ok(());
            }
            let (s, e) = *u.choose(&lines)?;
            match u.int_in_range(0u8..=3)? {
                0 => {
                    data.drain(s..e);
                }
                1 => {
                    let l = data[s..e].to_vec();
                    data.splice(s..s, l);
                }
                2 => {
                    let (s2, e2) = *u.choose(&lines)?;
                    if s2 != s {
                        let (a, b) = if s < s2 {
                            ((s, e), (s2, e2))
                        } else {
                            ((s2, e2), (s, e))
                        };
                        let la = data[a.0..a.1].to_vec();
                        let lb = data[b.0..b.1].to_vec();
                        let mut out = data[..a.0].to_vec();
                        out.extend_from_slice(&lb);
                        out.extend_from_slice(&data[a.1..b.0]);
                        out.extend_from_slice(&la);
                        out.extend_from_slice(&data[b.1..]);
                        *data = out;
                    }
                }
                _ => {
                    let ol = line_spans(other);
                    if let Ok(&(os, oe)) = u.choose(&ol) {
                        let l = other[os..oe].to_vec();
                        data.splice(s..e, l);
                    }
                }
            }
        }
        // a number swapped for an odd one
        11 => {
            let nums = runs(data, is_num);
            if let Ok(&(s, e)) = u.choose(&nums) {
                let n = u.choose(INTERESTING_NUMBERS)?.as_bytes().to_vec();
                data.splice(s..e, n);
            }
        }
        // a word swapped for a dictionary token
        12 if !dict.is_empty() => {
            let words = runs(data, is_word);
            if let Ok(&(s, e)) = u.choose(&words) {
                let t = u.choose(dict)?.clone();
                data.splice(s..e, t);
            }
        }
        // arbitrary characters (multi-byte UTF-8 included)
        13 => {
            let s: String = u.arbitrary::<String>()?.chars().take(8).collect();
            let c: char = u.arbitrary()?;
            let i = pos(u, len)?;
            let mut ins = s.into_bytes();
            ins.extend_from_slice(c.to_string().as_bytes());
            data.splice(i..i, ins);
        }
        // a run of one byte (deep nesting, long lines)
        _ => {
            let b = *u.choose(b"[{-( a9\"")?;
            let n = u.int_in_range(1usize..=512)?;
            let i = pos(u, len)?;
            data.splice(i..i, std::iter::repeat_n(b, n));
        }
    }
    Ok(())
}

/// 1 to 4 stacked edits of `base`, cut to `max_len`.
pub fn mutate(
    rng: &mut Rng,
    base: &[u8],
    other: &[u8],
    dict: &[Vec<u8>],
    max_len: usize,
) -> Vec<u8> {
    let entropy = rng.bytes(256);
    let mut u = Unstructured::new(&entropy);
    let mut data = base.to_vec();
    let n = u.int_in_range(1u8..=4).unwrap_or(1);
    for _ in 0..n {
        // Running out of entropy just ends the edit early.
        let _ = mutate_once(&mut u, &mut data, other, dict);
    }
    data.truncate(max_len);
    data
}

/// The outcome class of an error message: quoted text (escapes honoured) and numbers
/// blanked, lists cut, other characters outside ASCII dropped, repeats collapsed, the first 80
/// characters; so each distinct error path counts once, whatever the input's content.
pub fn signature(msg: &str) -> String {
    let mut out = String::new();
    let mut chars = msg.chars();
    while let Some(c) = chars.next() {
        let push = match c {
            '\'' | '"' | '`' => {
                let mut esc = false;
                for d in chars.by_ref() {
                    match (esc, d) {
                        (true, _) => esc = false,
                        (false, '\\') => esc = true,
                        (false, d) if d == c => break,
                        _ => {}
                    }
                }
                Some(c)
            }
            // A list (a header, say) is content: the class ends before it.
            '[' => break,
            c if c.is_ascii_digit() => Some('#'),
            c if c.is_whitespace() => Some(' '),
            c if c.is_ascii() && !c.is_ascii_control() => Some(c),
            _ => None,
        };
        if let Some(p) = push
            && !out.ends_with(p)
        {
            out.push(p);
        }
        if out.len() >= 80 {
            break;
        }
    }
    out
}

thread_local! {
    static FUZZING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// A panic hook that, on a fuzzing thread, records the panic (message and location) instead
/// of printing it; other threads keep the default hook.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if FUZZING.with(|f| f.get()) {
                let msg = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(non-string payload)".into());
                let loc = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("panic at {loc}: {msg}")));
            } else {
                default(info);
            }
        }));
    });
}

fn save(dir: &Path, target: &str, kind: &str, input: &[u8], note: &str) -> Option<PathBuf> {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).ok()?;
    let hash = blake3::hash(input).to_hex();
    let path = dir.join(format!("{kind}-{}.bin", &hash[..16]));
    std::fs::write(&path, input).ok()?;
    std::fs::write(path.with_extension("txt"), note).ok()?;
    Some(path)
}

/// The input running now, for the watchdog.
type Current = Arc<Mutex<Option<(Instant, u64, Arc<Vec<u8>>)>>>;

fn watchdog(
    target: &'static str,
    seed: u64,
    hang: Duration,
    dir: Option<PathBuf>,
    current: Current,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            let late = current
                .lock()
                .ok()
                .and_then(|c| c.clone())
                .filter(|(t, _, _)| t.elapsed() > hang);
            if let Some((t, iter, input)) = late {
                let note = format!(
                    "hang: {target} ran {:.1} s on this input ({} bytes)\nseed {seed} iteration {iter}\n",
                    t.elapsed().as_secs_f64(),
                    input.len()
                );
                let saved = dir
                    .as_deref()
                    .and_then(|d| save(d, target, "hang", &input, &note));
                eprintln!(
                    "fuzz {target}: HANG at iteration {iter} (seed {seed}); input saved to {}",
                    saved.map_or("(not saved)".into(), |p| p.display().to_string())
                );
                std::process::abort();
            }
        }
    })
}

/// Runs `t` under `cfg`: every seed first, then mutations of the corpus.
pub fn fuzz(t: &mut Target, cfg: &Config) -> Report {
    install_panic_hook();
    let seed = target_seed(cfg.seed, t.name);
    let mut rng = Rng::new(seed);
    let mut corpus: Vec<Vec<u8>> = t
        .seeds
        .iter()
        .map(|s| s[..s.len().min(t.max_len)].to_vec())
        .collect();
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let n_seeds = corpus.len() as u64;
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut found: BTreeSet<String> = BTreeSet::new();
    let mut report = Report {
        target: t.name,
        seed: cfg.seed,
        ..Default::default()
    };
    let current: Current = Arc::new(Mutex::new(None));
    let done = Arc::new(AtomicBool::new(false));
    let dog = watchdog(
        t.name,
        cfg.seed,
        Duration::from_secs(cfg.hang_secs),
        cfg.artifacts.clone(),
        current.clone(),
        done.clone(),
    );
    let verbose = std::env::var_os("FLAG_FUZZ_VERBOSE").is_some();
    let start = Instant::now();
    let mut iter = 0u64;
    loop {
        if cfg.iters.is_some_and(|n| iter >= n) || cfg.time.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        let input = if iter < n_seeds {
            corpus[iter as usize].clone()
        } else {
            let a = rng.below(corpus.len());
            let b = rng.below(corpus.len());
            mutate(&mut rng, &corpus[a], &corpus[b], &t.dict, t.max_len)
        };
        let input = Arc::new(input);
        let t0 = Instant::now();
        if let Ok(mut c) = current.lock() {
            *c = Some((t0, iter, input.clone()));
        }
        FUZZING.with(|f| f.set(true));
        let result = panic::catch_unwind(AssertUnwindSafe(|| (t.run)(&input)));
        FUZZING.with(|f| f.set(false));
        let ms = t0.elapsed().as_millis();
        if let Ok(mut c) = current.lock() {
            *c = None;
        }
        report.slowest_ms = report.slowest_ms.max(ms);
        let (kind, message) = match result {
            Ok(Outcome::Pass(sig)) => {
                if verbose && !seen.contains(&sig) {
                    eprintln!("{} new outcome: {sig}", t.name);
                }
                if seen.insert(sig) && iter >= n_seeds && corpus.len() < 4096 {
                    corpus.push(input.to_vec());
                }
                if ms as u64 >= cfg.slow_ms {
                    ("slow", format!("{ms} ms on a {} byte input", input.len()))
                } else {
                    iter += 1;
                    continue;
                }
            }
            Ok(Outcome::Violation(m)) => ("violation", m),
            Err(_) => (
                "panic",
                LAST_PANIC
                    .with(|p| p.borrow_mut().take())
                    .unwrap_or_else(|| "panic".into()),
            ),
        };
        // One report per distinct message class.
        if found.insert(format!("{kind}:{}", signature(&message))) {
            let note = format!(
                "{kind} in target {}: {message}\nseed {} iteration {iter} ({} bytes)\nreplay: FLAG_FUZZ_REPLAY=<this .bin> just fuzz\n",
                t.name,
                cfg.seed,
                input.len()
            );
            let saved = cfg
                .artifacts
                .as_deref()
                .and_then(|d| save(d, t.name, kind, &input, &note));
            let f = Finding {
                kind,
                message,
                iteration: iter,
                input: input.to_vec(),
                saved,
            };
            if kind == "slow" {
                report.slow.push(f);
            } else {
                report.findings.push(f);
            }
        }
        iter += 1;
    }
    done.store(true, Ordering::Relaxed);
    let _ = dog.join();
    report.execs = iter;
    report.corpus = corpus.len();
    report.signatures = seen.len();
    report.elapsed = start.elapsed();
    report
}

/// Runs one saved input through its target (the folder it was saved in names the target).
pub fn replay(t: &mut Target, input: &[u8]) -> String {
    install_panic_hook();
    FUZZING.with(|f| f.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(|| (t.run)(input)));
    FUZZING.with(|f| f.set(false));
    match result {
        Ok(Outcome::Pass(sig)) => format!("pass: {sig}"),
        Ok(Outcome::Violation(m)) => format!("violation: {m}"),
        Err(_) => LAST_PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| "panic".into()),
    }
}
