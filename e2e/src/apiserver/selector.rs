//! Label and field selectors, as the API server parses them.

use serde_json::Value;

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed `labelSelector`; all requirements must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn check_key(k: &str, whole: &str) -> Result<String, String> {
    let ok = !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(k.to_string())
    } else {
        Err(format!("invalid label key {k:?} in selector {whole:?}"))
    }
}

fn parse_set(rest: &str, whole: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected (values) in selector {whole:?}"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    /// Parses `a=b,c!=d,!e,f,g in (x,y),h notin (z)`. Empty = everything.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for part in split_top_level(s) {
            let p = part.trim();
            if p.is_empty() {
                return Err(format!("empty requirement in selector {s:?}"));
            }
            if let Some(k) = p.strip_prefix('!') {
                reqs.push(LabelReq::NotExists(check_key(k.trim(), s)?));
            } else if let Some((k, v)) = p.split_once("!=") {
                reqs.push(LabelReq::NotEq(
                    check_key(k.trim(), s)?,
                    v.trim().to_string(),
                ));
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                reqs.push(LabelReq::Eq(check_key(k.trim(), s)?, v.trim().to_string()));
            } else if let Some((k, rest)) = p.split_once(" notin ") {
                reqs.push(LabelReq::NotIn(
                    check_key(k.trim(), s)?,
                    parse_set(rest, s)?,
                ));
            } else if let Some((k, rest)) = p.split_once(" in ") {
                reqs.push(LabelReq::In(check_key(k.trim(), s)?, parse_set(rest, s)?));
            } else {
                reqs.push(LabelReq::Exists(check_key(p, s)?));
            }
        }
        Ok(Self(reqs))
    }

    /// True when the object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
        })
    }
}

/// A parsed `fieldSelector`: `path=value`, `path==value`, `path!=value`,
/// comma separated, with dotted JSON paths (`metadata.name`,
/// `metadata.namespace`, `spec.nodeName`, `status.phase`, ...). A missing
/// field reads as `""`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for part in s.split(',') {
            let p = part.trim();
            let (k, eq, v) = if let Some((k, v)) = p.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector requirement {p:?} in {s:?}"));
            };
            let k = k.trim();
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
                return Err(format!("invalid field path {k:?} in field selector {s:?}"));
            }
            reqs.push((k.to_string(), eq, v.trim().to_string()));
        }
        Ok(Self(reqs))
    }

    /// The value required for `path` by an `=` requirement, if any (used to
    /// narrow lookups, e.g. `metadata.name`).
    pub fn required(&self, path: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, eq, _)| *eq && k == path)
            .map(|(_, _, v)| v.as_str())
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, want)| {
            let mut cur = Some(obj);
            for seg in path.split('.') {
                cur = cur.and_then(|c| c.get(seg));
            }
            let got = match cur {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                Some(other) => other.to_string(),
            };
            (got == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "demo", "labels": labels}, "spec": {"nodeName": "node1"}})
    }

    #[test]
    fn label_selectors() {
        let o = obj(json!({"app": "web", "tier": "front"}));
        let cases = [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app=db", false),
            ("app!=db", true),
            ("app!=web", false),
            ("missing!=x", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app in (db, web)", true),
            ("app in (db)", false),
            ("app notin (db)", true),
            ("missing notin (db)", true),
            ("missing in (db)", false),
            (
                "app=web,tier in (front,back),!istio.io/dataplane-mode",
                true,
            ),
            ("app=web,tier=back", false),
        ];
        for (sel, want) in cases {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&o),
                want,
                "{sel}"
            );
        }
        assert!(LabelSelector::parse("a b").is_err());
        assert!(LabelSelector::parse("a in x").is_err());
        assert!(LabelSelector::parse("a=b,,c").is_err());
        let no_labels = json!({"metadata": {"name": "x"}});
        assert!(LabelSelector::parse("!a").unwrap().matches(&no_labels));
        assert!(!LabelSelector::parse("a").unwrap().matches(&no_labels));
    }

    #[test]
    fn field_selectors() {
        let o = obj(json!({}));
        for (sel, want) in [
            ("metadata.name=p", true),
            ("metadata.name==q", false),
            ("metadata.namespace=demo,spec.nodeName=node1", true),
            ("spec.nodeName!=node1", false),
            ("spec.nodeName!=node2", true),
            ("status.phase=", true),
        ] {
            assert_eq!(
                FieldSelector::parse(sel).unwrap().matches(&o),
                want,
                "{sel}"
            );
        }
        let f = FieldSelector::parse("metadata.name=p").unwrap();
        assert_eq!(f.required("metadata.name"), Some("p"));
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
