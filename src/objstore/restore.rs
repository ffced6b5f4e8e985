//! `snapship restore --from STORE`: a snapshot back out of an object store. The chain of
//! streams that rebuilds it (a full stream, then each incremental on the one before) is
//! downloaded and checked part by part ([`ObjectReplica::download`]) and received in order
//! by the backend's own receive, into a hidden directory beside `--to` (btrfs); the last one
//! becomes `--to` as a writable snapshot, and the received steps are deleted. A stream that
//! fails its check fails its receive, so nothing partial is ever left visible.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};

use super::{ObjectReplica, chain};
use crate::config::{BackendKind, LoadedConfig, Policy};
use crate::restore::{Held, Place, Restored, Which};
use crate::snapshot::btrfs::BtrfsReplica;
use crate::snapshot::{Incoming, ReplicaSide, SnapshotName, copy};

/// Restores `which` snapshot of `policy`'s file set from the object store `from` at `to`.
pub async fn restore(config: &LoadedConfig, policy: &Policy, from: &ObjectReplica, which: &Which, to: &str) -> Result<Restored> {
    if policy.backend != BackendKind::Btrfs {
        bail!("restoring from an object store is done for btrfs only so far; ZFS file sets cannot be restored from `{}` yet", from.name);
    }
    let manifests = from.manifests().await?;
    let held: Vec<Held> = chain::held(&manifests).into_iter().map(|s| Held { name: s.name, place: Place::Btrfs(PathBuf::from(&s.identity)) }).collect();
    let chosen = crate::restore::pick(&held, which).with_context(|| format!("in object store `{}`", from.name))?;
    let Place::Btrfs(identity) = &chosen.place else { unreachable!("made above") };
    let identity = identity.to_string_lossy().into_owned();
    let steps = chain::chain(&manifests, &identity).ok_or_else(|| anyhow!("the chain of {} is incomplete", chosen.name))?;
    let target = crate::restore::check_new_path(config, policy, to).await?;
    let parent = target.parent().expect("a checked target has a parent").to_path_buf();
    let staging = parent.join(format!(".snapship-restore-{}-{}", policy.fileset, std::process::id()));
    std::fs::create_dir(&staging).map_err(|e| anyhow!("cannot create {}: {e}", staging.display()))?;
    std::fs::set_permissions(&staging, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let side = BtrfsReplica::new(staging.clone());
    let result = async {
        let mut last = None;
        for m in &steps {
            let name = SnapshotName::parse(&m.snapshot).ok_or_else(|| anyhow!("{} is not a snapshot name", m.snapshot))?;
            let incoming = Incoming { name: name.clone(), identity: m.identity.clone(), base: m.base.clone(), from_token: false };
            let mut stream = from.download(m).await?;
            tracing::info!(snapshot = m.snapshot, bytes = m.size, "receiving a stream from the object store");
            last = Some(side.receive(&incoming, &mut stream).await.with_context(|| format!("receiving {} from object store `{}`", m.snapshot, from.name))?);
        }
        let last = last.expect("a chain has a stream");
        copy::btrfs_writable_snapshot(&staging.join(last.name.as_str()), &target).await
    }
    .await;
    // The received steps go, whatever happened; the restored copy stays.
    for s in side.list().await.unwrap_or_default() {
        if let Err(e) = side.delete(&s).await {
            tracing::warn!("cannot delete {} in {}: {e:#}", s.name, staging.display());
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&staging) {
        tracing::warn!("cannot remove {}: {e}", staging.display());
    }
    result?;
    Ok(Restored {
        snapshot: chosen.name.clone(),
        from: format!("object store `{}` ({} streams)", from.name, steps.len()),
        to: target.display().to_string(),
        how: "a writable btrfs snapshot of the received chain",
    })
}
