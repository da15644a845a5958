//! A raw HBONE client for tests that talk to a ztunnel's 15008 directly (as a misbehaving
//! or bypassing peer would), with a certificate of any identity from the test CA.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use e2e::netsim::NamedNetns;
use http::{Method, Request, StatusCode};
use tokio::net::TcpSocket;
use ztunnel::hbone::tls_connect;
use ztunnel::identity::local_ca::LocalCa;
use ztunnel::identity::{Identity, SecretManager};
use ztunnel::tls::TrustRoots;

/// ztunnel's `PACKET_MARK` (the capture rules skip sockets carrying it).
const PACKET_MARK: u32 = 1337;

/// From inside `netns` (bypassing its capture rules), as `identity`: TLS to `hbone` (expecting `peer`), one CONNECT for
/// `authority`; the response status.
pub fn connect_status(
    netns: &NamedNetns,
    ca: Arc<LocalCa>,
    identity: Identity,
    hbone: SocketAddr,
    peer: Identity,
    authority: &str,
) -> StatusCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sock = netns
        .run(TcpSocket::new_v4)
        .expect("enter netns")
        .expect("socket");
    // Marked like ztunnel's own sockets, so a pod's capture rules let it through.
    socket2::SockRef::from(&sock)
        .set_mark(PACKET_MARK)
        .expect("SO_MARK");
    let authority = authority.to_string();
    rt.block_on(async move {
        let roots = TrustRoots::from_der([ca.root_certificate().clone()], "test root").unwrap();
        let certs = SecretManager::new(ca, Duration::from_secs(3600));
        let cert = certs
            .fetch_certificate(&identity)
            .await
            .expect("certificate");
        let tcp = sock.connect(hbone).await.expect("connect to 15008");
        let cfg = ztunnel::tls::client_config(&cert, &roots, vec![peer]);
        let tls = tls_connect(tcp, cfg, hbone).await.expect("TLS to 15008");
        let (send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
        tokio::spawn(conn);
        let mut send = send.ready().await.expect("h2 ready");
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .body(())
            .unwrap();
        let (resp, _body) = send.send_request(req, false).expect("send CONNECT");
        resp.await.expect("CONNECT response").status()
    })
}
