//! Object-storage replicas in a policy: a `replicas:` entry with a `name` and an
//! `object_store` instead of a `node` and a `path` (docs/object-storage.md).
//!
//! ```yaml
//! replicas:
//!   - name: offsite
//!     object_store:
//!       endpoint: http://127.0.0.1:3900
//!       bucket: snapship
//!       prefix: projects/
//!       region: garage
//!       credentials: /etc/snapship/offsite.env   # AWS_ACCESS_KEY_ID=… / AWS_SECRET_ACCESS_KEY=…
//!     encryption_key: /etc/snapship/offsite.key  # 64 hex digits: `openssl rand -hex 32`
//!     full_every: 30d
//! ```
//!
//! The `replicas:` list holds both kinds. Node replicas go to [`Policy::replicas`] as before
//! ([`node_entries`] skips the others while serde reads the policy); the object-store ones
//! are read in a second pass over the same text ([`store_entries`]), so their errors name
//! their own keys and lines. No secret is ever in the policy: credentials come from a file
//! or the environment, the key from its own file.
//!
//! [`Policy::replicas`]: super::Policy::replicas

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use super::units::{ByteSize, HumanDuration, Name};
use super::{ConfigError, ReplicaSpec};

/// One object-storage replica of a file set: where its objects go and how they are sealed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreReplica {
    /// Its name in status, `list` and `restore --from` (not a node: no snapship runs there).
    pub name: Name,
    pub object_store: ObjectStore,
    /// A file holding the 256-bit key (64 hex digits) every object is encrypted with, on
    /// this side, before it leaves; without it nothing stored can be read back.
    pub encryption_key: PathBuf,
    /// A new full stream at least this often (default 30 days), so that chains stay short.
    #[serde(default = "default_full_every")]
    pub full_every: HumanDuration,
    /// Also a new full stream once the incremental streams since the last full add up to more
    /// than this fraction of its size (default 0.5).
    #[serde(default = "default_full_ratio")]
    pub full_ratio: f64,
    /// Plain bytes per uploaded part (default 16MiB; S3 needs 5MiB at least). Memory use per
    /// transfer is about twice this.
    #[serde(default = "default_part_size")]
    pub part_size: ByteSize,
    /// The replica node that feeds this store (a cascade: it uploads what it received);
    /// without it, the origin does.
    #[serde(default)]
    pub from: Option<Name>,
    /// Its index in the policy's `replicas:` (for messages: `replicas[N].…`).
    #[serde(skip)]
    pub index: usize,
}

/// The S3-compatible store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectStore {
    /// `http://HOST:PORT` or `https://HOST`; path-style requests.
    pub endpoint: String,
    pub bucket: String,
    /// Prepended to every object key (`projects/`); the file set's name follows it.
    #[serde(default)]
    pub prefix: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// A file of `AWS_ACCESS_KEY_ID=…` and `AWS_SECRET_ACCESS_KEY=…` lines; without it, those
    /// variables from the environment.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
}

fn default_full_every() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30 * 86400))
}

fn default_full_ratio() -> f64 {
    0.5
}

fn default_part_size() -> ByteSize {
    ByteSize(16 << 20)
}

fn default_region() -> String {
    "us-east-1".into()
}

/// The smallest part S3 takes (all but the last).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// The largest part S3 takes.
pub const MAX_PART_SIZE: u64 = 5 << 30;

/// An entry of `replicas:` that is an object store: it has a `name` or an `object_store` key.
fn is_store_entry(value: &serde_yaml::Value) -> bool {
    value.get("object_store").is_some() || value.get("name").is_some()
}

/// `replicas:` as node replicas only (serde's `deserialize_with` for `Policy::replicas`):
/// object-store entries are left to [`store_entries`].
pub fn node_entries<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ReplicaSpec>, D::Error> {
    let values = Vec::<serde_yaml::Value>::deserialize(d)?;
    let mut out = Vec::new();
    for value in values.into_iter().filter(|v| !is_store_entry(v)) {
        out.push(ReplicaSpec::deserialize(value).map_err(serde::de::Error::custom)?);
    }
    Ok(out)
}

/// The shape of the second pass: only `replicas:`, each entry kept as written.
#[derive(Deserialize)]
struct Entries {
    #[serde(default)]
    replicas: Vec<serde_yaml::Value>,
}

/// The object-store entries of a policy's text, with their index in `replicas:`; relative
/// file names are taken from the policy's directory.
pub fn store_entries(path: &Path, text: &str) -> Result<Vec<(usize, StoreReplica)>, ConfigError> {
    let entries: Entries = super::parse_yaml(path, text)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, value) in entries.replicas.into_iter().enumerate() {
        if !is_store_entry(&value) {
            continue;
        }
        let mut r: StoreReplica = serde_path_to_error::deserialize(value).map_err(|e| {
            let inner = e.path().to_string();
            let key = match inner.trim_end_matches(".?").trim_end_matches('?') {
                "" | "." => format!("replicas[{i}]"),
                k => format!("replicas[{i}].{k}"),
            };
            let message = super::wording::plain(&e.into_inner().to_string(), Some(&key));
            super::located(path, &super::locate::KeyIndex::new(text), &key, message)
        })?;
        r.index = i;
        r.encryption_key = base.join(&r.encryption_key);
        if let Some(c) = &mut r.object_store.credentials {
            *c = base.join(&*c);
        }
        out.push((i, r));
    }
    Ok(out)
}

/// The checks on the object-store entries of a policy: (key, message) per problem.
pub fn check(stores: &[(usize, StoreReplica)], node_names: &[&str]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (i, s) in stores {
        let key = |k: &str| format!("replicas[{i}].{k}");
        if node_names.contains(&s.name.0.as_str()) || seen.contains(&s.name.0.as_str()) {
            out.push((key("name"), format!("`{}` is already the name of a member or replica of this file set; give the object store its own name", s.name)));
        }
        seen.push(&s.name.0);
        let e = &s.object_store.endpoint;
        if !(e.starts_with("http://") || e.starts_with("https://")) || e.trim_end_matches('/').ends_with(':') {
            out.push((key("object_store.endpoint"), format!("{e:?} is not an http:// or https:// URL, like http://127.0.0.1:3900 or https://s3.example.net")));
        }
        if s.object_store.bucket.is_empty() || s.object_store.bucket.contains('/') {
            out.push((key("object_store.bucket"), "write the bucket's name alone, like `snapship` (a key prefix goes under `prefix`)".into()));
        }
        let p = &s.object_store.prefix;
        if p.starts_with('/') || p.split('/').any(|c| c == "." || c == "..") {
            out.push((key("object_store.prefix"), format!("{p:?} must be a relative key prefix without `.` or `..`, like `projects/`")));
        }
        if !(s.full_ratio > 0.0 && s.full_ratio.is_finite()) {
            out.push((
                key("full_ratio"),
                "write a fraction above 0, like 0.5 (a new full once the incrementals since the last add up to half its size)".into(),
            ));
        }
        if s.full_every.0.is_zero() {
            out.push((key("full_every"), "write how often a new full stream starts, like `30d`".into()));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&s.part_size.0) {
            out.push((key("part_size"), format!("{} is outside what S3 takes per part: write 5MiB to 5GiB, like `16MiB`", s.part_size)));
        }
    }
    out
}
