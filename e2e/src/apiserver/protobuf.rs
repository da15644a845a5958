//! Just enough of the Kubernetes protobuf encoding for the typed requests
//! kubectl's `create <kind>` generators send (`kubectl create namespace`,
//! `serviceaccount`, `configmap`, `secret generic`, `token`): the `k8s\0`
//! envelope (`runtime.Unknown`), `ObjectMeta` (name, generateName,
//! namespace, labels, annotations), ConfigMap/Secret data and the
//! TokenRequest spec. Anything else is refused rather than half-read, so a
//! field is never silently dropped.

use base64::Engine as _;
use serde_json::{Map, Value, json};

/// Prefix of protobuf-encoded Kubernetes objects.
pub const MAGIC: &[u8] = b"k8s\0";

#[derive(Debug, Clone, PartialEq)]
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.buf.split_first().ok_or("truncated varint")?;
            self.buf = rest;
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, String> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (num, wt) = (key >> 3, key & 7);
        let f = match wt {
            0 => Field::Varint(self.varint()?),
            2 => {
                let len = self.varint()? as usize;
                if len > self.buf.len() {
                    return Err("truncated length-delimited field".into());
                }
                let (b, rest) = self.buf.split_at(len);
                self.buf = rest;
                Field::Bytes(b)
            }
            1 | 5 => {
                let n = if wt == 1 { 8 } else { 4 };
                if n > self.buf.len() {
                    return Err("truncated fixed field".into());
                }
                self.buf = &self.buf[n..];
                Field::Fixed
            }
            _ => return Err(format!("unsupported wire type {wt}")),
        };
        Ok(Some((num, f)))
    }
}

fn fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, String> {
    let mut r = Reader { buf };
    let mut out = Vec::new();
    while let Some(f) = r.next()? {
        out.push(f);
    }
    Ok(out)
}

fn string(f: &Field<'_>, what: &str) -> Result<String, String> {
    match f {
        Field::Bytes(b) => {
            String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
        }
        _ => Err(format!("{what} has the wrong wire type")),
    }
}

fn bytes<'a>(f: &Field<'a>, what: &str) -> Result<&'a [u8], String> {
    match f {
        Field::Bytes(b) => Ok(b),
        _ => Err(format!("{what} has the wrong wire type")),
    }
}

/// A `map<string, string|bytes>` entry.
fn map_entry(b: &[u8], values_are_bytes: bool) -> Result<(String, Value), String> {
    let mut k = String::new();
    let mut v = Value::String(String::new());
    for (n, f) in fields(b)? {
        match n {
            1 => k = string(&f, "map key")?,
            2 if values_are_bytes => {
                v = json!(base64::engine::general_purpose::STANDARD.encode(bytes(&f, "map value")?))
            }
            2 => v = json!(string(&f, "map value")?),
            _ => return Err(format!("unexpected field {n} in a map entry")),
        }
    }
    Ok((k, v))
}

fn object_meta(b: &[u8]) -> Result<Value, String> {
    let mut m = Map::new();
    let mut labels = Map::new();
    let mut annotations = Map::new();
    for (n, f) in fields(b)? {
        match n {
            1 => {
                m.insert("name".into(), json!(string(&f, "metadata.name")?));
            }
            2 => {
                m.insert(
                    "generateName".into(),
                    json!(string(&f, "metadata.generateName")?),
                );
            }
            3 => {
                m.insert("namespace".into(), json!(string(&f, "metadata.namespace")?));
            }
            // selfLink, uid, resourceVersion, generation, creationTimestamp:
            // set by the server anyway.
            4..=8 => {}
            11 => {
                let (k, v) = map_entry(bytes(&f, "metadata.labels")?, false)?;
                labels.insert(k, v);
            }
            12 => {
                let (k, v) = map_entry(bytes(&f, "metadata.annotations")?, false)?;
                annotations.insert(k, v);
            }
            // managedFields
            17 => {}
            other => {
                return Err(format!(
                    "metadata field {other} is not supported by the kube-api-double"
                ));
            }
        }
    }
    if !labels.is_empty() {
        m.insert("labels".into(), Value::Object(labels));
    }
    if !annotations.is_empty() {
        m.insert("annotations".into(), Value::Object(annotations));
    }
    Ok(Value::Object(m))
}

fn not_empty(f: &Field<'_>) -> bool {
    !matches!(f, Field::Bytes(b) if b.is_empty())
}

