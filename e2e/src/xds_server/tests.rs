//! The double against a tonic client: subscriptions, pushes, reconnects, NACKs, TLS and tokens.
use super::*;
use mesh_proto::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::xds::{Node, Status as RpcStatus};
use std::collections::BTreeSet;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const T: Duration = Duration::from_secs(5);

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn workload(uid: &str, name: &str) -> Workload {
    Workload {
        uid: uid.into(),
        name: name.into(),
        namespace: "default".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        ..Default::default()
    }
}

/// A client stream: requests go in through `tx`.
struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

async fn open(channel: Channel, token: Option<&str>) -> Result<Client, Status> {
    let (tx, rx) = mpsc::channel(16);
    let outbound =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut req = Request::new(outbound);
    if let Some(t) = token {
        let v = format!("Bearer {t}").parse().unwrap();
        req.metadata_mut().insert("authorization", v);
    }
    req.metadata_mut()
        .insert("clusterid", "Kubernetes".parse().unwrap());
    let rx = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(req)
        .await?
        .into_inner();
    Ok(Client { tx, rx })
}

async fn plain(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

impl Client {
    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    async fn subscribe(&self, type_url: &str, initial: &[(&str, &str)]) {
        self.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "ztunnel~10.0.0.9~zt.istio-system~istio-system.svc.cluster.local".into(),
                cluster: "Kubernetes".into(),
                metadata: Some(prost_types::Struct {
                    fields: [("NAME".into(), "zt".to_string().into())].into(),
                }),
            }),
            type_url: type_url.into(),
            initial_resource_versions: initial
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .await;
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(T, self.rx.message())
            .await
            .expect("response in time")
            .expect("stream ok")
            .expect("stream open")
    }

    async fn answer(&self, r: &DeltaDiscoveryResponse, error: Option<&str>) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: error.map(|m| RpcStatus {
                code: 3,
                message: m.into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test]
async fn subscribe_ack_push_and_remove() {
    let xds = XdsServer::new().start(local()).unwrap();
    assert_ne!(xds.addr().port(), 0);
    xds.set_workload(workload("uid-1", "a"));
    xds.set_service(Service {
        namespace: "default".into(),
        hostname: "a.default.svc.cluster.local".into(),
        ..Default::default()
    });
    let mut a = open(plain(xds.addr()).await, Some("tok")).await.unwrap();
    let mut b = open(plain(xds.addr()).await, None).await.unwrap();
    a.subscribe(ADDRESS_TYPE, &[]).await;
    a.subscribe(AUTHORIZATION_TYPE, &[]).await;
    b.subscribe(ADDRESS_TYPE, &[]).await;
    let addrs = a.recv().await;
    assert_eq!(addrs.type_url, ADDRESS_TYPE);
    assert_eq!(
        names(&addrs),
        ["default/a.default.svc.cluster.local", "uid-1"]
    );
    let any = addrs.resources[1].resource.as_ref().unwrap();
    assert_eq!(any.type_url, ADDRESS_TYPE);
    let decoded = Address::decode(any.value.as_slice()).unwrap();
    assert!(matches!(decoded.r#type, Some(address::Type::Workload(w)) if w.name == "a"));
    let authz = a.recv().await;
    assert_eq!(authz.type_url, AUTHORIZATION_TYPE);
    assert!(authz.resources.is_empty() && authz.removed_resources.is_empty());
    let b_addrs = b.recv().await;
    let nonces: BTreeSet<_> = [&addrs.nonce, &authz.nonce, &b_addrs.nonce].into();
    assert!(nonces.len() == 3 && !nonces.contains(&String::new()));
    a.answer(&addrs, None).await;
    a.answer(&authz, None).await;
    b.answer(&b_addrs, None).await;
    xds.wait_acked(ADDRESS_TYPE, T).await.unwrap();
    xds.wait_acked(AUTHORIZATION_TYPE, T).await.unwrap();
    assert!(xds.wait_for(T, |h| h.acks().len() == 3).await);
    let acks = xds.acks();
    assert!(acks.iter().all(|a| a.error.is_none()));
    assert!(
        acks.iter()
            .any(|a| a.nonce == addrs.nonce && a.type_url == ADDRESS_TYPE)
    );
    assert_eq!(xds.connected(), 2);
    let nodes = xds.nodes();
    assert_eq!(nodes.len(), 2);
    assert!(nodes[0].id.starts_with("ztunnel~10.0.0.9~"));
    assert_eq!(nodes[0].metadata, serde_json::json!({"NAME": "zt"}));
    assert_eq!(nodes[0].token.as_deref(), Some("tok"));
    assert_eq!(nodes[0].cluster_id.as_deref(), Some("Kubernetes"));
    assert_eq!(nodes[1].token, None);

    // A later set is pushed to both streams, alone.
    xds.set_workload(workload("uid-2", "b"));
    for c in [&mut a, &mut b] {
        let push = c.recv().await;
        assert_eq!(push.type_url, ADDRESS_TYPE);
        assert_eq!(names(&push), ["uid-2"]);
        c.answer(&push, None).await;
    }
    xds.wait_acked(ADDRESS_TYPE, T).await.unwrap();
    xds.set_authorization(Authorization {
        name: "deny".into(),
        namespace: "default".into(),
        ..Default::default()
    });
    let push = a.recv().await;
    assert_eq!(
        (push.type_url.as_str(), names(&push)),
        (AUTHORIZATION_TYPE, vec!["default/deny"])
    );

    xds.remove_address("uid-1");
    let push = a.recv().await;
    assert!(push.resources.is_empty());
    assert_eq!(push.removed_resources, ["uid-1"]);
    drop(b);
    assert!(xds.wait_for(T, |h| h.connected() == 1).await);
}

#[tokio::test]
async fn reconnect_gets_only_the_difference() {
    let xds = XdsServer::new().start(local()).unwrap();
    for (uid, name) in [("u1", "a"), ("u2", "b"), ("u3", "c")] {
        xds.set_workload(workload(uid, name));
    }
    let mut c = open(plain(xds.addr()).await, None).await.unwrap();
    c.subscribe(ADDRESS_TYPE, &[]).await;
    let first = c.recv().await;
    assert_eq!(names(&first), ["u1", "u2", "u3"]);
    let versions: HashMap<_, _> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();

    xds.close_streams();
    let end = tokio::time::timeout(T, c.rx.message()).await.unwrap();
    assert_eq!(end.unwrap_err().code(), tonic::Code::Unavailable);
    assert!(xds.wait_for(T, |h| h.connected() == 0).await);

    xds.set_workload(workload("u2", "b2"));
    xds.remove_address("u3");
    let mut c = open(plain(xds.addr()).await, None).await.unwrap();
    let initial = [
        ("u1", versions["u1"].as_str()),
        ("u2", versions["u2"].as_str()),
        ("u3", versions["u3"].as_str()),
        ("ghost", "7"),
    ];
    c.subscribe(ADDRESS_TYPE, &initial).await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["u2"]);
    assert_ne!(r.resources[0].version, versions["u2"]);
    assert_eq!(r.removed_resources, ["ghost", "u3"]);
    assert_eq!(xds.nodes().len(), 2);
}

#[tokio::test]
async fn nack_is_recorded_with_its_message() {
    let xds = XdsServer::new().start(local()).unwrap();
    let mut c = open(plain(xds.addr()).await, None).await.unwrap();
    c.subscribe(ADDRESS_TYPE, &[]).await;
    let r = c.recv().await;
    c.answer(&r, None).await;
    xds.wait_acked(ADDRESS_TYPE, T).await.unwrap();
    let value = vec![0xff, 0xff, 0xff];
    let any = prost_types::Any {
        type_url: ADDRESS_TYPE.into(),
        value,
    };
    let resource = Some(any);
    xds.push_raw(
        ADDRESS_TYPE,
        Resource {
            name: "bad".into(),
            resource,
            ..Default::default()
        },
    );
    let r = c.recv().await;
    assert_eq!(names(&r), ["bad"]);
    assert!(!r.resources[0].version.is_empty());
    c.answer(&r, Some("cannot decode bad")).await;
    assert_eq!(
        xds.wait_acked(ADDRESS_TYPE, T).await,
        Err("cannot decode bad".into())
    );
    let last = xds.acks().pop().unwrap();
    assert_eq!(
        (last.nonce, last.error),
        (r.nonce, Some("cannot decode bad".into()))
    );
}

#[tokio::test]
async fn serves_tls_and_refuses_other_tokens() {
    let (root_pem, root_key) = node_agent::ca::authority::testing::generate_root("xds root");
    let (cert, key) =
        super::serving_cert(&root_pem, &root_key, &["istiod.istio-system.svc".into()]).unwrap();
    let xds = XdsServer::new().tls(cert, key);
    let xds = xds.require_token("secret").start(local()).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&root_pem))
        .domain_name("istiod.istio-system.svc");
    let endpoint = Endpoint::from_shared(format!("https://{}", xds.addr())).unwrap();
    let channel = endpoint.tls_config(tls).unwrap().connect().await.unwrap();
    for token in [None, Some("wrong")] {
        let err = open(channel.clone(), token).await.err().expect("refused");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
    assert_eq!(xds.rejected_tokens(), [None, Some("wrong".to_string())]);
    assert_eq!(xds.connected(), 0);
    let mut c = open(channel, Some("secret")).await.unwrap();
    c.subscribe(AUTHORIZATION_TYPE, &[]).await;
    assert_eq!(c.recv().await.type_url, AUTHORIZATION_TYPE);
    assert_eq!(xds.nodes()[0].token.as_deref(), Some("secret"));
}

/// Sync code: the server on its own runtime, the client on another thread.
#[test]
fn blocking_waits_from_sync_code() {
    let xds = XdsServer::new().start(local()).unwrap();
    xds.set_workload(workload("u1", "a"));
    let addr = xds.addr();
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = open(plain(addr).await, None).await.unwrap();
            c.subscribe(ADDRESS_TYPE, &[]).await;
            let r = c.recv().await;
            c.answer(&r, None).await;
            // Stay connected until the test is done with the stream.
            let _ = tokio::time::timeout(T, c.rx.message()).await;
        });
    });
    xds.wait_acked_blocking(ADDRESS_TYPE, T).unwrap();
    assert!(xds.wait_for_blocking(T, |h| h.connected() == 1));
    xds.close_streams();
    client.join().unwrap();
    assert!(xds.wait_for_blocking(T, |h| h.connected() == 0));
}

