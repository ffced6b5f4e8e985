//! Fetching a snapshot that another member holds: `promote` first gets the survivors' newest
//! (no write that reached a survivor is lost), and `restore --from NODE` gets the snapshot to
//! restore. Both sides are members of the file set, and either may be hostile.
//!
//! The asking node X sends `holds` to a member Y (what do you hold?), then `fetch{snapshot}`.
//! Y ships the snapshot to X exactly as a relay forwards (from its home, with the origin's
//! identity, incrementally from the newest base both hold, with resume, stall and bandwidth
//! limits: `replicate::bring_up_to_date` through a `ship::PeerReplica`): it opens `list` and
//! `begin` to X as a transfer of its own, and answers the fetch once X committed.
//!
//! Who checks what:
//! - Y ships only to the authenticated asker (the endpoint is made from the peer's
//!   certificate name, never from a message), only for a file set of which Y's own policy
//!   names the asker a member, and only a snapshot in Y's home that is not tampered.
//! - X admits Y's `list` and `begin` only while it awaits that fetch: a [`Grant`] (file set,
//!   peer, snapshot name and identity), in memory, to be used within [`GRANT_START`], gone
//!   once the fetch answered or the snapshot was committed. A `begin` of another snapshot or
//!   identity, or from another member, is refused as before (by epoch and policy).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use chrono::{DateTime, Utc};
use tokio::sync::RwLock;

use crate::config::Policy;
use crate::replicate;
use crate::ship::{Fetched, Holdings, ReplicaEndpoint};
use crate::snapshot::{self, OriginSide, Snapshot, SnapshotName};

/// How long the member asked has to start shipping (its `list` and `begin`), from the grant.
pub const GRANT_START: Duration = Duration::from_secs(120);

/// How long a member gets to answer `holds` before it counts as unreachable.
pub const ASK: Duration = Duration::from_secs(3);

/// The fetches this node awaits: whom it lets ship what into its home.
#[derive(Default)]
pub struct Grants {
    open: Mutex<Vec<Granted>>,
    next: AtomicU64,
}

#[derive(Clone)]
struct Granted {
    id: u64,
    fileset: String,
    peer: String,
    name: SnapshotName,
    identity: String,
    until: Instant,
}

/// An awaited fetch; dropping it withdraws the grant.
pub struct Grant {
    grants: Arc<Grants>,
    id: u64,
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.grants.open.lock().expect("grants lock").retain(|g| g.id != self.id);
    }
}

impl Grants {
    /// Lets `peer` ship the snapshot `name` with `identity` of `fileset` to this node, for
    /// as long as the returned grant lives (and it starts within [`GRANT_START`]).
    pub fn allow(self: &Arc<Self>, fileset: &str, peer: &str, name: &SnapshotName, identity: &str) -> Grant {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let granted =
            Granted { id, fileset: fileset.into(), peer: peer.into(), name: name.clone(), identity: identity.into(), until: Instant::now() + GRANT_START };
        self.open.lock().expect("grants lock").push(granted);
        Grant { grants: self.clone(), id }
    }

    /// The grant `peer` holds for `fileset`, if any (still to be started in time).
    fn find(&self, fileset: &str, peer: &str) -> Option<Granted> {
        let now = Instant::now();
        self.open.lock().expect("grants lock").iter().find(|g| g.fileset == fileset && g.peer == peer && g.until > now).cloned()
    }

    /// The identity of the snapshot `peer` may ship into `fileset` now: it may list what
    /// this node holds (to plan its stream) and see a cut transfer of that snapshot only.
    pub fn listing_for(&self, fileset: &str, peer: &str) -> Option<String> {
        self.find(fileset, peer).map(|g| g.identity)
    }

    /// Whether a `begin` of `name` with `identity` from `peer` into `fileset` is one this node
    /// asked for.
    pub fn admits(&self, fileset: &str, peer: &str, name: &SnapshotName, identity: &str) -> bool {
        self.find(fileset, peer).is_some_and(|g| &g.name == name && g.identity == identity)
    }

    /// The snapshot was received: the grant is used up.
    pub fn used(&self, fileset: &str, peer: &str, name: &SnapshotName) {
        self.open.lock().expect("grants lock").retain(|g| !(g.fileset == fileset && g.peer == peer && &g.name == name));
    }
}

/// How the member asked for a snapshot ships it: its send side and how it reaches the asker
/// (the daemon provides both; one-shot commands serve no fetches).
pub trait Pushes: Send + Sync {
    /// This node's snapshots of `policy`'s file set as a send side (btrfs: its home, a
    /// received copy sending with the origin's identity).
    fn sender(&self, policy: &Policy) -> Result<Arc<dyn OriginSide>>;
    /// How this node reaches `member` of `policy`'s file set.
    fn endpoint(&self, policy: &Policy, member: &str) -> Result<Arc<dyn ReplicaEndpoint>>;
}

