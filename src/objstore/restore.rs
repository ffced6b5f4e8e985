//! `snapship restore --from STORE`: a snapshot back out of an object store. The chain of
//! streams that rebuilds it (a full stream, then each incremental on the one before) is
//! downloaded and checked part by part ([`ObjectReplica::download`]) and received in order
//! by the backend's own receive: btrfs into a hidden directory beside `--to`, the last one
//! then becoming `--to` as a writable snapshot and the received steps deleted; ZFS into the
//! new dataset `--to`, made writable. A stream that
//! fails its check fails its receive, so nothing partial is ever left visible.
//!
//! With `--path`, the chain is received into a temporary place (btrfs: the hidden directory
//! beside `--to`; ZFS: a temporary dataset beside the file set's), only that file or
//! directory is copied to `--to` with its metadata (`snapshot::copy::copy_tree`), and the
//! temporary place is removed, on failure too.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use super::ObjectReplica;
use super::chain::{self, Manifest};
use crate::config::{BackendKind, LoadedConfig, Policy};
use crate::restore::{Held, Place, Restored, Which};
use crate::snapshot::btrfs::BtrfsReplica;
use crate::snapshot::runner::Cmd;
use crate::snapshot::zfs::ZfsReplica;
use crate::snapshot::{Incoming, ReplicaSide, Snapshot, SnapshotName, copy};

/// Restores `which` snapshot of `policy`'s file set from the object store `from` at `to`
/// (btrfs: a new path; ZFS: a new dataset), or only `subpath` of it, copied to the new path
/// `to`.
pub async fn restore(config: &LoadedConfig, policy: &Policy, from: &ObjectReplica, which: &Which, to: &str, subpath: Option<&Path>) -> Result<Restored> {
    let manifests = from.manifests().await?;
    let held: Vec<Held> = chain::held(&manifests).into_iter().map(|s| Held { name: s.name, place: Place::Zfs { dataset: s.identity } }).collect();
    let chosen = crate::restore::pick(&held, which).with_context(|| format!("in object store `{}`", from.name))?;
    let Place::Zfs { dataset: identity } = &chosen.place else { unreachable!("made above") };
    let steps = chain::chain(&manifests, identity).ok_or_else(|| anyhow!("the chain of {} is incomplete", chosen.name))?;
    let shown = format!("object store `{}` ({} streams)", from.name, steps.len());
    if let Some(subpath) = subpath {
        let live = (policy.backend == BackendKind::Btrfs).then(|| Path::new(&policy.origin.path));
        let rel = crate::restore::inside_path(subpath, live)?;
        let target = crate::restore::check_new_path(config, policy, to).await?;
        match policy.backend {
            BackendKind::Btrfs => path_from_btrfs(from, &steps, &rel, &target).await?,
            BackendKind::Zfs => path_from_zfs(config, policy, from, &steps, &rel, &target).await?,
        }
        return Ok(Restored {
            snapshot: chosen.name.clone(),
            from: format!("{} in {shown}", rel.display()),
            to: target.display().to_string(),
            how: "a copy (the chain was received into a temporary place, removed afterwards)",
        });
    }
    let (to, how) = match policy.backend {
        BackendKind::Btrfs => (into_btrfs(config, policy, from, &steps, to).await?, "a writable btrfs snapshot of the received chain"),
        BackendKind::Zfs => (into_zfs(config, policy, from, &steps, to).await?, "a writable ZFS dataset received from the chain"),
    };
    Ok(Restored { snapshot: chosen.name.clone(), from: shown, to, how })
}

/// Receives the chain `steps` in order through `side`.
async fn receive_chain(from: &ObjectReplica, steps: &[&Manifest], side: &dyn ReplicaSide) -> Result<Snapshot> {
    let mut last = None;
    for m in steps {
        let name = SnapshotName::parse(&m.snapshot).ok_or_else(|| anyhow!("{} is not a snapshot name", m.snapshot))?;
        let incoming = Incoming { name, identity: m.identity.clone(), base: m.base.clone(), from_token: false, fetched: false };
        let mut stream = from.download(m).await?;
        tracing::info!(snapshot = m.snapshot, bytes = m.size, "receiving a stream from the object store");
        last = Some(side.receive(&incoming, &mut stream).await.with_context(|| format!("receiving {} from object store `{}`", m.snapshot, from.name))?);
    }
    last.ok_or_else(|| anyhow!("an empty chain"))
}

/// btrfs: the chain received into a hidden directory beside `to`, the last snapshot made
/// writable at `to`, the received steps deleted (whatever happened).
async fn into_btrfs(config: &LoadedConfig, policy: &Policy, from: &ObjectReplica, steps: &[&Manifest], to: &str) -> Result<String> {
    let target = crate::restore::check_new_path(config, policy, to).await?;
    let t = target.as_path();
    in_btrfs_staging(from, steps, t, |last| async move { copy::btrfs_writable_snapshot(&last, t).await }).await?;
    Ok(to_string(&target))
}

/// btrfs `--path`: the chain received into the hidden directory beside `target`, `rel` of
/// its last snapshot copied to `target`, the received steps deleted (whatever happened).
async fn path_from_btrfs(from: &ObjectReplica, steps: &[&Manifest], rel: &Path, target: &Path) -> Result<()> {
    in_btrfs_staging(from, steps, target, |last| async move { copy_out(&last, rel, target, steps).await }).await
}

