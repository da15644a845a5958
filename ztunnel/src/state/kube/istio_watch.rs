//! The watches of the two Istio kinds, AuthorizationPolicy and
//! PeerAuthentication (one helper for both): which API version is served, and
//! what a 404 means.
//!
//! `security.istio.io/v1` exists since Istio 1.22; clusters whose Istio CRDs are
//! older serve these kinds only at `v1beta1` (the same spec schema for every
//! field ztunnel reads). Treating a 404 on `v1` as "no CRD" would stop enforcing
//! every DENY policy and STRICT mTLS while staying Ready (fail open), so:
//!
//! - `v1` is tried first; a 404 there tries `v1beta1` at once;
//! - only when neither is served is the CRD absent ([`Msg::Absent`]: none of
//!   that kind, a warning, a slow retry of both versions);
//! - the version found is kept; if it later answers 404 (CRD removed or
//!   replaced), both are probed again after a back-off, and until then the
//!   objects already known stay in force. A `v1` that appears while `v1beta1`
//!   is watched is not switched to (`v1beta1` keeps being served alongside it).
//!
//! Retries (missing CRD or any other error) use [`SlowBackoff`].

use std::borrow::Cow;
use std::fmt::Debug;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;

use super::{Msg, MsgStream, ObjectKind, watcher_config};

/// The API group of both kinds.
pub const GROUP: &str = "security.istio.io";

/// The versions tried, in order.
pub const VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// `K` served at the version given as its dynamic type (`K`'s own
/// [`kube::Resource`] impl names `v1`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(transparent)]
struct AtVersion<K>(K);

impl<K: kube::Resource<DynamicType = ()>> kube::Resource for AtVersion<K> {
    type DynamicType = &'static str;
    type Scope = K::Scope;

    fn kind(_: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(&())
    }
    fn group(_: &Self::DynamicType) -> Cow<'_, str> {
        K::group(&())
    }
    fn version(v: &Self::DynamicType) -> Cow<'_, str> {
        Cow::Borrowed(v)
    }
    fn plural(_: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(&())
    }
    fn meta(&self) -> &ObjectMeta {
        self.0.meta()
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0.meta_mut()
    }
}

/// What follows a 404 from the version being watched or tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterNotFound {
    /// Try this version now (the same probe round).
    Next(&'static str),
    /// The version that was served is gone: probe again from this version after
    /// a back-off, keeping what is known meanwhile.
    Reprobe(&'static str),
    /// No version is served: the CRD is absent. `newly`: it was not absent
    /// before (warn once). The next round starts at [`VERSIONS`]`[0]`.
    Absent { newly: bool },
}

/// Which version is watched, and what is known about the others.
#[derive(Debug, Default)]
pub struct VersionProbe {
    /// Index into [`VERSIONS`] of the version watched (or tried).
    at: usize,
    /// That version has delivered an event.
    serving: bool,
    /// The last round found no version.
    absent: bool,
}

/// A version started delivering events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NowServed {
    pub version: &'static str,
    /// The CRD was absent before.
    pub was_absent: bool,
}

impl VersionProbe {
    /// The version to watch (or try) now.
    pub fn version(&self) -> &'static str {
        VERSIONS[self.at]
    }

    /// An object event (or the end of a list) arrived from [`Self::version`]:
    /// `Some` the first time.
    pub fn served(&mut self) -> Option<NowServed> {
        if self.serving {
            return None;
        }
        self.serving = true;
        Some(NowServed {
            version: self.version(),
            was_absent: std::mem::take(&mut self.absent),
        })
    }

    /// [`Self::version`] answered 404.
    pub fn not_found(&mut self) -> AfterNotFound {
        if std::mem::take(&mut self.serving) {
            self.at = 0;
            return AfterNotFound::Reprobe(self.version());
        }
        if self.at + 1 < VERSIONS.len() {
            self.at += 1;
            return AfterNotFound::Next(self.version());
        }
        self.at = 0;
        let newly = !std::mem::replace(&mut self.absent, true);
        AfterNotFound::Absent { newly }
    }
}

/// The API server's HTTP status of a failed list or watch (`None`: not an API answer).
pub fn status_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// 404 from the list or watch: the resource is not served at that version.
pub fn is_not_found(e: &watcher::Error) -> bool {
    status_code(e) == Some(404)
}

