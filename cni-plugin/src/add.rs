//! ADD: decide whether the agent must hear about this pod, ask it, and fall
//! back to an API lookup when it cannot be reached or does not accept the pod.
//!
//! | situation | result |
//! |---|---|
//! | ambient off, not a Kubernetes pod, excluded namespace, agent's own pod | pass `prevResult` through (no I/O) |
//! | agent answers 200 | pass through |
//! | agent answers 500 (ambient pod, enrolment failed) | error 11: fail closed (kubelet retries), the agent's reason in `details` |
//! | agent unreachable or undecided (503, any other status), API says ambient | error 11: fail closed; the agent's answer or the connection error in `details` |
//! | agent unreachable or undecided, API says not ambient | pass through (logged with the agent's answer) |
//! | agent unreachable or undecided, API lookup fails | pass through (fail open), or error 11 with `enable_ambient_detection_retry` |
//!
//! "Pass through" without a `prevResult` (the plugin not chained after an
//! interface plugin) prints an empty result at the config's version,
//! `{"cniVersion":"<version>"}`, as upstream does; the agent is then told no
//! IPs (it takes the pod's from the API server).
//!
//! Only a 500 ([`STATUS_ENROLMENT_FAILED`]) means "ambient and not enrolled";
//! the agent also refuses while it is still syncing (503), and pods outside
//! the mesh must start regardless.

use std::path::Path;
use std::time::Duration;

use mesh_proto::cni_event::{CmdAddEvent, Enrolment, STATUS_ENROLMENT_FAILED};

use crate::agent_client::{AgentAnswer, AgentUnreachable};
use crate::cni::error::{CniError, ErrorCode};
use crate::cni::invocation::Invocation;
use crate::cni::result::PrevResult;
use crate::config::PluginConf;
use crate::pod_lookup::LookupError;
use mesh_proto::enablement::Decision;

/// Bound on the agent round trip (upstream uses the same 5 s).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one API lookup (client set-up, TLS handshake, pod and
/// namespace GETs together). Generous on purpose: running out of time means
/// "enrolment unknown", which fails open, so a slow-but-working API server
/// on a loaded node must not be mistaken for a dead one. The runtime allows
/// a sandbox minutes; upstream keeps retrying the pod GET for up to 30 s.
/// (Measured: 9 ms on a quiet node, 1.7 s in the emulated test VM, where
/// the former 3 s bound was overrun on a loaded CI machine.)
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Lookups made when `enable_ambient_detection_retry` is on.
pub const LOOKUP_ATTEMPTS_WITH_RETRY: u32 = 3;
const LOOKUP_BACKOFF: Duration = Duration::from_millis(200);

/// What ADD will do, decided without any I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    PassThrough(&'static str),
    AskAgent(CmdAddEvent),
}

/// Decides from config and environment alone.
pub fn plan(conf: &PluginConf, inv: &Invocation) -> Plan {
    if !conf.ambient_enabled {
        return Plan::PassThrough("ambient is not enabled in the plugin config");
    }
    let Some(pod) = inv.args.k8s_pod() else {
        return Plan::PassThrough("not a Kubernetes pod (no K8S_POD_* in CNI_ARGS)");
    };
    if let Some(why) = conf.static_skip(pod.name, pod.namespace) {
        return Plan::PassThrough(why);
    }
    Plan::AskAgent(CmdAddEvent {
        netns: inv.netns.clone(),
        pod_name: pod.name.to_string(),
        pod_namespace: pod.namespace.to_string(),
        pod_uid: pod.uid.map(String::from),
        ips: conf
            .prev_result
            .as_ref()
            .map(PrevResult::pod_ips)
            .unwrap_or_default(),
    })
}

/// The I/O ADD may do, behind a trait so the decision logic is unit-tested.
#[allow(async_fn_in_trait)]
pub trait Backends {
    async fn ask_agent(
        &self,
        socket: &Path,
        event: &CmdAddEvent,
    ) -> Result<AgentAnswer, AgentUnreachable>;
    async fn lookup(
        &self,
        conf: &PluginConf,
        namespace: &str,
        name: &str,
    ) -> Result<Decision, LookupError>;
}

/// Why the agent's answer did not settle the pod.
#[derive(Debug)]
enum AgentProblem {
    Refused { status: u16, reason: String },
    Unreachable(AgentUnreachable),
}

