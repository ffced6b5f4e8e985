//! Mutual TLS between nodes: certificates, the s2n-quic TLS configs, and the peer's identity.
//!
//! Every node has a certificate from the cluster's CA with its node name as DNS subject
//! alternative name. The origin (client) checks that the replica's certificate names the
//! node it meant to reach; the replica (server) requires a client certificate from the same
//! CA and reads the client's node name from it once the handshake has verified it. That name
//! is bound to the connection through an s2n-quic event context ([`PeerIdentity`]): it is the
//! only identity the replica trusts, whatever messages say.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// The CA, certificate and key of `files`, checked to belong together as far as can be
/// told without a handshake: the key is the certificate's (else every handshake would fail
/// with nothing but an alert on the other side).
fn read_tls_files(files: &TlsFiles) -> Result<(String, String, String)> {
    let (ca, cert, key) = (read_pem(&files.ca, "CA certificate")?, read_pem(&files.cert, "certificate")?, read_pem(&files.key, "key")?);
    check_key_matches(&cert, &key, files)?;
    Ok((ca, cert, key))
}

/// Fails, naming both files, when `key` is not the private key of `cert`.
fn check_key_matches(cert: &str, key: &str, files: &TlsFiles) -> Result<()> {
    let (cert_path, key_path) = (files.cert.display(), files.key.display());
    let der = x509_parser::pem::parse_x509_pem(cert.as_bytes()).with_context(|| format!("cannot parse the certificate {cert_path}"))?.1;
    let parsed = der.parse_x509().with_context(|| format!("cannot parse the certificate {cert_path}"))?;
    let key_pair = KeyPair::from_pem(key).with_context(|| format!("cannot parse the key {key_path}"))?;
    if parsed.public_key().subject_public_key.data.as_ref() != rcgen::PublicKeyData::der_bytes(&key_pair) {
        let node = node_name_of(&der.contents).unwrap_or_else(|| "NODE".into());
        bail!(
            "the key {key_path} is not the key of the certificate {cert_path}; point `tls.key` at the matching key, or give this key a certificate with `snapship certs --renew {}` (the key file must be the node's NODE.key in the certificate directory)",
            node.escape_debug()
        );
    }
    Ok(())
}

/// When `cert` (PEM) is not valid at `now`: the reason, with its date.
pub fn validity_problem(cert: &str, now: SystemTime) -> Option<String> {
    let der = x509_parser::pem::parse_x509_pem(cert.as_bytes()).ok()?.1;
    let parsed = der.parse_x509().ok()?;
    let (from, until) = (parsed.validity().not_before, parsed.validity().not_after);
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs() as i64;
    if until.timestamp() < now {
        Some(format!("expired on {until}"))
    } else if from.timestamp() > now {
        Some(format!("is not valid before {from}"))
    } else {
        None
    }
}

