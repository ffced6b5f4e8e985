//! Getting data back: `snapship restore` picks a snapshot this node holds (the newest at or
//! before a time, or one by name) and makes it available at a new place, never touching
//! the live file set, the snapshots, or the replica directory; only `--in-place`
//! ([`in_place`]) replaces the live file set, keeping what it held.
//!
//! Read top-down: [`held`] is what this node holds (origin snapshots, received copies);
//! [`pick`] chooses one (pure); [`restore`] checks the target and makes the copy through the
//! backend helpers in `snapshot::copy`: the whole file set as a writable copy (btrfs: a
//! writable snapshot; ZFS: a clone, `--to` naming the new dataset), or one file or directory
//! (`--path`) copied with its metadata. [`when`] reads the `--at` forms.

pub mod in_place;
pub mod when;

use std::path::{Component, Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use chrono::{DateTime, Utc};

use crate::config::{BackendKind, LoadedConfig, Policy};
use crate::snapshot::{self, Kind, SnapshotName, copy};

/// Which snapshot to restore.
#[derive(Debug, Clone)]
pub enum Which {
    /// The newest at or before this time.
    At(DateTime<Utc>),
    /// This one, by name.
    Named(String),
}

/// A snapshot this node holds, and where its files are.
#[derive(Debug, Clone)]
pub struct Held {
    pub name: SnapshotName,
    pub place: Place,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A read-only btrfs subvolume.
    Btrfs(PathBuf),
    /// `dataset@name`.
    Zfs { dataset: String },
}

impl Place {
    fn shown(&self, name: &SnapshotName) -> String {
        match self {
            Place::Btrfs(path) => path.display().to_string(),
            Place::Zfs { dataset } => format!("{dataset}@{name}"),
        }
    }
}

/// What a restore made.
#[derive(Debug)]
pub struct Restored {
    pub snapshot: SnapshotName,
    /// The snapshot (path or `dataset@name`), and the file or directory within it if only that.
    pub from: String,
    pub to: String,
    /// "a writable btrfs snapshot", "a ZFS clone", "a copy".
    pub how: &'static str,
}

/// Every snapshot of `policy`'s file set this node holds, oldest first: its origin snapshots
/// when this node is the origin, its received copies when it is a replica (a name held both
/// ways is listed once, as the origin's).
pub async fn held(config: &LoadedConfig, policy: &Policy) -> Result<Vec<Held>> {
    let here = &config.node.node;
    if policy.origin.node != *here && policy.replica_on(here).is_none() {
        bail!("node `{here}` holds no copy of `{}`: it is neither its origin (`{}`) nor one of its replicas", policy.fileset, policy.origin.node);
    }
    let mut out: Vec<Held> = Vec::new();
    if policy.origin.node == *here {
        for s in snapshot::origin_for(policy)?.list().await? {
            let place = match policy.backend {
                BackendKind::Btrfs => Place::Btrfs(policy.snapshot_dir().join(s.name.as_str())),
                BackendKind::Zfs => Place::Zfs { dataset: policy.origin.path.clone() },
            };
            out.push(Held { name: s.name, place });
        }
    }
    if let Some(replica) = policy.replica_on(here) {
        for s in snapshot::replica_for(policy, replica)?.list().await? {
            if out.iter().any(|h| h.name == s.name) {
                continue;
            }
            let place = match policy.backend {
                BackendKind::Btrfs => Place::Btrfs(Path::new(&replica.path).join(s.name.as_str())),
                BackendKind::Zfs => Place::Zfs { dataset: replica.path.clone() },
            };
            out.push(Held { name: s.name, place });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// A snapshot's time as shown to people.
pub fn shown_time(name: &SnapshotName) -> String {
    name.time().format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string()
}

pub fn kind_word(kind: Kind) -> &'static str {
    match kind {
        Kind::Scheduled => "scheduled",
        Kind::Continuous => "continuous",
    }
}

/// Chooses the snapshot to restore among `held` (oldest first).
pub fn pick<'a>(held: &'a [Held], which: &Which) -> Result<&'a Held> {
    let (Some(oldest), Some(newest)) = (held.first(), held.last()) else {
        bail!("this node holds no snapshot of the file set yet: nothing to restore from here (`snapship list` shows which members hold what)");
    };
    match which {
        Which::At(at) => held.iter().rev().find(|h| h.name.time() <= *at).ok_or_else(|| {
            anyhow!(
                "no snapshot at or before {}: the oldest this node holds is {} (taken {}); choose a later --at",
                at.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
                oldest.name,
                shown_time(&oldest.name)
            )
        }),
        Which::Named(text) => {
            let prefixed = format!("{}{text}", snapshot::name::PREFIX);
            if let Some(h) = held.iter().find(|h| h.name.as_str() == text || h.name.as_str() == prefixed) {
                return Ok(h);
            }
            let nearest = nearest_names(held, text);
            bail!(
                "this node holds no snapshot named `{text}`; the nearest it holds: {} (held: {} from {} to {}; `snapship list` shows them all)",
                nearest.join(", "),
                held.len(),
                oldest.name,
                newest.name
            )
        }
    }
}

/// Up to three names of `held` nearest to `text`: by time when `text` reads as a snapshot
/// name (a mistyped second), else by the longest common beginning.
fn nearest_names(held: &[Held], text: &str) -> Vec<String> {
    let parsed = SnapshotName::parse(text)
        .or_else(|| SnapshotName::parse(&format!("{}{text}", snapshot::name::PREFIX)))
        .or_else(|| SnapshotName::parse(&format!("{text}Z")))
        .or_else(|| SnapshotName::parse(&format!("{}{text}Z", snapshot::name::PREFIX)));
    let mut scored: Vec<(i64, &SnapshotName)> = held
        .iter()
        .map(|h| {
            let score = match &parsed {
                Some(p) => (h.name.time() - p.time()).num_milliseconds().abs(),
                None => -(h.name.as_str().chars().zip(text.chars()).take_while(|(a, b)| a == b).count() as i64),
            };
            (score, &h.name)
        })
        .collect();
    // Ties (same common beginning) go to the newest.
    scored.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(a.1)));
    let mut names: Vec<&SnapshotName> = scored.into_iter().take(3).map(|(_, n)| n).collect();
    names.sort();
    names.into_iter().map(|n| n.to_string()).collect()
}

