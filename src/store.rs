//! Small files a node keeps in its `state_dir`, and the one that decides roles: the epoch of
//! each file set.
//!
//! A file set starts at epoch 0 with the policy's `origin`. Promoting a replica makes epoch
//! N+1 with that node as origin; every member keeps the newest epoch it has seen in
//! `state_dir/epochs/FILESET.json`, and the protocol carries it (list, begin, their answers).
//! A node refuses data from an origin whose epoch is older than the newest it knows
//! (fencing), and an origin that learns a newer epoch stops at once. The policy file stays
//! the same on every node: it names the members and the *initial* origin.
//!
//! Every file here is written atomically (temp file, fsync, rename, fsync of the directory):
//! a crash leaves the old or the new content, never a mix.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::Policy;

/// Who is a file set's origin, and since which promotion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Epoch {
    pub number: u64,
    pub origin: String,
}

impl Epoch {
    /// Epoch 0 of `policy`: its initial origin.
    pub fn initial(policy: &Policy) -> Epoch {
        Epoch { number: 0, origin: policy.origin.node.0.clone() }
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "epoch {} (origin `{}`)", self.number, self.origin)
    }
}

/// What a node remembers of a file set's epochs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: Epoch,
    /// When this node promoted itself, and from which of its snapshots (the failover's RPO).
    #[serde(default)]
    pub promoted_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub promoted_from: Option<String>,
    /// Data this node wrote as origin after the newest snapshot the new origin had: kept
    /// read-only under these names, never deleted by snapship.
    #[serde(default)]
    pub diverged: Vec<String>,
}

/// The most promotions an epoch learned from a peer may be ahead of the one this node knows.
/// Each promotion or switchover adds one; a member away through more than this many is not
/// plausible, while an epoch far ahead (up to `u64::MAX`, past which nobody could ever be
/// promoted) would fence every later origin off for good.
pub const MAX_EPOCH_STEP: u64 = 1000;

/// Why this node does not follow `seen`, an epoch newer than `known`, if it does not: its
/// policy does not let `seen`'s origin be origin, or `seen` is [`implausible`].
pub fn unfollowed(policy: &Policy, known: &Epoch, seen: &Epoch) -> Option<String> {
    policy.origin_refusal(&seen.origin).or_else(|| implausible(known, seen))
}

/// Why `seen` is not believable next to `known`, if it is not.
pub fn implausible(known: &Epoch, seen: &Epoch) -> Option<String> {
    let ahead = seen.number.saturating_sub(known.number);
    (ahead > MAX_EPOCH_STEP)
        .then(|| format!("it is {ahead} promotions past epoch {} that this node knows, more than the {MAX_EPOCH_STEP} any real history has", known.number))
}

/// The epochs of every file set on this node; watchers hear of each change. Records are
/// read from their files each time (they are small): the daemon and a one-shot command
/// (`snapship diverged --remove`, `promote` without a daemon) then agree. Writes are
/// serialised within a process by `writing`.
pub struct EpochStore {
    dir: PathBuf,
    writing: Mutex<()>,
    changed: watch::Sender<u64>,
}

impl EpochStore {
    /// The store under `state_dir/epochs`; records are read when first asked for.
    pub fn open(state_dir: &Path) -> EpochStore {
        EpochStore { dir: state_dir.join("epochs"), writing: Mutex::default(), changed: watch::channel(0).0 }
    }

    fn path(&self, fileset: &str) -> PathBuf {
        self.dir.join(format!("{fileset}.json"))
    }

    /// This node's record of `policy`'s file set (epoch 0 when it has none).
    pub fn record(&self, policy: &Policy) -> Result<EpochRecord> {
        let path = self.path(&policy.fileset.0);
        let record = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a valid epoch file; ask a member for the current epoch before moving it away", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                EpochRecord { epoch: Epoch::initial(policy), promoted_at: None, promoted_from: None, diverged: Vec::new() }
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        Ok(record)
    }

    /// The current epoch of `policy`'s file set as this node knows it.
    pub fn current(&self, policy: &Policy) -> Result<Epoch> {
        Ok(self.record(policy)?.epoch)
    }

    /// Changes the record and writes it out before returning.
    fn update(&self, policy: &Policy, change: impl FnOnce(&mut EpochRecord) -> Result<()>) -> Result<EpochRecord> {
        let _one = self.writing.lock().expect("epochs lock");
        let mut record = self.record(policy)?;
        change(&mut record)?;
        write_atomically(&self.path(&policy.fileset.0), &serde_json::to_vec_pretty(&record)?)?;
        self.changed.send_modify(|n| *n += 1);
        Ok(record)
    }

    /// Adopts `seen` when it is newer than what this node knows; whether it was.
    pub fn learn(&self, policy: &Policy, seen: &Epoch) -> Result<bool> {
        let known = self.current(policy)?;
        if seen.number <= known.number {
            return Ok(false);
        }
        if let Some(why) = unfollowed(policy, &known, seen) {
            bail!("refusing epoch {}: {why}", seen.number);
        }
        let mut newer = false;
        // Compared again under the write lock: two learns at once never move it back.
        self.update(policy, |r| {
            newer = seen.number > r.epoch.number;
            if newer {
                r.epoch = seen.clone();
            }
            Ok(())
        })?;
        if newer {
            tracing::warn!(fileset = %policy.fileset, "learned a newer {seen}");
        }
        Ok(newer)
    }

