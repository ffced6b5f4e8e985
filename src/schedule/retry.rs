//! When a failed transfer is tried again: the backoff wait, cut short when the replica,
//! unreachable during it, answers again; or, after the replica said it has no room, the
//! wait for room. Pure: the origin's worker (`origin/job.rs`) sleeps, probes and reports
//! to these, with the times it reads from its clock.
//!
//! A backoff that grows to minutes is right for a replica that keeps failing, and wrong
//! for one that was only out of reach: after a three-minute outage the next try came 45 to
//! 54 s after the link was back. So while it waits the worker probes cheaply (a `list`, no
//! stream) every [`probe_period`]; once a probe has gone unanswered, the first answer ends
//! the wait. A replica that answers all along (it refused the stream, or broke off a
//! transfer while reachable) waits the backoff out: probing never turns the backoff into a
//! busy loop.

use std::time::Duration;

/// How often a waiting worker probes its replica: a quarter of the stall timeout, between
/// 1 and 5 s (a probe is one small request; a replica's return is noticed within that).
pub fn probe_period(stall: Duration) -> Duration {
    (stall / 4).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// How long a probe of a replica (a `list`) may take before the replica counts as out of
/// reach: its period, at least 2 s (a handshake and a listing, a few round trips).
pub fn probe_timeout(stall: Duration) -> Duration {
    probe_period(stall).max(Duration::from_secs(2))
}

/// The wait before trying a failed transfer again, with probes on the way. Times are
/// offsets on the caller's monotonic clock.
#[derive(Debug, Clone)]
pub struct RetryWait {
    /// When the backoff is over.
    until: Duration,
    probe_every: Duration,
    next_probe: Duration,
    /// A probe went unanswered: the replica was out of reach during this wait.
    unreachable: bool,
}

/// What the worker does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Sleep this long, then ask again.
    Sleep(Duration),
    /// Probe the replica now and report with [`RetryWait::probed`].
    Probe,
    /// Try the transfer again.
    Retry,
}

impl RetryWait {
    /// A backoff of `delay` from `now`, probing every `probe_every`.
    pub fn new(now: Duration, delay: Duration, probe_every: Duration) -> RetryWait {
        RetryWait { until: now + delay, probe_every, next_probe: now + probe_every, unreachable: false }
    }

    pub fn next(&self, now: Duration) -> Next {
        if now >= self.until {
            Next::Retry
        } else if now >= self.next_probe {
            Next::Probe
        } else {
            Next::Sleep(self.next_probe.min(self.until) - now)
        }
    }

    /// A probe at `now` was answered (or not); `true`: retry now (the replica is back after
    /// being out of reach).
    pub fn probed(&mut self, now: Duration, answered: bool) -> bool {
        self.next_probe = now + self.probe_every;
        if !answered {
            self.unreachable = true;
            return false;
        }
        self.unreachable
    }
}

/// Whether a replica that had no room for a stream has room now. It needs `needed` bytes
/// when it knew the stream's length; otherwise more than it took before the receive failed
/// (`received`, which is about what was free then) or than was free when it answered
/// (`free_then`), by a margin of an eighth, at least 64 MiB, so that the space of the failed
/// receive coming back, or a few freed megabytes, start no resend that fails the same way.
pub fn room_enough(free_now: u64, free_then: u64, received: u64, needed: Option<u64>) -> bool {
    match needed {
        Some(needed) => free_now >= needed,
        None => {
            let took = free_then.max(received);
            free_now > took.saturating_add((took / 8).max(64 << 20))
        }
    }
}

/// The longest a worker waits for room without trying again: where the stream shrinks on
/// the replica's disk (compression), it may fit in less than it took; one attempt an hour
/// finds out.
pub const ROOM_WAIT_MAX: Duration = Duration::from_secs(3600);

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// Drives a wait as the worker does, with `answers(t)` telling whether a probe at `t`
    /// is answered; returns when it retries.
    fn run(mut wait: RetryWait, answers: impl Fn(Duration) -> bool) -> Duration {
        let mut now = Duration::ZERO;
        loop {
            match wait.next(now) {
                Next::Sleep(d) => now += d,
                Next::Probe => {
                    if wait.probed(now, answers(now)) {
                        return now;
                    }
                }
                Next::Retry => return now,
            }
        }
    }

    #[test]
    fn a_replica_out_of_reach_is_retried_as_soon_as_it_answers() {
        // Backing off 300 s; the link comes back at 185 s; probes every 5 s.
        let wait = RetryWait::new(Duration::ZERO, 300 * S, 5 * S);
        assert_eq!(run(wait, |t| t >= 185 * S), 185 * S);
    }

    #[test]
    fn a_replica_that_answers_all_along_waits_the_backoff_out() {
        // It refused the stream (or broke off while reachable): probing must not turn the
        // backoff into a busy loop.
        let wait = RetryWait::new(Duration::ZERO, 64 * S, 5 * S);
        assert_eq!(run(wait, |_| true), 64 * S);
    }

    #[test]
    fn a_replica_that_stays_away_is_retried_when_the_backoff_ends() {
        let wait = RetryWait::new(Duration::ZERO, 32 * S, 5 * S);
        assert_eq!(run(wait, |_| false), 32 * S);
    }

    #[test]
    fn sleeps_never_overrun_the_backoff_and_probes_keep_their_period() {
        let mut wait = RetryWait::new(10 * S, 7 * S, 5 * S);
        assert_eq!(wait.next(10 * S), Next::Sleep(5 * S));
        assert_eq!(wait.next(15 * S), Next::Probe);
        assert!(!wait.probed(15 * S, false));
        assert_eq!(wait.next(15 * S), Next::Sleep(2 * S), "the backoff ends before the next probe");
        assert_eq!(wait.next(17 * S), Next::Retry);
    }

    #[test]
    fn probe_period_follows_the_stall_timeout_within_bounds() {
        assert_eq!(probe_period(120 * S), 5 * S);
        assert_eq!(probe_period(8 * S), 2 * S);
        assert_eq!(probe_period(Duration::from_millis(500)), S);
    }

    #[test]
    fn room_is_enough_when_the_stream_fits_or_clearly_more_is_free() {
        assert!(room_enough(2 << 30, 0, 0, Some(2 << 30)));
        assert!(!room_enough((2 << 30) - 1, 0, 0, Some(2 << 30)));
        // Unknown length: the stream took 100 MiB before the filesystem was full; the
        // failed receive's space coming back, or a few more MiB, is no reason to resend.
        assert!(!room_enough(100 << 20, 0, 100 << 20, None));
        assert!(!room_enough(110 << 20, 100 << 20, 0, None));
        assert!(room_enough(200 << 20, 0, 100 << 20, None));
        // On a large filesystem the margin is an eighth.
        assert!(!room_enough(9 << 30, 8 << 30, 0, None));
        assert!(room_enough(10 << 30, 0, 8 << 30, None));
    }

    #[test]
    fn a_replica_claiming_absurd_room_needs_cannot_overflow_the_rule() {
        // The figures come from the wire: a hostile replica's worst is to make its origin
        // wait (at most ROOM_WAIT_MAX per attempt), never a panic or a wrap-around.
        assert!(!room_enough(u64::MAX - 1, u64::MAX, u64::MAX, None));
        assert!(!room_enough(u64::MAX - 1, 0, 0, Some(u64::MAX)));
        assert!(room_enough(u64::MAX, 0, 0, Some(u64::MAX)));
    }
}