#[tokio::test]
async fn on_demand_names_select_by_alias_and_bring_a_services_workloads() {
    let xds = XdsServer::new().start(local()).unwrap();
    let svc_key = "default/a.default.svc.cluster.local";
    let mut member = workload("uid-1", "a");
    member.services = [(svc_key.to_string(), Default::default())].into();
    xds.set_workload(member);
    let mut other = workload("uid-2", "b");
    other.addresses = vec![vec![10, 0, 0, 2]];
    xds.set_workload(other);
    xds.set_service(Service {
        namespace: "default".into(),
        hostname: "a.default.svc.cluster.local".into(),
        addresses: vec![mesh_proto::workload::NetworkAddress {
            network: "".into(),
            address: vec![10, 96, 0, 1],
            length: None,
        }],
        ..Default::default()
    });
    let mut c = open(plain(xds.addr()).await, None).await.unwrap();
    // Upstream's on-demand start: subscribe to "*" and unsubscribe it at once.
    c.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE.into(),
        resource_names_subscribe: vec!["*".into()],
        resource_names_unsubscribe: vec!["*".into()],
        ..Default::default()
    })
    .await;
    let first = c.recv().await;
    assert!(first.resources.is_empty(), "nothing until asked: {first:?}");
    let ask = |name: &str| DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE.into(),
        resource_names_subscribe: vec![name.into()],
        ..Default::default()
    };
    // A workload by its address alias.
    c.send(ask("/10.0.0.2")).await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["uid-2"]);
    assert_eq!(r.resources[0].aliases, ["/10.0.0.2"]);
    // A service by its VIP: the service and its workloads.
    c.send(ask("/10.96.0.1")).await;
    let r = c.recv().await;
    assert_eq!(names(&r), [svc_key, "uid-1"]);
    // Nothing there: answered as removed.
    c.send(ask("/10.9.9.9")).await;
    let r = c.recv().await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, ["/10.9.9.9"]);
    assert_eq!(xds.demanded(), ["/10.0.0.2", "/10.96.0.1", "/10.9.9.9"]);
    // Later changes to what was asked for are pushed; the rest is not.
    let mut moved = workload("uid-2", "b");
    moved.addresses = vec![vec![10, 0, 0, 2]];
    moved.service_account = "sa2".into();
    xds.set_workload(moved);
    xds.set_workload(workload("uid-3", "c"));
    let r = c.recv().await;
    assert_eq!(names(&r), ["uid-2"]);
    // A withheld name (an overloaded istiod) is never answered: neither the workload
    // it matches nor its absence.
    let mut held = workload("uid-4", "d");
    held.addresses = vec![vec![10, 0, 0, 4]];
    xds.set_workload(held);
    xds.withhold("/10.0.0.4");
    c.send(ask("/10.0.0.4")).await;
    let r = c.recv().await;
    assert!(
        r.resources.is_empty() && r.removed_resources.is_empty(),
        "neither the workload nor its absence, and an earlier unknown name is not \
         listed again: {r:?}"
    );
}
