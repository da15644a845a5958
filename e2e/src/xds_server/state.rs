//! The double's state: resources, streams and what each was sent, and how a request
//! or a change turns into a delta response.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use mesh_proto::xds::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use tokio::sync::watch;

use super::{ADDRESS_TYPE, Ack, NodeInfo, Subscription};

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// The resources' revision ([`State::rev`]): streams diff on each change.
    pub(super) data: watch::Sender<u64>,
    /// Anything observable changed: wakes [`XdsHandle::wait_for`].
    pub(super) events: watch::Sender<()>,
    /// Bumped by [`XdsHandle::close_streams`].
    pub(super) close: watch::Sender<u64>,
    pub(super) token: Option<String>,
}

#[derive(Default)]
pub(super) struct State {
    /// Bumped on every change of `resources`.
    pub(super) rev: u64,
    pub(super) next_version: u64,
    pub(super) next_nonce: u64,
    pub(super) next_stream: u64,
    /// type URL -> name -> resource.
    pub(super) resources: BTreeMap<String, BTreeMap<String, Resource>>,
    /// Open streams: type URL -> where its subscription stands.
    pub(super) streams: BTreeMap<u64, HashMap<String, TypeStatus>>,
    pub(super) acks: Vec<Ack>,
    pub(super) nodes: Vec<NodeInfo>,
    pub(super) rejected: Vec<Option<String>>,
    /// Service name -> uids of its workloads (sent along when a service is asked for).
    pub(super) members: HashMap<String, BTreeSet<String>>,
    /// Address names subscribed explicitly, in order.
    pub(super) demanded: Vec<String>,
    pub(super) subscriptions: Vec<Subscription>,
    /// Explicit names never answered ([`XdsHandle::withhold`]).
    pub(super) withheld: BTreeSet<String>,
}

#[derive(Default)]
pub(super) struct TypeStatus {
    /// The `rev` its last diff was computed against.
    synced_rev: u64,
    last_nonce: String,
    /// The answer to `last_nonce`: `None` pending, `Some(None)` ACK, `Some(Some(e))` NACK.
    answer: Option<Option<String>>,
}

/// One stream's subscription to a type.
pub(super) struct Sub {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client holds: name -> version.
    known: HashMap<String, String>,
}

impl Sub {
    /// The resource names this subscription selects besides a wildcard: each explicit
    /// name matches a resource by name or alias, as istiod's on-demand lookup does, and
    /// a service brings its workloads. Also the explicit names nothing matches.
    fn resolve(
        &self,
        current: &BTreeMap<String, Resource>,
        members: &HashMap<String, BTreeSet<String>>,
        withheld: &BTreeSet<String>,
    ) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut selected = BTreeSet::new();
        let mut unmatched = BTreeSet::new();
        for n in self.names.iter().filter(|n| !withheld.contains(*n)) {
            let hits: Vec<&Resource> = current
                .values()
                .filter(|r| &r.name == n || r.aliases.contains(n))
                .collect();
            if hits.is_empty() {
                unmatched.insert(n.clone());
            }
            for r in hits {
                selected.insert(r.name.clone());
                if let Some(m) = members.get(&r.name) {
                    selected.extend(m.iter().cloned());
                }
            }
        }
        (selected, unmatched)
    }
}

/// A resource named `name` holding `value` (an encoded `type_url` message).
pub(super) fn resource(
    type_url: &str,
    name: String,
    aliases: Vec<String>,
    value: Vec<u8>,
) -> Resource {
    Resource {
        name,
        aliases,
        resource: Some(prost_types::Any {
            type_url: type_url.to_string(),
            value,
        }),
        ..Default::default()
    }
}

