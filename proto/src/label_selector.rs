//! Kubernetes label selectors (`metav1.LabelSelector`): `matchLabels` and
//! `matchExpressions` with `In`, `NotIn`, `Exists` and `DoesNotExist`, in
//! their API form (serde, camelCase keys as the API writes them) and compiled
//! ([`Selector`]) for matching label maps. We keep our own serde form (not
//! k8s-openapi's `LabelSelector`) to refuse unknown fields and to check
//! operators and values strictly, naming the key; matching is
//! `kube_core::Selector`'s.
//!
//! Semantics as the API server's: every `matchLabels` pair and every
//! expression must hold; `In` needs the key with one of the values, `NotIn`
//! holds when the key is absent or its value is not listed, `Exists` and
//! `DoesNotExist` look at the key only. A selector with neither field
//! matches everything.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// A label selector as written in YAML/JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(
        default,
        deserialize_with = "null_is_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub match_labels: BTreeMap<String, String>,
    #[serde(
        default,
        deserialize_with = "null_is_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` entry as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist` (checked by [`Selector::compile`]).
    pub operator: String,
    #[serde(
        default,
        deserialize_with = "null_is_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub values: Vec<String>,
}

/// YAML's `matchLabels:` with nothing after it is `null`: the same as absent.
pub(crate) fn null_is_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Why a selector does not compile: the key of the offending expression and
/// the problem. Callers add where the selector is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("matchExpressions key {key:?}: {problem}")]
pub struct RequirementError {
    pub key: String,
    pub problem: String,
}

/// A validated selector, ready to match label maps (kube's matcher, which
/// implements the API server's semantics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(kube_core::Selector);

impl Selector {
    /// Validates `s`: known operators, `In`/`NotIn` with at least one value,
    /// `Exists`/`DoesNotExist` without values, non-empty keys.
    pub fn compile(s: &LabelSelector) -> Result<Self, RequirementError> {
        use kube_core::Expression;
        if let Some(k) = s.match_labels.keys().find(|k| k.is_empty()) {
            return Err(RequirementError {
                key: k.clone(),
                problem: "matchLabels has an empty key".into(),
            });
        }
        let mut expressions: Vec<Expression> = s
            .match_labels
            .iter()
            .map(|(k, v)| Expression::Equal(k.clone(), v.clone()))
            .collect();
        for r in &s.match_expressions {
            let err = |problem: String| RequirementError {
                key: r.key.clone(),
                problem,
            };
            if r.key.is_empty() {
                return Err(err("the key is empty".into()));
            }
            let (key, values) = (r.key.clone(), r.values.iter().cloned().collect());
            let expression = match r.operator.as_str() {
                "In" => Expression::In(key, values),
                "NotIn" => Expression::NotIn(key, values),
                "Exists" => Expression::Exists(key),
                "DoesNotExist" => Expression::DoesNotExist(key),
                other => {
                    return Err(err(format!(
                        "unknown operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"
                    )));
                }
            };
            let with_values = matches!(expression, Expression::In(..) | Expression::NotIn(..));
            if with_values && r.values.is_empty() {
                return Err(err(format!(
                    "operator {} needs at least one value",
                    r.operator
                )));
            }
            if !with_values && !r.values.is_empty() {
                return Err(err(format!("operator {} takes no values", r.operator)));
            }
            expressions.push(expression);
        }
        Ok(Self(expressions.into_iter().collect()))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        kube_core::SelectorExt::matches(&self.0, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sel(v: serde_json::Value) -> Selector {
        Selector::compile(&serde_json::from_value(v).unwrap()).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_selector_matches_everything() {
        for s in [
            sel(json!({})),
            sel(json!({"matchLabels": null, "matchExpressions": null})),
            sel(json!({"matchLabels": {}, "matchExpressions": []})),
        ] {
            assert!(s.matches(&labels(&[])));
            assert!(s.matches(&labels(&[("a", "b")])));
        }
    }

    #[test]
    fn match_labels_need_every_pair() {
        let s = sel(json!({"matchLabels": {"a": "1", "b": "2"}}));
        assert!(s.matches(&labels(&[("a", "1"), ("b", "2"), ("c", "3")])));
        assert!(!s.matches(&labels(&[("a", "1")])));
        assert!(!s.matches(&labels(&[("a", "1"), ("b", "3")])));
        assert!(!s.matches(&labels(&[])));
    }

    #[test]
    fn each_operator() {
        let op = |op: &str, values: &[&str]| {
            sel(json!({"matchExpressions": [{"key": "k", "operator": op, "values": values}]}))
        };
        let none = labels(&[]);
        let x = labels(&[("k", "x")]);
        let y = labels(&[("k", "y")]);
        let other_key = labels(&[("j", "x")]);

        let s = op("In", &["x", "z"]);
        assert!(s.matches(&x) && !s.matches(&y) && !s.matches(&none) && !s.matches(&other_key));
        let s = op("NotIn", &["x"]);
        assert!(!s.matches(&x) && s.matches(&y) && s.matches(&none) && s.matches(&other_key));
        let s = op("Exists", &[]);
        assert!(s.matches(&x) && s.matches(&y) && !s.matches(&none) && !s.matches(&other_key));
        let s = op("DoesNotExist", &[]);
        assert!(!s.matches(&x) && !s.matches(&y) && s.matches(&none) && s.matches(&other_key));
    }

    #[test]
    fn labels_and_expressions_must_all_hold() {
        let s = sel(json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["front"]},
                {"key": "legacy", "operator": "DoesNotExist"}
            ]
        }));
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("tier", "front")])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("tier", "front"),
            ("legacy", "")
        ])));
    }

    #[test]
    fn invalid_expressions_name_the_key() {
        for (v, key, problem) in [
            (
                json!({"key": "k1", "operator": "Equals", "values": ["a"]}),
                "k1",
                "unknown operator \"Equals\"",
            ),
            (
                json!({"key": "k2", "operator": "in", "values": ["a"]}),
                "k2",
                "unknown operator \"in\"",
            ),
            (
                json!({"key": "k3", "operator": "In"}),
                "k3",
                "In needs at least one value",
            ),
            (
                json!({"key": "k4", "operator": "NotIn", "values": []}),
                "k4",
                "NotIn needs at least one value",
            ),
            (
                json!({"key": "k5", "operator": "Exists", "values": ["a"]}),
                "k5",
                "Exists takes no values",
            ),
            (
                json!({"key": "k6", "operator": "DoesNotExist", "values": ["a"]}),
                "k6",
                "DoesNotExist takes no values",
            ),
            (
                json!({"key": "", "operator": "Exists"}),
                "",
                "the key is empty",
            ),
        ] {
            let s: LabelSelector =
                serde_json::from_value(json!({ "matchExpressions": [v] })).unwrap();
            let e = Selector::compile(&s).unwrap_err();
            assert_eq!(e.key, key);
            assert!(e.problem.contains(problem), "{e}");
            assert!(e.to_string().contains(&format!("{key:?}")), "{e}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        // A misspelt field would otherwise select everything.
        assert!(
            serde_json::from_value::<LabelSelector>(json!({"matchLabel": {"a": "b"}})).is_err()
        );
        assert!(
            serde_json::from_value::<Requirement>(json!({"key": "a", "op": "Exists"})).is_err()
        );
    }

    #[test]
    fn serialises_in_the_api_form() {
        let s: LabelSelector = serde_json::from_value(json!({
            "matchExpressions": [{"key": "k", "operator": "Exists", "values": null}]
        }))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({"matchExpressions": [{"key": "k", "operator": "Exists"}]})
        );
    }
}
