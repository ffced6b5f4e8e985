//! What a node remembers between runs, per file set it is origin of, in
//! `state_dir/filesets/FILESET.json`: for each replica the common base last seen (so that it
//! stays protected from pruning while the replica is away, even across restarts), the
//! transfer in flight, the last success and error, and the totals of transfers and bytes
//! shipped (for status: they survive restarts).
//!
//! Written atomically (temp file, fsync, rename): a crash leaves the old or the new state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::observe::status::Totals;
use crate::snapshot::SnapshotName;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FilesetState {
    #[serde(default)]
    pub replicas: BTreeMap<String, ReplicaState>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaState {
    /// The newest snapshot both sides held when last seen: the next incremental base.
    pub base: Option<SnapshotName>,
    /// A transfer under way: the snapshot sent and its base.
    pub in_flight: Option<(SnapshotName, Option<SnapshotName>)>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_error: Option<(DateTime<Utc>, String)>,
    /// Totals since the state file was made (files from before they were kept read as 0).
    #[serde(default)]
    pub transfers_ok: u64,
    #[serde(default)]
    pub transfers_failed: u64,
    /// Stream bytes of the snapshots delivered.
    #[serde(default)]
    pub bytes_shipped: u64,
}

impl ReplicaState {
    /// The totals, for the status board.
    pub fn totals(&self) -> Totals {
        Totals { transfers_ok: self.transfers_ok, transfers_failed: self.transfers_failed, bytes_shipped: self.bytes_shipped }
    }
}

pub struct StateStore {
    path: PathBuf,
    state: Mutex<FilesetState>,
}

impl StateStore {
    /// The path of `fileset`'s state under `state_dir`.
    pub fn path_for(state_dir: &Path, fileset: &str) -> PathBuf {
        state_dir.join("filesets").join(format!("{fileset}.json"))
    }

    /// Reads a state file; a missing one is an empty state.
    pub fn read(path: &Path) -> Result<FilesetState> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("{} is not a valid state file; move it away to start afresh", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FilesetState::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn open(state_dir: &Path, fileset: &str) -> Result<StateStore> {
        let path = Self::path_for(state_dir, fileset);
        let state = Self::read(&path)?;
        Ok(StateStore { path, state: Mutex::new(state) })
    }

    pub async fn get(&self) -> FilesetState {
        self.state.lock().await.clone()
    }

    /// Records how a transfer of `snapshot` to `replica` ended (`Ok` with the stream bytes
    /// delivered): on success the snapshot is the new common base. On failure the transfer
    /// stays recorded as in flight (protected from pruning): the replica may hold it although
    /// its answer was lost. The base only moves forward: a backfilled snapshot older than
    /// it leaves it. Returns the previous common base when the base moved, `None` if not.
    pub async fn record_outcome(&self, replica: &str, snapshot: &SnapshotName, result: Result<u64, &anyhow::Error>) -> Result<Option<Option<SnapshotName>>> {
        let now = Utc::now();
        let (mut previous, mut moved) = (None, false);
        self.update(|s| {
            let r = s.replicas.entry(replica.to_string()).or_default();
            match result {
                Ok(bytes) => {
                    r.in_flight = None;
                    // A backfilled snapshot, older than the base, does not move it back.
                    if r.base.as_ref().is_none_or(|b| b <= snapshot) {
                        previous = r.base.replace(snapshot.clone());
                        moved = true;
                    }
                    r.last_success = Some(now);
                    r.last_error = None;
                    r.transfers_ok += 1;
                    r.bytes_shipped += bytes;
                }
                Err(e) => {
                    r.last_error = Some((now, format!("{e:#}")));
                    r.transfers_failed += 1;
                }
            }
        })
        .await?;
        Ok(moved.then_some(previous))
    }

    /// Changes the state and writes it out before returning.
    pub async fn update(&self, change: impl FnOnce(&mut FilesetState)) -> Result<()> {
        let mut guard = self.state.lock().await;
        change(&mut guard);
        let bytes = serde_json::to_vec_pretty(&*guard)?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || crate::store::write_atomically(&path, &bytes)).await??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), "projects").unwrap();
        let name = SnapshotName::parse("snapship-20260101T000000.000Z").unwrap();
        store.update(|s| s.replicas.entry("beta".into()).or_default().base = Some(name.clone())).await.unwrap();
        let again = StateStore::open(dir.path(), "projects").unwrap();
        assert_eq!(again.get().await.replicas["beta"].base, Some(name));
        std::fs::write(StateStore::path_for(dir.path(), "bad"), "{").unwrap();
        assert!(StateStore::open(dir.path(), "bad").err().unwrap().to_string().contains("not a valid state file"));
        // A name that is not one snapship makes is refused, not carried on as a string.
        std::fs::write(
            StateStore::path_for(dir.path(), "odd"),
            r#"{"replicas":{"beta":{"base":"../x","in_flight":null,"last_success":null,"last_error":null}}}"#,
        )
        .unwrap();
        assert!(StateStore::open(dir.path(), "odd").is_err());
    }

    #[tokio::test]
    async fn totals_add_up_and_old_files_still_load() {
        let dir = tempfile::tempdir().unwrap();
        // A state file from before the totals were kept.
        std::fs::create_dir_all(dir.path().join("filesets")).unwrap();
        std::fs::write(
            StateStore::path_for(dir.path(), "projects"),
            r#"{"replicas":{"beta":{"base":null,"in_flight":null,"last_success":null,"last_error":null}}}"#,
        )
        .unwrap();
        let store = StateStore::open(dir.path(), "projects").unwrap();
        assert_eq!(store.get().await.replicas["beta"].totals(), Totals::default());
        let name = SnapshotName::parse("snapship-20260101T000000.000Z").unwrap();
        store.record_outcome("beta", &name, Ok(1000)).await.unwrap();
        store.record_outcome("beta", &name, Err(&anyhow::anyhow!("cut"))).await.unwrap();
        store.record_outcome("beta", &name, Ok(24)).await.unwrap();
        // A backfilled older snapshot counts, but leaves the base where it was.
        let older = SnapshotName::parse("snapship-20251231T000000.000Z").unwrap();
        assert_eq!(store.record_outcome("beta", &older, Ok(0)).await.unwrap(), None);
        assert_eq!(store.get().await.replicas["beta"].base.as_ref(), Some(&name));
        let again = StateStore::open(dir.path(), "projects").unwrap();
        assert_eq!(again.get().await.replicas["beta"].totals(), Totals { transfers_ok: 3, transfers_failed: 1, bytes_shipped: 1024 });
    }
}
