//! The node agent's in-pod half for tests that run it in the test process: its ZDS server
//! (ztunnel connects to `uds`) and its in-pod redirector (capture rules in each pod's netns,
//! then the netns handed to ztunnel), with `node_netns` as the host.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use node_agent::redirect::inpod::{InpodConfig, InpodRedirector};
use node_agent::redirect::{PodRedirect, Redirector};
use node_agent::zds::{ZdsConfig, ZdsServer};

use crate::netsim::Pod;

pub struct InpodAgent {
    pub zds: ZdsServer,
    pub redirector: InpodRedirector,
}

impl InpodAgent {
    /// Starts serving ZDS on `uds` once `enrolled` (pods already redirected by an earlier
    /// agent) are reconciled, as the node agent does at start-up.
    pub async fn start(uds: &Path, node_netns: &Path, enrolled: &[PodRedirect]) -> Self {
        let zds = ZdsServer::new(ZdsConfig {
            socket_path: uds.to_path_buf(),
            ..Default::default()
        });
        let redirector = InpodRedirector::new(
            InpodConfig {
                host_netns: Some(node_netns.to_path_buf()),
                ipv6: false,
                ..Default::default()
            },
            Arc::new(zds.clone()),
        )
        .await
        .expect("in-pod redirector");
        let report = redirector.reconcile(enrolled).await;
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        zds.serve().expect("serve ZDS");
        Self { zds, redirector }
    }
}

/// What the agent knows of `pod` (namespace `default`, IPv4 only) to enrol it.
pub fn pod_redirect(pod: &Pod, uid: &str, service_account: &str) -> PodRedirect {
    PodRedirect {
        uid: uid.into(),
        name: pod.name().into(),
        namespace: "default".into(),
        service_account: service_account.into(),
        ips: vec![IpAddr::V4(pod.ip())],
        netns: Some(pod.netns().path().to_path_buf()),
        annotations: Default::default(),
    }
}
