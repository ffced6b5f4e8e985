//! `snapship verify` on the origin: proves that a replica's copy of a snapshot holds what the
//! origin's does, content and metadata, by comparing hash trees (`snapshot::tree`).
//!
//! Read top-down: [`verify`] picks the snapshot (the newest both hold, or one by name), has
//! the replica hash its copy while this node hashes its own (both reuse the content hashes
//! of their last verify for files whose inode, size, mtime and ctime are unchanged, unless
//! `full`), compares the roots, and [`descend`]s only into directories whose hashes differ,
//! asking the replica for their entries page by page. The outcome is a [`Verified`] (the
//! differences, each a path and what differs) or an error (could not verify).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::config::{LoadedConfig, Policy};
use crate::observe::metrics as names;
use crate::ship::{ReplicaEndpoint, TreeSource};
use crate::snapshot::tree::{self, Cache, Difference, Tree};
use crate::snapshot::{self, SnapshotName};

/// What one replica's verify found.
#[derive(Debug)]
pub struct Verified {
    pub replica: String,
    pub snapshot: SnapshotName,
    /// Empty when the copies are equal.
    pub differences: Vec<Difference>,
    /// Files this node hashed, and content hashes it reused from its last verify.
    pub hashed: usize,
    pub reused: usize,
    pub elapsed: Duration,
}

/// One replica's outcome as the command prints it (and the daemon sends it over its control
/// socket): the summary, or why it could not be verified.
#[derive(Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub replica: String,
    pub result: Result<Summary, String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Summary {
    pub snapshot: String,
    /// Each difference in words (`M docs/a.txt: content`); empty when equal.
    pub differences: Vec<String>,
    pub hashed: usize,
    pub reused: usize,
    pub seconds: f64,
    /// How the copy was checked, when not by hashing files (an object store's copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub how: Option<String>,
}

impl From<Verified> for Summary {
    fn from(v: Verified) -> Summary {
        Summary {
            snapshot: v.snapshot.to_string(),
            differences: v.differences.iter().map(|d| d.to_string()).collect(),
            hashed: v.hashed,
            reused: v.reused,
            seconds: v.elapsed.as_secs_f64(),
            how: None,
        }
    }
}

/// Verifies `replica`'s copy of `policy`'s file set against this origin's: the snapshot named
/// `which` (with or without the `snapship-` prefix), or the newest both hold.
pub async fn verify(config: &LoadedConfig, policy: &Policy, replica: &dyn ReplicaEndpoint, which: Option<&str>, full: bool) -> Result<Verified> {
    let started = Instant::now();
    let fileset = policy.fileset.0.clone();
    let here = config.node.node.0.as_str();
    let ours = snapshot::origin_on(policy, here)?.list().await.context("cannot list this origin's snapshots")?;
    let theirs = replica.list().await?.snapshots;
    // A copy changed after it was received is still a copy to verify (it is what verify is
    // for), though never a base: its identity carries the tampered mark.
    let received_as = |t: &snapshot::Snapshot| t.identity.strip_prefix(snapshot::btrfs::TAMPERED).unwrap_or(&t.identity).to_string();
    let both: Vec<&snapshot::Snapshot> = ours.iter().filter(|o| theirs.iter().any(|t| received_as(t) == o.identity && t.name == o.name)).collect();
    let chosen = match which {
        Some(text) => {
            let prefixed = format!("{}{text}", snapshot::name::PREFIX);
            let Some(o) = ours.iter().find(|o| o.name.as_str() == text || o.name.as_str() == prefixed) else {
                bail!("this origin holds no snapshot named `{text}` (`snapship list {fileset}` shows which it holds)");
            };
            if !both.iter().any(|b| b.name == o.name) {
                bail!(
                    "replica `{}` holds no received copy of {} (`snapship list {fileset}` shows what it holds; a copy made writable with `btrfs property set -f` lost its received UUID and is no copy any more)",
                    replica.node(),
                    o.name
                );
            }
            o
        }
        None => *both
            .last()
            .ok_or_else(|| anyhow!("origin and replica `{}` hold no snapshot in common yet: run `snapship sync {fileset}` first", replica.node()))?,
    };
    let name = chosen.name.clone();
    // Where this node's copy can be read: a btrfs snapshot as it is; on ZFS a temporary
    // read-only clone, destroyed once hashed, on failures too.
    let state_dir = config.node.state_dir.clone();
    let view =
        snapshot::view(policy, here, true, &name, &state_dir.join("verify-mnt")).await.with_context(|| format!("cannot read this origin's snapshot {name}"))?;
    let root = view.path().to_path_buf();
    // Both sides hash at once: the replica its copy, this node its own.
    let (fs, snap) = (fileset.clone(), name.to_string());
    let local = tokio::task::spawn_blocking(move || -> Result<Tree> {
        let dir = tree::cache_dir(&state_dir, &fs, "origin");
        let cache = if full { Cache::default() } else { tree::load_cache(&dir) };
        let tree = Tree::compute(&root, &cache, tree::hash_workers()).with_context(|| format!("cannot hash this origin's snapshot {snap}"))?;
        if let Err(e) = tree::save_cache(&dir, &tree::cache_of(&tree, &snap)) {
            tracing::warn!(fileset = %fs, "cannot keep the verify cache: {e:#}");
        }
        Ok(tree)
    });
    let (local, remote) = tokio::join!(local, replica.verify(&name, full));
    let closed = view.close().await;
    let (local, mut remote) = (local??, remote?);
    closed?;
    let differences = descend(&local, remote.as_mut()).await?;
    remote.done().await?;
    let verified =
        Verified { replica: replica.node().to_string(), snapshot: name, differences, hashed: local.hashed, reused: local.reused, elapsed: started.elapsed() };
    record(&fileset, &verified);
    Ok(verified)
}