/// `<network>/<ip>` for an address in bytes (4 or 16).
pub(super) fn alias(network: &str, bytes: &[u8]) -> Option<String> {
    let ip: std::net::IpAddr = match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok()?.into(),
        16 => <[u8; 16]>::try_from(bytes).ok()?.into(),
        _ => return None,
    };
    Some(format!("{network}/{ip}"))
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn notify(&self) {
        self.events.send_modify(|_| ());
    }

    pub(super) fn mutate(&self, f: impl FnOnce(&mut State)) {
        let rev = {
            let mut s = self.lock();
            f(&mut s);
            s.rev += 1;
            s.rev
        };
        self.data.send_replace(rev);
        self.notify();
    }

    /// Applies one request of stream `id`; returns the response to send, if any.
    pub(super) fn on_request(
        &self,
        id: u64,
        subs: &mut HashMap<String, Sub>,
        mut req: DeltaDiscoveryRequest,
    ) -> Option<DeltaDiscoveryResponse> {
        let mut s = self.lock();
        let s = &mut *s;
        if let Some(node) = req.node
            && let Some(info) = s.nodes.iter_mut().rev().find(|n| n.stream == id)
        {
            info.id = node.id;
            info.cluster = node.cluster;
            info.metadata = node
                .metadata
                .as_ref()
                .map_or(serde_json::Value::Null, struct_to_json);
        }
        let type_url = req.type_url;
        let subscription_change =
            !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty();
        if !req.response_nonce.is_empty() {
            let error = req.error_detail.map(|e| e.message);
            if let Some(st) = s.streams.get_mut(&id).and_then(|m| m.get_mut(&type_url))
                && st.last_nonce == req.response_nonce
            {
                st.answer = Some(error.clone());
            }
            s.acks.push(Ack {
                stream: id,
                type_url: type_url.clone(),
                nonce: req.response_nonce,
                error,
            });
            if !subscription_change {
                self.notify();
                return None;
            }
        }
        s.subscriptions.push(Subscription {
            stream: id,
            type_url: type_url.clone(),
            subscribe: req.resource_names_subscribe.clone(),
            unsubscribe: req.resource_names_unsubscribe.clone(),
        });
        let sub = subs.entry(type_url.clone()).or_insert_with(|| Sub {
            wildcard: req.resource_names_subscribe.is_empty(),
            names: BTreeSet::new(),
            known: std::mem::take(&mut req.initial_resource_versions),
        });
        let mut asked = BTreeSet::new();
        for n in req.resource_names_subscribe {
            match n.as_str() {
                "*" => sub.wildcard = true,
                _ => {
                    if type_url == ADDRESS_TYPE {
                        s.demanded.push(n.clone());
                    }
                    asked.insert(n.clone());
                    sub.names.insert(n);
                }
            }
        }
        for n in req.resource_names_unsubscribe {
            match n.as_str() {
                "*" => sub.wildcard = false,
                _ => _ = sub.names.remove(&n),
            }
        }
        let out = s.delta(id, &type_url, sub, Some(&asked));
        self.notify();
        out
    }
}

impl State {
    /// What stream `id` lacks of `type_url`, as a response. `asked`: the answer to a
    /// subscription request, sent even when empty, with the explicit names it asked
    /// for that nothing matches listed as removed (each once, as istiod answers them).
    pub(super) fn delta(
        &mut self,
        id: u64,
        type_url: &str,
        sub: &mut Sub,
        asked: Option<&BTreeSet<String>>,
    ) -> Option<DeltaDiscoveryResponse> {
        let empty = BTreeMap::new();
        let current = self.resources.get(type_url).unwrap_or(&empty);
        let (selected, unmatched) = sub.resolve(current, &self.members, &self.withheld);
        let wants = |name: &str| sub.wildcard || selected.contains(name);
        let resources: Vec<Resource> = current
            .values()
            .filter(|r| wants(&r.name) && sub.known.get(&r.name) != Some(&r.version))
            .cloned()
            .collect();
        let mut removed: BTreeSet<String> = sub
            .known
            .keys()
            .filter(|n| !(current.contains_key(*n) && wants(n)))
            .cloned()
            .collect();
        if let Some(asked) = asked {
            removed.extend(unmatched.intersection(asked).cloned());
        }
        for r in &resources {
            sub.known.insert(r.name.clone(), r.version.clone());
        }
        for n in &removed {
            sub.known.remove(n);
        }
        let rev = self.rev;
        let status = self
            .streams
            .get_mut(&id)
            .map(|m| m.entry(type_url.to_string()).or_default());
        if asked.is_none() && resources.is_empty() && removed.is_empty() {
            if let Some(st) = status {
                st.synced_rev = rev;
            }
            return None;
        }
        self.next_nonce += 1;
        let nonce = format!("n{}", self.next_nonce);
        if let Some(st) = status {
            *st = TypeStatus {
                synced_rev: rev,
                last_nonce: nonce.clone(),
                answer: None,
            };
        }
        Some(DeltaDiscoveryResponse {
            system_version_info: rev.to_string(),
            resources,
            type_url: type_url.to_string(),
            nonce,
            removed_resources: removed.into_iter().collect(),
        })
    }

    /// `Some(Ok)` once every stream subscribed to `type_url` (at least one) was
    /// sent revision `target` and ACKed; `Some(Err)` on a NACK; `None` pending.
    pub(super) fn ack_state(&self, type_url: &str, target: u64) -> Option<Result<(), String>> {
        let mut subscribed = self
            .streams
            .values()
            .filter_map(|t| t.get(type_url))
            .peekable();
        subscribed.peek()?;
        for st in subscribed {
            match &st.answer {
                _ if st.synced_rev < target => return None,
                None => return None,
                Some(Some(e)) => return Some(Err(e.clone())),
                Some(None) => {}
            }
        }
        Some(Ok(()))
    }
}

fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_to_json).collect())
        }
    }
}
