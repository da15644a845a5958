//! Tests of the CA: CSR checks, validity clamping, chains, loading the bundle, serving certificate.

use super::testing::*;
use super::*;

const ID: &str = "spiffe://cluster.local/ns/ns1/sa/sa1";

fn csr(sans: Vec<SanType>, key: &KeyPair) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.to_string().try_into().unwrap())
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn authority() -> Authority {
    let (cert, key) = generate_root("test root");
    Authority::from_pem(&cert, &key, Some(&cert), Some(&cert)).unwrap()
}

fn leaf_info(pem_text: &str) -> (Vec<String>, bool, Duration) {
    let der = CertificateDer::from_pem_slice(pem_text.as_bytes()).unwrap();
    let (_, x) = X509Certificate::from_der(der.as_ref()).unwrap();
    let mut sans = Vec::new();
    for ext in x.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for n in &san.general_names {
                sans.push(format!("{n:?}"));
            }
        }
    }
    let life = Duration::from_secs(
        (x.validity().not_after.timestamp() - x.validity().not_before.timestamp()) as u64,
    );
    (sans, x.is_ca(), life)
}

#[test]
fn signs_a_p256_csr_with_exactly_the_identity() {
    let a = authority();
    let key = p256();
    let chain = a
        .sign_workload_csr(&csr(vec![uri(ID)], &key), ID, Duration::from_secs(3600))
        .unwrap();
    assert_eq!(
        chain.len(),
        2,
        "leaf + root (chain file == root, deduplicated)"
    );
    assert_eq!(chain[1], a.root_pem());
    let (sans, is_ca, life) = leaf_info(&chain[0]);
    assert_eq!(sans, vec![format!("URI({ID:?})")]);
    assert!(!is_ca);
    assert_eq!(life, Duration::from_secs(3600 + 60));
}

#[test]
fn ca_cert_not_issued_by_root_cert_is_refused() {
    // A Secret updated with a signing certificate from root B while root-cert.pem
    // (what every ztunnel trusts) is still root A.
    let (root_a, _) = generate_root("A");
    let (ca_b, key_b) = generate_root("B");
    let Err((file, why)) = Authority::from_pem(&ca_b, &key_b, Some(&root_a), Some(&ca_b)) else {
        panic!("a signing certificate from another root was loaded");
    };
    assert_eq!(file, ROOT_CERT_FILE);
    assert!(why.contains("does not chain to this root"), "{why}");
    assert!(why.contains("CN=B") && why.contains("CN=A"), "{why}");
}

#[test]
fn an_expired_ca_issues_nothing() {
    let mut a = authority();
    a.ca_not_after = SystemTime::now() - Duration::from_secs(1);
    let e = a
        .sign_workload_csr(&csr(vec![uri(ID)], &p256()), ID, Duration::from_secs(3600))
        .unwrap_err();
    assert!(e.to_string().contains("expired at"), "{e}");
    let Err(e) = a.issue_serving_cert(&["mesh-ca".into()]) else {
        panic!("serving certificate issued by an expired CA");
    };
    assert!(e.to_string().contains("ca-cert.pem"), "{e}");
}

#[test]
fn csr_problems_are_refused_with_the_reason() {
    let key = p256();
    let other = "spiffe://cluster.local/ns/ns1/sa/admin";
    for (csr_pem, want) in [
        (csr(vec![uri(other)], &key), "must be exactly"),
        (csr(vec![uri(ID), uri(other)], &key), "must be exactly"),
        (
            csr(
                vec![uri(ID), SanType::DnsName("x.example".try_into().unwrap())],
                &key,
            ),
            "DNS:x.example",
        ),
        (csr(vec![], &key), "SANs []"),
        ("not a csr".to_string(), "not PEM"),
        (
            pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2, 3])),
            "not CERTIFICATE REQUEST",
        ),
        (
            pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", vec![1, 2, 3])),
            "cannot parse",
        ),
    ] {
        let Err(e) = check_csr(&csr_pem, ID) else {
            panic!("accepted: {want}");
        };
        assert!(e.to_string().contains(want), "{want}: {e}");
        assert!(e.to_string().contains(ID), "{e}");
    }
}

#[test]
fn tampered_csr_signature_is_refused() {
    let key = p256();
    let good = csr(vec![uri(ID)], &key);
    let mut der = pem::parse(&good).unwrap().into_contents();
    let n = der.len();
    der[n - 5] ^= 0x55; // inside the signature
    let bad = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    let e = check_csr(&bad, ID).unwrap_err();
    assert!(
        e.reason.contains("signature") || e.reason.contains("parse"),
        "{e}"
    );
}

#[test]
fn p384_csr_is_refused() {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let e = check_csr(&csr(vec![uri(ID)], &key), ID).unwrap_err();
    assert!(e.reason.contains("P-256"), "{e}");
}