/// `subpath` as a path inside the snapshot: relative, without `..`. An absolute path under
/// the live file set's path (`/srv/projects/docs/a.txt`) is taken relative to it; any other
/// absolute path is taken from the snapshot's root.
pub fn inside_path(subpath: &Path, live: Option<&Path>) -> Result<PathBuf> {
    let rel = match live.and_then(|l| subpath.strip_prefix(l).ok()) {
        Some(rel) => rel,
        None => subpath.strip_prefix("/").unwrap_or(subpath),
    };
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => bail!("--path {} leaves the file set (`..`); name a file or directory inside it, e.g. docs/report.txt", subpath.display()),
        }
    }
    if out.as_os_str().is_empty() {
        bail!("--path {} names the whole file set; leave --path out to restore all of it", subpath.display());
    }
    Ok(out)
}

/// Makes `which` snapshot of `policy`'s file set, as held on this node, available at `to`:
/// the whole file set, or only `subpath` within it.
pub async fn restore(config: &LoadedConfig, policy: &Policy, which: &Which, to: &str, subpath: Option<&Path>) -> Result<Restored> {
    let held = held(config, policy).await?;
    let chosen = pick(&held, which)?.clone();
    let name = chosen.name.clone();
    match (subpath, &chosen.place) {
        (None, Place::Btrfs(source)) => {
            let target = check_new_path(config, policy, to).await?;
            copy::btrfs_writable_snapshot(source, &target).await?;
            Ok(Restored { snapshot: name, from: source.display().to_string(), to: target.display().to_string(), how: "a writable btrfs snapshot" })
        }
        (None, Place::Zfs { dataset }) => {
            check_new_dataset(config, policy, to).await?;
            let snap = format!("{dataset}@{name}");
            copy::zfs_clone(&snap, to).await?;
            Ok(Restored {
                snapshot: name,
                from: snap,
                to: to.to_string(),
                how: "a writable ZFS clone (destroy it with `zfs destroy` when done; until then the snapshot is kept)",
            })
        }
        (Some(subpath), place) => {
            let live = (policy.backend == BackendKind::Btrfs).then(|| Path::new(&policy.origin.path));
            let rel = inside_path(subpath, live)?;
            let root = match place {
                Place::Btrfs(path) => path.clone(),
                Place::Zfs { dataset } => copy::zfs_snapshot_dir(dataset, name.as_str()).await?,
            };
            let source = resolve_inside(&root, &rel, &name)?;
            let target = check_new_path(config, policy, to).await?;
            copy::copy_tree(&source, &target).await?;
            Ok(Restored {
                snapshot: name.clone(),
                from: format!("{} in {}", rel.display(), place.shown(&name)),
                to: target.display().to_string(),
                how: "a copy",
            })
        }
    }
}

