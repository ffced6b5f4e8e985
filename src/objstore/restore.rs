//! `snapship restore --from STORE`: a snapshot back out of an object store. The chain of
//! streams that rebuilds it (a full stream, then each incremental on the one before) is
//! downloaded and checked part by part ([`ObjectReplica::download`]) and received in order
//! by the backend's own receive: btrfs into a hidden directory beside `--to`, the last one
//! then becoming `--to` as a writable snapshot and the received steps deleted; ZFS into the
//! new dataset `--to`, made writable. A stream that
//! fails its check fails its receive, so nothing partial is ever left visible.

use anyhow::{Context, Result, anyhow};

use super::ObjectReplica;
use super::chain::{self, Manifest};
use crate::config::{BackendKind, LoadedConfig, Policy};
use crate::restore::{Held, Place, Restored, Which};
use crate::snapshot::btrfs::BtrfsReplica;
use crate::snapshot::runner::Cmd;
use crate::snapshot::zfs::ZfsReplica;
use crate::snapshot::{Incoming, ReplicaSide, Snapshot, SnapshotName, copy};

/// Restores `which` snapshot of `policy`'s file set from the object store `from` at `to`
/// (btrfs: a new path; ZFS: a new dataset).
pub async fn restore(config: &LoadedConfig, policy: &Policy, from: &ObjectReplica, which: &Which, to: &str) -> Result<Restored> {
    let manifests = from.manifests().await?;
    let held: Vec<Held> = chain::held(&manifests).into_iter().map(|s| Held { name: s.name, place: Place::Zfs { dataset: s.identity } }).collect();
    let chosen = crate::restore::pick(&held, which).with_context(|| format!("in object store `{}`", from.name))?;
    let Place::Zfs { dataset: identity } = &chosen.place else { unreachable!("made above") };
    let steps = chain::chain(&manifests, identity).ok_or_else(|| anyhow!("the chain of {} is incomplete", chosen.name))?;
    let (to, how) = match policy.backend {
        BackendKind::Btrfs => (into_btrfs(config, policy, from, &steps, to).await?, "a writable btrfs snapshot of the received chain"),
        BackendKind::Zfs => (into_zfs(config, policy, from, &steps, to).await?, "a writable ZFS dataset received from the chain"),
    };
    Ok(Restored { snapshot: chosen.name.clone(), from: format!("object store `{}` ({} streams)", from.name, steps.len()), to, how })
}

/// Receives the chain `steps` in order through `side`.
async fn receive_chain(from: &ObjectReplica, steps: &[&Manifest], side: &dyn ReplicaSide) -> Result<Snapshot> {
    let mut last = None;
    for m in steps {
        let name = SnapshotName::parse(&m.snapshot).ok_or_else(|| anyhow!("{} is not a snapshot name", m.snapshot))?;
        let incoming = Incoming { name, identity: m.identity.clone(), base: m.base.clone(), from_token: false };
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
    let parent = target.parent().expect("a checked target has a parent").to_path_buf();
    let staging = parent.join(format!(".snapship-restore-{}-{}", policy.fileset, std::process::id()));
    std::fs::create_dir(&staging).map_err(|e| anyhow!("cannot create {}: {e}", staging.display()))?;
    std::fs::set_permissions(&staging, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let side = BtrfsReplica::new(staging.clone());
    let result = async {
        let last = receive_chain(from, steps, &side).await?;
        copy::btrfs_writable_snapshot(&staging.join(last.name.as_str()), &target).await
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
    result?;
    Ok(target.display().to_string())
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
