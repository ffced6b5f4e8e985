//! What makes an origin take a snapshot: the cron schedule, and changes to the data.
//!
//! Changes are noticed two ways: inotify (through the `notify` crate, recursive, one instance
//! for the whole process) wakes the scheduler as soon as something is written, and a poll
//! catches what inotify cannot see (writes through mmap, a watch limit reached) within
//! [`POLL`]. Either way the backend's `changed_since` decides, so a wake-up without a
//! committed change takes no snapshot.
//!
//! **The poll is one loop for the whole process** (a thread, like inotify's), not a timer per
//! file set: every [`POLL`] it reads each watcher's change counter, when its backend has a
//! cheap one ([`ChangeCounter`], btrfs: the subvolume's generation, one ioctl), and wakes only
//! the watchers whose counter moved since its last reading. So an idle node costs one ioctl
//! per file set per poll, in one thread, and wakes no task; a watcher without a counter
//! (ZFS) is woken on every poll, as before. Each watcher's first reading, one poll after it
//! started, wakes it whatever the value: a change made while the daemon was down counts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;

use super::clock::Clock;
use crate::config::cron::CronSchedule;
use crate::snapshot::ChangeCounter;

/// The safety-net poll of continuous mode (inotify is the prompt path; this catches what it
/// cannot see, like writes through mmap).
pub const POLL: Duration = Duration::from_secs(10);

/// Waits for the next firing of `schedule` after `after`, and returns its time.
pub async fn next_fire(schedule: &CronSchedule, clock: &Clock, after: DateTime<Utc>) -> DateTime<Utc> {
    match schedule.next_after(after) {
        Some(t) => {
            clock.sleep_until(t).await;
            t
        }
        None => std::future::pending().await,
    }
}

/// Why a [`ChangeWatcher`] woke up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// inotify saw a write: worth flushing and checking at once.
    Change,
    /// The safety-net poll: check cheaply, without forcing a commit.
    Poll,
}

/// Wakes its owner when files under a directory change. Notifications coalesce: many writes
/// make one wake-up, and nothing queues up while the owner is busy.
///
/// Every watcher of the process shares one inotify instance (and one thread): the kernel
/// allows a user 128 instances by default (`fs.inotify.max_user_instances`), so one per file
/// set would leave most file sets of a large node on the poll alone; watches (one per
/// directory) are plentiful by comparison. They share one poll loop too ([`Poller`]).
pub struct ChangeWatcher {
    wake: Arc<Notify>,
    /// The watched path, registered with the shared watcher; `None` if it could not watch.
    root: Option<PathBuf>,
    /// This watcher's place in the poll loop.
    polled: Arc<Polled>,
}

/// The process's one inotify watcher, and who is woken for which directory tree.
struct Shared {
    watcher: notify::RecommendedWatcher,
    /// Watched root -> the [`ChangeWatcher`]s of it (two file sets may watch one tree).
    roots: Arc<Mutex<HashMap<PathBuf, Vec<Arc<Notify>>>>>,
}