fn to_string(p: &Path) -> String {
    p.display().to_string()
}

/// Receives the chain into a fresh 0700 directory beside `target` (which must be on btrfs),
/// runs `then` on the last received snapshot's path, and deletes the directory and what was
/// received into it, whatever happened.
async fn in_btrfs_staging<F, Fut>(from: &ObjectReplica, steps: &[&Manifest], target: &Path, then: F) -> Result<()>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let parent = target.parent().expect("a checked target has a parent").to_path_buf();
    let staging = parent.join(format!(".snapship-restore-{}-{}", from.policy.fileset, std::process::id()));
    std::fs::create_dir(&staging).map_err(|e| anyhow!("cannot create {}: {e}", staging.display()))?;
    std::fs::set_permissions(&staging, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let side = BtrfsReplica::new(staging.clone());
    let result = async {
        let last = receive_chain(from, steps, &side)
            .await
            .with_context(|| format!("the chain is received beside --to, in {}, which must be on btrfs", staging.display()))?;
        then(staging.join(last.name.as_str())).await
    }
    .await;
    for s in side.list().await.unwrap_or_default() {
        if let Err(e) = side.delete(&s).await {
            tracing::warn!("cannot delete {} in {}: {e:#}", s.name, staging.display());
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&staging) {
        tracing::warn!("cannot remove {}: {e}", staging.display());
    }
    result
}

/// Copies `rel` of the received snapshot at `root` to `target`, with its metadata.
async fn copy_out(root: &Path, rel: &Path, target: &Path, steps: &[&Manifest]) -> Result<()> {
    let last = steps.last().expect("a chain is not empty");
    let name = SnapshotName::parse(&last.snapshot).ok_or_else(|| anyhow!("{} is not a snapshot name", last.snapshot))?;
    let source = crate::restore::resolve_inside(root, rel, &name)?;
    copy::copy_tree(&source, target).await
}

/// ZFS `--path`: the chain received into a temporary dataset beside the file set's dataset
/// on this node, `rel` of it copied to `target`, the dataset destroyed (whatever happened).
async fn path_from_zfs(config: &LoadedConfig, policy: &Policy, from: &ObjectReplica, steps: &[&Manifest], rel: &Path, target: &Path) -> Result<()> {
    let here = &config.node.node;
    let beside = policy.replica_on(here).map(|r| r.path.clone()).unwrap_or_else(|| policy.origin.path.clone());
    let parent = beside.rsplit_once('/').map_or(beside.as_str(), |(p, _)| p).to_string();
    if !copy::zfs_exists(&parent).await.unwrap_or(false) {
        bail!(
            "--path from an object store receives the chain into a temporary dataset under {parent} (beside {beside}), which this node does not have: restore the whole dataset (--to POOL/NAME, without --path), then copy from it"
        );
    }
    let temp = format!("{parent}/snapship-restore-{}-{}", policy.fileset, std::process::id());
    if copy::zfs_exists(&temp).await? {
        bail!("{temp} already exists (left by an earlier restore?): `zfs destroy -r {temp}` once you have looked at it");
    }
    let side = ZfsReplica::new(temp.clone());
    let result = async {
        receive_chain(from, steps, &side).await?;
        // Received unmounted; mounted where the pool puts it (zfs-fuse may have done so).
        let _ = Cmd::new("zfs").arg("mount").arg(&temp).output().await;
        let root = copy::zfs_mountpoint(&temp).await?.ok_or_else(|| anyhow!("the temporary dataset {temp} has no mountpoint"))?;
        copy_out(&root, rel, target, steps).await
    }
    .await;
    if copy::zfs_exists(&temp).await.unwrap_or(true) {
        if let Err(e) = destroy_temporary(&temp).await {
            tracing::error!("cannot destroy the temporary dataset {temp}: {e:#}; `zfs destroy -r {temp}`");
        }
    }
    result
}

/// Unmounts and destroys the temporary dataset `temp`, trying again for a few seconds while
/// ZFS calls it busy (as zfs-fuse does right after the copy read it).
async fn destroy_temporary(temp: &str) -> Result<()> {
    let _ = Cmd::new("zfs").arg("umount").arg(temp).output().await;
    let mut tries = 0;
    loop {
        match Cmd::new("zfs").arg("destroy").arg("-r").arg(temp).output().await {
            Ok(_) => return Ok(()),
            Err(e) if e.stderr().contains("busy") && tries < 40 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// ZFS: the chain received into the new dataset `to`, then made writable; on failure the
/// dataset goes again.
async fn into_zfs(config: &LoadedConfig, policy: &Policy, from: &ObjectReplica, steps: &[&Manifest], to: &str) -> Result<String> {
    crate::restore::check_new_dataset(config, policy, to).await?;
    let side = ZfsReplica::new(to.to_string());
    let result = async {
        receive_chain(from, steps, &side).await?;
        Cmd::new("zfs").arg("set").arg("readonly=off").arg(to).output().await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = result {
        if copy::zfs_exists(to).await.unwrap_or(false) {
            if let Err(de) = Cmd::new("zfs").arg("destroy").arg("-r").arg(to).output().await {
                tracing::error!("cannot destroy the partial restore {to}: {de}");
            }
        }
        return Err(e);
    }
    // Received unmounted; mount it where the pool puts it (zfs-fuse may have done so).
    let _ = Cmd::new("zfs").arg("mount").arg(to).output().await;
    Ok(to.to_string())
}
