//! Readiness: named conditions that must all hold before `/healthz/ready` answers 200.
//!
//! Components add a condition (a cheap closure) when they start: the dedicated proxy's
//! certificate, the in-pod snapshot (`watch::Receiver<bool>` from the ZDS client), ...

use std::sync::{Arc, Mutex};

type Condition = Box<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone, Default)]
pub struct Readiness {
    conditions: Arc<Mutex<Vec<(String, Condition)>>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("pending", &self.pending())
            .finish()
    }
}

impl Readiness {
    /// Adds a condition; readiness requires it to return true.
    pub fn add(
        &self,
        name: impl Into<String>,
        condition: impl Fn() -> bool + Send + Sync + 'static,
    ) {
        self.conditions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.into(), Box::new(condition)));
    }

    /// Adds a condition backed by a watch channel (`true` = ready).
    pub fn add_watch(&self, name: impl Into<String>, rx: tokio::sync::watch::Receiver<bool>) {
        self.add(name, move || *rx.borrow());
    }

    /// Names of the conditions not met yet.
    pub fn pending(&self) -> Vec<String> {
        self.conditions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, c)| !c())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Ready when at least one condition was added and all hold.
    pub fn is_ready(&self) -> bool {
        let conds = self.conditions.lock().unwrap_or_else(|e| e.into_inner());
        !conds.is_empty() && conds.iter().all(|(_, c)| c())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn all_conditions_must_hold() {
        let r = Readiness::default();
        assert!(!r.is_ready(), "nothing registered yet");
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        r.add("certificate", move || f.load(Ordering::SeqCst));
        let (tx, rx) = tokio::sync::watch::channel(false);
        r.add_watch("snapshot", rx);
        assert_eq!(r.pending(), vec!["certificate", "snapshot"]);
        flag.store(true, Ordering::SeqCst);
        tx.send(true).unwrap();
        assert!(r.is_ready());
        assert!(r.pending().is_empty());
    }
}
