//! The in-memory object store: objects as JSON, one global, monotonically
//! increasing resourceVersion, and a bounded log of change events that
//! watches replay from.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;

use serde_json::{Value, json};

use super::patch::{self, PatchType};
use super::resources::ResourceType;
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;

/// Watch event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Modified,
    Deleted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Added => "ADDED",
            EventKind::Modified => "MODIFIED",
            EventKind::Deleted => "DELETED",
        }
    }
}

/// One change, as retained for watches.
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub res: usize,
    pub kind: EventKind,
    /// The object after the change (for DELETED: its last state, with the
    /// deletion's resourceVersion).
    pub object: Value,
    /// The object before a MODIFIED change (to tell "stopped matching a
    /// selector" from "changed").
    pub prev: Option<Value>,
}

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The object itself: `status` is kept as stored when the resource has
    /// a status subresource.
    Main,
    /// `/status`: only `status`, labels and annotations change.
    Status,
}

/// Preconditions of a DELETE.
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// The state. All methods are quick and synchronous; the server calls them
/// under a mutex.
#[derive(Debug)]
pub struct Store {
    resources: Vec<ResourceType>,
    rv: u64,
    objects: Vec<BTreeMap<(String, String), Value>>,
    events: VecDeque<Event>,
    window: usize,
    /// Events with `rv <= compacted` are no longer retained.
    compacted: u64,
    next_service_ip: u32,
    /// Namespaces being deleted: their content goes in
    /// [`Store::finalize_namespaces`].
    terminating: Vec<(String, std::time::Instant)>,
}

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