fn shared() -> Result<&'static Mutex<Shared>> {
    static SHARED: OnceLock<std::result::Result<Mutex<Shared>, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let roots: Arc<Mutex<HashMap<PathBuf, Vec<Arc<Notify>>>>> = Arc::default();
            let r = roots.clone();
            let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if matches!(event.kind, EventKind::Access(_)) {
                    return;
                }
                let roots = r.lock().unwrap_or_else(|e| e.into_inner());
                // Each root the path lies under (a path's ancestors, itself included).
                for path in &event.paths {
                    for dir in path.ancestors() {
                        for wake in roots.get(dir).into_iter().flatten() {
                            wake.notify_one();
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start inotify: {e}"))?;
            Ok(Mutex::new(Shared { watcher, roots }))
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

impl ChangeWatcher {
    /// Watches `path` recursively; `counter` (if the backend has one) lets the poll skip
    /// this watcher while it stays. If inotify cannot watch (watch limit, unsupported fs),
    /// the watcher only wakes on the poll, and says so in the log.
    pub fn new(path: &Path, counter: Option<ChangeCounter>) -> ChangeWatcher {
        let wake = Arc::new(Notify::new());
        let root = Self::watch(path, &wake)
            .inspect_err(|e| tracing::warn!(path = %path.display(), "cannot watch for changes ({e:#}); polling every {}s instead", POLL.as_secs()))
            .ok();
        let polled = Arc::new(Polled::new(counter));
        Poller::global().add(&polled);
        ChangeWatcher { wake, root, polled }
    }

    fn watch(path: &Path, wake: &Arc<Notify>) -> Result<PathBuf> {
        let mut shared = shared()?.lock().unwrap_or_else(|e| e.into_inner());
        let first = !shared.roots.lock().unwrap_or_else(|e| e.into_inner()).contains_key(path);
        if first {
            shared.watcher.watch(path, RecursiveMode::Recursive).with_context(|| format!("cannot watch {}", path.display()))?;
        }
        shared.roots.lock().unwrap_or_else(|e| e.into_inner()).entry(path.to_path_buf()).or_default().push(wake.clone());
        Ok(path.to_path_buf())
    }

    /// Returns on the next change notification, or when the poll finds the counter moved
    /// (or has none to read); says which.
    ///
    /// # Cancel safety
    /// Cancel safe: a wake-up that arrives meanwhile is kept for the next call.
    pub async fn wait(&self) -> Woke {
        tokio::select! {
            biased;
            _ = self.wake.notified() => Woke::Change,
            _ = self.polled.wake.notified() => Woke::Poll,
        }
    }
}

impl Drop for ChangeWatcher {
    fn drop(&mut self) {
        Poller::global().remove(&self.polled);
        let (Some(root), Ok(shared)) = (self.root.take(), shared()) else { return };
        let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
        let last = {
            let mut roots = shared.roots.lock().unwrap_or_else(|e| e.into_inner());
            let wakes = roots.entry(root.clone()).or_default();
            wakes.retain(|w| !Arc::ptr_eq(w, &self.wake));
            let last = wakes.is_empty();
            if last {
                roots.remove(&root);
            }
            last
        };
        if last {
            let _ = shared.watcher.unwatch(&root);
        }
    }
}

/// One watcher as the poll loop sees it.
struct Polled {
    /// Woken when the poll finds a change (or cannot tell).
    wake: Notify,
    counter: Option<ChangeCounter>,
    /// The counter's last reading; `None` before the first.
    last: Mutex<Option<u64>>,
    /// Read no sooner than half a [`POLL`] after this (the first reading wakes the watcher
    /// whatever it reads; until then, a watcher just made has inotify alone).
    since: Instant,
    id: u64,
}

impl Polled {
    fn new(counter: Option<ChangeCounter>) -> Polled {
        static IDS: AtomicU64 = AtomicU64::new(0);
        Polled { wake: Notify::new(), counter, last: Mutex::new(None), since: Instant::now(), id: IDS.fetch_add(1, Ordering::Relaxed) }
    }

    /// One poll of this watcher at `now`: reads the counter and wakes the watcher if it
    /// moved, if it cannot be read (the check that follows says why), if there is none, or
    /// on the first reading.
    fn poll(&self, now: Instant) {
        if now.saturating_duration_since(self.since) < POLL / 2 {
            return;
        }
        let reading = match &self.counter {
            Some(counter) => counter().ok(),
            None => None,
        };
        let moved = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let moved = match (reading, *last) {
                (Some(now), Some(then)) => now != then,
                _ => true,
            };
            // No reading (none, or it failed): the next poll wakes the watcher again.
            *last = reading;
            moved
        };
        if moved {
            self.wake.notify_one();
        }
    }
}

/// The one poll loop of the process: a thread that polls every registered watcher every
/// [`POLL`] ([`Polled::poll`]). A thread rather than a task: its readings block (ioctls),
/// and it lives as long as the process, as inotify's does.
struct Poller {
    watchers: Mutex<HashMap<u64, Arc<Polled>>>,
}

impl Poller {
    fn global() -> &'static Poller {
        static POLLER: OnceLock<&'static Poller> = OnceLock::new();
        POLLER.get_or_init(|| {
            let poller: &'static Poller = Box::leak(Box::new(Poller { watchers: Mutex::default() }));
            let spawned = std::thread::Builder::new().name("snapship-poll".to_string()).spawn(move || {
                loop {
                    std::thread::sleep(POLL);
                    poller.poll_all(Instant::now());
                }
            });
            if let Err(e) = spawned {
                // Without it, inotify alone notices changes.
                tracing::error!("cannot start the poll of continuous file sets: {e}");
            }
            poller
        })
    }

    fn add(&self, polled: &Arc<Polled>) {
        self.watchers.lock().unwrap_or_else(|e| e.into_inner()).insert(polled.id, polled.clone());
    }

    fn remove(&self, polled: &Polled) {
        self.watchers.lock().unwrap_or_else(|e| e.into_inner()).remove(&polled.id);
    }

    /// Polls every watcher once, outside the registry's lock.
    fn poll_all(&self, now: Instant) {
        let watchers: Vec<Arc<Polled>> = self.watchers.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for polled in watchers {
            polled.poll(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    /// Firings of `expr` from `start` for `hours` simulated hours.
    async fn firings(expr: &str, start: DateTime<Utc>, hours: i64) -> Vec<DateTime<Utc>> {
        let schedule: CronSchedule = expr.parse().unwrap();
        let clock = Clock::fake(start);
        let end = start + chrono::Duration::hours(hours);
        let mut out = Vec::new();
        let mut after = clock.now();
        loop {
            let t = next_fire(&schedule, &clock, after).await;
            if t > end {
                return out;
            }
            assert!(clock.now() >= t, "woke before the firing time");
            out.push(t);
            after = t;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fires_on_time_across_minute_day_and_dst_boundaries() {
        // Every 15 minutes across midnight.
        let got = firings("*/15 * * * *", utc(2026, 3, 28, 23, 20, 0), 1).await;
        assert_eq!(got, [utc(2026, 3, 28, 23, 30, 0), utc(2026, 3, 28, 23, 45, 0), utc(2026, 3, 29, 0, 0, 0), utc(2026, 3, 29, 0, 15, 0)]);
        // Hourly across the EU switch to summer time (01:00 UTC, 29 March 2026): schedules run
        // in UTC, so there is no skipped or doubled hour.
        let got = firings("@hourly", utc(2026, 3, 29, 0, 30, 0), 3).await;
        assert_eq!(got, [utc(2026, 3, 29, 1, 0, 0), utc(2026, 3, 29, 2, 0, 0), utc(2026, 3, 29, 3, 0, 0)]);
        // And back to winter time (25 October 2026).
        let got = firings("30 1 * * *", utc(2026, 10, 24, 12, 0, 0), 48).await;
        assert_eq!(got, [utc(2026, 10, 25, 1, 30, 0), utc(2026, 10, 26, 1, 30, 0)]);
        // Seconds field: every 2 seconds for one minute is 30 firings.
        let got = firings("*/2 * * * * *", utc(2026, 1, 1, 0, 0, 0), 1).await;
        assert_eq!(got.iter().filter(|t| **t <= utc(2026, 1, 1, 0, 1, 0)).count(), 30);
    }

    #[tokio::test(start_paused = true)]
    async fn a_missed_firing_is_not_replayed() {
        // The scheduler asks for the next firing after *now*: after a long pause (a busy
        // transfer, a suspended machine) it fires once, not once per missed slot.
        let schedule: CronSchedule = "* * * * *".parse().unwrap();
        let clock = Clock::fake(utc(2026, 1, 1, 0, 0, 30));
        tokio::time::advance(Duration::from_secs(3600)).await;
        let t = next_fire(&schedule, &clock, clock.now()).await;
        assert_eq!(t, utc(2026, 1, 1, 1, 1, 0));
    }

    #[tokio::test]
    async fn watcher_wakes_on_a_write() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let w = ChangeWatcher::new(dir.path(), None);
        let start = std::time::Instant::now();
        std::fs::write(dir.path().join("sub/file"), "x").unwrap();
        assert_eq!(w.wait().await, Woke::Change);
        assert!(start.elapsed() < POLL, "woke by the poll, not by the write");
    }

    #[tokio::test]
    async fn watchers_share_one_inotify_and_wake_only_their_own() {
        // More watchers than the kernel's default of 128 inotify instances per user.
        let dir = tempfile::tempdir().unwrap();
        let watchers: Vec<(std::path::PathBuf, ChangeWatcher)> = (0..200)
            .map(|i| {
                let d = dir.path().join(format!("w{i}"));
                std::fs::create_dir(&d).unwrap();
                let w = ChangeWatcher::new(&d, None);
                (d, w)
            })
            .collect();
        assert!(watchers.iter().all(|(_, w)| w.root.is_some()), "some watchers fell back to the poll");
        std::fs::write(watchers[150].0.join("file"), "x").unwrap();
        assert_eq!(watchers[150].1.wait().await, Woke::Change);
        // The others were not woken: a wake-up is a stored permit, seen at once if present.
        let other = tokio::time::timeout(Duration::from_millis(300), watchers[149].1.wait()).await;
        assert!(other.is_err(), "a write under w150 woke w149");
        // Dropping one of two watchers of a tree keeps the other's watch.
        let (d, _) = &watchers[3];
        let again = ChangeWatcher::new(d, None);
        drop(again);
        std::fs::write(d.join("file"), "y").unwrap();
        assert_eq!(watchers[3].1.wait().await, Woke::Change);
    }

    #[test]
    fn the_poll_wakes_a_watcher_only_when_its_counter_moved() {
        let counter = Arc::new(AtomicU64::new(7));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let polled = {
            let (counter, failing) = (counter.clone(), failing.clone());
            Polled::new(Some(Arc::new(move || {
                anyhow::ensure!(!failing.load(Ordering::SeqCst), "cannot read the generation");
                Ok(counter.load(Ordering::SeqCst))
            })))
        };
        // A permit stored by notify_one is what `wait` would see at once.
        let woken = |p: &Polled| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async { tokio::time::timeout(Duration::from_millis(10), p.wake.notified()).await.is_ok() })
        };
        let start = polled.since;
        // Too soon after it started: not read, not woken (inotify covers the first moments).
        polled.poll(start + POLL / 4);
        assert!(!woken(&polled));
        // The first reading wakes it, whatever the value (a change while the daemon was down).
        polled.poll(start + POLL);
        assert!(woken(&polled), "the first reading did not wake the watcher");
        // Idle: the counter stays, nothing is woken, poll after poll.
        for i in 2..5 {
            polled.poll(start + POLL * i);
            assert!(!woken(&polled), "woken though nothing changed");
        }
        // The data changed (btrfs: a commit moved the generation): woken once.
        counter.store(8, Ordering::SeqCst);
        polled.poll(start + POLL * 5);
        assert!(woken(&polled), "a change was not noticed");
        polled.poll(start + POLL * 6);
        assert!(!woken(&polled));
        // A counter that cannot be read wakes it (the check says why), and again next time.
        failing.store(true, Ordering::SeqCst);
        polled.poll(start + POLL * 7);
        assert!(woken(&polled));
        polled.poll(start + POLL * 8);
        assert!(woken(&polled));
        // Readable again, even unchanged: woken once more (nothing to compare with), then idle.
        failing.store(false, Ordering::SeqCst);
        polled.poll(start + POLL * 9);
        assert!(woken(&polled));
        polled.poll(start + POLL * 10);
        assert!(!woken(&polled));
        // Without a counter (ZFS), every poll wakes, as a timer per file set did.
        let plain = Polled::new(None);
        plain.poll(plain.since + POLL);
        assert!(woken(&plain));
        plain.poll(plain.since + POLL * 2);
        assert!(woken(&plain));
    }
}
