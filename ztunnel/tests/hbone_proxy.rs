//! Two in-process proxies with different identities on loopback, talking HBONE: data
//! through the tunnel (direct, through a service VIP, on a named network, many streams and
//! a large transfer) and plaintext passthrough. Refused and malformed input is in
//! `hbone_refusals.rs`, what happens to open connections over time in `hbone_lifecycle.rs`.
//! Each test uses its own 127.77.x.0/24 addresses (x = 1, 2, 3, 10 here).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sa(ip: std::net::IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

// One runtime thread: the pool keeps connections per worker thread, so
// "both streams share one connection" only holds when they run on one.
#[tokio::test(flavor = "current_thread")]
async fn two_proxies_exchange_data_over_hbone() {
    let mesh = Mesh::new("127.77.1", |_| {});
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, sa_sockets) = mesh.proxy("a").await;
    let (_pb, _) = mesh.proxy("b").await;

    let data = Arc::new(b"hello through the tunnel".repeat(1000));
    let c = sa_sockets
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    let back = echo_roundtrip(c, data.clone()).await.unwrap();
    assert_eq!(back, *data);

    // Through the service VIP too (port 80 -> targetPort 8080).
    let c = sa_sockets
        .redirected_connect(
            mesh.a_ip,
            pa.addresses().outbound,
            "127.77.1.100:80".parse().unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(echo_roundtrip(c, data.clone()).await.unwrap(), *data);

    // Both access logs name the other side's SPIFFE identity.
    wait_for("access logs", || {
        log_lines(&["connection complete", "direction=\"inbound\"", "127.77.1.1"]).len() >= 2
            && log_lines(&[
                "connection complete",
                "direction=\"outbound\"",
                "127.77.1.2:15008",
            ])
            .len()
                >= 2
    })
    .await;
    let inbound = log_lines(&["connection complete", "direction=\"inbound\"", "127.77.1.1"]);
    assert!(
        inbound[0].contains("src.identity=spiffe://cluster.local/ns/ns-a/sa/sa-a"),
        "{inbound:?}"
    );
    let outbound = log_lines(&[
        "connection complete",
        "direction=\"outbound\"",
        "127.77.1.2:15008",
    ]);
    assert!(
        outbound[0].contains("dst.identity=spiffe://cluster.local/ns/ns-b/sa/sa-b"),
        "{outbound:?}"
    );
    assert!(
        outbound[0].contains("dst.hbone_addr=127.77.1.2:8080"),
        "{outbound:?}"
    );
    assert!(
        outbound
            .iter()
            .any(|l| l.contains("dst.service=\"b.ns-b.svc.cluster.local\""))
    );
    assert!(
        outbound[0].contains(&format!("bytes_sent={}", data.len())),
        "{outbound:?}"
    );

    // Metrics from both reporters.
    let src_principal = "source_principal=\"spiffe://cluster.local/ns/ns-a/sa/sa-a\"";
    assert!(
        mesh.metric(
            "istio_tcp_connections_opened_total",
            &["reporter=\"destination\"", src_principal]
        ) >= 2
    );
    assert!(
        mesh.metric(
            "istio_tcp_received_bytes_total",
            &["reporter=\"source\"", src_principal]
        ) >= 2 * data.len() as u64
    );
    // One pooled HTTP/2 connection (per worker thread) carried both streams.
    let pooled = pa.pool_connections();
    assert_eq!(pooled.len(), 1, "{pooled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_to_non_mesh_destination() {
    let mesh = Mesh::new("127.77.2", |_| {});
    let _echo = echo_server(sa(mesh.plain_ip, 9000)).await;
    let (pa, socks) = mesh.proxy("a").await;
    let c = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.plain_ip, 9000))
        .await
        .unwrap();
    let data = Arc::new(vec![7u8; 100_000]);
    assert_eq!(echo_roundtrip(c, data.clone()).await.unwrap(), *data);
    assert!(pa.pool_connections().is_empty(), "plaintext, no HBONE");
}

