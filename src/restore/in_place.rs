//! `snapship restore --in-place`: the live file set itself goes back to a snapshot, and what
//! it held is kept, never lost (docs/restore.md, "Restoring in place").
//!
//! Only on the file set's current origin (a replica's copies are read-only: promote it
//! first), and only with no `snapship run` using this node's `state_dir` (the caller holds
//! its lock): the daemon snapshots and ships the live file set, and would otherwise race
//! the swap. btrfs, read top-down in [`btrfs`]:
//! 1. a writable snapshot of the chosen one beside the live subvolume, under a hidden name;
//! 2. one `renameat2(RENAME_EXCHANGE)` swaps the two: the live path is the restored copy at
//!    once, and the hidden name holds the live subvolume as it was (writes racing the swap
//!    land in it, so none are lost);
//! 3. that subvolume gets its kept name, `NAME.before-restore-TIME` beside the live path,
//!    and is made read-only. It is outside the snapshot directory, so retention never sees
//!    it; only the admin deletes it.
//!
//! A failure before step 2 leaves the live file set as it was (the new copy is removed);
//! after it, the error says where the kept state is.
//!
//! ZFS (`snapshot::zfs::swap_in_place`): no rollback (it would destroy every later snapshot):
//! the live state is snapshotted, a clone of the chosen snapshot is promoted (the history up
//! to it moves into the clone) and takes the live name; the old dataset, with the later
//! snapshots and the live state, is kept read-only as `DATASET.before-restore-TIME`. Not
//! atomic as the btrfs swap is: two renames (see docs/restore.md).

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use chrono::Utc;

use super::{Place, Which, held, pick};
use crate::config::{BackendKind, LoadedConfig, Policy};
use crate::snapshot::{SnapshotName, copy};

/// What an in-place restore did.
#[derive(Debug)]
pub struct InPlace {
    pub snapshot: SnapshotName,
    /// The live file set, now the chosen snapshot's content.
    pub live: String,
    /// Where the live state from before is kept (read-only unless `warning` says otherwise).
    pub kept: String,
    /// Something that went wrong after the swap, which lost nothing.
    pub warning: Option<String>,
    /// How to delete the kept state once it is no longer needed (the command, in backticks).
    pub forget: String,
}

/// Restores `policy`'s live file set on this node to `which` snapshot; `origin_now` is the
/// file set's current origin (from the epoch). The caller holds the `state_dir` lock.
pub async fn restore_in_place(config: &LoadedConfig, policy: &Policy, origin_now: &str, which: &Which) -> Result<InPlace> {
    let here = config.node.node.0.as_str();
    let fileset = &policy.fileset;
    if origin_now != here {
        bail!(
            "node `{here}` is not the origin of `{fileset}` (`{origin_now}` is): a replica's copies are read-only and it has no live file set to restore. \
             Run restore --in-place on `{origin_now}`; or, to serve the file set from here, `snapship promote {fileset}` first; \
             or restore a copy beside with --to PATH"
        );
    }
    let live = policy.live_on(here).ok_or_else(|| anyhow!("node `{here}` is not a member of `{fileset}`"))?;
    let held = held(config, policy).await?;
    let chosen = pick(&held, which)?.clone();
    match (&chosen.place, policy.backend) {
        (Place::Btrfs(source), BackendKind::Btrfs) => btrfs(source, Path::new(&live), chosen.name).await,
        (Place::Zfs { dataset }, BackendKind::Zfs) if *dataset == live => {
            let swapped = crate::snapshot::zfs::swap_in_place(dataset, &chosen.name).await?;
            // The origin's holds for its replicas moved with the later snapshots.
            let forget = format!("`zfs destroy -r {}` (after `zfs release snapship:MEMBER` of any hold on its snapshots)", swapped.kept);
            Ok(InPlace { snapshot: chosen.name, live, kept: swapped.kept, warning: swapped.warning, forget })
        }
        (place, _) => bail!(
            "{} is not in the live file set {live} (a promoted replica's dataset moved by `promote_path:`?): restore a copy beside with --to, and switch by hand",
            place.shown(&chosen.name)
        ),
    }
}

/// The btrfs swap (see the module's comment).
async fn btrfs(source: &Path, live: &Path, snapshot: SnapshotName) -> Result<InPlace> {
    let checked = live.to_path_buf();
    let (parent, name) = tokio::task::spawn_blocking(move || names(&checked)).await??;
    let stamp = Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let restoring = parent.join(format!(".{name}.snapship-restoring-{stamp}"));
    let kept = parent.join(format!("{name}.before-restore-{stamp}"));
    copy::btrfs_writable_snapshot(source, &restoring).await.map_err(|e| e.context(format!("nothing changed: {} is as it was", live.display())))?;
    let (live, restoring2, kept2) = (live.to_path_buf(), restoring.clone(), kept.clone());
    tokio::task::spawn_blocking(move || swap(&live, &restoring2, &kept2, snapshot)).await?
}

