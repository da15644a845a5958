//! Defaults the real API server applies on create (create strategies,
//! admission, the service IP allocator), for the kinds where clients
//! notice: namespaces, pods, services, secrets.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use super::resources::ResourceType;
use super::status::ApiError;

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// Fills in what the real API server's create strategies and admission
/// plugins (and, for services, the IP allocator) would. `next_service_ip`
/// is the allocator's state.
pub fn on_create(
    r: &ResourceType,
    obj: &mut Value,
    next_service_ip: &mut u32,
) -> Result<(), ApiError> {
    let name = meta_str(obj, "name").unwrap_or_default().to_string();
    match (r.group, r.plural) {
        ("", "namespaces") => {
            if !obj["metadata"].get("labels").is_some_and(Value::is_object) {
                obj["metadata"]["labels"] = json!({});
            }
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        ("", "pods") => {
            if !obj.get("spec").is_some_and(Value::is_object) {
                return Err(ApiError::invalid("pods", &name, "spec: Required value"));
            }
            let spec = obj["spec"].as_object_mut().expect("object");
            let sa = spec
                .get("serviceAccountName")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .or_else(|| {
                    spec.get("serviceAccount")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                })
                .unwrap_or("default")
                .to_string();
            spec.insert("serviceAccountName".into(), json!(sa));
            spec.insert("serviceAccount".into(), json!(sa));
            // The create strategy resets status; the kubelet reports it.
            obj["status"] = json!({"phase": "Pending"});
        }
        ("", "services") => {
            if !obj.get("spec").is_some_and(Value::is_object) {
                obj["spec"] = json!({});
            }
            let spec = obj["spec"].as_object_mut().expect("object");
            let ty = spec
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("ClusterIP")
                .to_string();
            spec.insert("type".into(), json!(ty));
            if ty != "ExternalName" {
                let ip = match spec.get("clusterIP").and_then(Value::as_str) {
                    Some(ip) if !ip.is_empty() => ip.to_string(),
                    _ => {
                        let ip = Ipv4Addr::from(*next_service_ip).to_string();
                        *next_service_ip += 1;
                        ip
                    }
                };
                spec.insert("clusterIP".into(), json!(ip));
                spec.insert("clusterIPs".into(), json!([ip]));
                if ip != "None" {
                    spec.entry("ipFamilies").or_insert(json!(["IPv4"]));
                    spec.entry("ipFamilyPolicy").or_insert(json!("SingleStack"));
                }
            }
            spec.entry("sessionAffinity").or_insert(json!("None"));
            if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports {
                    if let Some(p) = p.as_object_mut() {
                        p.entry("protocol").or_insert(json!("TCP"));
                        if let Some(port) = p.get("port").cloned() {
                            p.entry("targetPort").or_insert(port);
                        }
                    }
                }
            }
            obj["status"] = json!({"loadBalancer": {}});
        }
        ("", "secrets") => {
            use base64::Engine as _;
            let string_data = obj.as_object_mut().and_then(|o| o.remove("stringData"));
            if let Some(Value::Object(sd)) = string_data {
                if !obj.get("data").is_some_and(Value::is_object) {
                    obj["data"] = json!({});
                }
                for (k, v) in sd {
                    let s = v.as_str().unwrap_or_default();
                    obj["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(s));
                }
            }
            if obj.get("type").is_none() {
                obj["type"] = json!("Opaque");
            }
        }
        _ => {}
    }
    Ok(())
}
