//! Checks that the signing certificate chains to the trust root before a CA
//! bundle is used: `ca-cert.pem`, then the intermediates of `cert-chain.pem`,
//! each signed by the next, the last by `root-cert.pem` (as istiod checks its
//! plugged-in bundle). A Secret updated with a signing certificate from another
//! root would otherwise be loaded, and every certificate issued afterwards would
//! chain to a root no ztunnel trusts.

use x509_parser::certificate::X509Certificate;

/// `signing` (the CA certificate), `intermediates` (in order, towards the root,
/// without `signing` or the root) and `root`: `Err` says which link is broken,
/// naming both certificates by subject.
pub fn verify_chain_to_root(
    signing: &X509Certificate<'_>,
    intermediates: &[X509Certificate<'_>],
    root: &X509Certificate<'_>,
) -> Result<(), String> {
    let mut child = signing;
    for parent in intermediates.iter().chain(std::iter::once(root)) {
        if child.issuer() != parent.subject() {
            return Err(format!(
                "{} is issued by {}, not by {}",
                child.subject(),
                child.issuer(),
                parent.subject()
            ));
        }
        child
            .verify_signature(Some(parent.public_key()))
            .map_err(|e| {
                format!(
                    "signature of {} does not verify with the key of {}: {e}",
                    child.subject(),
                    parent.subject()
                )
            })?;
        child = parent;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    use x509_parser::prelude::FromDer;

    fn ca_params(name: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    }

    fn key() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        X509Certificate::from_der(der).unwrap().1
    }

    #[test]
    fn root_intermediate_and_signing_certificate_chain() {
        let (root_key, inter_key, ca_key) = (key(), key(), key());
        let root = ca_params("root A").self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(ca_params("root A"), &root_key);
        let inter = ca_params("intermediate")
            .signed_by(&inter_key, &root_issuer)
            .unwrap();
        let inter_issuer = Issuer::new(ca_params("intermediate"), &inter_key);
        let ca = ca_params("signing")
            .signed_by(&ca_key, &inter_issuer)
            .unwrap();
        let (root, inter, ca) = (parse(root.der()), parse(inter.der()), parse(ca.der()));

        verify_chain_to_root(&ca, std::slice::from_ref(&inter), &root).unwrap();
        // The intermediate left out: the signing certificate's issuer is not the root.
        let e = verify_chain_to_root(&ca, &[], &root).unwrap_err();
        assert!(
            e.contains("CN=signing is issued by CN=intermediate, not by CN=root A"),
            "{e}"
        );
        // A self-signed root is its own chain.
        verify_chain_to_root(&root, &[], &root).unwrap();
    }

    #[test]
    fn same_name_other_key_is_refused() {
        // A second root with the same subject (e.g. a regenerated "root A"): names
        // match, the signature does not.
        let (a_key, b_key) = (key(), key());
        let a = ca_params("root A").self_signed(&a_key).unwrap();
        let b = ca_params("root A").self_signed(&b_key).unwrap();
        let e = verify_chain_to_root(&parse(b.der()), &[], &parse(a.der())).unwrap_err();
        assert!(
            e.contains("does not verify with the key of CN=root A"),
            "{e}"
        );
    }
}