/// `rel` within the snapshot at `root`, refusing a path that leads out of it through a
/// symlink (the last component itself is copied as it is, a symlink as a symlink).
pub fn resolve_inside(root: &Path, rel: &Path, name: &SnapshotName) -> Result<PathBuf> {
    let root = std::fs::canonicalize(root).map_err(|e| anyhow!("cannot open snapshot {}: {e}", root.display()))?;
    let wanted = root.join(rel);
    let missing = || anyhow!("{} is not in snapshot {name} (taken {}); `ls {}` shows what is", rel.display(), shown_time(name), root.display());
    let parent = wanted.parent().expect("rel is not empty");
    let parent = std::fs::canonicalize(parent).map_err(|_| missing())?;
    if !parent.starts_with(&root) {
        bail!("{} leads out of snapshot {name} through a symlink; name the file where the link points, inside the file set", rel.display());
    }
    let source = parent.join(wanted.file_name().expect("a normal last component"));
    std::fs::symlink_metadata(&source).map_err(|_| missing())?;
    Ok(source)
}

/// `to` as a new path to restore into: it must not exist, its parent must, and it must lie
/// outside the live file set, the snapshot directory and this node's replica directory.
pub async fn check_new_path(config: &LoadedConfig, policy: &Policy, to: &str) -> Result<PathBuf> {
    let given = Path::new(to);
    if std::fs::symlink_metadata(given).is_ok() {
        bail!("{to} already exists; restore never overwrites anything: choose a path that does not exist (or move it away first)");
    }
    let Some(file_name) = given.file_name() else {
        bail!("--to {to} does not name a new file or directory");
    };
    let parent = match given.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent = std::fs::canonicalize(&parent).map_err(|e| anyhow!("cannot use {}: {e}; create the directory {} first", to, parent.display()))?;
    let target = parent.join(file_name);
    for (root, what) in forbidden_dirs(config, policy).await {
        let root = std::fs::canonicalize(&root).unwrap_or(root);
        if target.starts_with(&root) {
            bail!("{to} is inside {what} ({}); restore never writes there: choose a path outside it", root.display());
        }
    }
    Ok(target)
}

/// The directories of `policy`'s file set a restore must never write into, as this node
/// knows them.
async fn forbidden_dirs(config: &LoadedConfig, policy: &Policy) -> Vec<(PathBuf, String)> {
    let fileset = &policy.fileset;
    let mut out = Vec::new();
    match policy.backend {
        BackendKind::Btrfs => {
            out.push((PathBuf::from(&policy.origin.path), format!("the live file set `{fileset}`")));
            out.push((policy.snapshot_dir(), format!("the snapshot directory of `{fileset}`")));
            for r in policy.replicas.iter().filter(|r| r.node == config.node.node) {
                out.push((PathBuf::from(&r.path), format!("the replica directory of `{fileset}`")));
            }
        }
        BackendKind::Zfs => {
            let here = &config.node.node;
            let mut datasets = Vec::new();
            if policy.origin.node == *here {
                datasets.push((policy.origin.path.clone(), format!("the live file set `{fileset}`")));
            }
            for r in policy.replicas.iter().filter(|r| r.node == *here) {
                datasets.push((r.path.clone(), format!("the replica dataset of `{fileset}`")));
            }
            for (dataset, what) in datasets {
                if let Ok(Some(mountpoint)) = copy::zfs_mountpoint(&dataset).await {
                    out.push((mountpoint, what));
                }
            }
        }
    }
    out
}

