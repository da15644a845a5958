//! Service `subjectAltNames` through the real outbound proxy (in process, loopback, the
//! `common` harness, addresses 127.81.1.0/24): the endpoint's HBONE server is a stand-in
//! that proves an identity other than the endpoint workload's. Addressed through a service
//! listing that identity in `subjectAltNames`, the connection is accepted; addressed
//! through a service without it, or to the pod directly, the client refuses the peer.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::Response;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ztunnel::config::H2Config;
use ztunnel::hbone::server::{serve, tls_accept};
use ztunnel::identity::SecretManager;
use ztunnel::state::Service;

/// An HBONE server at `addr` proving `identity`, answering every CONNECT with 200 and
/// echoing the stream; records the authorities it was asked for.
async fn alt_identity_server(
    mesh: &Mesh,
    addr: SocketAddr,
    identity: ztunnel::identity::Identity,
) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = TcpListener::bind(addr).await.unwrap();
    let certs = SecretManager::new(mesh.ca.clone(), std::time::Duration::from_secs(3600));
    let roots = roots(&mesh.ca);
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let cert = certs.fetch_certificate(&identity).await.unwrap();
            let cfg = ztunnel::tls::server_config(&cert, &roots, "cluster.local");
            let seen = s.clone();
            tokio::spawn(async move {
                let Ok(tls) = tls_accept(tcp, cfg, std::time::Duration::from_secs(2)).await else {
                    return;
                };
                let tracker = TaskTracker::new();
                let _ = serve(
                    tls,
                    &H2Config::default(),
                    CancellationToken::new(),
                    &tracker,
                    move |req, mut respond| {
                        seen.lock()
                            .unwrap()
                            .push(req.uri().authority().unwrap().to_string());
                        async move {
                            let Ok(mut send) = respond.send_response(
                                Response::builder().status(200).body(()).unwrap(),
                                false,
                            ) else {
                                return;
                            };
                            let mut body = req.into_body();
                            while let Some(Ok(chunk)) = body.data().await {
                                let n = chunk.len();
                                // Small chunks: wait until the whole chunk fits.
                                send.reserve_capacity(n);
                                while send.capacity() < n {
                                    let next =
                                        std::future::poll_fn(|cx| send.poll_capacity(cx)).await;
                                    if !matches!(next, Some(Ok(_))) {
                                        return;
                                    }
                                }
                                let _ = send.send_data(chunk, false);
                                let _ = body.flow_control().release_capacity(n);
                            }
                            let _ = send.send_data(Bytes::new(), true);
                        }
                    },
                )
                .await;
            });
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_alt_names_widen_the_accepted_identities() {
    let mesh = Mesh::new("127.81.1", |_| {});
    let alt = mesh.identity("sa-alt", "ns-b");
    // b's ztunnel is replaced by a server proving sa-alt instead of sa-b.
    let seen = alt_identity_server(&mesh, SocketAddr::new(mesh.b_ip, 15008), alt.clone()).await;
    // A second service on b whose subjectAltNames admit sa-alt.
    let src = mesh.store.source("file");
    let svc: Service = serde_yaml_ng::from_str(
        "name: b-alt\nnamespace: ns-b\nhostname: b-alt.ns-b.svc.cluster.local\n\
         vips: [\"/127.81.1.101\"]\nports: {80: 8080}\n\
         subjectAltNames: [\"spiffe://cluster.local/ns/ns-b/sa/sa-alt\"]\n",
    )
    .unwrap();
    src.upsert_service(svc);
    let mut b = (**mesh.store.snapshot().workload_by_uid("b").unwrap()).clone();
    b.services.insert(
        "ns-b/b-alt.ns-b.svc.cluster.local".into(),
        [(80, 8080)].into(),
    );
    src.upsert_workload(b);
    let (pa, socks) = mesh.proxy("a").await;
    let data = Arc::new(b"san check".repeat(100));
    let via = |dst: &str| {
        let socks = socks.clone();
        let data = data.clone();
        let dst: SocketAddr = dst.parse().unwrap();
        let listener = pa.addresses().outbound;
        let a_ip = mesh.a_ip;
        async move {
            let c = socks.redirected_connect(a_ip, listener, dst).await.unwrap();
            matches!(echo_roundtrip(c, data.clone()).await, Ok(back) if back == *data)
        }
    };

    // The SAN service: sa-alt accepted, authority = podIP:targetPort.
    assert!(via("127.81.1.101:80").await);
    assert_eq!(*seen.lock().unwrap(), ["127.81.1.2:8080"]);
    // The plain service and the pod itself expect sa-b only: the handshake is refused.
    assert!(!via("127.81.1.100:80").await);
    assert!(!via("127.81.1.2:8080").await);
    assert_eq!(seen.lock().unwrap().len(), 1);
    wait_for("the refusal access-logged with both identities", || {
        log_lines(&[
            "connection complete",
            "dst.addr=127.81.1.2:15008",
            "spiffe://cluster.local/ns/ns-b/sa/sa-alt",
            "not one of the expected",
        ])
        .len()
            >= 2
    })
    .await;
    // Counted as failed with upstream's TLS_FAILURE flag (not a generic CONNECT).
    let text = mesh.metrics_text();
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_failed_total{")
                && l.contains("reporter=\"source\"")
                && l.contains("destination_workload=\"b\"")
        })
        .collect();
    // One line per destination service (the plain service, the pod).
    assert!(
        failed.len() == 2
            && failed
                .iter()
                .all(|l| l.contains("response_flags=\"TLS_FAILURE\"") && l.ends_with(" 1")),
        "{text}"
    );
}
