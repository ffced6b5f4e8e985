//! What can be checked on this node before it runs: its TLS material and the places its
//! policies name here. `snapship check` prints every finding; `snapship run` refuses to start
//! on a TLS error and skips a file set whose places are wrong.
//!
//! Config files are checked by `crate::config` without touching anything else; this module
//! looks at what they point at. Every finding is a [`ConfigError`] located at the key that
//! names the thing checked (`tls.cert` in the node config, `origin.path` in a policy), so the
//! admin sees which line to change, and its message says what to do.
//!
//! - TLS ([`tls`]): the three PEM files parse, the key is the certificate's, the certificate
//!   is signed by the CA, names this node (its DNS subject alternative name is `node:`, as
//!   peers read it), and is valid now; one that expires within [`EXPIRY_WARNING`] is a
//!   warning.
//! - Places ([`places`]): where this node is a file set's origin, its path is a btrfs
//!   subvolume (and `snapshot_dir` on the same filesystem) or an existing ZFS dataset; where
//!   it holds a replica, the replica's directory (or the one it is to be made in) is on
//!   btrfs, or its ZFS pool exists.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::config::locate::KeyIndex;
use crate::config::{BackendKind, ConfigError, NodeConfig, Policy};
use crate::snapshot::runner::{Cmd, CommandError};

/// A certificate that expires sooner than this is reported (as a warning: it still works).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// `statfs.f_type` of btrfs.
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;

/// What a check found: errors stop `check` (non-zero) and `run`; warnings are printed only.
#[derive(Debug, Default)]
pub struct Findings {
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<ConfigError>,
}

// ---------------------------------------------------------------------------------------
// TLS

/// Checks the node's `tls:` files (nothing when it has no `tls:` section; whether it needs
/// one is the config's check).
pub fn tls(node: &NodeConfig) -> Findings {
    let mut found = Findings::default();
    let Some(files) = &node.tls else { return found };
    let index = KeyIndex::new(&std::fs::read_to_string(&node.file).unwrap_or_default());
    let at = |key: &str, message: String| ConfigError { file: node.file.clone(), position: index.position(key), key: Some(key.to_string()), message };
    let certs_dir = files.ca.parent().unwrap_or(Path::new(".")).display().to_string();
    let make = format!("`snapship certs --out {certs_dir} {}` makes it", node.node);

    let ca = match read_certificate(&files.ca, "the CA certificate", "tls.ca", "ca.pem") {
        Ok(ca) => Some(ca),
        Err(e) => {
            found.errors.push(at("tls.ca", format!("{e}; `snapship certs --out DIR NODE...` makes DIR/ca.pem")));
            None
        }
    };
    let cert = match read_certificate(&files.cert, "the certificate", "tls.cert", &format!("{}.pem", node.node)) {
        Ok(cert) => Some(cert),
        Err(e) => {
            found.errors.push(at("tls.cert", format!("{e}; {make}")));
            None
        }
    };
    let key = match std::fs::read_to_string(&files.key) {
        Err(e) => {
            found.errors.push(at("tls.key", format!("cannot read the key {}: {e}; {make}", files.key.display())));
            None
        }
        Ok(text) => match rcgen::KeyPair::from_pem(&text) {
            Ok(key) => Some(key),
            Err(_) => {
                found.errors.push(at(
                    "tls.key",
                    format!("{} is not a PEM private key; point `tls.key` at {}.key, made with its certificate", files.key.display(), node.node),
                ));
                None
            }
        },
    };

    if let Some(ca) = &ca {
        if let Some(problem) = validity(ca, &files.ca, "the CA certificate") {
            let fix = "make a new CA and new certificates for every node (`snapship certs --out NEWDIR NODE...`)";
            match problem {
                Validity::Warning(m) => found.warnings.push(at("tls.ca", format!("{m}; before then, {fix}"))),
                Validity::Error(m) => found.errors.push(at("tls.ca", format!("{m}; {fix}"))),
            }
        }
    }
    let Some(cert) = &cert else { return found };
    let parsed = cert.parsed();
    if let Some(key) = &key {
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            found.errors.push(at(
                "tls.key",
                format!(
                    "{} is not the key of the certificate {}; point `tls.key` at the key made with it, or give this key a new certificate: `snapship certs --out {certs_dir} --renew {}`",
                    files.key.display(),
                    files.cert.display(),
                    node.node
                ),
            ));
        }
    }
    if let Some(ca) = &ca {
        if parsed.verify_signature(Some(ca.parsed().public_key())).is_err() {
            found.errors.push(at(
                "tls.cert",
                format!(
                    "{} is not signed by the CA {}, so no peer will accept it; every node needs a certificate from the one CA: {make} (in the directory holding that CA's ca.pem and ca.key)",
                    files.cert.display(),
                    files.ca.display()
                ),
            ));
        }
    }
    match crate::ship::tls::node_name_of(&cert.der) {
        Some(name) if name == node.node.0 => {}
        named => found.errors.push(at(
            "tls.cert",
            format!(
                "{} is the certificate of {}, but this node is `{}` (`node:`): peers would take it for that node; point `tls.cert` and `tls.key` at {}.pem and {}.key, or {make}",
                files.cert.display(),
                named.map_or("no node (it has no DNS name)".to_string(), |n| format!("node `{n}`")),
                node.node,
                node.node,
                node.node
            ),
        )),
    }
    if let Some(problem) = validity(cert, &files.cert, "the certificate") {
        let fix = format!("renew it with `snapship certs --out {certs_dir} --renew {}` and copy the new {}.pem here", node.node, node.node);
        match problem {
            Validity::Warning(m) => found.warnings.push(at("tls.cert", format!("{m}; {fix}"))),
            Validity::Error(m) => found.errors.push(at("tls.cert", format!("{m}; {fix}"))),
        }
    }
    found
}

