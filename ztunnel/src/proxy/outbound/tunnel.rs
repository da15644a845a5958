//! Opening outbound HBONE streams: the source's certificate, a pooled stream (a new
//! connection made when none can take it: TCP, then TLS verified against the expected
//! identities, with the CRL watch when `CRL_PATH` is set), and what a failure records.

use std::sync::Arc;

use super::super::ProxyCtx;
use crate::hbone::double::InnerTimeouts;
use crate::hbone::{self, FailureKind, H2Stream, HboneError, PoolKey};
use crate::identity::{Identity, WorkloadCertificate};
use crate::telemetry::{
    ConnectionTelemetry, Direction, ProxyMetrics, RefusalReason, Reporter, ResponseFlags,
};

/// The certificate of `id`, with `tele` back; a failure is counted, closes `tele` and
/// gives `None`.
pub(super) async fn source_certificate(
    ctx: &ProxyCtx,
    id: &Identity,
    tele: ConnectionTelemetry,
) -> Option<(Arc<WorkloadCertificate>, ConnectionTelemetry)> {
    match ctx.inputs.certs.fetch_certificate(id).await {
        Ok(c) => Some((c, tele)),
        Err(e) => {
            let metrics = &ctx.inputs.metrics;
            metrics.refused(Direction::Outbound, RefusalReason::no_identity);
            tele.close_with_flag(0, 0, Some(&e.to_string()), ResponseFlags::IdentityError);
            None
        }
    }
}

/// A CONNECT `request` on a pooled connection for `key`, or on a new one presenting
/// `cert`.
pub(super) async fn open_pooled(
    ctx: &ProxyCtx,
    key: &PoolKey,
    cert: Arc<WorkloadCertificate>,
    request: http::Request<()>,
) -> Result<H2Stream, HboneError> {
    let cfg = &ctx.inputs.cfg;
    let (timeout, handshake_timeout) = (cfg.connect_timeout, cfg.handshake_timeout);
    let (dst, orig_src) = (key.dst, key.src_ip);
    // Everything the closure clones is cloned only when a new connection is made, not
    // per stream.
    let connect = || {
        let expected = key.dst_identities.clone();
        let sockets = ctx.sockets.clone();
        let roots = ctx.inputs.roots.clone();
        let crl_rejections = ctx.inputs.metrics.crl_rejections(Reporter::source);
        async move {
            let tcp = match tokio::time::timeout(timeout, sockets.connect(dst, orig_src)).await {
                Ok(Ok(s)) => s,
                Ok(Err(source)) => return Err(HboneError::Connect { dst, source }),
                Err(_) => return Err(HboneError::ConnectTimeout { dst, timeout }),
            };
            let config = crate::tls::client_config(&cert, &roots, expected);
            let tls = hbone::tls_connect_within(tcp, config, dst, handshake_timeout)
                .await
                .inspect_err(|e| {
                    if let HboneError::Tls { source, .. } = e
                        && crate::tls::crl::is_revoked(source)
                    {
                        crl_rejections.inc();
                    }
                })?;
            // With CRL_PATH: a reloaded list revoking the server's chain closes the pooled
            // connection.
            let revocation = roots.revocation().and_then(|lists| {
                lists.watch_connection(
                    tls.get_ref().1.peer_certificates(),
                    roots.store(),
                    webpki::KeyUsage::server_auth(),
                    dst.to_string(),
                    crl_rejections.clone(),
                )
            });
            Ok((tls, revocation))
        }
    };
    // The peer answers once it has connected to its app (its own connect timeout).
    let response_timeout = timeout + handshake_timeout;
    ctx.pool
        .open_stream(key, request, response_timeout, connect)
        .await
}

/// Double HBONE's inner tunnel to `target` over `outer` (a stream to the gateway at
/// `via`): TLS with `tls`, the deadlines of a direct connection's handshake and CONNECT
/// answer, and with `CRL_PATH` the same revocation checks as the outer connection (a
/// revoked destination is refused and counted; a reload revoking it closes the tunnel).
pub(super) async fn open_inner(
    ctx: &ProxyCtx,
    outer: H2Stream,
    tls: Arc<rustls::ClientConfig>,
    via: std::net::SocketAddr,
    target: String,
    request: http::Request<()>,
) -> Result<H2Stream, HboneError> {
    let cfg = &ctx.inputs.cfg;
    let timeouts = InnerTimeouts {
        handshake: cfg.handshake_timeout,
        response: cfg.connect_timeout + cfg.handshake_timeout,
    };
    let roots = ctx.inputs.roots.clone();
    let crl_rejections = ctx.inputs.metrics.crl_rejections(Reporter::source);
    let label = format!("{target} through {via}");
    let rejections = crl_rejections.clone();
    let watch = move |peer_certs: Option<&[rustls::pki_types::CertificateDer<'_>]>| {
        roots.revocation().and_then(|lists| {
            lists.watch_connection(
                peer_certs,
                roots.store(),
                webpki::KeyUsage::server_auth(),
                label,
                rejections,
            )
        })
    };
    let opened = ctx
        .pool
        .open_inner_stream(outer, tls, via, request, timeouts, watch)
        .await;
    opened.map_err(|e| {
        if let HboneError::Tls { source, .. } = &e
            && crate::tls::crl::is_revoked(source)
        {
            crl_rejections.inc();
        }
        HboneError::Inner {
            target,
            source: Box::new(e),
        }
    })
}

/// Records a stream that could not be opened: TLS failures are counted once per failed
/// handshake (streams that waited for it fail with `Waited`); the access log names the
/// peer either way.
pub(super) fn failed(metrics: &ProxyMetrics, tele: ConnectionTelemetry, e: &HboneError) {
    match e.innermost() {
        HboneError::TlsTimeout { .. } => {
            metrics.refused(Direction::Outbound, RefusalReason::handshake_timeout)
        }
        HboneError::Tls { .. } | HboneError::Alpn { .. } => {
            metrics.refused(Direction::Outbound, RefusalReason::tls_handshake)
        }
        _ => {}
    }
    tele.close_with_flag(0, 0, Some(&e.to_string()), response_flag(e.kind()));
}

/// `response_flags` for a failed HBONE stream: upstream's mapping, except that a 401 answer
/// (the destination's policy denied the stream) is `DENY` on the source side too, where
/// upstream reports a generic `CONNECT` failure (as `proxy/node_local.rs` does).
fn response_flag(kind: FailureKind) -> ResponseFlags {
    match kind {
        FailureKind::Connect => ResponseFlags::ConnectionFailure,
        FailureKind::ConnectTimeout => ResponseFlags::NetworkPolicyError,
        FailureKind::Tls => ResponseFlags::TlsFailure,
        FailureKind::H2 => ResponseFlags::Http2HandshakeFailure,
        FailureKind::Denied => ResponseFlags::AuthorizationPolicyDenied,
    }
}
