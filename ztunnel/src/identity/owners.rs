//! Who keeps an identity's certificate alive in the [`super::SecretManager`].
//!
//! Two kinds of owner; either one is enough to keep a certificate cached and renewed:
//!
//! - an **account hold**: a workload running on this ztunnel as a namespace/service account
//!   (in-pod mode: one hold per running workload proxy, replicas share the account; it keeps
//!   the account's identities of every trust domain);
//! - the **node claim**: in node-wide (TPROXY) mode, the set of identities of the workloads
//!   the state lists on this node, replaced as a whole on every state change.
//!
//! A certificate is forgotten when its last owner lets go: the last hold of its account is
//! dropped while the node claim does not list it, or a new node claim stops listing it while
//! no hold has its account. Until a node claim has been made, an identity without a hold is
//! not tracked and is kept (dedicated mode, and in-pod mode where every served identity is
//! held), which is what the manager did before owners existed.

use std::collections::{HashMap, HashSet};

use super::Identity;

/// A namespace/service account.
pub(super) type Account = (String, String);

pub(super) fn account_of(identity: &Identity) -> Account {
    (
        identity.namespace().to_string(),
        identity.service_account().to_string(),
    )
}

#[derive(Debug, Default)]
pub(super) struct Owners {
    /// Running workloads per account.
    accounts: HashMap<Account, usize>,
    /// Node-wide mode: identities of this node's workloads; `None` until the first claim.
    node: Option<HashSet<Identity>>,
}

impl Owners {
    pub(super) fn hold(&mut self, account: Account) {
        *self.accounts.entry(account).or_insert(0) += 1;
    }

    /// Drops one hold of `account`; true when it was the last one.
    pub(super) fn release(&mut self, account: &Account) -> bool {
        let Some(n) = self.accounts.get_mut(account) else {
            return false;
        };
        *n -= 1;
        if *n > 0 {
            return false;
        }
        self.accounts.remove(account);
        true
    }

    pub(super) fn holders(&self, account: &Account) -> usize {
        self.accounts.get(account).copied().unwrap_or(0)
    }

    /// Replaces the node claim.
    pub(super) fn claim_for_node(&mut self, identities: HashSet<Identity>) {
        self.node = Some(identities);
    }

    /// Whether an owner keeps `identity`: its account is held or the node claims it.
    pub(super) fn keeps(&self, identity: &Identity) -> bool {
        self.accounts.contains_key(&account_of(identity))
            || self.node.as_ref().is_some_and(|n| n.contains(identity))
    }

    /// Whether `identity` is tracked (a node claim exists) and no owner keeps it: its
    /// certificate must go, and must not be renewed.
    pub(super) fn orphaned(&self, identity: &Identity) -> bool {
        self.node.is_some() && !self.keeps(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa)
    }

    /// Before any node claim nothing is orphaned; afterwards an identity is kept by either
    /// owner and orphaned only when neither keeps it (holds cover every trust domain).
    #[test]
    fn either_owner_keeps_an_identity() {
        let mut o = Owners::default();
        let held = id("ns1", "held");
        let claimed = id("ns1", "claimed");
        let nobody = id("ns1", "nobody");
        o.hold(account_of(&held));
        assert!(
            !o.orphaned(&nobody),
            "untracked before the first node claim"
        );
        o.claim_for_node(HashSet::from([claimed.clone()]));
        assert!(o.keeps(&held) && !o.orphaned(&held));
        assert!(
            !o.orphaned(&Identity::new("other.domain", "ns1", "held")),
            "a hold keeps the account in every trust domain"
        );
        assert!(o.keeps(&claimed) && !o.orphaned(&claimed));
        assert!(o.orphaned(&nobody));
        o.claim_for_node(HashSet::new());
        assert!(o.orphaned(&claimed), "no longer claimed");
        assert!(!o.orphaned(&held), "still held");
    }

    #[test]
    fn release_reports_the_last_hold() {
        let mut o = Owners::default();
        let a = account_of(&id("ns1", "sa1"));
        o.hold(a.clone());
        o.hold(a.clone());
        assert_eq!(o.holders(&a), 2);
        assert!(!o.release(&a));
        assert!(o.release(&a));
        assert_eq!(o.holders(&a), 0);
        assert!(!o.release(&a), "releasing an unheld account is a no-op");
    }
}