/// When the certificate in the PEM file at `path` expires (its notAfter, Unix seconds), or
/// `None` when the file does not hold one (`tls` says what is wrong with it).
pub fn certificate_expiry(path: &Path) -> Option<i64> {
    let cert = read_certificate(path, "the certificate", "tls.cert", "NODE.pem").ok()?;
    Some(cert.parsed().validity().not_after.timestamp())
}

/// A certificate read from a PEM file, kept as DER.
struct Certificate {
    der: Vec<u8>,
}

impl Certificate {
    fn parsed(&self) -> x509_parser::certificate::X509Certificate<'_> {
        // Parsed once already in `read_certificate`.
        x509_parser::parse_x509_certificate(&self.der).expect("a certificate that parsed before").1
    }
}

/// The certificate in the PEM file at `path`, or what is wrong with it (`what` names it,
/// `key` is the config key naming the file, `usual` the file `snapship certs` writes for it).
fn read_certificate(path: &Path, what: &str, key: &str, usual: &str) -> Result<Certificate, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    let not_one = || format!("{} is not a PEM certificate (-----BEGIN CERTIFICATE-----); point `{key}` at {usual}", path.display());
    let (_, pem) = x509_parser::pem::parse_x509_pem(&bytes).map_err(|_| not_one())?;
    if pem.label != "CERTIFICATE" {
        return Err(format!("{} holds a {} where {what} belongs; point `{key}` at {usual}", path.display(), pem.label.to_lowercase()));
    }
    pem.parse_x509().map_err(|_| not_one())?;
    Ok(Certificate { der: pem.contents })
}

enum Validity {
    Warning(String),
    Error(String),
}

/// Whether `cert` is valid now and for [`EXPIRY_WARNING`] more.
fn validity(cert: &Certificate, path: &Path, what: &str) -> Option<Validity> {
    let parsed = cert.parsed();
    let v = parsed.validity();
    let (not_before, not_after) = (v.not_before.timestamp(), v.not_after.timestamp());
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let date = |t: i64| chrono::DateTime::from_timestamp(t, 0).map_or(t.to_string(), |d| d.format("%Y-%m-%d %H:%M UTC").to_string());
    if now < not_before {
        return Some(Validity::Error(format!(
            "{what} {} is not valid before {}: check this node's clock (`timedatectl`), or that of the machine that made it",
            path.display(),
            date(not_before)
        )));
    }
    if now >= not_after {
        return Some(Validity::Error(format!("{what} {} expired on {}; peers refuse it", path.display(), date(not_after))));
    }
    let left = not_after - now;
    if left < EXPIRY_WARNING.as_secs() as i64 {
        return Some(Validity::Warning(format!("{what} {} expires on {} (in {} days)", path.display(), date(not_after), left / 86_400)));
    }
    None
}

// ---------------------------------------------------------------------------------------
// Places

