//! Line numbers for validation errors. serde_yaml gives positions only for syntax errors, so
//! we find stage blocks and keys in the text itself (pipelines are small, block-style YAML).

/// The `stages:` block of a pipeline file, split per stage.
pub struct Locator {
    lines: Vec<String>,
    /// (stage name, first line index, end line index exclusive)
    stages: Vec<(String, usize, usize)>,
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn is_content(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#')
}

/// The key of a `key: ...` line, unquoted.
fn key_of(line: &str) -> Option<String> {
    let t = line.trim();
    let t = t.strip_prefix("- ").unwrap_or(t);
    let (k, _) = t.split_once(':')?;
    let k = k.trim().trim_matches(|c| c == '"' || c == '\'');
    (!k.is_empty() && !k.contains(' ')).then(|| k.to_string())
}

impl Locator {
    pub fn new(text: &str) -> Self {
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        let mut stages = Vec::new();
        if let Some(start) = lines
            .iter()
            .position(|l| indent_of(l) == 0 && key_of(l).as_deref() == Some("stages"))
        {
            let mut stage_indent = None;
            let mut i = start + 1;
            while i < lines.len() {
                let l = &lines[i];
                if !is_content(l) {
                    i += 1;
                    continue;
                }
                let ind = indent_of(l);
                if ind == 0 {
                    break;
                }
                let si = *stage_indent.get_or_insert(ind);
                if ind == si
                    && let Some(k) = key_of(l)
                {
                    if let Some(last) = stages.last_mut() {
                        let last: &mut (String, usize, usize) = last;
                        last.2 = i;
                    }
                    stages.push((k, i, lines.len()));
                }
                i += 1;
            }
            if let Some(last) = stages.last_mut() {
                last.2 = i;
            }
        }
        Locator { lines, stages }
    }

    /// 1-based line of a stage's name, or of `stages:` / line 1 when absent.
    pub fn stage(&self, name: &str) -> usize {
        self.stages
            .iter()
            .find(|s| s.0 == name)
            .map(|s| s.1 + 1)
            .unwrap_or_else(|| self.top_key("stages"))
    }

    /// Every definition line of a stage name (more than one = duplicate).
    pub fn stage_definitions(&self) -> Vec<(String, usize)> {
        self.stages.iter().map(|s| (s.0.clone(), s.1 + 1)).collect()
    }

    /// 1-based line of `key:` inside a stage's block, searched after the line of `section:`
    /// when given (e.g. key "bars" in section "inputs"); falls back to the stage line.
    pub fn stage_key(&self, stage: &str, section: Option<&str>, key: &str) -> usize {
        let Some(&(_, start, end)) = self.stages.iter().find(|s| s.0 == stage) else {
            return self.stage(stage);
        };
        let mut from = start + 1;
        if let Some(sec) = section {
            match (start + 1..end).find(|&i| key_of(&self.lines[i]).as_deref() == Some(sec)) {
                Some(i) => {
                    // Flow style (`params: {a: 1}`) keeps keys on the section line.
                    if self.lines[i].contains(&format!("{key}:")) {
                        return i + 1;
                    }
                    from = i + 1;
                }
                None => return start + 1,
            }
        }
        (from..end)
            .find(|&i| {
                key_of(&self.lines[i]).as_deref() == Some(key)
                    || self.lines[i].contains(&format!("{key}:"))
            })
            .map(|i| i + 1)
            .unwrap_or(start + 1)
    }

    /// 1-based line of the first line in a stage's block containing `needle`.
    pub fn stage_text(&self, stage: &str, needle: &str) -> usize {
        let Some(&(_, start, end)) = self.stages.iter().find(|s| s.0 == stage) else {
            return self.stage(stage);
        };
        (start..end)
            .find(|&i| self.lines[i].contains(needle))
            .map(|i| i + 1)
            .unwrap_or(start + 1)
    }

    /// 1-based line of a top-level key, or 1.
    pub fn top_key(&self, key: &str) -> usize {
        self.lines
            .iter()
            .position(|l| indent_of(l) == 0 && key_of(l).as_deref() == Some(key))
            .map(|i| i + 1)
            .unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "params:\n  a: 1\nstages:\n  one:\n    uses: x\n    params:\n      p: 1\n  two:\n    uses: y\n    inputs:\n      bars: one.bars\n";

    #[test]
    fn finds_stage_and_key_lines() {
        let l = Locator::new(TEXT);
        assert_eq!(l.stage("one"), 4);
        assert_eq!(l.stage("two"), 8);
        assert_eq!(l.stage_key("one", Some("params"), "p"), 7);
        assert_eq!(l.stage_key("two", Some("inputs"), "bars"), 11);
        assert_eq!(l.stage_key("two", None, "uses"), 9);
        assert_eq!(l.stage_text("two", "one.bars"), 11);
    }
}