/// `to` as a new ZFS dataset for a clone: a dataset name that does not exist, outside the
/// live dataset and this node's replica dataset.
pub async fn check_new_dataset(config: &LoadedConfig, policy: &Policy, to: &str) -> Result<()> {
    if to.starts_with('/') || !to.contains('/') {
        bail!(
            "with ZFS, --to names the new dataset to clone into (e.g. {}/restore), not a path; to copy files into a directory, add --path",
            policy.origin.path.split('/').next().unwrap_or("pool")
        );
    }
    let here = &config.node.node;
    let mut taken = vec![(policy.origin.path.as_str(), "the live file set")];
    taken.extend(policy.replicas.iter().filter(|r| r.node == *here).map(|r| (r.path.as_str(), "the replica dataset")));
    for (dataset, what) in taken {
        if to == dataset || to.starts_with(&format!("{dataset}/")) {
            bail!("{to} is inside {what} of `{}` ({dataset}); restore never writes there: choose a dataset outside it", policy.fileset);
        }
    }
    if copy::zfs_exists(to).await? {
        bail!("dataset {to} already exists; restore never overwrites anything: choose a name that does not exist");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(names: &[&str]) -> Vec<Held> {
        names.iter().map(|n| Held { name: SnapshotName::parse(n).unwrap(), place: Place::Btrfs(PathBuf::from("/snap").join(n)) }).collect()
    }

    const A: &str = "snapship-20261201T080000.000Z";
    const B: &str = "snapship-20261201T090000.000Z-c";
    const C: &str = "snapship-20261201T100000.000Z";

    fn at(text: &str) -> Which {
        Which::At(DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc))
    }

    #[test]
    fn picks_the_newest_at_or_before() {
        let h = held(&[A, B, C]);
        assert_eq!(pick(&h, &at("2026-12-01T09:00:00Z")).unwrap().name.as_str(), B, "exactly at a snapshot");
        assert_eq!(pick(&h, &at("2026-12-01T09:59:59.999Z")).unwrap().name.as_str(), B, "between two");
        assert_eq!(pick(&h, &at("2026-12-01T10:00:00Z")).unwrap().name.as_str(), C);
        assert_eq!(pick(&h, &at("2030-01-01T00:00:00Z")).unwrap().name.as_str(), C, "after the newest");
        let e = pick(&h, &at("2026-12-01T07:59:59.999Z")).unwrap_err().to_string();
        assert!(e.contains("the oldest this node holds is snapship-20261201T080000.000Z (taken 2026-12-01 08:00:00.000 UTC)"), "{e}");
        assert!(pick(&[], &at("2026-12-01T09:00:00Z")).unwrap_err().to_string().contains("holds no snapshot"));
    }

    #[test]
    fn by_name_with_or_without_the_prefix_and_nearest_names_otherwise() {
        let h = held(&[A, B, C]);
        assert_eq!(pick(&h, &Which::Named(B.into())).unwrap().name.as_str(), B);
        assert_eq!(pick(&h, &Which::Named("20261201T100000.000Z".into())).unwrap().name.as_str(), C);
        // A mistyped time: the nearest by time.
        let e = pick(&h, &Which::Named("snapship-20261201T095900.000Z".into())).unwrap_err().to_string();
        assert!(e.contains(&format!("nearest it holds: {A}, {B}, {C}")), "{e}");
        let more = held(&[A, B, C, "snapship-20261202T000000.000Z"]);
        let e = pick(&more, &Which::Named("snapship-20261201T0800".into())).unwrap_err().to_string();
        assert!(e.contains(&format!("nearest it holds: {A}, {B}, {C}")), "{e}");
        let e = pick(&h, &Which::Named("backup-monday".into())).unwrap_err().to_string();
        assert!(e.contains("no snapshot named `backup-monday`") && e.contains("snapship list"), "{e}");
    }

    #[test]
    fn subpaths_stay_inside_the_file_set() {
        let live = Some(Path::new("/srv/projects"));
        assert_eq!(inside_path(Path::new("docs/a.txt"), live).unwrap(), Path::new("docs/a.txt"));
        assert_eq!(inside_path(Path::new("/docs/a.txt"), live).unwrap(), Path::new("docs/a.txt"));
        assert_eq!(inside_path(Path::new("/srv/projects/docs/a.txt"), live).unwrap(), Path::new("docs/a.txt"));
        assert_eq!(inside_path(Path::new("./docs/"), live).unwrap(), Path::new("docs"));
        assert!(inside_path(Path::new("docs/../../etc"), live).unwrap_err().to_string().contains("leaves the file set"));
        assert!(inside_path(Path::new("/srv/projects"), live).unwrap_err().to_string().contains("leave --path out"));
        assert!(inside_path(Path::new("."), None).is_err());
    }
}