/// Checks what `policy` names on this node: its origin's path and snapshot directory where
/// this node is the origin, its replica's place where it holds one.
pub async fn places(policy: &Policy, node: &NodeConfig) -> Findings {
    let index = KeyIndex::new(&std::fs::read_to_string(&policy.file).unwrap_or_default());
    let at = |key: &str, message: String| ConfigError { file: policy.file.clone(), position: index.position(key), key: Some(key.to_string()), message };
    let mut found = Findings::default();
    if policy.origin.node == node.node {
        let problems = match policy.backend {
            BackendKind::Btrfs => btrfs_origin(policy),
            BackendKind::Zfs => zfs_dataset(&policy.origin.path).await.into_iter().map(|m| ("origin.path".to_string(), m)).collect(),
        };
        found.errors.extend(problems.into_iter().map(|(key, m)| at(&key, m)));
    }
    // Uploads to an object store would fail without these (on the origin, or on the relay
    // its `from:` names); the node replicas still run.
    let origin_here = policy.origin.node == node.node;
    for store in policy.object_stores.iter().filter(|s| origin_here || s.from.as_ref() == Some(&node.node)) {
        for (key, m) in crate::objstore::check_files(store) {
            found.warnings.push(at(&key, format!("object store `{}`: {m}; uploads to it fail until this is fixed", store.name)));
        }
    }
    for (i, replica) in policy.replicas.iter().enumerate().filter(|(_, r)| r.node == node.node) {
        let key = format!("replicas[{i}].path");
        match policy.backend {
            BackendKind::Btrfs => match btrfs_replica(Path::new(&replica.path)) {
                Place::Fine => {}
                Place::Warning(m) => found.warnings.push(at(&key, m)),
                Place::Error(m) => found.errors.push(at(&key, m)),
            },
            BackendKind::Zfs => found.errors.extend(zfs_pool(&replica.path).await.map(|m| at(&key, m))),
        }
    }
    found
}

/// The origin of a btrfs file set: a subvolume, with its snapshot directory on the same
/// filesystem. Returns (key, message) pairs.
fn btrfs_origin(policy: &Policy) -> Vec<(String, String)> {
    let path = Path::new(&policy.origin.path);
    let key = "origin.path".to_string();
    if let Some(problem) = not_a_btrfs_dir(path) {
        let create = format!("create the subvolume with `btrfs subvolume create {}` on a btrfs filesystem", path.display());
        return vec![(key, format!("{problem}; {create}"))];
    }
    match libbtrfsutil::is_subvolume(path) {
        Ok(true) => {}
        Ok(false) => {
            return vec![(
                key,
                format!(
                    "{} is a plain directory, not a btrfs subvolume, so it cannot be snapshotted: make it one (`btrfs subvolume create NEW`, move the data in, rename NEW to {}), or point `origin.path` at a subvolume",
                    path.display(),
                    path.display()
                ),
            )];
        }
        Err(e) => return vec![(key, format!("cannot tell whether {} is a btrfs subvolume: {e}", path.display()))],
    }
    // The snapshot directory need not exist yet (it is made on the first snapshot); the
    // directory it will be made in decides the filesystem.
    let snapdir = policy.snapshot_dir();
    let key = if policy.origin.snapshot_dir.is_some() { "origin.snapshot_dir" } else { "origin.path" }.to_string();
    let Some(existing) = snapdir.ancestors().find(|a| a.exists()) else { return Vec::new() };
    if existing == snapdir && !snapdir.is_dir() {
        return vec![(
            key,
            format!("the snapshot directory {} exists and is not a directory; remove it or set `origin.snapshot_dir` elsewhere", snapdir.display()),
        )];
    }
    match (filesystem_of(path), filesystem_of(existing)) {
        (Some(a), Some(b)) if a != b => vec![(
            key,
            format!(
                "the snapshot directory {} is on another filesystem than the subvolume {} (btrfs snapshots stay on their filesystem); set `origin.snapshot_dir` to a directory on it, like {}",
                snapdir.display(),
                path.display(),
                path.parent().unwrap_or(Path::new("/")).join(".snapship").join(&policy.fileset.0).display()
            ),
        )],
        _ => Vec::new(),
    }
}

/// What [`btrfs_replica`] found.
enum Place {
    Fine,
    Warning(String),
    Error(String),
}

/// A btrfs replica's place: the directory itself when it exists, else its parent, must be a
/// directory on btrfs (`btrfs receive` makes subvolumes there). A parent that does not exist
/// yet is made by the first receive, as long as the directory it will be made in is on
/// btrfs: a warning, in case the path is mistyped.
fn btrfs_replica(path: &Path) -> Place {
    let on_btrfs = "point it at a directory on a btrfs filesystem: received snapshots are btrfs subvolumes";
    if path.exists() {
        return not_a_btrfs_dir(path).map_or(Place::Fine, |p| Place::Error(format!("{p}; {on_btrfs}")));
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    if parent.exists() {
        return not_a_btrfs_dir(parent).map_or(Place::Fine, |p| Place::Error(format!("{p} (the replica's parent directory); {on_btrfs}")));
    }
    let Some(existing) = parent.ancestors().find(|a| a.exists()) else { return Place::Fine };
    match not_a_btrfs_dir(existing) {
        Some(p) => Place::Error(format!(
            "the parent directory {} of the replica does not exist, and {p}; create the parent (`mkdir -p {}`) on the btrfs filesystem that is to hold the replica, or {on_btrfs}",
            parent.display(),
            parent.display()
        )),
        None => Place::Warning(format!(
            "the parent directory {} of the replica does not exist yet; the first receive creates it in {} (on btrfs): check the path, or create it (`mkdir -p {}`)",
            parent.display(),
            existing.display(),
            parent.display()
        )),
    }
}

/// What keeps `path` from being a directory on btrfs, if anything.
fn not_a_btrfs_dir(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(format!("{} does not exist", path.display())),
        Err(e) => return Some(format!("cannot look at {}: {e}", path.display())),
        Ok(m) if !m.is_dir() => return Some(format!("{} is not a directory", path.display())),
        Ok(_) => {}
    }
    match rustix::fs::statfs(path) {
        Err(e) => Some(format!("cannot statfs {}: {e}", path.display())),
        Ok(fs) if f_type(&fs) == BTRFS_SUPER_MAGIC => None,
        Ok(fs) => Some(format!("{} is on {}, not btrfs", path.display(), filesystem_name(f_type(&fs)))),
    }
}

