//! Reading Prometheus / OpenMetrics text exposition (what `/metrics` returns) in tests:
//! samples with their labels, and sums over the samples matching some labels.

use std::collections::BTreeMap;

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// The value of label `key` (`""` when absent).
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map(String::as_str).unwrap_or("")
    }

    /// Whether every `(key, value)` pair is a label of this sample.
    pub fn has(&self, labels: &[(&str, &str)]) -> bool {
        labels.iter().all(|(k, v)| self.label(k) == *v)
    }
}

/// Every sample of `text` (comments, `# EOF` and malformed lines skipped).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// Samples named `name` carrying all `labels`.
pub fn matching<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && s.has(labels))
        .collect()
}

/// Sum of the samples named `name` carrying all `labels` (0 when none).
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    matching(&parse(text), name, labels)
        .iter()
        .map(|s| s.value)
        .sum()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => (&line[..i], &line[i..]),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let end;
        loop {
            // key
            let mut key = String::new();
            loop {
                let (i, c) = chars.next()?;
                match c {
                    '=' => break,
                    '}' if key.is_empty() => {
                        end = i + 1;
                        return finish(name, labels, &body[end..]);
                    }
                    ',' | ' ' if key.is_empty() => {}
                    c => key.push(c),
                }
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.insert(key, value);
            match chars.peek() {
                Some((_, ',')) => {
                    chars.next();
                }
                Some((i, '}')) => {
                    end = i + 1;
                    break;
                }
                _ => return None,
            }
        }
        &body[end..]
    } else {
        rest
    };
    finish(name, labels, rest)
}

fn finish(name: &str, labels: BTreeMap<String, String>, rest: &str) -> Option<Sample> {
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_labels_and_sums() {
        let text = "# HELP x help\n# TYPE x counter\n\
                    x_total{a=\"1\",b=\"q\\\"uote\"} 3\n\
                    x_total{a=\"2\",b=\"\"} 4.5\n\
                    g 7\n\
                    e{} 1\n\
                    # EOF\n";
        let s = parse(text);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].label("b"), "q\"uote");
        assert_eq!(s[1].label("b"), "");
        assert_eq!(s[2].name, "g");
        assert_eq!(sum(text, "x_total", &[]), 7.5);
        assert_eq!(sum(text, "x_total", &[("a", "2")]), 4.5);
        assert_eq!(sum(text, "x_total", &[("a", "3")]), 0.0);
        assert_eq!(sum(text, "e", &[]), 1.0);
    }
}