pub(crate) fn new_uid() -> String {
    let b: [u8; 16] = rand::random();
    let mut b = b;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// DNS-1123 subdomain (most object names).
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && n.as_bytes()[0].is_ascii_alphanumeric()
        && n.as_bytes()[n.len() - 1].is_ascii_alphanumeric()
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

impl Store {
    /// A store serving `resources`, retaining the last `window` events, with
    /// the namespaces a fresh cluster has.
    pub fn new(resources: Vec<ResourceType>, window: usize) -> Self {
        let n = resources.len();
        let mut s = Self {
            resources,
            rv: 0,
            objects: vec![BTreeMap::new(); n],
            events: VecDeque::new(),
            window: window.max(1),
            compacted: 0,
            next_service_ip: u32::from(Ipv4Addr::new(10, 96, 0, 10)),
            terminating: Vec::new(),
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let ns_res = s
                .index("", "namespaces")
                .expect("namespaces are always served");
            s.create(ns_res, None, json!({"metadata": {"name": ns}}), false)
                .expect("seed namespace");
        }
        s
    }

    pub fn resources(&self) -> &[ResourceType] {
        &self.resources
    }

    pub fn resource(&self, i: usize) -> &ResourceType {
        &self.resources[i]
    }

    /// Index of the resource `group`/`plural`.
    pub fn index(&self, group: &str, plural: &str) -> Option<usize> {
        self.resources
            .iter()
            .position(|r| r.group == group && r.plural == plural)
    }

    /// Index by group and kind (for `apiVersion`/`kind` of a body).
    pub fn index_by_kind(&self, group: &str, kind: &str) -> Option<usize> {
        self.resources
            .iter()
            .position(|r| r.group == group && r.kind == kind && !r.create_only)
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Events with `rv <= compacted()` are gone: watching from there is 410.
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Forgets every retained event and moves the resourceVersion on by
    /// one (without an event), so that every version a client holds is too
    /// old: watches from it (and open watches, when they next wake) get
    /// 410 Gone; a fresh list returns the new version.
    pub fn compact(&mut self) {
        self.events.clear();
        self.rv += 1;
        self.compacted = self.rv;
    }

    fn key(&self, res: usize, ns: Option<&str>, name: &str) -> (String, String) {
        let ns = if self.resources[res].namespaced {
            ns.unwrap_or("").to_string()
        } else {
            String::new()
        };
        (ns, name.to_string())
    }

    fn record(&mut self, res: usize, kind: EventKind, object: Value, prev: Option<Value>) {
        self.events.push_back(Event {
            rv: self.rv,
            res,
            kind,
            object,
            prev,
        });
        while self.events.len() > self.window {
            if let Some(e) = self.events.pop_front() {
                self.compacted = e.rv;
            }
        }
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn get(&self, res: usize, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let key = self.key(res, ns, name);
        self.objects[res]
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&self.resources[res].qualified(), name))
    }

    /// Objects of `res` (in `ns`, or all namespaces when `None`) matching
    /// the selectors, and the current resourceVersion.
    pub fn list(
        &self,
        res: usize,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> (Vec<Value>, u64) {
        let items = self.objects[res]
            .iter()
            .filter(|((ons, _), _)| ns.is_none_or(|n| !self.resources[res].namespaced || ons == n))
            .filter(|(_, o)| labels.matches(o) && fields.matches(o))
            .map(|(_, o)| o.clone())
            .collect();
        (items, self.rv)
    }

    /// Retained events of `res` after `since`, or 410 when some are gone.
    pub fn events_since(&self, res: usize, since: u64) -> Result<Vec<Event>, ApiError> {
        if since < self.compacted {
            return Err(ApiError::gone(format!(
                "too old resource version: {since} ({})",
                self.compacted + 1
            )));
        }
        Ok(self
            .events
            .iter()
            .filter(|e| e.rv > since && e.res == res)
            .cloned()
            .collect())
    }

    fn namespace_exists(&self, ns: &str) -> bool {
        let i = self
            .index("", "namespaces")
            .expect("namespaces are always served");
        self.objects[i].contains_key(&(String::new(), ns.to_string()))
    }

    /// Checks `apiVersion`/`kind` of a body against the resource, and fixes
    /// `metadata.namespace`.
    fn normalise(&self, res: usize, ns: Option<&str>, obj: &mut Value) -> Result<(), ApiError> {
        let r = &self.resources[res];
        if !obj.is_object() {
            return Err(ApiError::bad_request(format!(
                "{} body must be a JSON object",
                r.qualified()
            )));
        }
        if let Some(k) = obj.get("kind").and_then(Value::as_str)
            && k != r.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind {k:?} of the body does not match the resource {} (kind {})",
                r.qualified(),
                r.kind
            )));
        }
        if let Some(av) = obj.get("apiVersion").and_then(Value::as_str)
            && av != r.api_version()
        {
            return Err(ApiError::bad_request(format!(
                "the apiVersion {av:?} of the body does not match {} ({})",
                r.qualified(),
                r.api_version()
            )));
        }
        obj["kind"] = json!(r.kind);
        obj["apiVersion"] = json!(r.api_version());
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        if r.namespaced {
            let ns = ns.ok_or_else(|| {
                ApiError::bad_request(format!(
                    "{} is namespaced: use /namespaces/<ns>/{}",
                    r.qualified(),
                    r.plural
                ))
            })?;
            match meta_str(obj, "namespace") {
                Some(b) if !b.is_empty() && b != ns => {
                    return Err(ApiError::bad_request(format!(
                        "the namespace of the provided object ({b}) does not match the namespace sent on the request ({ns})"
                    )));
                }
                _ => obj["metadata"]["namespace"] = json!(ns),
            }
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        Ok(())
    }

    /// Creates an object (name from `metadata.name` or `generateName`).
    pub fn create(
        &mut self,
        res: usize,
        ns: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let r = self.resources[res];
        self.normalise(res, ns, &mut obj)?;
        let name = match meta_str(&obj, "name").filter(|n| !n.is_empty()) {
            Some(n) => n.to_string(),
            None => match meta_str(&obj, "generateName").filter(|n| !n.is_empty()) {
                Some(g) => {
                    let mut n;
                    loop {
                        n = format!("{g}{}", random_suffix());
                        if !self.objects[res].contains_key(&self.key(res, ns, &n)) {
                            break;
                        }
                    }
                    obj["metadata"]["name"] = json!(n);
                    n
                }
                None => {
                    return Err(ApiError::invalid(
                        &r.qualified(),
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        if !valid_name(&name) {
            return Err(ApiError::invalid(
                &r.qualified(),
                &name,
                "metadata.name: Invalid value: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
            ));
        }
        if r.namespaced {
            let ns = ns.unwrap_or_default();
            if !self.namespace_exists(ns) {
                return Err(ApiError::not_found("namespaces", ns));
            }
            if self.terminating.iter().any(|(t, _)| t == ns) {
                return Err(ApiError::forbidden(
                    &r.qualified(),
                    &name,
                    &format!(
                        "unable to create new content in namespace {ns} because it is being terminated"
                    ),
                ));
            }
        }
        let key = self.key(res, ns, &name);
        if self.objects[res].contains_key(&key) {
            return Err(ApiError::already_exists(&r.qualified(), &name));
        }
        super::defaults::on_create(&r, &mut obj, &mut self.next_service_ip)?;
        let meta = obj["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        meta.insert("uid".into(), json!(new_uid()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        meta.remove("deletionTimestamp");
        meta.remove("managedFields");
        if obj.get("spec").is_some() {
            obj["metadata"]["generation"] = json!(1);
        }
        if dry_run {
            obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
            return Ok(obj);
        }
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects[res].insert(key, obj.clone());
        self.record(res, EventKind::Added, obj.clone(), None);
        // What controllers of a real cluster would add.
        if r.group.is_empty()
            && r.plural == "namespaces"
            && let Some(sa) = self.index("", "serviceaccounts")
        {
            let _ = self.create(
                sa,
                Some(&name),
                json!({"metadata": {"name": "default"}}),
                false,
            );
        }
        Ok(obj)
    }

    /// Replaces an object (PUT), or its status. `metadata.resourceVersion`
    /// in the body, when set, must be the current one.
    pub fn update(
        &mut self,
        res: usize,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
        part: Part,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let r = self.resources[res];
        self.normalise(res, ns, &mut obj)?;
        match meta_str(&obj, "name") {
            Some(n) if n == name => {}
            Some("") | None => obj["metadata"]["name"] = json!(name),
            Some(n) => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
        }
        let old = self.get(res, ns, name)?;
        if let Some(want) = meta_str(&obj, "resourceVersion").filter(|v| !v.is_empty())
            && Some(want) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(
                &r.qualified(),
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        self.replace(res, ns, name, old, obj, part, dry_run)
    }

    /// Applies a patch to the stored object (or its status).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        res: usize,
        ns: Option<&str>,
        name: &str,
        kind: PatchType,
        body: &Value,
        part: Part,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let r = self.resources[res];
        let old = match self.get(res, ns, name) {
            Ok(o) => o,
            // Server-side apply creates what does not exist.
            Err(e) if kind == PatchType::Apply && part == Part::Main && e.code == 404 => {
                let mut obj = body.clone();
                if obj.is_object() {
                    if !obj.get("metadata").is_some_and(Value::is_object) {
                        obj["metadata"] = json!({});
                    }
                    obj["metadata"]["name"] = json!(name);
                }
                return self.create(res, ns, obj, dry_run);
            }
            Err(e) => return Err(e),
        };
        let mut new = old.clone();
        patch::apply(&mut new, kind, body)
            .map_err(|e| ApiError::invalid(&r.qualified(), name, e))?;
        // A resourceVersion in the patch is a precondition.
        if let Some(want) = body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && Some(want) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(
                &r.qualified(),
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        self.normalise(res, ns, &mut new)?;
        if meta_str(&new, "name") != Some(name) {
            return Err(ApiError::bad_request(format!(
                "a patch of {} {name} cannot change its name",
                r.qualified()
            )));
        }
        self.replace(res, ns, name, old, new, part, dry_run)
    }

    /// Shared tail of update and patch: keeps what the client may not
    /// change, bumps the resourceVersion when something changed, records
    /// the event.
    #[allow(clippy::too_many_arguments)]
    fn replace(
        &mut self,
        res: usize,
        ns: Option<&str>,
        name: &str,
        old: Value,
        mut new: Value,
        part: Part,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let r = self.resources[res];
        for f in [
            "uid",
            "creationTimestamp",
            "namespace",
            "name",
            "generation",
            "deletionTimestamp",
        ] {
            match old["metadata"].get(f) {
                Some(v) => new["metadata"][f] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(f);
                    }
                }
            }
        }
        if let Some(m) = new["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
        match part {
            Part::Main if r.has_status() => match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(o) = new.as_object_mut() {
                        o.remove("status");
                    }
                }
            },
            Part::Main => {}
            Part::Status => {
                // Everything but status, labels and annotations stays.
                let mut merged = old.clone();
                for f in ["labels", "annotations"] {
                    match new["metadata"].get(f) {
                        Some(v) => merged["metadata"][f] = v.clone(),
                        None => {
                            if let Some(m) = merged["metadata"].as_object_mut() {
                                m.remove(f);
                            }
                        }
                    }
                }
                match new.get("status") {
                    Some(s) => merged["status"] = s.clone(),
                    None => {
                        if let Some(o) = merged.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
                new = merged;
            }
        }
        if part == Part::Main
            && old.get("spec") != new.get("spec")
            && old["metadata"].get("generation").is_some()
        {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            new["metadata"]["generation"] = json!(g);
        }
        // No change: no new resourceVersion, no event (as the real server).
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if new == old || dry_run {
            return Ok(new);
        }
        let rv = self.bump();
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = self.key(res, ns, name);
        self.objects[res].insert(key, new.clone());
        self.record(res, EventKind::Modified, new.clone(), Some(old));
        Ok(new)
    }

    /// Deletes an object at once (finalizers and grace periods are not
    /// modelled). Deleting a namespace deletes everything in it.
    pub fn delete(
        &mut self,
        res: usize,
        ns: Option<&str>,
        name: &str,
        pre: &Preconditions,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let r = self.resources[res];
        let old = self.get(res, ns, name)?;
        if let Some(uid) = &pre.uid
            && Some(uid.as_str()) != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(
                &r.qualified(),
                name,
                &format!("the UID in the precondition ({uid}) does not match the UID in record"),
            ));
        }
        if let Some(v) = &pre.resource_version
            && Some(v.as_str()) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(
                &r.qualified(),
                name,
                "the ResourceVersion in the precondition does not match the ResourceVersion in record",
            ));
        }
        if dry_run {
            return Ok(old);
        }
        if r.group.is_empty() && r.plural == "namespaces" {
            // As the real server: the namespace turns Terminating now; its
            // content and then the namespace itself go shortly after (the
            // server runs finalize_namespaces in the background).
            if !self.terminating.iter().any(|(t, _)| t == name) {
                self.terminating
                    .push((name.to_string(), std::time::Instant::now()));
                let mut obj = old.clone();
                obj["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                obj["status"]["phase"] = json!("Terminating");
                let rv = self.bump();
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                let key = self.key(res, ns, name);
                self.objects[res].insert(key, obj.clone());
                self.record(res, EventKind::Modified, obj.clone(), Some(old));
                return Ok(obj);
            }
            return Ok(old);
        }
        self.remove(res, ns, name)
    }

    /// True when namespaces wait for [`Store::finalize_namespaces`].
    pub fn has_terminating(&self) -> bool {
        !self.terminating.is_empty()
    }

    /// Deletes the content of namespaces being deleted, then the namespaces.
    pub fn finalize_namespaces(&mut self) {
        self.finalize_namespaces_deleted_before(std::time::Instant::now());
    }

    /// [`Store::finalize_namespaces`] for the namespaces whose deletion
    /// started at or before `cutoff`.
    pub fn finalize_namespaces_deleted_before(&mut self, cutoff: std::time::Instant) {
        let ns_res = self
            .index("", "namespaces")
            .expect("namespaces are always served");
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.terminating)
            .into_iter()
            .partition(|(_, since)| *since <= cutoff);
        self.terminating = waiting;
        for (ns, _) in due {
            for i in 0..self.resources.len() {
                if !self.resources[i].namespaced {
                    continue;
                }
                let names: Vec<String> = self.objects[i]
                    .keys()
                    .filter(|(o, _)| *o == ns)
                    .map(|(_, n)| n.clone())
                    .collect();
                for n in names {
                    let _ = self.remove(i, Some(&ns), &n);
                }
            }
            let _ = self.remove(ns_res, None, &ns);
        }
    }

    fn remove(&mut self, res: usize, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let key = self.key(res, ns, name);
        let mut obj = self.objects[res]
            .remove(&key)
            .ok_or_else(|| ApiError::not_found(&self.resources[res].qualified(), name))?;
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(res, EventKind::Deleted, obj.clone(), None);
        Ok(obj)
    }
}

#[cfg(test)]
mod tests;