type Inner<K> = Pin<Box<dyn Stream<Item = Result<Event<AtVersion<K>>, watcher::Error>> + Send>>;

fn watch_at<K>(client: &kube::Client, version: &'static str) -> Inner<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let api = Api::<AtVersion<K>>::all_with(client.clone(), &version);
    watcher::watcher(api, watcher_config()).boxed()
}

fn unwrap_event<K>(e: Event<AtVersion<K>>) -> Event<K> {
    match e {
        Event::Apply(o) => Event::Apply(o.0),
        Event::Delete(o) => Event::Delete(o.0),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(o.0),
        Event::InitDone => Event::InitDone,
    }
}

struct State<K, F> {
    client: kube::Client,
    kind: ObjectKind,
    wrap: F,
    probe: VersionProbe,
    inner: Inner<K>,
    backoff: SlowBackoff,
    pause: Option<Duration>,
}

/// The watch of an Istio kind (`kind` names it in logs): events at whichever of
/// [`VERSIONS`] is served, [`Msg::Absent`] when none is, other errors as
/// [`Msg::Error`] (followed by a slow back-off).
pub(super) fn stream<K, F>(client: kube::Client, kind: ObjectKind, wrap: F) -> MsgStream
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
    F: Fn(Box<Event<K>>) -> Msg + Send + 'static,
{
    let probe = VersionProbe::default();
    let inner = watch_at::<K>(&client, probe.version());
    let state = State {
        client,
        kind,
        wrap,
        probe,
        inner,
        backoff: SlowBackoff::new(),
        pause: None,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(d) = st.pause.take() {
                tokio::time::sleep(d).await;
            }
            match st.inner.next().await? {
                // The watcher announces `Init` before it lists: not yet a sign that
                // the version is served.
                Ok(e @ Event::Init) => {
                    return Some(((st.wrap)(Box::new(unwrap_event(e))), st));
                }
                Ok(e) => {
                    st.backoff.reset();
                    if let Some(now) = st.probe.served() {
                        log_served(st.kind, now);
                    }
                    return Some(((st.wrap)(Box::new(unwrap_event(e))), st));
                }
                Err(e) if is_not_found(&e) => {
                    let tried = st.probe.version();
                    let after = st.probe.not_found();
                    st.inner = watch_at::<K>(&st.client, st.probe.version());
                    match after {
                        AfterNotFound::Next(v) => {
                            tracing::debug!(
                                resource = st.kind.name(),
                                "{} is not served at {GROUP}/{tried} (404); trying {GROUP}/{v}",
                                st.kind.crd_kind()
                            );
                        }
                        AfterNotFound::Reprobe(v) => {
                            tracing::warn!(
                                resource = st.kind.name(),
                                "{} watched at {GROUP}/{tried} answered 404 (CRD removed or \
                                 changed); keeping the {} known and looking for {GROUP}/{v} \
                                 or {GROUP}/{} again",
                                st.kind.crd_kind(),
                                st.kind.name(),
                                VERSIONS[1]
                            );
                            st.pause = Some(st.backoff.next_delay());
                        }
                        AfterNotFound::Absent { newly } => {
                            if newly {
                                tracing::warn!(
                                    resource = st.kind.name(),
                                    "{} CRD is not installed ({GROUP} serves neither {} nor \
                                     {}): none are enforced; checking again slowly",
                                    st.kind.crd_kind(),
                                    VERSIONS[0],
                                    VERSIONS[1]
                                );
                            }
                            st.pause = Some(st.backoff.next_delay());
                            return Some((Msg::Absent(st.kind), st));
                        }
                    }
                }
                Err(e) => {
                    st.pause = Some(st.backoff.next_delay());
                    return Some((Msg::Error(st.kind, e), st));
                }
            }
        }
    })
    .boxed()
}

fn log_served(kind: ObjectKind, now: NowServed) {
    let also = if now.was_absent {
        " (the CRD is available now)"
    } else {
        ""
    };
    if now.version == VERSIONS[0] {
        tracing::info!(
            resource = kind.name(),
            "{}: watching {GROUP}/{}{also}",
            kind.crd_kind(),
            now.version
        );
    } else {
        tracing::info!(
            resource = kind.name(),
            "{}: watching {GROUP}/{}{also}; {GROUP}/{} is not served (Istio CRDs older \
             than 1.22)",
            kind.crd_kind(),
            now.version,
            VERSIONS[0]
        );
    }
}