/// The differences between `origin`'s tree and `replica`'s, asking the replica only for the
/// directories whose hashes differ.
pub async fn descend(origin: &Tree, replica: &mut dyn TreeSource) -> Result<Vec<Difference>> {
    let mut out = Vec::new();
    let root_differs = tree::entry_differences(&origin.root, replica.root());
    if !root_differs.is_empty() {
        out.push(Difference::Modified { path: String::new(), what: root_differs });
    }
    if origin.root.hash == replica.root().hash {
        return Ok(out);
    }
    let mut todo = vec![String::new()];
    while let Some(at) = todo.pop() {
        let ours = origin.dir(&at).ok_or_else(|| anyhow!("{at:?} is not a directory of this origin's tree"))?;
        let theirs = replica.dir(&at).await?;
        let (differences, below) = tree::compare_entries(&at, ours, &theirs);
        out.extend(differences);
        // Depth first, in name order.
        todo.extend(below.into_iter().rev());
    }
    Ok(out)
}

/// Logs the outcome (a mismatch as an error) and counts the differences.
fn record(fileset: &str, v: &Verified) {
    let n = v.differences.len();
    metrics::counter!(names::VERIFY_MISMATCHES, "fileset" => fileset.to_string(), "replica" => v.replica.clone()).increment(n as u64);
    if n == 0 {
        tracing::info!(%fileset, replica = %v.replica, snapshot = %v.snapshot, hashed = v.hashed, reused = v.reused, seconds = v.elapsed.as_secs_f64(), "verified: equal");
    } else {
        for d in &v.differences {
            tracing::error!(%fileset, replica = %v.replica, snapshot = %v.snapshot, "verify: {d}");
        }
        tracing::error!(%fileset, replica = %v.replica, snapshot = %v.snapshot, differences = n, "verify: the replica's copy differs from the origin's");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ship::LocalTree;

    #[tokio::test]
    async fn descends_only_where_hashes_differ() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        for d in [&a, &b] {
            for sub in ["same", "changed/deeper"] {
                std::fs::create_dir_all(d.join(sub)).unwrap();
            }
            std::fs::write(d.join("same/f"), "1").unwrap();
            std::fs::write(d.join("changed/deeper/g"), "2").unwrap();
        }
        std::fs::write(b.join("changed/deeper/g"), "3").unwrap();
        // Directory mtimes are made equal so that only the content differs.
        for rel in ["", "same", "changed", "changed/deeper", "same/f", "changed/deeper/g"] {
            let t = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec { tv_sec: 1, tv_nsec: 0 },
                last_modification: rustix::fs::Timespec { tv_sec: 1, tv_nsec: 0 },
            };
            for d in [&a, &b] {
                rustix::fs::utimensat(rustix::fs::CWD, d.join(rel), &t, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).unwrap();
            }
        }
        let origin = Tree::compute(&a, &Cache::default(), 2).unwrap();
        let mut replica = LocalTree(Tree::compute(&b, &Cache::default(), 2).unwrap());
        let found = descend(&origin, &mut replica).await.unwrap();
        assert_eq!(found.iter().map(|d| d.to_string()).collect::<Vec<_>>(), vec!["M changed/deeper/g: content"]);
        let mut same = LocalTree(Tree::compute(&a, &Cache::default(), 2).unwrap());
        assert!(descend(&origin, &mut same).await.unwrap().is_empty());
    }
}
