//! Writable copies of snapshots this node holds, for `snapshot restore`. Nothing here writes
//! to a snapshot or to the live file set: each function makes something new at `target`.
//!
//! - btrfs: a writable snapshot of the read-only one (instant, shares every extent);
//! - ZFS: a clone of `dataset@snapshot` (instant; it stays dependent on the snapshot, so
//!   retention cannot destroy that snapshot until the clone is destroyed or promoted);
//! - one file or directory out of a snapshot: `cp -a --reflink=auto` (mode, owner, times,
//!   xattrs, ACLs; extents shared where the filesystem can).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use super::runner::Cmd;

/// Makes `target` (which must not exist) a writable btrfs snapshot of the subvolume `source`.
pub async fn btrfs_writable_snapshot(source: &Path, target: &Path) -> Result<()> {
    let (source, target) = (source.to_path_buf(), target.to_path_buf());
    tokio::task::spawn_blocking(move || {
        libbtrfsutil::CreateSnapshotOptions::new().create(&source, &target).map_err(|e| {
            if e.errno() == nix::errno::Errno::EXDEV as i32 {
                anyhow!(
                    "cannot snapshot {} to {}: not on the same btrfs filesystem; choose a --to on the filesystem of {} (a writable snapshot cannot cross filesystems), or copy what you need with --path",
                    source.display(),
                    target.display(),
                    source.display()
                )
            } else {
                anyhow!("cannot snapshot {} to {}: {e} ({})", source.display(), target.display(), e.os_error())
            }
        })
    })
    .await
    .context("blocking btrfs task panicked")?
}

/// Makes the dataset `target` (which must not exist) a writable clone of `snapshot`
/// (`dataset@name`).
pub async fn zfs_clone(snapshot: &str, target: &str) -> Result<()> {
    // A clone inherits from its new parent; a parent that is read-only (a replica's) would
    // make a read-only copy.
    Cmd::new("zfs")
        .arg("clone")
        .arg("-o")
        .arg("readonly=off")
        .arg(snapshot)
        .arg(target)
        .output()
        .await
        .map_err(|e| anyhow!("{e}; a clone must be in the same pool as {snapshot}, and its parent dataset must exist (create it with `zfs create -p`)"))?;
    Ok(())
}

/// Whether the ZFS dataset `name` exists.
pub async fn zfs_exists(name: &str) -> Result<bool> {
    match Cmd::new("zfs").arg("list").arg("-H").arg("-o").arg("name").arg(name).output().await {
        Ok(_) => Ok(true),
        Err(e) if e.stderr().contains("does not exist") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Where the files of `dataset@name` can be read: `.zfs/snapshot/NAME` under the dataset's
/// mountpoint. zfs-fuse has no `.zfs` directory: then an error that says what to do instead.
pub async fn zfs_snapshot_dir(dataset: &str, name: &str) -> Result<PathBuf> {
    let Some(mountpoint) = zfs_mountpoint(dataset).await? else {
        bail!(
            "{dataset} is not mounted, so its snapshots' files cannot be read; restore the whole file set (without --path) to a new dataset and copy from it"
        );
    };
    let dir = mountpoint.join(".zfs/snapshot").join(name);
    if !dir.is_dir() {
        bail!(
            "{} is not there (this ZFS shows no `.zfs/snapshot` directory); restore the whole file set (without --path) to a new dataset and copy from it",
            dir.display()
        );
    }
    Ok(dir)
}

/// `used` and `referenced` (bytes) of each snapship snapshot of `dataset`, by snapshot name:
/// the filesystem knows them without reading any data. Empty when the dataset is missing.
pub async fn zfs_sizes(dataset: &str) -> Result<BTreeMap<String, (u64, u64)>> {
    let text = match Cmd::new("zfs")
        .arg("get")
        .arg("-H")
        .arg("-p")
        .arg("-o")
        .arg("name,property,value")
        .arg("-d")
        .arg("1")
        .arg("used,referenced")
        .arg(dataset)
        .output()
        .await
    {
        Ok(text) => text,
        Err(e) if e.stderr().contains("does not exist") => return Ok(BTreeMap::new()),
        Err(e) => return Err(e.into()),
    };
    let prefix = format!("{dataset}@");
    let mut out = BTreeMap::new();
    for (name, props) in super::zfs::parse_properties(&text) {
        let Some(snap) = name.strip_prefix(&prefix) else { continue };
        let get = |p: &str| props.get(p).and_then(|v| v.parse::<u64>().ok());
        if let (Some(used), Some(referenced)) = (get("used"), get("referenced")) {
            out.insert(snap.to_string(), (used, referenced));
        }
    }
    Ok(out)
}

/// Copies the file or directory `source` to `target` (which must not exist) with everything
/// `cp -a` keeps: mode, owner, times, xattrs, ACLs, hard links within it; symlinks are copied
/// as symlinks, never followed. Extents are shared (reflinked) where the filesystem allows.
pub async fn copy_tree(source: &Path, target: &Path) -> Result<()> {
    Cmd::new("cp").arg("-a").arg("--reflink=auto").arg("--no-target-directory").arg(source).arg(target).output().await?;
    Ok(())
}

/// Where the ZFS dataset `dataset` is mounted; `None` when it is not (or does not exist).
pub async fn zfs_mountpoint(dataset: &str) -> Result<Option<PathBuf>> {
    match Cmd::new("zfs").arg("get").arg("-H").arg("-o").arg("value").arg("mountpoint").arg(dataset).output().await {
        Ok(text) => Ok(Some(text.trim()).filter(|m| m.starts_with('/')).map(PathBuf::from)),
        Err(e) if e.stderr().contains("does not exist") => Ok(None),
        Err(e) => Err(e.into()),
    }
}