/// Workloads on a named network (`network: net1`): the inbound side looks the target (and
/// the source) up on the served workload's network, not the default one, so HBONE and
/// inbound plaintext both reach the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_on_a_named_network_talk_over_hbone() {
    let mesh = Mesh::new("127.77.10", |_| {});
    for uid in ["a", "b", "plain"] {
        let mut w = (**mesh.store.snapshot().workload_by_uid(uid).unwrap()).clone();
        w.network = "net1".into();
        mesh.store.source("file").upsert_workload(w);
    }
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, socks_a) = mesh.proxy("a").await;
    let (pb, socks_b) = mesh.proxy("b").await;
    let data = Arc::new(b"on net1".repeat(100));
    let c = socks_a
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    assert_eq!(echo_roundtrip(c, data.clone()).await.unwrap(), *data);
    let c = socks_b
        .redirected_connect(
            mesh.plain_ip,
            pb.addresses().inbound_plain,
            sa(mesh.b_ip, 8080),
        )
        .await
        .unwrap();
    assert_eq!(echo_roundtrip(c, data.clone()).await.unwrap(), *data);
    // The inbound side knew both ends.
    wait_for("inbound access logs", || {
        log_lines(&[
            "connection complete",
            "direction=\"inbound\"",
            "src.addr=127.77.10.",
            "dst.workload=\"b\"",
        ])
        .len()
            >= 2
    })
    .await;
    let hbone = log_lines(&[
        "connection complete",
        "direction=\"inbound\"",
        "src.addr=127.77.10.1:",
    ]);
    assert!(hbone[0].contains("src.workload=\"a\""), "{hbone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_connections_and_large_transfer_keep_data_intact() {
    let mesh = Mesh::new("127.77.3", |_| {});
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, socks) = mesh.proxy("a").await;
    let (pb, _) = mesh.proxy("b").await;

    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let socks = socks.clone();
        let listener = pa.addresses().outbound;
        let (a_ip, b_ip) = (mesh.a_ip, mesh.b_ip);
        tasks.push(tokio::spawn(async move {
            let data: Vec<u8> = (0..20_000u32)
                .map(|x| (x.wrapping_mul(31) ^ i) as u8)
                .collect();
            let data = Arc::new(data);
            let c = socks
                .redirected_connect(a_ip, listener, sa(b_ip, 8080))
                .await
                .unwrap();
            let back = echo_roundtrip(c, data.clone()).await.unwrap();
            assert_eq!(sha256(&back), sha256(&data), "connection {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // 200 streams over pooled connections of at most 100 streams each.
    let pool = pa.pool_connections();
    assert!((2..=10).contains(&pool.len()), "{pool:?}");

    // A large transfer one way, checksummed on the far side.
    const SIZE: usize = 256 * 1024 * 1024;
    let sink = tokio::net::TcpListener::bind(sa(mesh.b_ip, 8081))
        .await
        .unwrap();
    let receiver = tokio::spawn(async move {
        let (mut s, _) = sink.accept().await.unwrap();
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
            total += n;
        }
        (total, ctx.finish().as_ref().to_vec())
    });
    let mut c = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8081))
        .await
        .unwrap();
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut block = vec![0u8; 1 << 20];
    for i in 0..(SIZE >> 20) {
        for (j, b) in block.iter_mut().enumerate().step_by(4096) {
            *b = (i + j) as u8;
        }
        ctx.update(&block);
        c.write_all(&block).await.unwrap();
    }
    c.shutdown().await.unwrap();
    let (total, digest) = receiver.await.unwrap();
    assert_eq!(total, SIZE);
    assert_eq!(digest, ctx.finish().as_ref().to_vec());
    drop(c);
    wait_for("connections to finish", || {
        pa.active_connections() == 0 && pb.active_connections() <= pool.len()
    })
    .await;
}
