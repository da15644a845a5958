//! The plugin-event endpoint with fake handlers: status mapping, timeout,
//! handler completion after the timeout, bad requests, socket lifecycle.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mesh_proto::cni_event::{CmdAddEvent, CmdAddReply, Enrolment, PodIp};
use node_agent::plugin_events::{CmdAddRefusal, PluginEventListener, PodEventHandler};
use tokio::sync::{Notify, oneshot};

/// Answers by pod name: `ok-*` enrolled, `fail-*` error, `slow-*` sleeps.
struct Fake {
    calls: AtomicUsize,
    finished: AtomicUsize,
    finished_notify: Notify,
    last: std::sync::Mutex<Option<CmdAddEvent>>,
}

impl Fake {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            calls: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            finished_notify: Notify::new(),
            last: std::sync::Mutex::new(None),
        })
    }
}

impl PodEventHandler for Fake {
    fn cmd_add(&self, event: CmdAddEvent) -> BoxFuture<'_, Result<CmdAddReply, CmdAddRefusal>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            *self.last.lock().unwrap() = Some(event.clone());
            let r = if event.pod_name.starts_with("fail-") {
                Err(CmdAddRefusal::EnrolmentFailed(format!(
                    "partial add error: no ztunnel connection for pod {}",
                    event.pod_name
                )))
            } else if event.pod_name.starts_with("undecided-") {
                Err(CmdAddRefusal::Undecided(format!(
                    "node agent is still starting; pod {}",
                    event.pod_name
                )))
            } else {
                if event.pod_name.starts_with("slow-") {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                Ok(CmdAddReply {
                    enrolment: Enrolment::Enrolled,
                    reason: "namespace label istio.io/dataplane-mode=ambient".into(),
                })
            };
            self.finished.fetch_add(1, Ordering::SeqCst);
            self.finished_notify.notify_waiters();
            r
        })
    }
}

fn event(name: &str) -> CmdAddEvent {
    CmdAddEvent {
        netns: "/var/run/netns/cni-1234".into(),
        pod_name: name.into(),
        pod_namespace: "demo".into(),
        pod_uid: Some("uid-1".into()),
        ips: vec![PodIp {
            interface: Some(2),
            address: "10.244.1.7/24".into(),
            gateway: Some("10.244.1.1".into()),
        }],
    }
}

async fn request(socket: &Path, method: &str, path: &str, body: Vec<u8>) -> (u16, String) {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "x")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

struct Server {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

fn start(handler: Arc<dyn PodEventHandler>, timeout: Duration) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let listener = PluginEventListener::bind(&run_dir).unwrap();
    let socket = listener.path().to_path_buf();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(listener.serve(handler, timeout, async {
        let _ = rx.await;
    }));
    Server {
        _dir: dir,
        socket,
        stop: Some(stop),
        task,
    }
}

#[tokio::test]
async fn maps_handler_results_to_statuses() {
    let fake = Fake::new();
    let srv = start(fake.clone(), Duration::from_secs(5));
    assert!(srv.socket.ends_with("run/pluginevent.sock"));

    let (status, body) = request(
        &srv.socket,
        "POST",
        "/cmdadd",
        serde_json::to_vec(&event("ok-1")).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let reply: CmdAddReply = serde_json::from_str(&body).unwrap();
    assert_eq!(reply.enrolment, Enrolment::Enrolled);
    assert_eq!(
        fake.last.lock().unwrap().as_ref().unwrap(),
        &event("ok-1"),
        "event arrives intact"
    );

    let (status, body) = request(
        &srv.socket,
        "POST",
        "/cmdadd",
        serde_json::to_vec(&event("fail-1")).unwrap(),
    )
    .await;
    assert_eq!(status, 500, "enrolment failed: the plugin fails ADD");
    assert!(
        body.contains("no ztunnel connection for pod fail-1"),
        "{body}"
    );

    let (status, body) = request(
        &srv.socket,
        "POST",
        "/cmdadd",
        serde_json::to_vec(&event("undecided-1")).unwrap(),
    )
    .await;
    assert_eq!(status, 503, "undecided: the plugin asks the API itself");
    assert!(body.contains("still starting; pod undecided-1"), "{body}");

    // Upstream's plugin omits PodUID: accepted.
    let upstream = br#"{"Netns":"/n","PodName":"ok-2","PodNamespace":"demo","IPs":[]}"#.to_vec();
    assert_eq!(
        request(&srv.socket, "POST", "/cmdadd", upstream).await.0,
        200
    );

    let (status, body) = request(&srv.socket, "POST", "/cmdadd", b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    assert!(body.contains("invalid pod event"));
    assert_eq!(request(&srv.socket, "GET", "/cmdadd", vec![]).await.0, 405);
    assert_eq!(request(&srv.socket, "POST", "/other", vec![]).await.0, 404);
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        4,
        "bad requests never reach the handler"
    );

    let Server {
        socket, stop, task, ..
    } = srv;
    stop.unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(!socket.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn timeout_answers_503_and_handler_still_completes() {
    let fake = Fake::new();
    let srv = start(fake.clone(), Duration::from_millis(100));
    let finished = fake.finished_notify.notified();
    let (status, body) = request(
        &srv.socket,
        "POST",
        "/cmdadd",
        serde_json::to_vec(&event("slow-1")).unwrap(),
    )
    .await;
    assert_eq!(status, 503);
    assert!(body.contains("demo/slow-1"), "{body}");
    assert_eq!(fake.finished.load(Ordering::SeqCst), 0);
    tokio::time::timeout(Duration::from_secs(5), finished)
        .await
        .expect("handler runs to completion after the timeout");
    assert_eq!(fake.finished.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_events_and_stale_socket_replaced() {
    let fake = Fake::new();
    let dir = tempfile::tempdir().unwrap();
    // A socket file left by a previous agent.
    let stale =
        std::os::unix::net::UnixListener::bind(dir.path().join("pluginevent.sock")).unwrap();
    drop(stale);
    let listener = PluginEventListener::bind(dir.path()).unwrap();
    let socket = listener.path().to_path_buf();
    let (_stop, rx) = oneshot::channel::<()>();
    tokio::spawn(listener.serve(fake.clone(), Duration::from_secs(5), async {
        let _ = rx.await;
    }));
    let mut all = Vec::new();
    for i in 0..8 {
        let socket = socket.clone();
        all.push(tokio::spawn(async move {
            request(
                &socket,
                "POST",
                "/cmdadd",
                serde_json::to_vec(&event(&format!("slow-{i}"))).unwrap(),
            )
            .await
            .0
        }));
    }
    for h in all {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(fake.calls.load(Ordering::SeqCst), 8);
}
