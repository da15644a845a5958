//! [`ZdsServer`] as the in-pod redirector's [`WorkloadHandoff`].

use futures::future::BoxFuture;
use mesh_proto::zds::WorkloadInfo;

use super::ZdsServer;
use crate::redirect::inpod::{HandoffError, WorkloadHandoff};
use crate::redirect::netns::Netns;

impl WorkloadHandoff for ZdsServer {
    fn add<'a>(
        &'a self,
        uid: &'a str,
        info: &'a WorkloadInfo,
        netns: &'a Netns,
    ) -> BoxFuture<'a, Result<(), HandoffError>> {
        Box::pin(async move {
            self.add_workload(uid, info.clone(), netns)
                .await
                .map_err(HandoffError::from)
        })
    }

    fn register(&self, uid: &str, info: &WorkloadInfo, netns: Option<&Netns>) {
        ZdsServer::register(self, uid, info.clone(), netns);
    }

    fn del<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<(), HandoffError>> {
        Box::pin(async move { self.del_workload(uid).await.map_err(HandoffError::from) })
    }
}