/// Decodes the object of a protobuf request body into JSON.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or("not a Kubernetes protobuf body (no k8s\\0 prefix)")?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (n, f) in fields(rest)? {
        match n {
            1 => {
                for (m, g) in fields(bytes(&f, "typeMeta")?)? {
                    match m {
                        1 => api_version = string(&g, "apiVersion")?,
                        2 => kind = string(&g, "kind")?,
                        _ => {}
                    }
                }
            }
            2 => raw = bytes(&f, "raw")?,
            _ => {}
        }
    }
    let mut obj = json!({"apiVersion": api_version, "kind": kind});
    let mut data = Map::new();
    let mut string_data = Map::new();
    let unsupported = |n: u64| {
        Err(format!(
            "protobuf field {n} of {kind} is not supported by the kube-api-double: send JSON (e.g. kubectl create -f <manifest>)"
        ))
    };
    for (n, f) in fields(raw)? {
        match (kind.as_str(), n) {
            (_, 1) => obj["metadata"] = object_meta(bytes(&f, "metadata")?)?,
            // Namespace spec (finalizers) and status are set by the server.
            ("Namespace", 2 | 3) => {}
            ("ServiceAccount", 2 | 3) | ("ConfigMap", 4) | ("Secret", 5) if !not_empty(&f) => {}
            ("ServiceAccount", 4) => {
                if let Field::Varint(v) = f {
                    obj["automountServiceAccountToken"] = json!(v != 0);
                }
            }
            ("ConfigMap", 2) => {
                let (k, v) = map_entry(bytes(&f, "data")?, false)?;
                data.insert(k, v);
            }
            ("ConfigMap", 3) | ("Secret", 2) => {
                let (k, v) = map_entry(bytes(&f, "data")?, true)?;
                if kind == "ConfigMap" {
                    obj["binaryData"][k] = v;
                } else {
                    data.insert(k, v);
                }
            }
            ("Secret", 3) => obj["type"] = json!(string(&f, "type")?),
            ("Secret", 4) => {
                let (k, v) = map_entry(bytes(&f, "stringData")?, false)?;
                string_data.insert(k, v);
            }
            ("ConfigMap", 4) | ("Secret", 5) => {
                if let Field::Varint(v) = f {
                    obj["immutable"] = json!(v != 0);
                }
            }
            ("TokenRequest", 2) => obj["spec"] = token_request_spec(bytes(&f, "spec")?)?,
            ("TokenRequest", 3) => {}
            _ if !not_empty(&f) => {}
            _ => return unsupported(n),
        }
    }
    if !data.is_empty() {
        obj["data"] = Value::Object(data);
    }
    if !string_data.is_empty() {
        obj["stringData"] = Value::Object(string_data);
    }
    Ok(obj)
}

fn token_request_spec(b: &[u8]) -> Result<Value, String> {
    let mut spec = json!({});
    let mut auds = Vec::new();
    for (n, f) in fields(b)? {
        match n {
            1 => auds.push(json!(string(&f, "spec.audiences")?)),
            3 => {
                let mut r = json!({});
                for (m, g) in fields(bytes(&f, "spec.boundObjectRef")?)? {
                    let key = match m {
                        1 => "kind",
                        2 => "apiVersion",
                        3 => "name",
                        4 => "uid",
                        _ => continue,
                    };
                    r[key] = json!(string(&g, "spec.boundObjectRef")?);
                }
                spec["boundObjectRef"] = r;
            }
            4 => {
                if let Field::Varint(v) = f {
                    spec["expirationSeconds"] = json!(v as i64);
                }
            }
            _ => {}
        }
    }
    spec["audiences"] = Value::Array(auds);
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(n: u64, b: &[u8]) -> Vec<u8> {
        let mut v = vec![((n << 3) | 2) as u8, b.len() as u8];
        v.extend_from_slice(b);
        v
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let mut tm = ld(1, api_version.as_bytes());
        tm.extend(ld(2, kind.as_bytes()));
        let mut u = ld(1, &tm);
        u.extend(ld(2, raw));
        let mut out = MAGIC.to_vec();
        out.extend(u);
        out
    }

    #[test]
    fn decodes_a_namespace_with_labels() {
        let mut label = ld(1, b"team");
        label.extend(ld(2, b"a"));
        let mut meta = ld(1, b"demo");
        meta.extend(ld(11, &label));
        let mut raw = ld(1, &meta);
        raw.extend(ld(2, b""));
        raw.extend(ld(3, b""));
        let v = decode(&envelope("v1", "Namespace", &raw)).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": {"team": "a"}}})
        );
    }

    #[test]
    fn decodes_configmap_data_and_refuses_unknown_specs() {
        let mut e = ld(1, b"k");
        e.extend(ld(2, b"v"));
        let mut raw = ld(1, &ld(1, b"cm"));
        raw.extend(ld(2, &e));
        let v = decode(&envelope("v1", "ConfigMap", &raw)).unwrap();
        assert_eq!(v["data"], json!({"k": "v"}));
        let mut raw = ld(1, &ld(1, b"web"));
        raw.extend(ld(2, b"\x0a\x01x"));
        let err = decode(&envelope("apps/v1", "Deployment", &raw)).unwrap_err();
        assert!(err.contains("not supported"), "{err}");
        assert!(decode(b"{}").is_err());
    }
}