/// TLS for the listening (replica) side: our certificate, client certificates required.
pub fn server_tls(files: &TlsFiles) -> Result<s2n_tls_provider::Server> {
    let (ca, cert, key) = read_tls_files(files)?;
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
    let (ca, cert, key) = read_tls_files(files)?;
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

/// This node's TLS while `snapship run` runs: replaced on SIGHUP ([`LiveTls::replace`]).
/// Handshakes after a replace use the new files; connections already open keep theirs, so
/// transfers in flight are not cut. Both endpoints read the current config through a
/// [`ConfigLoader`](s2n_tls_provider::ConfigLoader) at each handshake.
#[derive(Clone)]
pub struct LiveTls {
    server: Current<s2n_tls_provider::Server>,
    client: Current<s2n_tls_provider::Client>,
}

impl LiveTls {
    /// Both configs from `files`, checked as [`server_tls`] and [`client_tls`] check them.
    pub fn load(files: &TlsFiles) -> Result<LiveTls> {
        let (server, client) = (server_tls(files)?, client_tls(files)?);
        Ok(LiveTls { server: Current(Arc::new(Mutex::new(server))), client: Current(Arc::new(Mutex::new(client))) })
    }

    /// Uses `files` for every handshake from now on; on an error the old ones stay.
    pub fn replace(&self, files: &TlsFiles) -> Result<()> {
        let (server, client) = (server_tls(files)?, client_tls(files)?);
        *self.server.0.lock().expect("tls lock") = server;
        *self.client.0.lock().expect("tls lock") = client;
        Ok(())
    }

    /// For `Server::builder().with_tls(..)`.
    pub fn server(&self) -> LiveServer {
        LiveServer(self.server.clone())
    }

    /// For `Client::builder().with_tls(..)`.
    pub fn client(&self) -> LiveClient {
        LiveClient(self.client.clone())
    }
}

/// The config an endpoint uses now, shared with the [`LiveTls`] that replaces it.
pub struct Current<T>(Arc<Mutex<T>>);

impl<T> Clone for Current<T> {
    fn clone(&self) -> Self {
        Current(self.0.clone())
    }
}

impl<T: s2n_tls_provider::ConfigLoader> s2n_tls_provider::ConfigLoader for Current<T> {
    fn load(&mut self, cx: s2n_tls_provider::ConnectionContext) -> s2n_tls_provider::config::Config {
        self.0.lock().expect("tls lock").load(cx)
    }
}

/// The listening side's TLS provider of a [`LiveTls`].
pub struct LiveServer(Current<s2n_tls_provider::Server>);
/// The connecting side's TLS provider of a [`LiveTls`].
pub struct LiveClient(Current<s2n_tls_provider::Client>);

impl s2n_quic::provider::tls::Provider for LiveServer {
    type Server = s2n_tls_provider::Server<Current<s2n_tls_provider::Server>>;
    type Client = s2n_tls_provider::Client;
    type Error = String;

    fn start_server(self) -> Result<Self::Server, String> {
        Ok(s2n_tls_provider::Server::from_loader(self.0))
    }

    fn start_client(self) -> Result<Self::Client, String> {
        Err("the listening side's TLS cannot start a client".into())
    }
}

impl s2n_quic::provider::tls::Provider for LiveClient {
    type Server = s2n_tls_provider::Server;
    type Client = s2n_tls_provider::Client<Current<s2n_tls_provider::Client>>;
    type Error = String;

    fn start_server(self) -> Result<Self::Server, String> {
        Err("the connecting side's TLS cannot start a server".into())
    }

    fn start_client(self) -> Result<Self::Client, String> {
        Ok(s2n_tls_provider::Client::from_loader(self.0))
    }
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

/// s2n-quic event subscriber that records, per connection, the peer's verified node name,
/// and logs handshakes that fail (the replica's side of a refused certificate).
pub struct PeerIdentity;

/// The per-connection context of [`PeerIdentity`]; query it with
/// `connection.query_event_context(|p: &PeerName| ...)`.
#[derive(Debug, Default)]
pub struct PeerName(pub Option<String>, bool);

impl Subscriber for PeerIdentity {
    type ConnectionContext = PeerName;

    fn create_connection_context(&mut self, _meta: &ConnectionMeta, _info: &ConnectionInfo) -> PeerName {
        PeerName(None, false)
    }

    fn on_tls_exporter_ready(&mut self, context: &mut PeerName, _meta: &ConnectionMeta, event: &events::TlsExporterReady) {
        // Called once the handshake is complete, so the chain has been verified against our CA.
        context.1 = true;
        if let Ok(chain) = event.session.peer_cert_chain_der() {
            context.0 = chain.first().and_then(|leaf| node_name_of(leaf));
        }
    }

    fn on_connection_closed(&mut self, context: &mut PeerName, _meta: &ConnectionMeta, event: &events::ConnectionClosed) {
        if !context.1 {
            // The peer's certificate is not known here (it was refused), so say what to check.
            let error = format!("{}", event.error);
            let what = if error.contains("expired") {
                "the peer's certificate has expired or is not valid yet: check it there with `openssl x509 -enddate -noout -in CERT`; renew it with `snapship certs --renew NODE`"
            } else {
                "if it was a snapship node, its certificate may have expired or not be valid yet (check `openssl x509 -enddate -noout -in CERT` there; renew with `snapship certs --renew NODE`), be from another CA than this node's, or be no snapship certificate at all"
            };
            tracing::warn!("refused a connection during its TLS handshake ({}): {what}", error.escape_debug());
        }
    }
}

// ---------------------------------------------------------------------------------------
// `snapship certs`: the cluster's CA and the node certificates.
//
// Renewal is by hand (there is no ACME here), so lifetimes are a trade: long enough that an
// admin renews on a calendar reminder rather than during an outage, short enough that a
// leaked node key stops being useful on its own (there is no revocation list either).

/// Days a node certificate is valid unless `--days` says otherwise: 825, the longest a
/// public TLS server certificate could be valid until 2020. That is a renewal about every
/// two years with three months of slack, and an upper bound on how long a stolen node key
/// stays usable.
pub const NODE_CERT_DAYS: u32 = 825;
/// Days a new CA is valid: 10 years. Replacing a CA means new certificates on every node at
/// once, so it should outlive several rounds of node renewals.
pub const CA_CERT_DAYS: u32 = 3650;
/// notBefore lies this far in the past, so that a node whose clock is a little behind the
/// admin's machine accepts a certificate made a moment ago.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// What [`make_certs`] does for a named node that already has a key or certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Stop before writing anything, naming the file: a key is never lost by accident.
    Refuse,
    /// A new certificate (new serial, new validity) for the node's existing key, signed by
    /// the existing CA; the key file is not touched.
    Renew,
    /// A new key and certificate; whatever holds the old key loses its access.
    Replace,
}

/// How `snapship certs` runs: node certificate lifetime and what to do with existing files.
#[derive(Debug, Clone, Copy)]
pub struct CertOptions {
    pub node_days: u32,
    pub existing: Existing,
}

impl Default for CertOptions {
    fn default() -> Self {
        CertOptions { node_days: NODE_CERT_DAYS, existing: Existing::Refuse }
    }
}

/// A file [`make_certs`] wrote; certificates carry their expiry.
#[derive(Debug)]
pub struct Written {
    pub path: PathBuf,
    pub valid_until: Option<SystemTime>,
}

/// `snapship certs`: a CA (reused when `DIR/ca.pem` and `DIR/ca.key` exist, never replaced)
/// and a certificate and key per node, valid from a moment ago for `options.node_days`.
/// Everything that can refuse is checked before anything is written.
pub fn make_certs(dir: &Path, nodes: &[Name], options: &CertOptions) -> Result<Vec<Written>> {
    check_request(dir, nodes, options)?;
    let existing_ca = Ca::load(dir)?;
    let now = SystemTime::now();
    let (not_before, not_after) = (now - CLOCK_SKEW, now + DAY * options.node_days);
    let ca_not_after = existing_ca.as_ref().map_or(now + DAY * CA_CERT_DAYS, |ca| ca.not_after);
    if not_after > ca_not_after {
        let left = ca_not_after.duration_since(now).unwrap_or_default().as_secs() / DAY.as_secs();
        bail!(
            "a node certificate for {} days would outlive the CA {} (it expires in {left} days): choose --days {left} or less, or make a new CA for every node",
            options.node_days,
            dir.join("ca.pem").display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    let ca = match existing_ca {
        Some(ca) => ca,
        None => {
            let ca = Ca::create(dir)?;
            written.push(Written { path: dir.join("ca.pem"), valid_until: Some(ca.not_after) });
            written.push(Written { path: dir.join("ca.key"), valid_until: None });
            ca
        }
    };
    for node in nodes {
        let key = match options.existing {
            Existing::Renew => NodeKey::Existing,
            Existing::Refuse | Existing::Replace => NodeKey::New,
        };
        written.extend(issue(dir, &ca, node, key, not_before, not_after)?);
    }
    Ok(written)
}

/// Signs a certificate for `node` valid from `not_before` to `not_after` with the CA in
/// `ca_dir`, for the node's key there (a new key when it has none), and writes
/// `ca_dir/NODE.pem`, replacing it. Returns that path. For tests (an expired or not yet valid
/// certificate) and renewals; `snapship certs` is what admins run, with its safety checks.
pub fn make_node_cert_with_validity(ca_dir: &Path, node: &Name, not_before: SystemTime, not_after: SystemTime) -> Result<PathBuf> {
    let ca = Ca::load(ca_dir)?.ok_or_else(|| anyhow!("no CA in {} (ca.pem and ca.key); make one with `snapship certs`", ca_dir.display()))?;
    let key = if ca_dir.join(format!("{node}.key")).exists() { NodeKey::Existing } else { NodeKey::New };
    issue(ca_dir, &ca, node, key, not_before, not_after)?;
    Ok(ca_dir.join(format!("{node}.pem")))
}

/// Refuses, before anything is written, what `make_certs` must not do.
fn check_request(dir: &Path, nodes: &[Name], options: &CertOptions) -> Result<()> {
    if options.node_days == 0 {
        bail!("--days must be at least 1");
    }
    let mut seen = std::collections::BTreeSet::new();
    for node in nodes {
        if node.0 == "ca" {
            bail!("a node cannot be called `ca`: its files would be the CA's (ca.pem, ca.key)");
        }
        if !seen.insert(node) {
            bail!("node `{node}` is named twice");
        }
    }
    let has_ca = dir.join("ca.pem").exists() || dir.join("ca.key").exists();
    for node in nodes {
        let (pem, key) = (dir.join(format!("{node}.pem")), dir.join(format!("{node}.key")));
        match options.existing {
            Existing::Refuse => {
                if let Some(found) = [&key, &pem].into_iter().find(|p| p.exists()) {
                    bail!(
                        "{} already exists; nothing was written. To give `{node}` a new certificate for its existing key, add --renew; to replace its key and certificate (the old key stops working), add --force",
                        found.display()
                    );
                }
            }
            Existing::Renew => {
                if !key.exists() {
                    bail!("cannot renew `{node}`: {} does not exist; to make its key and certificate, run without --renew", key.display());
                }
                if !has_ca {
                    bail!("cannot renew `{node}`: no CA in {} (ca.pem and ca.key); renewing needs the CA that signed the other nodes", dir.display());
                }
            }
            Existing::Replace => {}
        }
    }
    Ok(())
}

/// The cluster's CA: what signs node certificates, and until when it is valid itself.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl Ca {
    /// The CA in `dir`, `None` when there is none; an error when it is half there, broken,
    /// or expired.
    fn load(dir: &Path) -> Result<Option<Ca>> {
        let (pem_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        match (pem_path.exists(), key_path.exists()) {
            (false, false) => return Ok(None),
            (true, true) => {}
            _ => bail!("{} has only one of ca.pem and ca.key; restore the other or remove both to make a new CA", dir.display()),
        }
        let pem = read_pem(&pem_path, "CA certificate")?;
        let key = KeyPair::from_pem(&read_pem(&key_path, "CA key")?).with_context(|| format!("cannot parse the CA key {}", key_path.display()))?;
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes()).with_context(|| format!("cannot parse the CA certificate {}", pem_path.display()))?.1;
        let cert = der.parse_x509().with_context(|| format!("cannot parse the CA certificate {}", pem_path.display()))?;
        if cert.public_key().subject_public_key.data.as_ref() != rcgen::PublicKeyData::der_bytes(&key) {
            bail!("{} is not the key of {}; restore the matching pair", key_path.display(), pem_path.display());
        }
        let not_after = system_time(cert.validity().not_after.timestamp());
        if not_after <= SystemTime::now() {
            bail!("the CA {} has expired; make a new CA (move ca.pem and ca.key away, then run certs for every node with --force)", pem_path.display());
        }
        let issuer = Issuer::from_ca_cert_pem(&pem, key).with_context(|| format!("cannot use the CA certificate {}", pem_path.display()))?;
        Ok(Some(Ca { issuer, not_after }))
    }

    /// A new CA in `dir`, valid for [`CA_CERT_DAYS`].
    fn create(dir: &Path) -> Result<Ca> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "snapship CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        let not_after = now + DAY * CA_CERT_DAYS;
        set_validity(&mut params, now - CLOCK_SKEW, not_after)?;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        write_file(&dir.join("ca.key"), &key.serialize_pem(), 0o600)?;
        write_file(&dir.join("ca.pem"), &cert.pem(), 0o644)?;
        Ok(Ca { issuer: Issuer::new(params, key), not_after: truncated_to_seconds(not_after) })
    }
}

/// Which key a node certificate is for.
#[derive(Clone, Copy)]
enum NodeKey {
    /// The one in `NODE.key`, kept as it is.
    Existing,
    /// A new one, written to `NODE.key`.
    New,
}

/// Writes `dir/NODE.pem` (and `dir/NODE.key` for a new key): a certificate for the node's
/// name, for both ends of a connection, with a fresh random serial.
fn issue(dir: &Path, ca: &Ca, node: &Name, key: NodeKey, not_before: SystemTime, not_after: SystemTime) -> Result<Vec<Written>> {
    let (pem_path, key_path) = (dir.join(format!("{node}.pem")), dir.join(format!("{node}.key")));
    let key_pair = match key {
        NodeKey::Existing => KeyPair::from_pem(&read_pem(&key_path, "key")?).with_context(|| format!("cannot parse the key {}", key_path.display()))?,
        NodeKey::New => KeyPair::generate()?,
    };
    let mut params = CertificateParams::new(vec![node.0.clone()])?;
    params.distinguished_name.push(DnType::CommonName, node.0.clone());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    set_validity(&mut params, not_before, not_after)?;
    // rcgen's default serial is a hash of the public key: a renewal would repeat it.
    params.serial_number = Some(random_serial()?);
    let cert = params.signed_by(&key_pair, &ca.issuer)?;
    let mut written = Vec::new();
    if let NodeKey::New = key {
        write_file(&key_path, &key_pair.serialize_pem(), 0o600)?;
        written.push(Written { path: key_path, valid_until: None });
    }
    write_file(&pem_path, &cert.pem(), 0o644)?;
    written.insert(0, Written { path: pem_path, valid_until: Some(truncated_to_seconds(not_after)) });
    Ok(written)
}

fn set_validity(params: &mut CertificateParams, not_before: SystemTime, not_after: SystemTime) -> Result<()> {
    let asn1 = |t: SystemTime| {
        let secs = t.duration_since(UNIX_EPOCH).map_err(|_| anyhow!("certificate dates before 1970 are not supported"))?.as_secs();
        x509_parser::time::ASN1Time::from_timestamp(secs as i64).map(|t| t.to_datetime()).map_err(|e| anyhow!("certificate date out of range: {e}"))
    };
    params.not_before = asn1(not_before)?;
    params.not_after = asn1(not_after)?;
    Ok(())
}

/// A positive serial of 16 random bytes (RFC 5280: unique per CA, at most 20 bytes).
fn random_serial() -> Result<rcgen::SerialNumber> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).context("cannot read /dev/urandom for a certificate serial")?;
    bytes[0] &= 0x7f;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

