//! Who is calling: the bearer token checked with the Kubernetes TokenReview API.
//!
//! A token is accepted when the API server says it is authenticated for one of
//! `TOKEN_AUDIENCES` and it belongs to a service account
//! (`system:serviceaccount:<ns>:<sa>`). Pod-bound tokens (projected tokens are)
//! also name the pod (`authentication.kubernetes.io/pod-name` / `pod-uid` in the
//! user's extra fields), which node authorization needs.

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

const SA_PREFIX: &str = "system:serviceaccount:";
/// TokenReview `user.extra` keys of a pod-bound token.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// An authenticated caller (a Kubernetes service account).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to, if any.
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

impl Caller {
    /// `namespace/serviceaccount`, for logs.
    pub fn account(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }

    /// The caller's own SPIFFE identity in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// Authentication failure.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The token is not acceptable (gRPC `Unauthenticated`).
    #[error("token rejected: {0}")]
    Rejected(String),
    /// The token could not be checked (gRPC `Unavailable`).
    #[error("token review failed: {0}")]
    Unavailable(String),
}

/// Checks bearer tokens.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>>;
}

/// [`Authenticator`] over the TokenReview API.
pub struct TokenReviewAuthenticator {
    api: Api<TokenReview>,
    audiences: Vec<String>,
}

impl TokenReviewAuthenticator {
    pub fn new(client: kube::Client, audiences: Vec<String>) -> Self {
        TokenReviewAuthenticator {
            api: Api::all(client),
            audiences,
        }
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: token.to_string(),
                    audiences: Some(self.audiences.clone()),
                },
                ..Default::default()
            };
            let answer = self
                .api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| AuthError::Unavailable(format!("TokenReview request: {e}")))?;
            caller_from_review(&answer, &self.audiences)
        })
    }
}

/// Interprets a TokenReview answer.
pub fn caller_from_review(review: &TokenReview, audiences: &[String]) -> Result<Caller, AuthError> {
    let status = review
        .status
        .as_ref()
        .ok_or_else(|| AuthError::Unavailable("TokenReview answer without status".into()))?;
    if status.authenticated != Some(true) {
        let why = status
            .error
            .clone()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "not authenticated".into());
        return Err(AuthError::Rejected(why));
    }
    let granted = status.audiences.clone().unwrap_or_default();
    if !granted.iter().any(|a| audiences.contains(a)) {
        return Err(AuthError::Rejected(format!(
            "token audiences {granted:?} include none of {audiences:?}"
        )));
    }
    let user = status
        .user
        .as_ref()
        .ok_or_else(|| AuthError::Rejected("authenticated without a user".into()))?;
    let username = user.username.clone().unwrap_or_default();
    let (namespace, service_account) = username
        .strip_prefix(SA_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .ok_or_else(|| {
            AuthError::Rejected(format!("user {username:?} is not a service account"))
        })?;
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    Ok(Caller {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        pod_name: extra(EXTRA_POD_NAME),
        pod_uid: extra(EXTRA_POD_UID),
    })
}

/// The token of an `authorization: Bearer <token>` header value.
pub fn bearer_token(header: Option<&str>) -> Result<&str, AuthError> {
    let value = header.ok_or_else(|| AuthError::Rejected("no authorization header".into()))?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(|| {
        AuthError::Rejected("authorization header is not \"Bearer <token>\"".into())
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Rejected(
            "authorization header is not \"Bearer <token>\"".into(),
        ));
    }
    Ok(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};
    use std::collections::BTreeMap;

    fn review(
        authenticated: bool,
        username: &str,
        audiences: &[&str],
        pod: Option<(&str, &str)>,
    ) -> TokenReview {
        let mut extra = BTreeMap::new();
        if let Some((name, uid)) = pod {
            extra.insert(EXTRA_POD_NAME.to_string(), vec![name.to_string()]);
            extra.insert(EXTRA_POD_UID.to_string(), vec![uid.to_string()]);
        }
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(authenticated),
                audiences: Some(audiences.iter().map(|s| s.to_string()).collect()),
                error: (!authenticated).then(|| "token has expired".to_string()),
                user: Some(UserInfo {
                    username: Some(username.to_string()),
                    extra: Some(extra),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    fn aud() -> Vec<String> {
        vec!["istio-ca".to_string()]
    }

    #[test]
    fn service_account_with_pod_binding() {
        let c = caller_from_review(
            &review(
                true,
                "system:serviceaccount:istio-system:ztunnel",
                &["istio-ca"],
                Some(("ztunnel-abc", "uid-1")),
            ),
            &aud(),
        )
        .unwrap();
        assert_eq!(c.account(), "istio-system/ztunnel");
        assert_eq!(c.pod_name.as_deref(), Some("ztunnel-abc"));
        assert_eq!(c.pod_uid.as_deref(), Some("uid-1"));
        assert_eq!(
            c.identity("cluster.local"),
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
        );
    }

    #[test]
    fn rejections() {
        for (r, want) in [
            (
                review(false, "system:serviceaccount:a:b", &[], None),
                "expired",
            ),
            (
                review(true, "system:serviceaccount:a:b", &["other"], None),
                "include none",
            ),
            (
                review(true, "alice", &["istio-ca"], None),
                "not a service account",
            ),
            (
                review(true, "system:serviceaccount:a", &["istio-ca"], None),
                "not a service account",
            ),
        ] {
            match caller_from_review(&r, &aud()) {
                Err(AuthError::Rejected(why)) => assert!(why.contains(want), "{why}"),
                other => panic!("{want}: {other:?}"),
            }
        }
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token(Some("Bearer abc")).unwrap(), "abc");
        assert_eq!(bearer_token(Some("bearer  abc ")).unwrap(), "abc");
        for bad in [
            None,
            Some(""),
            Some("Basic abc"),
            Some("Bearer"),
            Some("Bearer  "),
        ] {
            assert!(
                matches!(bearer_token(bad), Err(AuthError::Rejected(_))),
                "{bad:?}"
            );
        }
    }
}
