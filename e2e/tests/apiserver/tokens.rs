//! TokenRequest / TokenReview, the standalone `kube-api-double` binary, and reaching the
//! double from simulated nodes and pods.

use super::*;

fn review(status: &Value) -> (bool, String) {
    (
        status["authenticated"].as_bool().unwrap_or(false),
        status["error"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_request_and_review() {
    let api = ApiServer::start().unwrap();
    api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}))
        .unwrap();
    api.create(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ztunnel", "namespace": "demo"}})).unwrap();
    let pod = api
        .create(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "zt-1", "namespace": "demo"},
            "spec": {"serviceAccountName": "ztunnel", "nodeName": "node1", "containers": []}}))
        .unwrap();
    let pod_uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    let client = kube::Client::try_from(api.kube_config()).unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "demo");
    let request = |aud: &str, secs: i64, bound: bool| -> TokenRequest {
        let mut spec = json!({"audiences": [aud], "expirationSeconds": secs});
        if bound {
            spec["boundObjectRef"] =
                json!({"kind": "Pod", "apiVersion": "v1", "name": "zt-1", "uid": pod_uid});
        }
        serde_json::from_value(json!({"spec": spec})).unwrap()
    };
    let tr: TokenRequest = sas
        .create_subresource(
            "token",
            "ztunnel",
            &PostParams::default(),
            &request("istio-ca", 3600, true),
        )
        .await
        .unwrap();
    let token = serde_json::to_value(&tr).unwrap()["status"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let err = sas
        .create_subresource::<_, TokenRequest>(
            "token",
            "ztunnel",
            &PostParams::default(),
            &request("istio-ca", 60, false),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422),
        "{err:?}"
    );
    let err = sas
        .create_subresource::<_, TokenRequest>(
            "token",
            "nobody",
            &PostParams::default(),
            &request("istio-ca", 3600, false),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err:?}"
    );

    let reviews: Api<TokenReview> = Api::all(client.clone());
    let check = |token: String, audiences: Vec<&str>| {
        let reviews = reviews.clone();
        let auds: Vec<String> = audiences.into_iter().map(str::to_string).collect();
        async move {
            let mut spec = json!({"token": token});
            if !auds.is_empty() {
                spec["audiences"] = json!(auds);
            }
            let r: TokenReview = serde_json::from_value(json!({"spec": spec})).unwrap();
            let out = reviews.create(&PostParams::default(), &r).await.unwrap();
            serde_json::to_value(&out).unwrap()["status"].clone()
        }
    };
    // good
    let st = check(token.clone(), vec!["istio-ca", "other"]).await;
    assert_eq!(review(&st), (true, String::new()), "{st}");
    assert_eq!(st["user"]["username"], "system:serviceaccount:demo:ztunnel");
    assert_eq!(st["audiences"], json!(["istio-ca"]));
    assert_eq!(
        st["user"]["extra"]["authentication.kubernetes.io/pod-name"],
        json!(["zt-1"])
    );
    assert_eq!(
        st["user"]["extra"]["authentication.kubernetes.io/pod-uid"],
        json!([pod_uid])
    );
    assert_eq!(
        st["user"]["extra"]["authentication.kubernetes.io/node-name"],
        json!(["node1"])
    );
    assert!(
        st["user"]["groups"]
            .as_array()
            .unwrap()
            .contains(&json!("system:serviceaccounts:demo"))
    );
    // wrong audience
    let (ok, err) = review(&check(token.clone(), vec!["something-else"]).await);
    assert!(!ok && err.contains("audiences"), "{err}");
    // no audience asked: the API server's own, which this token lacks
    let (ok, _) = review(&check(token.clone(), vec![]).await);
    assert!(!ok);
    let plain = api.mint_token(&TokenSpec::new(
        "demo",
        "ztunnel",
        &[],
        Duration::from_secs(60),
    ));
    assert!(
        review(&check(plain, vec![]).await).0,
        "default audience {DEFAULT_AUDIENCE}"
    );
    // expired
    let expired = api.mint_token(&TokenSpec::expired(
        "demo",
        "ztunnel",
        &["istio-ca"],
        Duration::from_secs(30),
    ));
    let (ok, err) = review(&check(expired, vec!["istio-ca"]).await);
    assert!(!ok && err.contains("expired"), "{err}");
    // signed by someone else
    let forged = TokenSigner::random().mint(&TokenSpec::new(
        "demo",
        "ztunnel",
        &["istio-ca"],
        Duration::from_secs(60),
    ));
    let (ok, err) = review(&check(forged, vec!["istio-ca"]).await);
    assert!(!ok && err.contains("signature"), "{err}");
    // garbage
    let (ok, err) = review(&check("not-a-token".into(), vec!["istio-ca"]).await);
    assert!(!ok && err.contains("JWT"), "{err}");
    // the bound pod goes away: its token stops working
    api.delete("v1", "Pod", Some("demo"), "zt-1").unwrap();
    let (ok, err) = review(&check(token.clone(), vec!["istio-ca"]).await);
    assert!(!ok && err.contains("zt-1"), "{err}");
    // the account is recreated (new UID): old tokens stop working
    let t2 = api.mint_token(&TokenSpec::new(
        "demo",
        "ztunnel",
        &["istio-ca"],
        Duration::from_secs(60),
    ));
    api.delete("v1", "ServiceAccount", Some("demo"), "ztunnel")
        .unwrap();
    api.create(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ztunnel", "namespace": "demo"}})).unwrap();
    let (ok, err) = review(&check(t2, vec!["istio-ca"]).await);
    assert!(!ok && err.contains("UID"), "{err}");
}

