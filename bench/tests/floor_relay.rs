//! `bench-floor-relay` carries TCP between two pods behind the in-pod capture rules, as the
//! bench uses it (root; real netns). Without the relays the captured connection has
//! nowhere to go, so data arriving intact proves both hops relayed it.

use std::time::Duration;

use e2e::dedicated_mesh::{EchoServer, apply_capture_rules, connect_in, echo_checked, wait_until};
use e2e::netsim::{Cluster, Process, can_create_netns};

#[test]
fn two_relays_carry_captured_tcp_between_pods() {
    if !can_create_netns() {
        eprintln!("skipped: needs root to create network namespaces");
        return;
    }
    let cluster = Cluster::new("floor", 1).expect("simulated node");
    let node = cluster.node(1);
    let a = node.add_pod("a").expect("pod a");
    let b = node.add_pod("b").expect("pod b");
    let mut relays = Vec::new();
    for pod in [&a, &b] {
        apply_capture_rules(pod).expect("capture rules");
        let cmd = pod.netns().command(env!("CARGO_BIN_EXE_bench-floor-relay"));
        relays.push(Process::spawn(cmd).expect("start bench-floor-relay"));
    }
    let _echo = EchoServer::start(b.netns(), 8080, None);
    let dst = std::net::SocketAddr::from((b.ip(), 8080));
    // The relays bind their ports right after start: wait for the captured connect to be
    // taken, then send once.
    wait_until("relay A listening", Duration::from_secs(10), || {
        connect_in(a.netns(), dst).is_ok()
    });
    echo_checked(connect_in(a.netns(), dst).expect("connect"), 1 << 20)
        .expect("1 MiB through both relays");
    for mut r in relays {
        r.terminate(Duration::from_secs(2));
    }
}
