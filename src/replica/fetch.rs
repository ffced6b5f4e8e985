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
use crate::replica::relay::{Kept, RelayGuard};
use crate::replicate;
use crate::ship::{Fetched, Holdings, ReplicaEndpoint};
use crate::snapshot::{self, OriginSide, Snapshot, SnapshotName};
use crate::store::{Epoch, MAX_EPOCH_STEP, unfollowed};

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
    /// How far its stream got.
    progress: Progress,
}

/// How far the stream of a grant got, as the fetching side sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    /// No receive session yet.
    Waiting,
    /// A receive session is attached.
    Begun,
    /// The receive session ended without the snapshot (the member may begin again).
    Failed,
    /// Received and committed here.
    Received,
}

/// Marks the grant's stream failed when dropped before [`Grants::used`]: every way out of a
/// fetched receive but its commit.
pub struct Receiving {
    grants: Arc<Grants>,
    fileset: String,
    peer: String,
    name: SnapshotName,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.grants.set(&self.fileset, &self.peer, &self.name, Progress::Failed);
    }
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
        let granted = Granted {
            id,
            fileset: fileset.into(),
            peer: peer.into(),
            name: name.clone(),
            identity: identity.into(),
            until: Instant::now() + GRANT_START,
            progress: Progress::Waiting,
        };
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

    /// The stream of the snapshot `name` from `peer` into `fileset` started: its receive
    /// session is attached. Hold the returned guard for the receive: dropped before
    /// [`used`](Self::used), it marks the stream failed.
    pub fn began(self: &Arc<Self>, fileset: &str, peer: &str, name: &SnapshotName) -> Receiving {
        self.set(fileset, peer, name, Progress::Begun);
        Receiving { grants: self.clone(), fileset: fileset.into(), peer: peer.into(), name: name.clone() }
    }

    fn set(&self, fileset: &str, peer: &str, name: &SnapshotName, progress: Progress) {
        let mut open = self.open.lock().expect("grants lock");
        for g in open.iter_mut().filter(|g| g.fileset == fileset && g.peer == peer && &g.name == name) {
            g.progress = progress;
        }
    }

    /// How far the stream of `grant` got (a grant used up was received).
    fn progress(&self, grant: &Grant) -> Progress {
        self.open.lock().expect("grants lock").iter().find(|g| g.id == grant.id).map_or(Progress::Received, |g| g.progress)
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
/// `to`, the member that asked. Pruning on this node keeps the step's snapshot and base while
/// it ships (registered with `guard` under a read of its planning lock, as a relay's step is):
/// the lock itself is not held across the transfer, so a slow or stalling asker never holds
/// up this node's pruning, and through it its receives from the origin.
pub async fn push(pushes: &dyn Pushes, policy: &Policy, to: &str, snapshot: &Snapshot, guard: &Arc<RelayGuard>, stall: Duration) -> Result<Fetched> {
    let side = pushes.sender(policy)?;
    let sent = side.list().await?.into_iter().find(|s| s.name == snapshot.name && s.identity == snapshot.identity);
    let sent = sent.ok_or_else(|| anyhow!("snapshot {} is not among this node's snapshots to send", snapshot.name))?;
    let ep = pushes.endpoint(policy, to)?;
    let hooks = PushHooks { planning: guard.planning(&policy.fileset.0), guard: guard.clone(), fileset: policy.fileset.0.clone(), kept: Mutex::new(None) };
    let report = replicate::bring_up_to_date(side.as_ref(), &sent, ep.as_ref(), stall, &hooks).await?;
    tracing::info!(fileset = %policy.fileset, to, snapshot = %report.snapshot, base = report.base.as_deref().unwrap_or("none (full)"), bytes = report.bytes, "fetched from here: shipped");
    Ok(Fetched { snapshot: report.snapshot, base: report.base, bytes: report.bytes })
}

/// What a push does around its steps: keep each step's snapshot and base from pruning.
struct PushHooks {
    planning: Arc<RwLock<()>>,
    guard: Arc<RelayGuard>,
    fileset: String,
    kept: Mutex<Option<Kept>>,
}

#[async_trait::async_trait]
impl replicate::Hooks for PushHooks {
    fn planning(&self) -> &RwLock<()> {
        &self.planning
    }

    async fn planned(&self, _: &str, step: &replicate::Step) -> Result<()> {
        let identities = std::iter::once(&step.snapshot).chain(step.plan.base()).map(|s| s.identity.clone()).collect();
        *self.kept.lock().expect("kept lock") = Some(self.guard.keep(&self.fileset, identities));
        Ok(())
    }

    fn started(&self, _: &str, _: &replicate::Step, _: Arc<crate::ship::meter::Tally>, _: u64) {}

    async fn finished(&self, _: &str, _: &SnapshotName, _: &Result<replicate::ReplicaReport>) {}
}

/// Asks `from` to ship `snapshot` (as it listed it) to this node, under a grant of `grants`;
/// `Ok` once this node received it.
pub async fn fetch(grants: &Arc<Grants>, policy: &Policy, from: &dyn ReplicaEndpoint, snapshot: &Snapshot) -> Result<Fetched> {
    if snapshot::is_tampered(snapshot) {
        bail!("`{}` lists {} as tampered: it is no copy to fetch", from.node(), snapshot.name);
    }
    let grant = grants.allow(&policy.fileset.0, from.node(), &snapshot.name, &snapshot.identity);
    // A member that never starts shipping is passed over (before a promotion, the next
    // holder is tried); while its stream runs, the receive's own watchdogs govern it; once
    // it was received here, or its receive failed, the member's answer is awaited a little
    // longer only. (A `begin` admitted just before the start deadline may wait for a receive
    // slot: the deadline allows for it.)
    let answer = from.fetch(&snapshot.name);
    tokio::pin!(answer);
    let started = Instant::now();
    let ended = loop {
        tokio::select! {
            got = &mut answer => return got,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        match grants.progress(&grant) {
            Progress::Waiting if started.elapsed() >= GRANT_START + super::service::RECEIVE_WAIT => {
                bail!("`{}` did not start shipping {} within {} s", from.node(), snapshot.name, GRANT_START.as_secs())
            }
            Progress::Waiting | Progress::Begun => {}
            ended => break ended,
        }
    };
    let Ok(got) = tokio::time::timeout(ANSWER_AFTER, answer).await else {
        let what = match ended {
            Progress::Received => "shipped it (this node holds it now)",
            _ => "broke its stream off",
        };
        bail!("`{}` {what} but did not answer the fetch of {} within {} s of that", from.node(), snapshot.name, ANSWER_AFTER.as_secs());
    };
    got
}

/// How long the member asked has to answer the fetch once this node received the snapshot,
/// or its receive failed.
const ANSWER_AFTER: Duration = Duration::from_secs(30);

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

/// Of the epochs newer than `known` that members claim in their `holds` answers, one the
/// member it names confirms (a promotion happened elsewhere: this node must not promote
/// too), and the claims not believed, with why (pure). Epochs are not signed: a member's word
/// that *another* member was promoted counts only when that member's own answer says so, so
/// a hostile member cannot block every promotion by naming the silent old origin in a newer
/// epoch. A member naming itself is believed when this node's policy lets it be origin (it
/// could have promoted itself); an epoch this node's policy refuses, or implausibly far
/// ahead, never is.
pub fn promoted_elsewhere<'a>(policy: &Policy, known: &Epoch, answers: &'a [(String, Holdings)]) -> (Option<(&'a str, &'a Epoch)>, Vec<String>) {
    let mut doubted = Vec::new();
    for (node, h) in answers.iter().filter(|(_, h)| h.epoch.number > known.number) {
        let claimed = &h.epoch;
        let named = claimed.origin.escape_debug();
        let why = if let Some(why) = unfollowed(policy, known, claimed) {
            why
        } else if claimed.origin == *node {
            return (Some((node, claimed)), doubted);
        } else {
            let own = answers.iter().find(|(n, _)| *n == claimed.origin).map(|(_, h)| &h.epoch);
            match own {
                Some(own) if own.origin == claimed.origin && own.number >= claimed.number => return (Some((node, claimed)), doubted),
                Some(own) => format!("`{named}` itself answers in {own}"),
                None => format!("`{named}` did not answer to confirm it"),
            }
        };
        doubted.push(format!("`{node}` says `{named}` is the origin in epoch {}, not believed: {}", claimed.number, why.escape_debug()));
    }
    (None, doubted)
}

/// The epoch number a promotion here must go past (pure): the highest a member claimed that
/// this node's policy could follow, so that no member refuses the new epoch as stale, or as
/// another origin's, where such a claim was recorded. Never so far that a member knowing only
/// `known` would refuse the new epoch as implausible: a hostile member's claim of
/// `known` + [`MAX_EPOCH_STEP`] must not make the promoted node one nobody follows.
pub fn promote_past(policy: &Policy, known: &Epoch, answers: &[(String, Holdings)]) -> u64 {
    let claimed = answers.iter().map(|(_, h)| &h.epoch).filter(|e| unfollowed(policy, known, e).is_none());
    let highest = claimed.map(|e| e.number).max().unwrap_or(0);
    highest.min(known.number.saturating_add(MAX_EPOCH_STEP - 1))
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

    fn snap(hour: u32, identity: &str) -> Snapshot {
        let name = SnapshotName::parse(&format!("snapship-20260101T{hour:02}0000.000Z")).unwrap();
        Snapshot { name, identity: identity.into(), local_id: None, parent_local_id: None }
    }

    fn held(node: &str, snapshots: Vec<Snapshot>) -> (String, Holdings) {
        (node.to_string(), Holdings { snapshots, epoch: Epoch { number: 0, origin: "alpha".into() } })
    }

    #[test]
    fn a_grants_progress_follows_its_receive_session() {
        let grants = Arc::new(Grants::default());
        let s = snap(3, "c");
        let grant = grants.allow("p", "gamma", &s.name, "c");
        assert!(!grants.admits("p", "delta", &s.name, "c"), "another member");
        assert!(!grants.admits("p", "gamma", &s.name, "forged"), "another identity");
        assert!(grants.admits("p", "gamma", &s.name, "c"));
        assert_eq!(grants.progress(&grant), Progress::Waiting, "admitted is not begun: the receive may still refuse it");
        drop(grants.began("p", "delta", &s.name));
        assert_eq!(grants.progress(&grant), Progress::Waiting, "another member's");
        let receiving = grants.began("p", "gamma", &s.name);
        assert_eq!(grants.progress(&grant), Progress::Begun);
        drop(receiving);
        assert_eq!(grants.progress(&grant), Progress::Failed, "a receive that ended without the snapshot");
        let receiving = grants.began("p", "gamma", &s.name);
        assert_eq!(grants.progress(&grant), Progress::Begun, "begun again");
        grants.used("p", "gamma", &s.name);
        drop(receiving);
        assert_eq!(grants.progress(&grant), Progress::Received);
    }

    #[test]
    fn a_promotion_elsewhere_counts_only_on_the_word_of_the_member_promoted() {
        let dir = std::path::Path::new("/nonexistent");
        let node = crate::config::parse_node_text(
            &dir.join("n.yaml"),
            "node: beta\nstate_dir: s\ntls:\n  ca: ca.pem\n  cert: c.pem\n  key: c.key\npeers:\n  alpha: 127.0.0.1:1\n  gamma: 127.0.0.1:2\n  delta: 127.0.0.1:3\npolicies: []\n",
        )
        .unwrap();
        let text = "fileset: p\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: /srv/p\nreplicas:\n  - node: beta\n    path: /b/p\n  - node: gamma\n    path: /b/p\n    promotable: false\n  - node: delta\n    path: /b/p\n";
        let policy = crate::config::parse_policy_text(&dir.join("p.yaml"), text, &node).unwrap();
        let e = |number: u64, origin: &str| Epoch { number, origin: origin.into() };
        let at = |node: &str, epoch: Epoch| (node.to_string(), Holdings { snapshots: vec![], epoch });
        let known = e(0, "alpha");
        // gamma names the silent old origin in a newer epoch: not believed, the promotion goes on.
        let answers = [at("gamma", e(1, "alpha")), at("delta", e(0, "alpha"))];
        let (found, doubted) = promoted_elsewhere(&policy, &known, &answers);
        assert!(found.is_none());
        assert_eq!(doubted, ["`gamma` says `alpha` is the origin in epoch 1, not believed: `alpha` did not answer to confirm it"]);
        // ... nor naming delta, which answers in epoch 0; nor itself (not promotable); nor far ahead.
        let answers = [at("gamma", e(1, "delta")), at("delta", e(0, "alpha"))];
        let (found, doubted) = promoted_elsewhere(&policy, &known, &answers);
        assert!(found.is_none() && doubted[0].contains("`delta` itself answers in"), "{doubted:?}");
        assert!(promoted_elsewhere(&policy, &known, &[at("gamma", e(1, "gamma"))]).0.is_none());
        assert!(promoted_elsewhere(&policy, &known, &[at("delta", e(u64::MAX, "delta"))]).0.is_none());
        // delta promoted itself, or gamma reports it and delta confirms: this node must not promote.
        assert_eq!(promoted_elsewhere(&policy, &known, &[at("delta", e(1, "delta"))]).0, Some(("delta", &e(1, "delta"))));
        let both = [at("gamma", e(1, "delta")), at("delta", e(1, "delta"))];
        assert_eq!(promoted_elsewhere(&policy, &known, &both).0.map(|(_, e)| e.clone()), Some(e(1, "delta")));
        // Promoting past the claims not believed: past the highest one this node could follow,
        // never so far that a member knowing only `known` would refuse the new epoch.
        let claims = [at("gamma", e(3, "alpha")), at("delta", e(7, "gamma")), at("eps", e(u64::MAX, "alpha"))];
        assert_eq!(promote_past(&policy, &known, &claims), 3, "gamma may not be origin; u64::MAX is implausible");
        let far = [at("gamma", e(MAX_EPOCH_STEP, "alpha"))];
        let past = promote_past(&policy, &known, &far);
        assert!(crate::store::implausible(&known, &e(past + 1, "beta")).is_none(), "the promoted epoch {} would be refused", past + 1);
        assert_eq!(past + 1, MAX_EPOCH_STEP);
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