/// The live subvolume's directory and name, once checked: a writable subvolume.
fn names(live: &Path) -> Result<(PathBuf, String)> {
    match libbtrfsutil::is_subvolume(live) {
        Ok(true) => {}
        Ok(false) => bail!("{} is not a btrfs subvolume: nothing to restore in place", live.display()),
        Err(e) => bail!("cannot use {} as a btrfs subvolume: {e}", live.display()),
    }
    if libbtrfsutil::subvolume_read_only(live).unwrap_or(false) {
        bail!("{} is read-only (frozen by a switchover or a step-down): this node does not serve it as the origin now; nothing changed", live.display());
    }
    let parent = live.parent().filter(|p| !p.as_os_str().is_empty()).ok_or_else(|| anyhow!("{} has no parent directory", live.display()))?;
    let name = live.file_name().ok_or_else(|| anyhow!("{} names no subvolume", live.display()))?.to_string_lossy().into_owned();
    Ok((parent.to_path_buf(), name))
}

/// Steps 2 and 3: swaps `restoring` (the new copy) and `live` atomically, then gives the old
/// live subvolume its kept name and makes it read-only.
fn swap(live: &Path, restoring: &Path, kept: &Path, snapshot: SnapshotName) -> Result<InPlace> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    if let Err(e) = renameat_with(CWD, restoring, CWD, live, RenameFlags::EXCHANGE) {
        let cleanup = match libbtrfsutil::delete_subvolume(restoring) {
            Ok(()) => String::new(),
            Err(d) => format!("; remove the unused copy {} with `btrfs subvolume delete` ({d})", restoring.display()),
        };
        bail!("cannot swap {} with the restored copy: {e}; nothing changed: {} is as it was{cleanup}", live.display(), live.display());
    }
    // From here on the live path is the restored copy; the old live state is at `restoring`.
    let mut done = InPlace { snapshot, live: live.display().to_string(), kept: kept.display().to_string(), warning: None, forget: String::new() };
    if let Err(e) = renameat_with(CWD, restoring, CWD, kept, RenameFlags::NOREPLACE) {
        done.kept = restoring.display().to_string();
        done.warning = Some(format!("could not rename it to {} ({e}); it is kept under the hidden name", kept.display()));
    }
    done.forget = format!("`btrfs subvolume delete {}`", done.kept);
    let at = PathBuf::from(&done.kept);
    if let Err(e) = libbtrfsutil::set_subvolume_read_only(&at, true) {
        let w = format!("could not make it read-only ({e}); it is kept writable");
        done.warning = Some(done.warning.map_or(w.clone(), |old| format!("{old}; {w}")));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(node: &str, backend: &str) -> LoadedConfig {
        let other = if node == "alpha" { "beta" } else { "alpha" };
        let dir = Path::new("/nonexistent");
        let node = crate::config::parse_node_text(
            &dir.join("n.yaml"),
            &format!("node: {node}\nstate_dir: s\ntls:\n  ca: ca.pem\n  cert: c.pem\n  key: c.key\npeers:\n  {other}: 127.0.0.1:1\npolicies: []\n"),
        )
        .unwrap();
        let text = format!(
            "fileset: p\nbackend: {backend}\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: /nonexistent/p\nreplicas:\n  - node: beta\n    path: /nonexistent/b\n"
        );
        let policy = crate::config::parse_policy_text(&dir.join("p.yaml"), &text, &node).unwrap();
        LoadedConfig { node, policies: vec![policy], errors: vec![] }
    }

    #[tokio::test]
    async fn a_replica_refuses_and_says_to_promote_first() {
        // beta, a replica while alpha is the origin.
        let config = loaded("beta", "btrfs");
        let e = restore_in_place(&config, &config.policies[0], "alpha", &Which::Named("x".into())).await.unwrap_err().to_string();
        assert!(e.contains("read-only") && e.contains("snapship promote p") && e.contains("on `alpha`"), "{e}");
        // alpha after beta was promoted: alpha is a replica now.
        let config = loaded("alpha", "btrfs");
        let e = restore_in_place(&config, &config.policies[0], "beta", &Which::Named("x".into())).await.unwrap_err().to_string();
        assert!(e.contains("not the origin of `p` (`beta` is)"), "{e}");
    }
}