fn system_time(unix_seconds: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix_seconds.max(0) as u64)
}

/// Certificates hold whole seconds.
fn truncated_to_seconds(t: SystemTime) -> SystemTime {
    system_time(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64))
}

/// Writes `path` with `mode` whatever was there before: into a new file beside it, then
/// renamed over it, so a replaced key never keeps an old, wider mode and a crash never
/// leaves half a key.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names(list: &[&str]) -> Vec<Name> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn read(dir: &Path, file: &str) -> Vec<u8> {
        std::fs::read(dir.join(file)).unwrap()
    }

    /// What the tests look at in `DIR/FILE`: serial, validity (Unix seconds), public key.
    struct Seen {
        serial: Vec<u8>,
        not_before: i64,
        not_after: i64,
        public_key: Vec<u8>,
        node: Option<String>,
    }

    fn seen(dir: &Path, file: &str) -> Seen {
        let pem = x509_parser::pem::parse_x509_pem(&read(dir, file)).unwrap().1;
        let cert = pem.parse_x509().unwrap();
        Seen {
            serial: cert.raw_serial().to_vec(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            public_key: cert.public_key().subject_public_key.data.to_vec(),
            node: node_name_of(&pem.contents),
        }
    }

    fn now() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    const DAY_SECS: i64 = 86_400;

    #[test]
    fn certificates_carry_the_node_name_and_reuse_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        make_certs(dir.path(), &names(&["alpha", "beta"]), &CertOptions::default()).unwrap();
        let ca_before = read(dir.path(), "ca.pem");
        for n in ["alpha", "beta"] {
            assert_eq!(seen(dir.path(), &format!("{n}.pem")).node.as_deref(), Some(n));
            assert_eq!(mode(&dir.path().join(format!("{n}.key"))), 0o600);
        }
        assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
        // A later run for a new node keeps the CA.
        make_certs(dir.path(), &names(&["gamma"]), &CertOptions::default()).unwrap();
        assert_eq!(read(dir.path(), "ca.pem"), ca_before);
        assert!(dir.path().join("gamma.pem").exists());
    }

    #[test]
    fn node_certificates_last_825_days_from_an_hour_ago_and_the_ca_10_years() {
        let dir = tempfile::tempdir().unwrap();
        let start = now();
        make_certs(dir.path(), &names(&["alpha"]), &CertOptions::default()).unwrap();
        let node = seen(dir.path(), "alpha.pem");
        assert!((node.not_before - (start - 3600)).abs() <= 5, "notBefore {} for a start at {start}", node.not_before);
        assert!((node.not_after - (start + 825 * DAY_SECS)).abs() <= 5, "notAfter {} for a start at {start}", node.not_after);
        let ca = seen(dir.path(), "ca.pem");
        assert!((ca.not_after - (start + 3650 * DAY_SECS)).abs() <= 5);
    }

    #[test]
    fn days_sets_the_node_lifetime_but_not_past_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let start = now();
        make_certs(dir.path(), &names(&["alpha"]), &CertOptions { node_days: 30, ..Default::default() }).unwrap();
        assert!((seen(dir.path(), "alpha.pem").not_after - (start + 30 * DAY_SECS)).abs() <= 5);
        let e = make_certs(dir.path(), &names(&["beta"]), &CertOptions { node_days: 4000, ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("would outlive the CA") && e.contains("--days"), "{e}");
        assert!(!dir.path().join("beta.pem").exists());
        let fresh = tempfile::tempdir().unwrap();
        make_certs(fresh.path(), &names(&["alpha"]), &CertOptions { node_days: 3651, ..Default::default() }).unwrap_err();
        assert_eq!(std::fs::read_dir(fresh.path()).unwrap().count(), 0, "a refused run makes no CA either");
    }

    #[test]
    fn existing_node_files_are_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        make_certs(dir.path(), &names(&["alpha"]), &CertOptions::default()).unwrap();
        let (key, pem) = (read(dir.path(), "alpha.key"), read(dir.path(), "alpha.pem"));
        let e = make_certs(dir.path(), &names(&["beta", "alpha"]), &CertOptions::default()).unwrap_err().to_string();
        assert!(e.contains(&dir.path().join("alpha.key").display().to_string()) && e.contains("--renew") && e.contains("--force"), "{e}");
        assert_eq!((read(dir.path(), "alpha.key"), read(dir.path(), "alpha.pem")), (key, pem));
        assert!(!dir.path().join("beta.pem").exists(), "a refused run writes nothing");
        // A certificate without its key counts too.
        std::fs::remove_file(dir.path().join("alpha.key")).unwrap();
        let e = make_certs(dir.path(), &names(&["alpha"]), &CertOptions::default()).unwrap_err().to_string();
        assert!(e.contains(&dir.path().join("alpha.pem").display().to_string()), "{e}");
    }

    #[test]
    fn force_replaces_key_and_certificate_but_keeps_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        make_certs(dir.path(), &names(&["alpha"]), &CertOptions::default()).unwrap();
        let (ca, key) = (read(dir.path(), "ca.pem"), read(dir.path(), "alpha.key"));
        // A key file someone made readable gets the right mode back with the new key.
        std::fs::set_permissions(dir.path().join("alpha.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        make_certs(dir.path(), &names(&["alpha"]), &CertOptions { existing: Existing::Replace, ..Default::default() }).unwrap();
        assert_ne!(read(dir.path(), "alpha.key"), key);
        assert_eq!(mode(&dir.path().join("alpha.key")), 0o600);
        assert_eq!(read(dir.path(), "ca.pem"), ca);
    }

    #[test]
    fn renew_keeps_the_key_and_issues_a_new_certificate() {
        let dir = tempfile::tempdir().unwrap();
        make_certs(dir.path(), &names(&["alpha", "beta"]), &CertOptions { node_days: 30, ..Default::default() }).unwrap();
        let (ca, key, beta) = (read(dir.path(), "ca.pem"), read(dir.path(), "alpha.key"), read(dir.path(), "beta.pem"));
        let before = seen(dir.path(), "alpha.pem");
        let written = make_certs(dir.path(), &names(&["alpha"]), &CertOptions { existing: Existing::Renew, ..Default::default() }).unwrap();
        assert_eq!(written.iter().map(|w| w.path.clone()).collect::<Vec<_>>(), vec![dir.path().join("alpha.pem")]);
        let after = seen(dir.path(), "alpha.pem");
        assert_eq!(read(dir.path(), "alpha.key"), key);
        assert_eq!(after.public_key, before.public_key, "the certificate is for the same key");
        assert_ne!(after.serial, before.serial);
        assert!(after.not_after > before.not_after + 700 * DAY_SECS);
        assert_eq!((read(dir.path(), "ca.pem"), read(dir.path(), "beta.pem")), (ca, beta), "nothing else changes");
        // Renewing needs the node's key and the CA.
        let e = make_certs(dir.path(), &names(&["gamma"]), &CertOptions { existing: Existing::Renew, ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("gamma.key does not exist"), "{e}");
    }

    #[test]
    fn an_expired_certificate_can_be_made_for_tests() {
        let dir = tempfile::tempdir().unwrap();
        make_certs(dir.path(), &names(&["alpha"]), &CertOptions::default()).unwrap();
        let key = read(dir.path(), "alpha.key");
        let (start, alpha) = (SystemTime::now(), "alpha".parse().unwrap());
        let path = make_node_cert_with_validity(dir.path(), &alpha, start - DAY * 10, start - DAY).unwrap();
        assert_eq!(path, dir.path().join("alpha.pem"));
        let cert = seen(dir.path(), "alpha.pem");
        assert!((cert.not_after - (now() - DAY_SECS)).abs() <= 5 && cert.not_before < cert.not_after);
        assert_eq!(read(dir.path(), "alpha.key"), key, "it keeps the node's key");
        // A node without a key gets one.
        make_node_cert_with_validity(dir.path(), &"beta".parse().unwrap(), start, start + DAY).unwrap();
        assert_eq!(mode(&dir.path().join("beta.key")), 0o600);
    }

    #[test]
    fn a_ca_key_that_does_not_match_the_ca_or_a_node_called_ca_is_refused() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for d in [&a, &b] {
            make_certs(d.path(), &names(&["alpha"]), &CertOptions::default()).unwrap();
        }
        std::fs::copy(b.path().join("ca.key"), a.path().join("ca.key")).unwrap();
        let e = make_certs(a.path(), &names(&["beta"]), &CertOptions::default()).unwrap_err().to_string();
        assert!(e.contains("is not the key of"), "{e}");
        let e = make_certs(b.path(), &names(&["ca"]), &CertOptions::default()).unwrap_err().to_string();
        assert!(e.contains("cannot be called `ca`"), "{e}");
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        make_certs(dir.path(), &names(&["alpha", "beta"]), &CertOptions::default()).unwrap();
        let files = TlsFiles { ca: dir.path().join("ca.pem"), cert: dir.path().join("alpha.pem"), key: dir.path().join("beta.key") };
        for e in [client_tls(&files).err().unwrap(), server_tls(&files).err().unwrap()] {
            let e = format!("{e:#}");
            assert!(e.contains("beta.key is not the key of the certificate") && e.contains("alpha.pem") && e.contains("--renew"), "{e}");
        }
        let files = TlsFiles { key: dir.path().join("alpha.key"), ..files };
        client_tls(&files).unwrap();
        server_tls(&files).unwrap();
    }

    #[test]
    fn validity_problems_are_named_with_their_date() {
        let dir = tempfile::tempdir().unwrap();
        make_certs(dir.path(), &names(&["alpha"]), &CertOptions::default()).unwrap();
        let pem = String::from_utf8(read(dir.path(), "alpha.pem")).unwrap();
        let now = SystemTime::now();
        assert_eq!(validity_problem(&pem, now), None);
        assert!(validity_problem(&pem, now + DAY * 900).unwrap().starts_with("expired on"));
        assert!(validity_problem(&pem, now - DAY).unwrap().starts_with("is not valid before"));
    }
}
