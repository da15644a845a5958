//! The client's side of on-demand lookups (`XDS_ON_DEMAND`): which Address names the
//! data path asked for, and who is still waiting for an answer.
//!
//! istiod answers a subscription to `<network>/<ip>`, a uid or `<namespace>/<hostname>`
//! with the matching resources (named by their own key, the asked-for name among their
//! `aliases`; a service comes with its workloads) or, if nothing matches, with the name
//! in `removed_resources`. Either completes the waiters; they then read the store, which
//! the response was applied to first.

use std::collections::{BTreeSet, HashMap, HashSet};

use mesh_proto::xds::DeltaDiscoveryResponse;
use tokio::sync::oneshot;

use crate::state::on_demand::Demand;

#[derive(Debug, Default)]
pub(super) struct Demanded {
    /// Names asked for that resolved: subscribed again after a reconnect.
    names: BTreeSet<String>,
    /// Waiters per name not answered yet.
    pending: HashMap<String, Vec<oneshot::Sender<()>>>,
    /// Names istiod answered as unknown on the current stream. They stay subscribed
    /// there, so istiod pushes them if they appear; asked again meanwhile (every new
    /// connection to an address outside the mesh), they are answered at once instead
    /// of costing a round trip each. Bounded; forgotten on reconnect.
    absent: HashSet<String>,
}

/// At most this many unknown names are remembered per stream.
const MAX_ABSENT: usize = 16 * 1024;

impl Demanded {
    /// Records a request; `true` when its name must be sent to istiod (not already
    /// awaiting an answer).
    pub(super) fn add(&mut self, d: Demand) -> bool {
        if self.absent.contains(&d.key) {
            let _ = d.answered.send(());
            return false;
        }
        self.names.insert(d.key.clone());
        let waiters = self.pending.entry(d.key).or_default();
        waiters.push(d.answered);
        waiters.len() == 1
    }

    /// A new stream: nothing is known to be absent there yet.
    pub(super) fn new_stream(&mut self) {
        self.absent.clear();
    }

    /// Every name asked for so far.
    pub(super) fn names(&self) -> Vec<String> {
        self.names.iter().cloned().collect()
    }

    /// Completes the waiters of every name `resp` answers (by name, alias or removal);
    /// returns how many names were answered.
    pub(super) fn answered(&mut self, resp: &DeltaDiscoveryResponse) -> usize {
        // Pushed (a name subscribed earlier appeared): no longer absent, asked or not.
        if !self.absent.is_empty() {
            for r in &resp.resources {
                self.absent.remove(&r.name);
                for a in &r.aliases {
                    self.absent.remove(a);
                }
            }
        }
        if self.pending.is_empty() {
            return 0;
        }
        // An address istiod does not know is not asked for again after a reconnect
        // (the next connection to it asks anew): keeps `names` to what resolved.
        for gone in &resp.removed_resources {
            if self.pending.contains_key(gone) {
                self.names.remove(gone);
                if self.absent.len() < MAX_ABSENT {
                    self.absent.insert(gone.clone());
                }
            }
        }
        let mut hit: Vec<&str> = resp.removed_resources.iter().map(String::as_str).collect();
        for r in &resp.resources {
            hit.push(&r.name);
            hit.extend(r.aliases.iter().map(String::as_str));
        }
        let mut n = 0;
        for name in hit {
            if let Some(waiters) = self.pending.remove(name) {
                n += 1;
                for w in waiters {
                    let _ = w.send(());
                }
            }
        }
        n
    }

    /// Names still awaiting an answer.
    pub(super) fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::xds::Resource;

    fn demand(key: &str) -> (Demand, oneshot::Receiver<()>) {
        let (answered, rx) = oneshot::channel();
        (
            Demand {
                key: key.into(),
                answered,
            },
            rx,
        )
    }

    #[test]
    fn coalesces_requests_and_answers_by_name_alias_or_removal() {
        let mut d = Demanded::default();
        let (a1, mut ra1) = demand("/10.0.0.1");
        let (a2, mut ra2) = demand("/10.0.0.1");
        let (b, mut rb) = demand("ns/svc.ns.svc.cluster.local");
        let (c, mut rc) = demand("/10.0.0.9");
        assert!(d.add(a1), "first request for a name is sent");
        assert!(!d.add(a2), "a second one waits for the same answer");
        assert!(d.add(b));
        assert!(d.add(c));
        assert_eq!(d.pending(), 3);

        let resp = DeltaDiscoveryResponse {
            resources: vec![
                Resource {
                    name: "uid-1".into(),
                    aliases: vec!["/10.0.0.1".into()],
                    ..Default::default()
                },
                Resource {
                    name: "ns/svc.ns.svc.cluster.local".into(),
                    ..Default::default()
                },
            ],
            removed_resources: vec!["/10.0.0.9".into()],
            ..Default::default()
        };
        assert_eq!(d.answered(&resp), 3);
        assert!(ra1.try_recv().is_ok() && ra2.try_recv().is_ok());
        assert!(rb.try_recv().is_ok() && rc.try_recv().is_ok());
        assert_eq!(d.pending(), 0);
        // Names that resolved stay subscribed (for reconnects), unknown ones do not;
        // asking again sends again.
        assert_eq!(d.names(), ["/10.0.0.1", "ns/svc.ns.svc.cluster.local"]);
        let (again, _r) = demand("/10.0.0.1");
        assert!(d.add(again));
        assert_eq!(d.answered(&DeltaDiscoveryResponse::default()), 0);

        // An unknown name asked again on the same stream: answered at once, not sent.
        let (c2, mut rc2) = demand("/10.0.0.9");
        assert!(!d.add(c2));
        assert!(rc2.try_recv().is_ok());
        // Once istiod pushes it (by alias), it is no longer absent, also when no
        // request is pending at the time.
        d.answered(&DeltaDiscoveryResponse {
            resources: vec![Resource {
                name: "uid-1".into(),
                aliases: vec!["/10.0.0.1".into()],
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(d.pending(), 0);
        d.answered(&DeltaDiscoveryResponse {
            resources: vec![Resource {
                name: "uid-9".into(),
                aliases: vec!["/10.0.0.9".into()],
                ..Default::default()
            }],
            ..Default::default()
        });
        let (c3, _rc3) = demand("/10.0.0.9");
        assert!(d.add(c3), "asked for again once present");
        // After a reconnect nothing is known absent.
        d.answered(&DeltaDiscoveryResponse {
            removed_resources: vec!["/10.0.0.9".into()],
            ..Default::default()
        });
        d.new_stream();
        let (c4, _rc4) = demand("/10.0.0.9");
        assert!(d.add(c4));
    }
}