#[test]
fn binary_serves_writes_kubeconfig_and_mints_tokens() {
    let bin = env!("CARGO_BIN_EXE_kube-api-double");
    let out = Command::new(bin).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("TEST DOUBLE") && help.contains("not a product"),
        "{help}"
    );

    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    let key = dir.path().join("key");
    let mut cmd = Command::new(bin);
    cmd.args(["--listen", "127.0.0.1:0", "--kubeconfig-out"])
        .arg(&kc)
        .arg("--signing-key-file")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _server = e2e::netsim::Process::spawn(cmd).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(kc.exists() && key.exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the server wrote no kubeconfig"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // mint an expired token with the CLI; the server rejects it as expired
    // (so it verified the signature with the same key)
    let minted = Command::new(bin)
        .args([
            "mint-token",
            "--namespace",
            "default",
            "--service-account",
            "default",
            "--audience",
            "istio-ca",
            "--expires-in",
            "-60",
            "--signing-key-file",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_string();
    assert!(
        TokenSigner::from_hex(&std::fs::read_to_string(&key).unwrap())
            .unwrap()
            .verify(&token)
            .is_err()
    );
    if !have_kubectl() {
        return;
    }
    let out = kubectl_ok(&kc, &["get", "ns", "-o", "name"]);
    assert!(out.contains("namespace/default"), "{out}");
    let review = dir.path().join("review.json");
    std::fs::write(
        &review,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token, "audiences": ["istio-ca"]}}).to_string(),
    )
    .unwrap();
    let out = kubectl_ok(
        &kc,
        &["create", "-f", review.to_str().unwrap(), "-o", "json"],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"]["authenticated"], false);
    assert_eq!(v["status"]["error"], "token has expired");
}

#[test]
fn reachable_from_simulated_nodes_and_pods() {
    if !have_kubectl() {
        return;
    }
    if !e2e::netsim::can_create_netns() {
        eprintln!("skipped: creating network namespaces needs root");
        return;
    }
    let cluster = e2e::netsim::Cluster::new("apinode", 1).unwrap();
    let pod = cluster.node(1).add_pod("client").unwrap();
    let mut api = ApiServer::start().unwrap();
    // A second listener inside the underlay namespace, on the address every
    // node and pod can reach.
    let addr = api.add_listener(cluster.bind_host_tcp(0).unwrap()).unwrap();
    assert_eq!(addr.ip(), std::net::IpAddr::V4(cluster.host_ip()));
    let kc = cluster.scope().dir().join("kubeconfig-cluster");
    e2e::apiserver::write_kubeconfig_for(&kc, &format!("http://{addr}")).unwrap();
    api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "from-test"}}))
        .unwrap();
    for ns in [cluster.node(1).netns(), pod.netns()] {
        let out = ns
            .exec(
                "kubectl",
                [
                    "--kubeconfig",
                    kc.to_str().unwrap(),
                    "get",
                    "ns",
                    "from-test",
                    "-o",
                    "name",
                ],
                Duration::from_secs(30),
            )
            .unwrap();
        assert_eq!(out.trim(), "namespace/from-test", "from {}", ns.name());
    }
    // the loopback listener is not reachable from inside the cluster
    let out = pod
        .netns()
        .output(
            "kubectl",
            [
                "--kubeconfig",
                "/nonexistent",
                "--server",
                &api.url(),
                "--request-timeout=2s",
                "get",
                "ns",
            ],
            Duration::from_secs(30),
        )
        .unwrap();
    assert!(!out.status.success());
}