#[test]
fn ca_request_in_csr_never_yields_a_ca() {
    let a = authority();
    let key = p256();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri(ID)];
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let pem_csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let chain = a
        .sign_workload_csr(&pem_csr, ID, Duration::from_secs(60))
        .unwrap();
    assert!(!leaf_info(&chain[0]).1);
}

#[test]
fn validity_is_clamped_to_the_ca_expiry() {
    let a = authority();
    let key = p256();
    let chain = a
        .sign_workload_csr(
            &csr(vec![uri(ID)], &key),
            ID,
            Duration::from_secs(10 * 365 * 24 * 3600),
        )
        .unwrap();
    let (_, _, life) = leaf_info(&chain[0]);
    assert!(life < Duration::from_secs(366 * 24 * 3600), "{life:?}");
}

#[test]
fn intermediate_layout_sends_the_full_chain() {
    let (root_cert, root_key) = generate_root("root");
    let root_kp = KeyPair::from_pem(&root_key).unwrap();
    let root_issuer = Issuer::from_ca_cert_pem(&root_cert, root_kp).unwrap();
    let int_key = p256();
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "intermediate");
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let int_cert = p.signed_by(&int_key, &root_issuer).unwrap().pem();
    let chain_file = format!("{int_cert}{root_cert}");
    let a = Authority::from_pem(
        &int_cert,
        &int_key.serialize_pem(),
        Some(&root_cert),
        Some(&chain_file),
    )
    .unwrap();
    let key = p256();
    let chain = a
        .sign_workload_csr(&csr(vec![uri(ID)], &key), ID, Duration::from_secs(60))
        .unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[1].trim(), int_cert.trim());
    assert_eq!(chain[2], a.root_pem());
    // Without root-cert.pem an intermediate cannot be used.
    let e = Authority::from_pem(&int_cert, &int_key.serialize_pem(), None, None).unwrap_err();
    assert_eq!(e.0, ROOT_CERT_FILE);
}

#[test]
fn load_errors_name_dir_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = Authority::load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains(CA_CERT_FILE) && e.contains(&dir.path().display().to_string()),
        "{e}"
    );
    let (cert, key) = generate_root("a");
    let (_, other_key) = generate_root("b");
    write_root_dir(dir.path(), &cert, &other_key);
    let e = Authority::load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains(CA_KEY_FILE) && e.contains("does not match"),
        "{e}"
    );
    write_root_dir(dir.path(), &cert, &key);
    let a = Authority::load(dir.path()).unwrap();
    assert!(!a.source().is_empty());
    // A leaf is not a CA.
    let leaf = a
        .sign_workload_csr(&csr(vec![uri(ID)], &p256()), ID, Duration::from_secs(60))
        .unwrap();
    let e = Authority::from_pem(&leaf[0], &key, None, None).unwrap_err();
    assert!(e.1.contains("not a CA"), "{e:?}");
}

#[test]
fn sec1_ec_key_from_the_chart_is_accepted() {
    // The chart's genPrivateKey "ecdsa" writes SEC1 (`EC PRIVATE KEY`).
    let (cert, key_pkcs8) = generate_root("sec1");
    let der = pem::parse(&key_pkcs8).unwrap().into_contents();
    let sec1 = pkcs8_p256_to_sec1(&der);
    let sec1_pem = pem::encode(&pem::Pem::new("EC PRIVATE KEY", sec1));
    Authority::from_pem(&cert, &sec1_pem, None, None).unwrap();
}

/// Extracts the inner ECPrivateKey (SEC1) from a PKCS#8 P-256 key: the OCTET STRING
/// that holds it is the last element of the PrivateKeyInfo SEQUENCE.
fn pkcs8_p256_to_sec1(der: &[u8]) -> Vec<u8> {
    // Find the 0x04 (OCTET STRING) whose content starts with SEQUENCE + version 1.
    for i in 0..der.len().saturating_sub(4) {
        if der[i] == 0x04 && der[i + 2] == 0x30 {
            let len = der[i + 1] as usize;
            if i + 2 + len <= der.len() && der[i + 4] == 0x02 {
                return der[i + 2..i + 2 + len].to_vec();
            }
        }
    }
    panic!("no SEC1 key inside PKCS#8");
}

#[test]
fn serving_cert_has_dns_and_ip_sans() {
    let a = authority();
    let s = a
        .issue_serving_cert(&["mesh-ca.istio-system.svc".into(), "127.0.0.1".into()])
        .unwrap();
    assert_eq!(s.key.cert.len(), 2);
    let (sans, is_ca, _) = leaf_info(&pem_cert(&s.key.cert[0]));
    assert!(!is_ca);
    assert!(sans[0].contains("mesh-ca.istio-system.svc"), "{sans:?}");
    assert!(sans[1].contains("[127, 0, 0, 1]"), "{sans:?}");
    assert!(s.refresh_at() > SystemTime::now());
}
