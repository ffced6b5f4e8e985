//! Changing who is origin: promotion of a replica, and stepping down when another member
//! was promoted (failback starts there: the old origin then receives from the new one,
//! incrementally from the newest snapshot both hold).
//!
//! The epoch (`crate::store`) is what moves the roles; this module does what the
//! filesystems need on the way: the promoted node's live file set is made from the newest
//! snapshot it received, and a node that steps down keeps what it wrote as diverged data and
//! freezes its live file set. Nothing here deletes anything.

use std::time::Duration;

use anyhow::{Result, bail};

use crate::config::Policy;
use crate::ship::ReplicaEndpoint;
use crate::ship::client::Refused;
use crate::snapshot;
use crate::store::{Epoch, EpochStore};

/// How long a member gets to answer before it counts as gone.
const ANSWER: Duration = Duration::from_secs(3);

/// Whether the member behind `ep` answers at all (any answer, a refusal included).
pub async fn answers(ep: &dyn ReplicaEndpoint) -> bool {
    match tokio::time::timeout(ANSWER, ep.list()).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.chain().any(|c| c.downcast_ref::<Refused>().is_some() || c.downcast_ref::<crate::ship::client::Fenced>().is_some()),
        Err(_) => false,
    }
}

/// The current epoch of `policy`'s file set, whose origin is another node than `here`; an
/// error when `here` is the origin already (there is nothing to promote).
pub fn other_origin(policy: &Policy, here: &str, epochs: &EpochStore) -> Result<Epoch> {
    let known = epochs.current(policy)?;
    if known.origin == here {
        bail!("this node is already the origin of `{}` ({known})", policy.fileset);
    }
    Ok(known)
}

/// Whether `here` may be promoted by its own policy (not a replica marked `promotable: false`).
pub fn may_be_origin(policy: &Policy, here: &str) -> Result<()> {
    match policy.origin_refusal(here) {
        Some(why) => bail!("{why} (in this node's policy); promote another member"),
        None => Ok(()),
    }
}

/// Makes `here` the origin of `policy`'s file set: its live file set from the newest
/// snapshot it holds, then a new epoch. Returns what to tell the admin (promoted from which
/// snapshot, taken when: the failover's recovery point).
pub async fn promote(policy: &Policy, here: &str, epochs: &EpochStore, past: u64) -> Result<String> {
    // Before the live file set is made writable: a node its own policy does not let be
    // origin never gets a writable copy (`promote --force`, a `handover` request).
    may_be_origin(policy, here)?;
    other_origin(policy, here, epochs)?;
    let held = snapshot::replica_on(policy, here)?.list().await?;
    let Some(newest) = held.last() else {
        bail!("this node holds no snapshot of `{}`: there is nothing to promote", policy.fileset);
    };
    let origin = snapshot::origin_on(policy, here)?;
    origin.make_live_from(newest).await?;
    let epoch = epochs.promote(policy, here, newest.name.as_str(), past)?;
    let age = chrono::Utc::now() - newest.name.time();
    let live = policy.live_on(here).unwrap_or_default();
    let report = format!(
        "{}: promoted `{here}` to origin in epoch {} from {} (taken {} ago: writes after it on the old origin are not here); writable at {live}",
        policy.fileset,
        epoch.number,
        newest.name,
        humantime::format_duration(Duration::from_secs(age.num_seconds().max(0) as u64)),
    );
    tracing::warn!("{report}");
    Ok(report)
}

/// This node is no longer the origin: keep the live file set's content read-only as
/// diverged data (never deleted by snapship; `list` shows it) and freeze the live file set.
pub async fn step_down(policy: &Policy, origin: &dyn snapshot::OriginSide, epochs: &EpochStore) -> Result<()> {
    let kept = origin.step_down().await?;
    epochs.add_diverged(policy, &kept)?;
    tracing::warn!(fileset = %policy.fileset, kept = %kept, "stepped down: the live file set is read-only; what it held is kept as {kept}");
    Ok(())
}