impl AgentProblem {
    /// Short form for the CNI error message.
    fn summary(&self) -> String {
        match self {
            Self::Refused { status, .. } => format!("the node agent refused it (HTTP {status})"),
            Self::Unreachable(_) => "the node agent is unreachable".to_string(),
        }
    }

    /// The agent's own words (refusal) or the connection error: `details`.
    fn details(&self) -> String {
        match self {
            Self::Refused { reason, .. } => reason.clone(),
            Self::Unreachable(e) => e.to_string(),
        }
    }
}

impl std::fmt::Display for AgentProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused { status, reason } => {
                write!(f, "node agent refused the pod (HTTP {status}): {reason}")
            }
            Self::Unreachable(e) => write!(f, "node agent unreachable: {e}"),
        }
    }
}

/// Asks the agent, falls back to the API; `Ok` carries the logged reason
/// for letting the pod through.
pub async fn resolve(
    conf: &PluginConf,
    event: &CmdAddEvent,
    backends: &impl Backends,
) -> Result<String, CniError> {
    let pod = format!("{}/{}", event.pod_namespace, event.pod_name);
    let socket = conf.agent_socket();
    let problem = match backends.ask_agent(&socket, event).await {
        Ok(AgentAnswer::Accepted(reply)) => {
            return Ok(match reply {
                Some(r) => {
                    let what = match r.enrolment {
                        Enrolment::Enrolled => "enrolled",
                        Enrolment::NotAmbient => "not ambient",
                    };
                    format!("pod {pod}: agent says {what}: {}", r.reason)
                }
                None => format!("pod {pod}: agent accepted the pod"),
            });
        }
        Ok(AgentAnswer::Refused { status, reason }) if status == STATUS_ENROLMENT_FAILED => {
            return Err(CniError::new(
                ErrorCode::TryAgainLater,
                format!("node agent could not enrol ambient pod {pod} (HTTP {status})"),
            )
            .with_details(reason));
        }
        Ok(AgentAnswer::Refused { status, reason }) => AgentProblem::Refused { status, reason },
        Err(e) => AgentProblem::Unreachable(e),
    };
    tracing::warn!(pod = %pod, agent = %problem, "node agent did not accept the pod; looking it up in the API server");
    let attempts = if conf.detection_retry {
        LOOKUP_ATTEMPTS_WITH_RETRY
    } else {
        1
    };
    let mut last_err = None;
    for attempt in 1..=attempts {
        if attempt > 1 {
            tokio::time::sleep(LOOKUP_BACKOFF * (attempt - 1)).await;
        }
        let started = std::time::Instant::now();
        let answer = backends
            .lookup(conf, &event.pod_namespace, &event.pod_name)
            .await;
        tracing::info!(pod = %pod, attempt, took = ?started.elapsed(), ok = answer.is_ok(), "API lookup done");
        match answer {
            Ok(decision) if decision.is_ambient() => {
                return Err(CniError::new(
                    ErrorCode::TryAgainLater,
                    format!(
                        "pod {pod} is ambient ({}) but {}",
                        decision.reason(),
                        problem.summary()
                    ),
                )
                .with_details(problem.details()));
            }
            Ok(decision) => {
                return Ok(format!(
                    "pod {pod}: not ambient ({}), per the API server; {problem}",
                    decision.reason()
                ));
            }
            Err(e) => {
                tracing::warn!(pod = %pod, attempt, error = %e, "ambient detection failed");
                last_err = Some(e);
            }
        }
    }
    let err = last_err.expect("at least one lookup attempt");
    if conf.detection_retry {
        Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "cannot tell whether pod {pod} is ambient and {}",
                problem.summary()
            ),
        )
        .with_details(format!("{}; {err}", problem.details())))
    } else {
        Ok(format!(
            "pod {pod}: failing open, enrolment unknown ({problem}; lookup: {err})"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::invocation::Invocation;
    use mesh_proto::cni_event::{CmdAddReply, STATUS_UNDECIDED};
    use mesh_proto::enablement::Reason;
    use std::cell::Cell;
    use std::path::PathBuf;

    fn conf(extra: &str) -> PluginConf {
        let text = format!(
            r#"{{"cniVersion":"1.0.0","name":"net","type":"istio-cni","ambient_enabled":true,
                "pod_namespace":"istio-system","cni_agent_run_dir":"/run/x"{extra},
                "prevResult":{{"cniVersion":"1.0.0","ips":[{{"address":"10.1.0.7/24","interface":0}}]}}}}"#
        );
        PluginConf::parse(text.as_bytes()).unwrap()
    }

    fn inv(args: &str) -> Invocation {
        let args = args.to_string();
        Invocation::from_env(move |k| {
            Some(match k {
                "CNI_COMMAND" => "ADD".into(),
                "CNI_CONTAINERID" => "c".into(),
                "CNI_NETNS" => "/var/run/netns/p".into(),
                "CNI_IFNAME" => "eth0".into(),
                "CNI_ARGS" => args.clone(),
                _ => return None,
            })
        })
        .unwrap()
    }

    #[test]
    fn plan_skips_without_io() {
        let c = conf("");
        assert!(
            matches!(plan(&c, &inv("")), Plan::PassThrough(r) if r.contains("not a Kubernetes"))
        );
        assert!(matches!(
            plan(&c, &inv("K8S_POD_NAME=a;K8S_POD_NAMESPACE=kube-system")),
            Plan::PassThrough("namespace is excluded")
        ));
        assert!(matches!(
            plan(
                &c,
                &inv("K8S_POD_NAME=istio-cni-node-abc;K8S_POD_NAMESPACE=istio-system")
            ),
            Plan::PassThrough("pod is the node agent itself")
        ));
        let off = conf(r#","ambient_enabled":false"#);
        assert!(matches!(
            plan(&off, &inv("K8S_POD_NAME=a;K8S_POD_NAMESPACE=demo")),
            Plan::PassThrough(_)
        ));
        let Plan::AskAgent(ev) = plan(
            &c,
            &inv("K8S_POD_NAME=a;K8S_POD_NAMESPACE=demo;K8S_POD_UID=u1"),
        ) else {
            panic!("expected AskAgent");
        };
        assert_eq!(ev.netns, "/var/run/netns/p");
        assert_eq!(ev.pod_uid.as_deref(), Some("u1"));
        assert_eq!(ev.ips[0].address, "10.1.0.7/24");
    }

    /// Without `prevResult` ADD still decides as usual (skip or ask the
    /// agent, with no IPs); `commands` prints an empty result then.
    #[test]
    fn plan_without_prev_result_skips_or_asks_with_no_ips() {
        let c = PluginConf::parse(
            br#"{"cniVersion":"1.0.0","name":"net","type":"istio-cni","ambient_enabled":true}"#,
        )
        .unwrap();
        assert!(matches!(
            plan(&c, &inv("K8S_POD_NAME=a;K8S_POD_NAMESPACE=kube-system")),
            Plan::PassThrough("namespace is excluded")
        ));
        let Plan::AskAgent(ev) = plan(&c, &inv("K8S_POD_NAME=a;K8S_POD_NAMESPACE=demo")) else {
            panic!("expected AskAgent");
        };
        assert!(ev.ips.is_empty());
    }

    const NO_MATCH: Reason = Reason::NoSelector { default: true };
    const NS_LABEL: Reason = Reason::Selector {
        index: 1,
        default: true,
    };

    struct Fake {
        agent: fn() -> Result<AgentAnswer, AgentUnreachable>,
        lookup: fn() -> Result<Decision, LookupError>,
        lookups: Cell<u32>,
    }

    impl Backends for Fake {
        async fn ask_agent(
            &self,
            _: &Path,
            _: &CmdAddEvent,
        ) -> Result<AgentAnswer, AgentUnreachable> {
            (self.agent)()
        }
        async fn lookup(&self, _: &PluginConf, _: &str, _: &str) -> Result<Decision, LookupError> {
            self.lookups.set(self.lookups.get() + 1);
            (self.lookup)()
        }
    }

    fn down() -> Result<AgentAnswer, AgentUnreachable> {
        Err(AgentUnreachable::Connect {
            socket: PathBuf::from("/run/x/pluginevent.sock"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
    }

    fn lookup_fails() -> Result<Decision, LookupError> {
        Err(LookupError::Timeout {
            namespace: "demo".into(),
            name: "a".into(),
            after: Duration::from_secs(1),
        })
    }

    fn run(conf: &PluginConf, fake: &Fake) -> Result<String, CniError> {
        let Plan::AskAgent(ev) = plan(conf, &inv("K8S_POD_NAME=a;K8S_POD_NAMESPACE=demo")) else {
            panic!()
        };
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(resolve(conf, &ev, fake))
    }

    fn fake(
        agent: fn() -> Result<AgentAnswer, AgentUnreachable>,
        lookup: fn() -> Result<Decision, LookupError>,
    ) -> Fake {
        Fake {
            agent,
            lookup,
            lookups: Cell::new(0),
        }
    }

    #[test]
    fn agent_answers_decide() {
        let c = conf("");
        let ok = fake(
            || {
                Ok(AgentAnswer::Accepted(Some(CmdAddReply {
                    enrolment: Enrolment::Enrolled,
                    reason: "namespace label".into(),
                })))
            },
            || panic!("no lookup when the agent answers"),
        );
        assert!(run(&c, &ok).unwrap().contains("enrolled"));
    }

    fn refused() -> Result<AgentAnswer, AgentUnreachable> {
        Ok(AgentAnswer::Refused {
            status: STATUS_UNDECIDED,
            reason: "node agent is still starting (syncing pods and redirection)".into(),
        })
    }

    #[test]
    fn refusal_lets_non_ambient_pods_through() {
        let c = conf("");
        let f = fake(refused, || Ok(Decision::NotAmbient(NO_MATCH)));
        let why = run(&c, &f).unwrap();
        assert_eq!(f.lookups.get(), 1, "a refusal falls back to the API");
        assert!(
            why.contains("demo/a") && why.contains("not ambient"),
            "{why}"
        );
        assert!(
            why.contains("HTTP 503") && why.contains("still starting"),
            "{why}"
        );
    }

    #[test]
    fn refusal_of_an_ambient_pod_fails_closed_with_the_agents_reason() {
        let c = conf("");
        let e = run(&c, &fake(refused, || Ok(Decision::Ambient(NS_LABEL)))).unwrap_err();
        assert_eq!(e.code, ErrorCode::TryAgainLater);
        assert!(
            e.msg.contains("demo/a") && e.msg.contains("refused it (HTTP 503)"),
            "{}",
            e.msg
        );
        assert_eq!(
            e.details.as_deref(),
            Some("node agent is still starting (syncing pods and redirection)")
        );
    }

    #[test]
    fn enrolment_failure_fails_closed_without_a_lookup() {
        let failed = || {
            Ok(AgentAnswer::Refused {
                status: STATUS_ENROLMENT_FAILED,
                reason: "enrolling ambient pod demo/a failed: no ztunnel".into(),
            })
        };
        let f = fake(failed, || panic!("the agent decided: no lookup"));
        let e = run(&conf(""), &f).unwrap_err();
        assert_eq!(e.code, ErrorCode::TryAgainLater);
        assert!(
            e.msg.contains("demo/a") && e.msg.contains("HTTP 500"),
            "{}",
            e.msg
        );
        assert!(e.details.unwrap().contains("no ztunnel"));
    }

    #[test]
    fn refusal_and_failed_lookup_follow_the_unreachable_policy() {
        let f = fake(refused, lookup_fails);
        let why = run(&conf(""), &f).unwrap();
        assert!(
            why.contains("failing open") && why.contains("still starting"),
            "{why}"
        );
        let retry = conf(r#","enable_ambient_detection_retry":true"#);
        let f = fake(refused, lookup_fails);
        let e = run(&retry, &f).unwrap_err();
        assert_eq!(e.code, ErrorCode::TryAgainLater);
        assert!(e.details.unwrap().contains("still starting"));
        assert_eq!(f.lookups.get(), LOOKUP_ATTEMPTS_WITH_RETRY);
    }

    #[test]
    fn agent_down_fails_closed_for_ambient_and_open_otherwise() {
        let c = conf("");
        let e = run(&c, &fake(down, || Ok(Decision::Ambient(NS_LABEL)))).unwrap_err();
        assert_eq!(e.code, ErrorCode::TryAgainLater);
        assert!(e.details.unwrap().contains("pluginevent.sock"));
        assert!(run(&c, &fake(down, || Ok(Decision::NotAmbient(NO_MATCH)))).is_ok());
        let f = fake(down, lookup_fails);
        assert!(run(&c, &f).unwrap().contains("failing open"));
        assert_eq!(f.lookups.get(), 1);
    }

    #[test]
    fn detection_retry_retries_then_errors() {
        let c = conf(r#","enable_ambient_detection_retry":true"#);
        let f = fake(down, lookup_fails);
        let e = run(&c, &f).unwrap_err();
        assert_eq!(e.code, ErrorCode::TryAgainLater);
        assert_eq!(f.lookups.get(), LOOKUP_ATTEMPTS_WITH_RETRY);
    }
}
