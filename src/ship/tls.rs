//! Mutual TLS between nodes: certificates, the s2n-quic TLS configs, and the peer's identity.
//!
//! Every node has a certificate from the cluster's CA with its node name as DNS subject
//! alternative name. The origin (client) checks that the replica's certificate names the
//! node it meant to reach; the replica (server) requires a client certificate from the same
//! CA and reads the client's node name from it once the handshake has verified it. That name
//! is bound to the connection through an s2n-quic event context ([`PeerIdentity`]): it is the
//! only identity the replica trusts, whatever messages say.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use s2n_quic::provider::event::{ConnectionInfo, ConnectionMeta, Subscriber, events};
use s2n_quic::provider::tls::default::{self as s2n_tls_provider, callbacks::VerifyHostNameCallback};

use crate::config::TlsFiles;
use crate::config::units::Name;

/// ALPN protocol id: refuse anything that is not snapship.
const ALPN: &str = "snapship/1";

fn read_pem(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// Accepts any client certificate name that is a valid node name; authorization by name
/// happens per request, against the policies.
struct AnyNodeName;

impl VerifyHostNameCallback for AnyNodeName {
    fn verify_host_name(&self, host_name: &str) -> bool {
        host_name.parse::<Name>().is_ok()
    }
}

/// TLS for the listening (replica) side: our certificate, client certificates required.
pub fn server_tls(files: &TlsFiles) -> Result<s2n_tls_provider::Server> {
    let (ca, cert, key) = (read_pem(&files.ca, "CA certificate")?, read_pem(&files.cert, "certificate")?, read_pem(&files.key, "key")?);
    let build = || -> Result<s2n_tls_provider::Server, s2n_tls_provider::error::Error> {
        s2n_tls_provider::Server::builder()
            .with_application_protocols([ALPN])?
            .with_certificate(cert.as_str(), key.as_str())?
            .with_empty_trust_store()?
            .with_trusted_certificate(ca.as_str())?
            .with_client_authentication()?
            .with_verify_host_name_callback(AnyNodeName)?
            .build()
    };
    build().map_err(|e| anyhow!("cannot set up TLS from {}, {}, {}: {e}", files.ca.display(), files.cert.display(), files.key.display()))
}

/// TLS for the connecting (origin) side: trust only our CA, present our certificate.
pub fn client_tls(files: &TlsFiles) -> Result<s2n_tls_provider::Client> {
    let (ca, cert, key) = (read_pem(&files.ca, "CA certificate")?, read_pem(&files.cert, "certificate")?, read_pem(&files.key, "key")?);
    let build = || -> Result<s2n_tls_provider::Client, s2n_tls_provider::error::Error> {
        s2n_tls_provider::Client::builder()
            .with_application_protocols([ALPN])?
            .with_empty_trust_store()?
            .with_certificate(ca.as_str())?
            .with_client_identity(cert.as_str(), key.as_str())?
            .build()
    };
    build().map_err(|e| anyhow!("cannot set up TLS from {}, {}, {}: {e}", files.ca.display(), files.cert.display(), files.key.display()))
}

/// The node name in a DER certificate: its first DNS subject alternative name.
pub fn node_name_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(name) => Some(name.to_string()),
        _ => None,
    })
}

/// s2n-quic event subscriber that records, per connection, the peer's verified node name.
pub struct PeerIdentity;

/// The per-connection context of [`PeerIdentity`]; query it with
/// `connection.query_event_context(|p: &PeerName| ...)`.
#[derive(Debug, Default)]
pub struct PeerName(pub Option<String>);

impl Subscriber for PeerIdentity {
    type ConnectionContext = PeerName;

    fn create_connection_context(&mut self, _meta: &ConnectionMeta, _info: &ConnectionInfo) -> PeerName {
        PeerName(None)
    }

    fn on_tls_exporter_ready(&mut self, context: &mut PeerName, _meta: &ConnectionMeta, event: &events::TlsExporterReady) {
        // Called once the handshake is complete, so the chain has been verified against our CA.
        if let Ok(chain) = event.session.peer_cert_chain_der() {
            context.0 = chain.first().and_then(|leaf| node_name_of(leaf));
        }
    }
}

/// `snapship certs`: a CA (reused when `DIR/ca.pem` and `DIR/ca.key` exist) and a
/// certificate and key per node. Returns the files written.
pub fn make_certs(dir: &Path, nodes: &[Name]) -> Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let mut written = Vec::new();
    let ca_key_pair;
    let issuer = if ca_pem.exists() && ca_key.exists() {
        ca_key_pair = KeyPair::from_pem(&read_pem(&ca_key, "CA key")?).context("cannot parse the CA key")?;
        Issuer::from_ca_cert_pem(&read_pem(&ca_pem, "CA certificate")?, &ca_key_pair).context("cannot parse the CA certificate")?
    } else if ca_pem.exists() || ca_key.exists() {
        bail!("{} has only one of ca.pem and ca.key; restore the other or remove both to make a new CA", dir.display());
    } else {
        ca_key_pair = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "snapship CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_after = rcgen::date_time_ymd(2126, 1, 1);
        let cert = params.self_signed(&ca_key_pair)?;
        write_private(&ca_key, &ca_key_pair.serialize_pem())?;
        std::fs::write(&ca_pem, cert.pem())?;
        written.extend([ca_pem.clone(), ca_key.clone()]);
        Issuer::new(params, &ca_key_pair)
    };
    for node in nodes {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![node.0.clone()])?;
        params.distinguished_name.push(DnType::CommonName, node.0.clone());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_after = rcgen::date_time_ymd(2126, 1, 1);
        let cert = params.signed_by(&key, &issuer)?;
        let (pem, keyfile) = (dir.join(format!("{node}.pem")), dir.join(format!("{node}.key")));
        std::fs::write(&pem, cert.pem()).with_context(|| format!("cannot write {}", pem.display()))?;
        write_private(&keyfile, &key.serialize_pem())?;
        written.extend([pem, keyfile]);
    }
    Ok(written)
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_carry_the_node_name_and_reuse_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<Name> = ["alpha", "beta"].iter().map(|n| n.parse().unwrap()).collect();
        make_certs(dir.path(), &names).unwrap();
        let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
        for n in ["alpha", "beta"] {
            let pem = std::fs::read_to_string(dir.path().join(format!("{n}.pem"))).unwrap();
            let der = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents;
            assert_eq!(node_name_of(&der).as_deref(), Some(n));
            let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.path().join(format!("{n}.key"))).unwrap().permissions());
            assert_eq!(mode & 0o777, 0o600);
        }
        // A later run for a new node keeps the CA.
        make_certs(dir.path(), &["gamma".parse().unwrap()]).unwrap();
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        assert!(dir.path().join("gamma.pem").exists());
    }
}