/// Ships `snapshot` (in this node's home, checked by the caller) of `policy`'s file set to
/// `to`, the member that asked. `planning`: read while it ships, so this node's replica
/// pruning (which writes it) keeps the snapshot and its base meanwhile.
pub async fn push(pushes: &dyn Pushes, policy: &Policy, to: &str, snapshot: &Snapshot, planning: Arc<RwLock<()>>, stall: Duration) -> Result<Fetched> {
    let side = pushes.sender(policy)?;
    let sent = side.list().await?.into_iter().find(|s| s.name == snapshot.name && s.identity == snapshot.identity);
    let sent = sent.ok_or_else(|| anyhow!("snapshot {} is not among this node's snapshots to send", snapshot.name))?;
    let ep = pushes.endpoint(policy, to)?;
    let _kept = planning.read_owned().await;
    // The hooks' own planning lock: the real one is held above for the whole transfer.
    let hooks = replicate::NoHooks::default();
    let report = replicate::bring_up_to_date(side.as_ref(), &sent, ep.as_ref(), stall, &hooks).await?;
    tracing::info!(fileset = %policy.fileset, to, snapshot = %report.snapshot, base = report.base.as_deref().unwrap_or("none (full)"), bytes = report.bytes, "fetched from here: shipped");
    Ok(Fetched { snapshot: report.snapshot, base: report.base, bytes: report.bytes })
}

/// Asks `from` to ship `snapshot` (as it listed it) to this node, under a grant of `grants`;
/// `Ok` once this node received it.
pub async fn fetch(grants: &Arc<Grants>, policy: &Policy, from: &dyn ReplicaEndpoint, snapshot: &Snapshot) -> Result<Fetched> {
    if snapshot::is_tampered(snapshot) {
        bail!("`{}` lists {} as tampered: it is no copy to fetch", from.node(), snapshot.name);
    }
    let _grant = grants.allow(&policy.fileset.0, from.node(), &snapshot.name, &snapshot.identity);
    from.fetch(&snapshot.name).await
}

/// What each member answered `holds` (or why it did not), asked all at once, each for at
/// most [`ASK`].
pub async fn ask_members(members: &[Arc<dyn ReplicaEndpoint>]) -> Vec<(String, Result<Holdings>)> {
    let asks = members.iter().map(|ep| async move {
        let answer = match tokio::time::timeout(ASK, ep.holds()).await {
            Ok(answer) => answer,
            Err(_) => Err(anyhow!("no answer within {}s", ASK.as_secs())),
        };
        (ep.node().to_string(), answer)
    });
    futures::future::join_all(asks).await
}

/// Of what other members hold (`answers`), the newest snapshot newer than every one this node
/// `holds`, that this node lacks, with every member that holds it (by identity), to fetch it
/// from one of them (pure). Tampered copies never count, nor names dated beyond
/// [`super::service::MAX_FUTURE`] from `now` (this node would refuse them: a hostile member
/// listing one must not block a promotion).
pub fn newest_elsewhere<'a>(holds: &[Snapshot], answers: &'a [(String, Holdings)], now: DateTime<Utc>) -> Option<(&'a Snapshot, Vec<&'a str>)> {
    let mine = holds.iter().map(|s| &s.name).max();
    let latest = now + super::service::MAX_FUTURE;
    let candidates = || {
        answers.iter().flat_map(|(node, h)| h.snapshots.iter().map(move |s| (node.as_str(), s))).filter(|(_, s)| {
            !snapshot::is_tampered(s) && s.name.time() <= latest && mine.is_none_or(|m| s.name > *m) && !holds.iter().any(|h| h.identity == s.identity)
        })
    };
    let newest_name = candidates().map(|(_, s)| &s.name).max()?;
    // Two copies under that name (one forged?): the one more members hold.
    let holders = |id: &str| candidates().filter(|(_, s)| &s.name == newest_name && s.identity == id).map(|(n, _)| n).collect::<Vec<_>>();
    let newest = candidates().filter(|(_, s)| &s.name == newest_name).map(|(_, s)| s).max_by_key(|s| holders(&s.identity).len())?;
    Some((newest, holders(&newest.identity)))
}

/// Which snapshot of another member's to fetch for a restore.
#[derive(Debug, Clone)]
pub enum Wanted {
    Named(String),
    At(DateTime<Utc>),
}