    /// Makes `node` the origin in a new epoch (one past the newest known, and past `past`:
    /// the number of an epoch a member claimed that was not believed, so that the new one is
    /// not refused as stale where that claim was recorded), promoted from `from` (a snapshot
    /// name).
    pub fn promote(&self, policy: &Policy, node: &str, from: &str, past: u64) -> Result<Epoch> {
        if let Some(why) = policy.origin_refusal(node) {
            bail!("{why} (this node's policy)");
        }
        let record = self.update(policy, |r| {
            let newest = r.epoch.number.max(past);
            let number = newest.checked_add(1).ok_or_else(|| anyhow::anyhow!("the epoch number {newest} cannot grow"))?;
            r.epoch = Epoch { number, origin: node.to_string() };
            r.promoted_at = Some(Utc::now());
            r.promoted_from = Some(from.to_string());
            Ok(())
        })?;
        Ok(record.epoch)
    }

    /// Remembers data kept as diverged.
    pub fn add_diverged(&self, policy: &Policy, name: &str) -> Result<()> {
        self.update(policy, |r| {
            r.diverged.push(name.to_string());
            Ok(())
        })
        .map(|_| ())
    }

    /// Forgets diverged data `name` (its snapshot was removed); an error if it is not kept.
    pub fn remove_diverged(&self, policy: &Policy, name: &str) -> Result<()> {
        self.update(policy, |r| {
            let before = r.diverged.len();
            r.diverged.retain(|d| d != name);
            if r.diverged.len() == before {
                bail!("no diverged data `{name}` is kept for `{}` (kept: {})", policy.fileset, if before == 0 { "none".into() } else { r.diverged.join(", ") });
            }
            Ok(())
        })
        .map(|_| ())
    }

    /// Ticks whenever a record changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync of the directory).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().expect("state files live in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let dir = std::path::Path::new("/tmp");
        let node = crate::config::parse_node_text(&dir.join("n.yaml"), "node: beta\nstate_dir: s\npolicies: []\n").unwrap();
        let text = "fileset: p\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: beta\n  path: /srv/p\nreplicas:\n  - node: beta\n    path: /b/p\n";
        crate::config::parse_policy_text(&dir.join("p.yaml"), text, &node).unwrap()
    }

    #[test]
    fn epochs_only_move_forward_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy();
        let store = EpochStore::open(dir.path());
        assert_eq!(store.current(&p).unwrap(), Epoch { number: 0, origin: "beta".into() });
        let ticks = store.subscribe();
        let e1 = store.promote(&p, "beta", "snapship-20260101T000000.000Z", 0).unwrap();
        assert_eq!(e1.number, 1);
        assert!(ticks.has_changed().unwrap());
        assert!(!store.learn(&p, &Epoch { number: 1, origin: "beta".into() }).unwrap(), "not newer");
        assert!(store.learn(&p, &Epoch { number: 0, origin: "beta".into() }).is_ok_and(|b| !b), "older is ignored");
        assert!(store.learn(&p, &Epoch { number: 5, origin: "mallory".into() }).is_err(), "a non-member cannot be origin");
        let err = store.learn(&p, &Epoch { number: u64::MAX, origin: "beta".into() }).unwrap_err().to_string();
        assert!(err.contains("promotions past epoch 1"), "an epoch far ahead was learned: {err}");
        let again = EpochStore::open(dir.path());
        let r = again.record(&p).unwrap();
        assert_eq!((r.epoch.number, r.promoted_from.as_deref()), (1, Some("snapship-20260101T000000.000Z")));
        assert!(store.learn(&p, &Epoch { number: 1 + MAX_EPOCH_STEP, origin: "beta".into() }).unwrap(), "as far ahead as allowed");
        // A promotion past a claim it did not believe is numbered past that claim.
        let next = store.promote(&p, "beta", "snapship-20260101T000000.000Z", 5000).unwrap();
        assert_eq!(next.number, 5001);
        assert_eq!(store.promote(&p, "beta", "snapship-20260101T000000.000Z", 7).unwrap().number, 5002, "never below the known epoch");
    }

    #[test]
    fn a_member_marked_not_promotable_is_never_origin_here() {
        let dir = std::path::Path::new("/tmp");
        let node = crate::config::parse_node_text(
            &dir.join("n.yaml"),
            "node: alpha\nstate_dir: s\npolicies: []\npeers:\n  beta: b:7441\n  gamma: g:7441\ntls:\n  ca: /c.pem\n  cert: /a.pem\n  key: /a.key\n",
        )
        .unwrap();
        let text = "fileset: p\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: /srv/p\nreplicas:\n  \
                    - node: beta\n    path: /b/p\n  - node: gamma\n    path: /b/p\n    promotable: false\n";
        let p = crate::config::parse_policy_text(&dir.join("p.yaml"), text, &node).unwrap();
        let state = tempfile::tempdir().unwrap();
        let store = EpochStore::open(state.path());
        let err = store.learn(&p, &Epoch { number: 1, origin: "gamma".into() }).unwrap_err().to_string();
        assert!(err.contains("`gamma` may not be the origin of `p`: its replica entry says `promotable: false`"), "{err}");
        assert!(store.promote(&p, "gamma", "snapship-20260101T000000.000Z", 0).is_err());
        assert_eq!(store.current(&p).unwrap(), Epoch { number: 0, origin: "alpha".into() }, "nothing was recorded");
        assert!(store.learn(&p, &Epoch { number: 1, origin: "beta".into() }).unwrap(), "a promotable member is followed");
        assert!(store.learn(&p, &Epoch { number: 2, origin: "alpha".into() }).unwrap(), "the policy's origin always may be");
    }
}
