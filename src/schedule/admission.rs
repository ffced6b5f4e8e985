//! How many transfers may run at once: admission before the work, so that a node starting
//! with thousands of file sets (each one's first transfer due at once) runs a few transfers
//! at a time and queues the rest, instead of starting thousands of `btrfs send`s and
//! `btrfs receive`s together.
//!
//! - The origin side ([`Admission`]): at most [`PER_PEER`] transfers to one peer at a time,
//!   node-wide (all file sets' workers share it); a worker waits for a slot before it lists
//!   the replica and plans, so the plan is fresh when the stream starts. Waiters are served
//!   in the order they came (tokio's semaphore is fair).
//! - The replica side ([`Receives`]): at most [`RECEIVES`] receives at a time, whatever their
//!   origins, and at most [`PER_PEER`] of them from one peer (so that one origin, hostile or
//!   just busy, cannot hold every slot); a `begin` beyond that waits for a slot, up to a
//!   bound below the origin's wait for an answer, and is then answered `Busy` (the origin
//!   tries again). Slots are taken only once the peer is authorized for the file set.
//!
//! A slot is a [`Permit`]: held for the transfer, given back when dropped (also when the
//! transfer fails or is cancelled).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Transfers from this node to one peer at a time. `btrfs send`/`receive` of a small
/// change is mostly waiting on the disk and on the round trips: a few in parallel fill
/// both, many only add processes and seeks.
pub const PER_PEER: usize = 8;

/// Receives on this node at a time, from all origins together.
pub const RECEIVES: usize = 16;

/// A slot of an [`Admission`] or of [`Receives`]: the transfer may run while it is held.
#[derive(Debug)]
pub struct Permit(#[allow(dead_code)] Vec<OwnedSemaphorePermit>);

/// The origin side: slots per peer, shared by every worker of the node.
#[derive(Debug)]
pub struct Admission {
    per_peer: usize,
    peers: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Default for Admission {
    fn default() -> Self {
        Admission::new(PER_PEER)
    }
}

impl Admission {
    /// At most `per_peer` transfers to each peer at a time (at least one).
    pub fn new(per_peer: usize) -> Admission {
        Admission { per_peer: per_peer.max(1), peers: Mutex::default() }
    }

    fn slots(&self, peer: &str) -> Arc<Semaphore> {
        // Keyed by the peer names of the config: bounded by it.
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.entry(peer.to_string()).or_insert_with(|| Arc::new(Semaphore::new(self.per_peer))).clone()
    }

    /// Waits for a slot for a transfer to `peer`.
    ///
    /// # Cancel safety
    /// Cancel safe: dropped while waiting, it takes no slot and loses its place in the queue.
    pub async fn admit(&self, peer: &str) -> Permit {
        Permit(vec![self.slots(peer).acquire_owned().await.expect("the semaphore is never closed")])
    }

    /// Transfers to `peer` running now.
    pub fn running(&self, peer: &str) -> usize {
        self.per_peer - self.slots(peer).available_permits()
    }
}

/// The replica side: slots for receives, node-wide and per peer.
#[derive(Debug)]
pub struct Receives {
    slots: Arc<Semaphore>,
    limit: usize,
    per_peer: Admission,
}

impl Default for Receives {
    fn default() -> Self {
        Receives::new(RECEIVES, PER_PEER)
    }
}

impl Receives {
    /// At most `limit` receives at a time, and `per_peer` from one peer (each at least one).
    pub fn new(limit: usize, per_peer: usize) -> Receives {
        let limit = limit.max(1);
        Receives { slots: Arc::new(Semaphore::new(limit)), limit, per_peer: Admission::new(per_peer) }
    }

    /// A slot for one receive from `peer` (authorized already), waiting up to `patience` for
    /// one; `None` if none came free.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`Admission::admit`]: a slot of the peer's taken while the node-wide
    /// one is awaited is given back with the dropped future.
    pub async fn admit_within(&self, peer: &str, patience: Duration) -> Option<Permit> {
        tokio::time::timeout(patience, async {
            let Permit(mut slots) = self.per_peer.admit(peer).await;
            slots.push(self.slots.clone().acquire_owned().await.expect("the semaphore is never closed"));
            Permit(slots)
        })
        .await
        .ok()
    }

    /// Receives running now.
    pub fn running(&self) -> usize {
        self.limit - self.slots.available_permits()
    }

    /// The most receives at a time.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn transfers_to_one_peer_beyond_the_limit_wait_their_turn_in_order() {
        let admission = Arc::new(Admission::new(2));
        let a = admission.admit("beta").await;
        let _b = admission.admit("beta").await;
        assert_eq!(admission.running("beta"), 2);
        // Another peer has slots of its own.
        let g = admission.admit("gamma").await;
        assert_eq!(admission.running("gamma"), 1);
        drop(g);
        assert_eq!(admission.running("gamma"), 0);
        // A third and a fourth transfer to beta wait, and are admitted in the order they came.
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = tokio::task::JoinSet::new();
        for i in 0..2 {
            let (admission, order) = (admission.clone(), order.clone());
            waiting.spawn(async move {
                let permit = admission.admit("beta").await;
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_secs(1)).await;
                drop(permit);
            });
            tokio::task::yield_now().await; // queued before the next one
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(order.lock().unwrap().is_empty(), "admitted beyond the limit");
        assert_eq!(admission.running("beta"), 2);
        drop(a);
        while waiting.join_next().await.is_some() {}
        assert_eq!(*order.lock().unwrap(), [0, 1]);
        assert_eq!(admission.running("beta"), 1, "the slots came back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_takes_no_slot() {
        let admission = Admission::new(1);
        let held = admission.admit("beta").await;
        assert!(tokio::time::timeout(Duration::from_secs(5), admission.admit("beta")).await.is_err());
        drop(held);
        assert_eq!(admission.running("beta"), 0);
        let _again = admission.admit("beta").await;
        assert_eq!(admission.running("beta"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn receives_beyond_the_limit_wait_then_get_none() {
        let receives = Arc::new(Receives::new(2, 2));
        let first = receives.admit_within("alpha", Duration::from_secs(30)).await.expect("a free slot");
        let _second = receives.admit_within("gamma", Duration::from_secs(30)).await.expect("a free slot");
        assert_eq!(receives.running(), 2);
        // A third waits, and gets the slot the first gives back within its patience.
        let third = {
            let receives = receives.clone();
            tokio::spawn(async move { receives.admit_within("alpha", Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(first);
        let third = third.await.unwrap();
        assert!(third.is_some(), "waited and was admitted");
        // A fourth finds none free within its patience.
        assert!(receives.admit_within("alpha", Duration::from_secs(30)).await.is_none());
        assert_eq!(receives.running(), 2, "the one that gave up took no slot");
        assert_eq!(Receives::new(0, 0).limit(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn one_peer_cannot_hold_every_receive_slot() {
        // A peer (hostile, or only busy) that opens begins and never finishes them gets its
        // share, not the node's: another origin is still received.
        let receives = Receives::new(4, 2);
        let held: Vec<Permit> =
            futures::future::join_all((0..2).map(|_| receives.admit_within("mallory", Duration::from_secs(1)))).await.into_iter().flatten().collect();
        assert_eq!(held.len(), 2);
        assert!(receives.admit_within("mallory", Duration::from_secs(25)).await.is_none(), "beyond its share");
        assert_eq!(receives.running(), 2, "the refused one holds nothing");
        let other = receives.admit_within("alpha", Duration::from_secs(1)).await;
        assert!(other.is_some(), "another origin waited behind one peer's stalled receives");
    }
}