/// The snapshot `wanted` among `held` by `node` (oldest first or in any order), or what to do.
pub fn pick<'a>(node: &str, held: &'a [Snapshot], wanted: &Wanted) -> Result<&'a Snapshot> {
    let usable: Vec<&Snapshot> = held.iter().filter(|s| !snapshot::is_tampered(s)).collect();
    let found = match wanted {
        Wanted::Named(text) => {
            let prefixed = format!("{}{text}", snapshot::name::PREFIX);
            usable.iter().find(|s| s.name.as_str() == text || s.name.as_str() == prefixed).copied()
        }
        Wanted::At(at) => usable.iter().filter(|s| s.name.time() <= *at).max_by(|a, b| a.name.cmp(&b.name)).copied(),
    };
    found.ok_or_else(|| {
        let range = match (usable.iter().map(|s| &s.name).min(), usable.iter().map(|s| &s.name).max()) {
            (Some(a), Some(b)) => format!("it holds {} snapshots, from {a} to {b}", usable.len()),
            _ => "it holds none".to_string(),
        };
        match wanted {
            Wanted::Named(text) => anyhow!("`{node}` holds no snapshot named `{text}` ({range}; `snapship list` on `{node}` shows them)"),
            Wanted::At(at) => anyhow!("`{node}` holds no snapshot at or before {} ({range})", at.format("%Y-%m-%d %H:%M:%S%.3f UTC")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Epoch;

    fn snap(hour: u32, identity: &str) -> Snapshot {
        let name = SnapshotName::parse(&format!("snapship-20260101T{hour:02}0000.000Z")).unwrap();
        Snapshot { name, identity: identity.into(), local_id: None, parent_local_id: None }
    }

    fn held(node: &str, snapshots: Vec<Snapshot>) -> (String, Holdings) {
        (node.to_string(), Holdings { snapshots, epoch: Epoch { number: 0, origin: "alpha".into() } })
    }

    #[test]
    fn the_newest_a_survivor_holds_beyond_ours_is_fetched() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T12:00:00Z").unwrap().with_timezone(&Utc);
        let mine = [snap(1, "a"), snap(2, "b")];
        let answers = [held("gamma", vec![snap(1, "a"), snap(2, "b"), snap(3, "c")]), held("delta", vec![snap(2, "b")])];
        let (s, from) = newest_elsewhere(&mine, &answers, now).unwrap();
        assert_eq!((s.identity.as_str(), from), ("c", vec!["gamma"]));
        // Nothing newer anywhere: nothing to fetch.
        assert!(newest_elsewhere(&mine, &answers[1..], now).is_none());
        // Older snapshots we lack are no reason to fetch before promoting.
        assert!(newest_elsewhere(&mine, &[held("gamma", vec![snap(0, "z")])], now).is_none());
        // A tampered copy is never fetched, nor a name dated ahead of this node's clock (a
        // hostile member's, which this node would refuse to receive).
        let tampered = snap(4, &format!("{}x", snapshot::btrfs::TAMPERED));
        let future = snap(23, "f");
        assert_eq!(newest_elsewhere(&mine, &[held("gamma", vec![snap(3, "c"), tampered, future])], now).unwrap().0.identity, "c");
        // Every member holding that very copy is a source; of two copies under one name, the
        // one more members hold is taken.
        let both = [held("eps", vec![snap(3, "forged")]), held("gamma", vec![snap(3, "c")]), held("delta", vec![snap(3, "c")])];
        let (s, from) = newest_elsewhere(&mine, &both, now).unwrap();
        assert_eq!((s.identity.as_str(), from), ("c", vec!["gamma", "delta"]));
        // Holding nothing, any newest counts.
        assert_eq!(newest_elsewhere(&[], &answers, now).unwrap().0.identity, "c");
    }

    #[test]
    fn a_restore_picks_by_name_or_time_and_says_what_the_member_holds() {
        let theirs = [snap(1, "a"), snap(3, "c")];
        assert_eq!(pick("gamma", &theirs, &Wanted::Named("snapship-20260101T030000.000Z".into())).unwrap().identity, "c");
        assert_eq!(pick("gamma", &theirs, &Wanted::Named("20260101T010000.000Z".into())).unwrap().identity, "a");
        let at = DateTime::parse_from_rfc3339("2026-01-01T02:30:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(pick("gamma", &theirs, &Wanted::At(at)).unwrap().identity, "a");
        let e = pick("gamma", &theirs, &Wanted::Named("nope".into())).unwrap_err().to_string();
        assert!(e.contains("`gamma` holds no snapshot named `nope`") && e.contains("2 snapshots"), "{e}");
    }

    #[test]
    fn a_grant_admits_one_peer_one_snapshot_until_used_or_dropped() {
        let grants = Arc::new(Grants::default());
        let s = snap(3, "c");
        let grant = grants.allow("projects", "gamma", &s.name, "c");
        assert!(grants.admits("projects", "gamma", &s.name, "c"));
        assert!(!grants.admits("projects", "delta", &s.name, "c"), "another member");
        assert!(!grants.admits("other", "gamma", &s.name, "c"), "another file set");
        assert!(!grants.admits("projects", "gamma", &snap(4, "c").name, "c"), "another snapshot");
        assert!(!grants.admits("projects", "gamma", &s.name, "forged"), "another identity");
        assert_eq!(grants.listing_for("projects", "gamma").as_deref(), Some("c"));
        assert!(grants.listing_for("projects", "delta").is_none());
        drop(grant);
        assert!(!grants.admits("projects", "gamma", &s.name, "c"), "withdrawn");
        let _grant = grants.allow("projects", "gamma", &s.name, "c");
        grants.used("projects", "gamma", &s.name);
        assert!(!grants.admits("projects", "gamma", &s.name, "c"), "used up");
    }
}