/// Back-off for the Istio watches: 1 s doubling to 60 s (a missing CRD is
/// polled slowly), reset by an object event (not the watcher's `Init`, which
/// comes before every list attempt) and after 2 min without errors.
pub struct SlowBackoff {
    next: Duration,
    last: Option<tokio::time::Instant>,
}

impl SlowBackoff {
    const START: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);
    const RESET_AFTER: Duration = Duration::from_secs(120);

    pub fn new() -> Self {
        SlowBackoff {
            next: Self::START,
            last: None,
        }
    }

    pub fn reset(&mut self) {
        self.next = Self::START;
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_at(tokio::time::Instant::now())
    }

    fn next_at(&mut self, now: tokio::time::Instant) -> Duration {
        if self
            .last
            .is_some_and(|l| now.duration_since(l) > Self::RESET_AFTER + self.next)
        {
            self.next = Self::START;
        }
        self.last = Some(now);
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // ±10 % jitter so many ztunnels do not retry in lockstep.
        let jitter = rand::random_range(0.9..1.1);
        d.mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_retry_slows_to_a_minute_and_resets() {
        let mut b = SlowBackoff::new();
        let secs: Vec<f64> = (0..9).map(|_| b.next_delay().as_secs_f64()).collect();
        for (got, want) in secs
            .iter()
            .zip([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0])
        {
            assert!((got / want - 1.0).abs() <= 0.1 + 1e-9, "{secs:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1100));
        // A long quiet period also starts again from 1 s.
        let t0 = tokio::time::Instant::now();
        b.next_at(t0);
        b.next_at(t0 + Duration::from_secs(1));
        assert!(b.next_at(t0 + Duration::from_secs(2)) >= Duration::from_millis(3600));
        let later = t0 + Duration::from_secs(600);
        assert!(b.next_at(later) <= Duration::from_millis(1100));
    }

    #[test]
    fn v1_is_tried_first_and_a_404_there_tries_v1beta1_not_absent() {
        let mut p = VersionProbe::default();
        assert_eq!(p.version(), "v1");
        assert_eq!(p.not_found(), AfterNotFound::Next("v1beta1"));
        assert_eq!(p.version(), "v1beta1");
        assert_eq!(
            p.served(),
            Some(NowServed {
                version: "v1beta1",
                was_absent: false
            })
        );
        // Logged once.
        assert_eq!(p.served(), None);
        assert_eq!(p.version(), "v1beta1");
    }

    #[test]
    fn absent_only_when_neither_version_is_served_and_warned_once() {
        let mut p = VersionProbe::default();
        assert_eq!(p.not_found(), AfterNotFound::Next("v1beta1"));
        assert_eq!(p.not_found(), AfterNotFound::Absent { newly: true });
        // The slow retry probes both again, from v1.
        assert_eq!(p.version(), "v1");
        assert_eq!(p.not_found(), AfterNotFound::Next("v1beta1"));
        assert_eq!(p.not_found(), AfterNotFound::Absent { newly: false });
        // Installed later (at v1).
        assert_eq!(
            p.served(),
            Some(NowServed {
                version: "v1",
                was_absent: true
            })
        );
    }

    #[test]
    fn a_404_on_the_served_version_probes_both_again() {
        let mut p = VersionProbe::default();
        assert_eq!(p.not_found(), AfterNotFound::Next("v1beta1"));
        assert!(p.served().is_some());
        // v1beta1 worked, then 404: not absent yet, back to probing v1 first.
        assert_eq!(p.not_found(), AfterNotFound::Reprobe("v1"));
        assert_eq!(p.version(), "v1");
        assert_eq!(p.not_found(), AfterNotFound::Next("v1beta1"));
        assert_eq!(p.not_found(), AfterNotFound::Absent { newly: true });
        // Also when v1 was the served one.
        let mut p = VersionProbe::default();
        assert!(p.served().is_some());
        assert_eq!(p.not_found(), AfterNotFound::Reprobe("v1"));
        assert_eq!(p.not_found(), AfterNotFound::Next("v1beta1"));
        assert_eq!(
            p.served(),
            Some(NowServed {
                version: "v1beta1",
                was_absent: false
            })
        );
    }
}