/// `statfs.f_type`, whose C type differs between architectures.
#[allow(clippy::unnecessary_cast)]
fn f_type(fs: &rustix::fs::StatFs) -> i64 {
    fs.f_type as i64
}

/// The common name of a `statfs.f_type`, for messages.
fn filesystem_name(magic: i64) -> String {
    match magic {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x6573_5546 => "a FUSE filesystem".into(),
        0x794C_7630 => "overlayfs".into(),
        0x6969 => "NFS".into(),
        other => format!("a filesystem of type {other:#x}"),
    }
}

/// Which filesystem (superblock) `path` is on: the device number `/proc/self/mountinfo` shows
/// for its mount. Not `st_dev`: every btrfs subvolume has its own. `None` if unknown.
fn filesystem_of(path: &Path) -> Option<String> {
    let stx = rustix::fs::statx(rustix::fs::CWD, path, rustix::fs::AtFlags::empty(), rustix::fs::StatxFlags::MNT_ID).ok()?;
    if stx.stx_mask & rustix::fs::StatxFlags::MNT_ID.bits() == 0 {
        return None;
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let id: u64 = fields.next()?.parse().ok()?;
        let device = fields.nth(1)?;
        (id == stx.stx_mnt_id).then(|| device.to_string())
    })
}

/// A ZFS origin: the dataset exists (`zfs list`).
async fn zfs_dataset(dataset: &str) -> Option<String> {
    match Cmd::new("zfs").arg("list").arg("-H").arg("-o").arg("name").arg(dataset).output().await {
        Ok(_) => None,
        Err(e @ CommandError::Spawn { .. }) => Some(format!("{e}; is ZFS installed on this node?")),
        Err(e) => Some(format!("the dataset {dataset} cannot be listed ({}); create it with `zfs create {dataset}`, or fix the name", one_line(e.stderr()))),
    }
}

/// A ZFS replica: its pool exists (`zpool list`); the dataset itself is made by the first
/// receive.
async fn zfs_pool(dataset: &str) -> Option<String> {
    let pool = dataset.split('/').next().unwrap_or(dataset);
    match Cmd::new("zpool").arg("list").arg("-H").arg("-o").arg("name").arg(pool).output().await {
        Ok(_) => None,
        Err(e @ CommandError::Spawn { .. }) => Some(format!("{e}; is ZFS installed on this node?")),
        Err(e) => Some(format!(
            "the pool {pool} of the replica dataset {dataset} cannot be listed ({}); the first receive creates the dataset, but its pool must exist (`zpool list` shows this node's pools)",
            one_line(e.stderr())
        )),
    }
}

/// A command's stderr on one line, for a message.
fn one_line(stderr: &str) -> String {
    stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_replica_parent_on_a_non_btrfs_directory_is_an_error() {
        // The test machine's temporary directory is not btrfs (ext4 or tmpfs).
        let dir = tempfile::tempdir().unwrap();
        if not_a_btrfs_dir(dir.path()).is_none() {
            return; // on btrfs after all: nothing to see here
        }
        match btrfs_replica(&dir.path().join("a/b/replica")) {
            Place::Error(m) => assert!(m.contains("a/b of the replica does not exist") && m.contains("not btrfs"), "{m}"),
            _ => panic!("a replica off btrfs must be an error"),
        }
        match btrfs_replica(dir.path()) {
            Place::Error(m) => assert!(m.contains("not btrfs"), "{m}"),
            _ => panic!("a replica off btrfs must be an error"),
        }
    }

    #[test]
    fn one_filesystem_is_one_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let (a, b) = (filesystem_of(dir.path()), filesystem_of(&dir.path().join("sub")));
        assert!(a.is_some() && a == b, "{a:?} {b:?}");
        assert_ne!(filesystem_of(Path::new("/proc")), a, "/proc is a filesystem of its own");
    }

    #[test]
    fn stderr_becomes_one_line() {
        assert_eq!(one_line("connect: refused\n\n  Please start it.\n"), "connect: refused Please start it.");
    }
}
