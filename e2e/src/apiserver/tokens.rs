//! Service-account tokens: JWT-shaped, HMAC-SHA256 signed by the double
//! (TokenRequest mints them, TokenReview checks them). Not the real
//! server's RS256/ES256 tokens: only the double can verify them, which is
//! all TokenReview clients need.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};

/// The issuer, and the default audience of tokens and reviews (as the real
/// API server's `--api-audiences` default).
pub const DEFAULT_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Extra keys of a TokenReview's `user.extra`.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
pub const EXTRA_CREDENTIAL_ID: &str = "authentication.kubernetes.io/credential-id";

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    pub namespace: String,
    pub service_account: String,
    /// UID of the service account; when set, TokenReview checks that the
    /// account still has it (a deleted and recreated account fails).
    pub service_account_uid: Option<String>,
    /// Empty = [`DEFAULT_AUDIENCE`].
    pub audiences: Vec<String>,
    /// Expiry; may be in the past (to test expired tokens).
    pub expires: SystemTime,
    /// The pod the token is bound to (name, uid).
    pub pod: Option<(String, String)>,
    /// The bound pod's node (name).
    pub node: Option<String>,
}

impl TokenSpec {
    /// A token for `namespace/service_account` valid for `lifetime` from now
    /// for `audiences`.
    pub fn new(
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
        lifetime: Duration,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            service_account_uid: None,
            audiences: audiences.iter().map(|s| s.to_string()).collect(),
            expires: SystemTime::now() + lifetime,
            pod: None,
            node: None,
        }
    }

    /// An already expired token (expired `ago`).
    pub fn expired(
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
        ago: Duration,
    ) -> Self {
        let mut s = Self::new(namespace, service_account, audiences, Duration::ZERO);
        s.expires = SystemTime::now() - ago;
        s
    }

    pub fn bound_to_pod(mut self, name: &str, uid: &str) -> Self {
        self.pod = Some((name.into(), uid.into()));
        self
    }

    /// `system:serviceaccount:<ns>:<sa>`.
    pub fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

/// Why a token is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not a JWT (expected three base64url parts)")]
    Malformed,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token claims are invalid: {0}")]
    BadClaims(String),
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
}

/// Signs and verifies tokens with one HMAC key.
#[derive(Clone)]
pub struct TokenSigner {
    key: hmac::Key,
    key_bytes: Vec<u8>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(..)")
    }
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

impl TokenSigner {
    /// A signer with a fresh random key.
    pub fn random() -> Self {
        let k: [u8; 32] = rand::random();
        Self::from_key(&k)
    }

    pub fn from_key(key: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            key_bytes: key.to_vec(),
        }
    }

    /// The key as hex (what a signing-key file holds).
    pub fn key_hex(&self) -> String {
        self.key_bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses a hex key (whitespace around it ignored).
    pub fn from_hex(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.len() < 32 || !s.len().is_multiple_of(2) {
            return Err(format!(
                "signing key must be at least 16 bytes of hex, got {} characters",
                s.len()
            ));
        }
        let bytes: Result<Vec<u8>, _> = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16))
            .collect();
        bytes
            .map(|b| Self::from_key(&b))
            .map_err(|e| format!("signing key is not hex: {e}"))
    }

    /// Mints a token.
    pub fn mint(&self, spec: &TokenSpec) -> String {
        let now = unix(SystemTime::now());
        let aud = if spec.audiences.is_empty() {
            vec![DEFAULT_AUDIENCE.to_string()]
        } else {
            spec.audiences.clone()
        };
        let mut k8s = json!({
            "namespace": spec.namespace,
            "serviceaccount": {"name": spec.service_account},
        });
        if let Some(uid) = &spec.service_account_uid {
            k8s["serviceaccount"]["uid"] = json!(uid);
        }
        if let Some((name, uid)) = &spec.pod {
            k8s["pod"] = json!({"name": name, "uid": uid});
        }
        if let Some(node) = &spec.node {
            k8s["node"] = json!({"name": node});
        }
        let claims = json!({
            "iss": DEFAULT_AUDIENCE,
            "sub": spec.username(),
            "aud": aud,
            "exp": unix(spec.expires),
            "iat": now,
            "nbf": now,
            "jti": super::store::new_uid(),
            "kubernetes.io": k8s,
        });
        let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = B64.encode(claims.to_string());
        let signing_input = format!("{header}.{payload}");
        let sig = hmac::sign(&self.key, signing_input.as_bytes());
        format!("{signing_input}.{}", B64.encode(sig.as_ref()))
    }

    /// Checks signature and validity period; returns the claims.
    pub fn verify(&self, token: &str) -> Result<Value, TokenError> {
        let mut parts = token.trim().split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let sig = B64.decode(s).map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.key, format!("{h}.{p}").as_bytes(), &sig)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: Value = B64
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| TokenError::BadClaims("payload is not JSON".into()))?;
        let now = unix(SystemTime::now());
        let exp = claims["exp"]
            .as_i64()
            .ok_or_else(|| TokenError::BadClaims("no exp".into()))?;
        if exp <= now {
            return Err(TokenError::Expired);
        }
        if claims["nbf"].as_i64().is_some_and(|nbf| nbf > now + 60) {
            return Err(TokenError::NotYetValid);
        }
        Ok(claims)
    }
}

/// The token's audiences (`aud` may be a string or a list).
pub fn audiences(claims: &Value) -> Vec<String> {
    match &claims["aud"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_and_tampering_fails() {
        let s = TokenSigner::random();
        let spec = TokenSpec::new("demo", "sleep", &["istio-ca"], Duration::from_secs(600))
            .bound_to_pod("p", "u1");
        let t = s.mint(&spec);
        let c = s.verify(&t).unwrap();
        assert_eq!(c["sub"], "system:serviceaccount:demo:sleep");
        assert_eq!(audiences(&c), vec!["istio-ca"]);
        assert_eq!(c["kubernetes.io"]["pod"]["uid"], "u1");
        // another key
        assert_eq!(
            TokenSigner::random().verify(&t),
            Err(TokenError::BadSignature)
        );
        // a changed payload
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(b"{\"exp\":99999999999}"),
            parts[2]
        );
        assert_eq!(s.verify(&forged), Err(TokenError::BadSignature));
        assert_eq!(s.verify("abc"), Err(TokenError::Malformed));
        let old = s.mint(&TokenSpec::expired(
            "demo",
            "sleep",
            &[],
            Duration::from_secs(5),
        ));
        assert_eq!(s.verify(&old), Err(TokenError::Expired));
        assert_eq!(
            audiences(
                &s.verify(&s.mint(&TokenSpec::new("a", "b", &[], Duration::from_secs(60))))
                    .unwrap()
            ),
            vec![DEFAULT_AUDIENCE]
        );
    }

    #[test]
    fn keys_round_trip_through_hex() {
        let s = TokenSigner::random();
        let t = s.mint(&TokenSpec::new("a", "b", &[], Duration::from_secs(60)));
        let s2 = TokenSigner::from_hex(&format!("{}\n", s.key_hex())).unwrap();
        s2.verify(&t).unwrap();
        assert!(TokenSigner::from_hex("zz").is_err());
        assert!(TokenSigner::from_hex(&"g".repeat(64)).is_err());
    }
}
