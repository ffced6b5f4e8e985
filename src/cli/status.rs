//! `snapship status` in words: what the daemon's [`StatusReport`] says, one file set after
//! the other, with whatever needs the admin's attention (an RPO exceeded, a failure) on a
//! line of its own.

use std::fmt::Write;
use std::time::Duration;

use bytesize::ByteSize;
use chrono::{DateTime, Utc};

use crate::observe::status::{ErrorStatus, ReplicaStatus, StatusReport, VerifyStatus};

/// The report as `snapship status` prints it.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    let w = &mut out;
    line(w, format!("node {}", report.node));
    for o in &report.origin_of {
        let rpo = o.rpo_seconds.map_or(String::new(), |r| format!(", rpo {}", seconds(r)));
        line(w, format!("{} (origin, {}{rpo}): newest {}, {} snapshot(s)", o.fileset, o.mode, o.newest.as_deref().unwrap_or("-"), o.snapshots));
        if let Some(e) = &o.last_snapshot_error {
            line(w, format!("  FAILED {}", error(e)));
        }
        if let Some(e) = &o.last_prune_error {
            line(w, format!("  FAILED {}", error(e)));
        }
        if let Some(next) = &o.next_verify {
            line(w, format!("  next scheduled verify at {}", when(next)));
        }
        for r in &o.replicas {
            replica(w, r, o.rpo_seconds);
        }
    }
    for o in &report.relay_of {
        let fed_by = o.fed_by.as_deref().unwrap_or("-");
        line(w, format!("{} (relay, fed by {fed_by}): newest received {}, {} snapshot(s)", o.fileset, o.newest.as_deref().unwrap_or("-"), o.snapshots));
        for r in &o.replicas {
            replica(w, r, o.rpo_seconds);
        }
    }
    for e in report.epochs.iter().filter(|e| e.epoch > 0 || !e.diverged.is_empty()) {
        let mut text = format!("{}: origin `{}` in epoch {}", e.fileset, e.origin, e.epoch);
        if let (Some(at), Some(from)) = (&e.promoted_at, &e.promoted_from) {
            let _ = write!(text, ", promoted here at {} from {from}", when(at));
        }
        line(w, text);
        for d in &e.diverged {
            line(w, format!("  diverged data kept: {d} (see docs/failover.md)"));
        }
    }
    for r in &report.replica_of {
        line(
            w,
            format!(
                "{} (replica of {}): newest {} (age {}), {} snapshot(s)",
                r.fileset,
                r.origin,
                r.newest.as_deref().unwrap_or("-"),
                r.lag_seconds.map_or("-".to_string(), seconds),
                r.snapshots
            ),
        );
        if let Some(e) = &r.last_prune_error {
            line(w, format!("  FAILED {}", error(e)));
        }
        for t in &r.tampered {
            line(
                w,
                format!(
                    "  TAMPERED {t}: changed after it was received; never used as a base (`snapship verify --snapshot {t}` on the origin shows what differs)"
                ),
            );
        }
    }
    for b in &report.config.broken {
        line(w, format!("{}: broken, left out: {} (fix it, then `systemctl reload snapship`)", b.file, b.error));
    }
    if let Some(r) = report.config.reload.as_ref().filter(|r| !r.ok) {
        line(w, format!("RELOAD REFUSED at {}: {}", when(&r.at), r.message));
    }
    out
}

/// One replica of a file set this node is origin of: what it holds and how far behind it
/// is, the transfer under way, the totals, the last error.
fn replica(w: &mut String, r: &ReplicaStatus, rpo: Option<f64>) {
    let lag = r.lag_seconds.map_or("-".to_string(), seconds);
    let base = r.newest.as_deref().map_or("none yet".to_string(), |n| format!("common base {n}"));
    line(w, format!("  -> {}: {base}, lag {lag}", r.node));
    if let (true, Some(rpo)) = (r.rpo_exceeded, rpo) {
        line(w, format!("     RPO EXCEEDED: the replica lacks changes from {lag} ago, more than the rpo of {}", seconds(rpo)));
    }
    if let Some(t) = &r.transfer {
        let from = t.base.as_deref().map_or("full".to_string(), |b| format!("from {b}"));
        let resumed = if t.resumed_from > 0 { format!(", resumed at {}", size(t.resumed_from)) } else { String::new() };
        line(
            w,
            format!(
                "     sending {} ({from}): {} so far at {}/s, since {}{resumed}",
                t.snapshot,
                size(t.bytes),
                size(t.bytes_per_second as u64),
                when(&t.started)
            ),
        );
    }
    if let Some(room) = &r.waiting_for_room {
        let needs = room.needed.map_or("more".to_string(), size);
        line(
            w,
            format!(
                "     WAITING FOR ROOM on {} since {}: {} free, the stream needs {needs}; free space there (the origin checks, and sends again once there is room)",
                r.node,
                when(&room.since),
                size(room.free)
            ),
        );
    }
    line(w, format!("     totals: {} ok, {} failed, {} shipped", r.transfers_ok, r.transfers_failed, size(r.bytes_shipped)));
    feeds(w, &r.downstream, 1);
    if r.backfill_pending > 0 || r.backfill_bytes > 0 {
        line(w, format!("     backfill: {} missed snapshot(s) to go, {} backfilled", r.backfill_pending, size(r.backfill_bytes)));
    }
    if let Some(e) = &r.last_error {
        line(w, format!("     last transfer error {}", error(e)));
    }
    if let Some(v) = &r.verify {
        verified(w, &r.node, v);
    }
}

/// What the daemon's last verifies of a replica found.
fn verified(w: &mut String, node: &str, v: &VerifyStatus) {
    match &v.last {
        Some(run) if run.mismatches == 0 => line(w, format!("     verified {} at {}: equal", run.snapshot, when(&run.at))),
        Some(run) => {
            line(
                w,
                format!(
                    "     VERIFY MISMATCH: {node}'s copy of {} differs from the origin's in {} place(s) (verified at {}); do not promote it; `snapship verify --replica {node}` names each",
                    run.snapshot,
                    run.mismatches,
                    when(&run.at)
                ),
            );
            for d in &run.differences {
                line(w, format!("       {d}"));
            }
            if run.mismatches > run.differences.len() {
                line(w, format!("       ... and {} more (the daemon's log has them all)", run.mismatches - run.differences.len()));
            }
        }
        None => {}
    }
    if let Some(e) = &v.last_error {
        line(w, format!("     could not verify {}", error(e)));
    }
}

/// The replicas a relay feeds (cascades), as it reported them, indented by depth.
fn feeds(w: &mut String, hops: &[crate::ship::protocol::Hop], depth: usize) {
    for h in hops {
        let lag = h.lag_seconds.map_or("-".to_string(), |l| seconds(l as f64));
        let backfill = if h.backfill_pending > 0 { format!(", {} to backfill", h.backfill_pending) } else { String::new() };
        line(w, format!("     {}feeds {}: newest {}, lag {lag}{backfill}", "  ".repeat(depth - 1), h.node, h.newest.as_deref().unwrap_or("none yet")));
        if let Some(e) = &h.last_error {
            line(w, format!("     {}  last error: {e}", "  ".repeat(depth - 1)));
        }
        feeds(w, &h.downstream, depth + 1);
    }
}

fn line(w: &mut String, text: String) {
    w.push_str(&text);
    w.push('\n');
}

fn error(e: &ErrorStatus) -> String {
    format!("at {}: {}", when(&e.at), e.message)
}

fn when(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn seconds(s: f64) -> String {
    humantime::format_duration(Duration::from_secs(s as u64)).to_string()
}

fn size(bytes: u64) -> String {
    ByteSize(bytes).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::status::{OriginStatus, TransferStatus};

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn beta() -> ReplicaStatus {
        ReplicaStatus {
            node: "beta".into(),
            newest: Some("snapship-20260101T000000.000Z".into()),
            lag_seconds: Some(0.0),
            rpo_exceeded: false,
            transfer: None,
            last_success: None,
            last_error: None,
            transfers_ok: 3,
            transfers_failed: 1,
            bytes_shipped: 24 << 20,
            bytes_sent: 24 << 20,
            resumes: 0,
            backfill_pending: 0,
            backfill_bytes: 0,
            downstream: vec![],
            waiting_for_room: None,
            verify: None,
        }
    }

    fn report(replica: ReplicaStatus) -> StatusReport {
        StatusReport {
            node: "alpha".into(),
            origin_of: vec![OriginStatus {
                fileset: "projects".into(),
                mode: "continuous".into(),
                newest: Some("snapship-20260101T000000.000Z".into()),
                snapshots: 2,
                rpo_seconds: Some(120.0),
                last_snapshot_error: None,
                last_prune_error: None,
                replicas: vec![replica],
                fed_by: None,
                next_verify: None,
            }],
            replica_of: vec![],
            relay_of: vec![],
            epochs: vec![],
            config: Default::default(),
        }
    }

    #[test]
    fn a_current_replica_shows_its_common_base_lag_and_totals() {
        let text = render(&report(beta()));
        assert_eq!(
            text,
            "node alpha\n\
             projects (origin, continuous, rpo 2m): newest snapship-20260101T000000.000Z, 2 snapshot(s)\n  \
             -> beta: common base snapship-20260101T000000.000Z, lag 0s\n     \
             totals: 3 ok, 1 failed, 24.0 MiB shipped\n"
        );
    }

    #[test]
    fn a_transfer_in_progress_shows_its_bytes_and_rate() {
        let mut r = beta();
        r.transfer = Some(TransferStatus {
            snapshot: "snapship-20260101T000100.000Z".into(),
            base: Some("snapship-20260101T000000.000Z".into()),
            bytes: 8 << 20,
            bytes_per_second: (2 << 20) as f64,
            started: at("2026-01-01T00:01:01Z"),
            resumed_from: 0,
        });
        let text = render(&report(r));
        assert!(
            text.contains(
                "sending snapship-20260101T000100.000Z (from snapship-20260101T000000.000Z): 8.0 MiB so far at 2.0 MiB/s, since 2026-01-01 00:01:01 UTC\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn an_exceeded_rpo_and_failures_stand_out() {
        let mut r = beta();
        (r.lag_seconds, r.rpo_exceeded) = (Some(300.0), true);
        r.last_error = Some(ErrorStatus { at: at("2026-01-01T00:02:00Z"), message: "beta cannot be reached".into() });
        let mut report = report(r);
        report.origin_of[0].last_snapshot_error = Some(ErrorStatus { at: at("2026-01-01T00:03:00Z"), message: "cannot take a snapshot: gone".into() });
        let text = render(&report);
        assert!(text.contains("  FAILED at 2026-01-01 00:03:00 UTC: cannot take a snapshot: gone\n"), "{text}");
        assert!(text.contains("lag 5m\n     RPO EXCEEDED: the replica lacks changes from 5m ago, more than the rpo of 2m\n"), "{text}");
        assert!(text.contains("last transfer error at 2026-01-01 00:02:00 UTC: beta cannot be reached"), "{text}");
    }

    #[test]
    fn a_replica_without_room_says_so_and_what_to_do() {
        let mut r = beta();
        r.waiting_for_room = Some(crate::observe::status::RoomWait { since: at("2026-01-01T00:04:00Z"), free: 1 << 20, needed: Some(3 << 30) });
        let text = render(&report(r));
        assert!(text.contains("WAITING FOR ROOM on beta since 2026-01-01 00:04:00 UTC: 1.0 MiB free, the stream needs 3.0 GiB; free space there"), "{text}");
    }

    #[test]
    fn a_verify_mismatch_stands_out_with_its_differences() {
        use crate::observe::status::VerifyRun;
        let mut r = beta();
        let run = |mismatches, differences: Vec<String>| VerifyRun {
            snapshot: "snapship-20260101T000000.000Z".into(),
            at: at("2026-01-01T00:05:00Z"),
            mismatches,
            differences,
        };
        r.verify = Some(VerifyStatus { last: Some(run(0, vec![])), last_success: Some(at("2026-01-01T00:05:00Z")), last_error: None });
        let mut shown = report(r.clone());
        shown.origin_of[0].next_verify = Some(at("2026-01-01T01:00:00Z"));
        let text = render(&shown);
        assert!(text.contains("  next scheduled verify at 2026-01-01 01:00:00 UTC\n"), "{text}");
        assert!(text.contains("     verified snapship-20260101T000000.000Z at 2026-01-01 00:05:00 UTC: equal\n"), "{text}");
        r.verify = Some(VerifyStatus {
            last: Some(run(3, vec!["M sub/f.txt: content".into()])),
            last_success: None,
            last_error: Some(ErrorStatus { at: at("2026-01-01T00:06:00Z"), message: "beta cannot be reached".into() }),
        });
        let text = render(&report(r));
        assert!(text.contains("VERIFY MISMATCH: beta's copy of snapship-20260101T000000.000Z differs from the origin's in 3 place(s)"), "{text}");
        assert!(text.contains("       M sub/f.txt: content\n       ... and 2 more"), "{text}");
        assert!(text.contains("could not verify at 2026-01-01 00:06:00 UTC: beta cannot be reached"), "{text}");
    }

    #[test]
    fn a_replica_that_holds_nothing_yet_says_so() {
        let mut r = beta();
        (r.newest, r.lag_seconds) = (None, None);
        assert!(render(&report(r)).contains("-> beta: none yet, lag -\n"));
    }
}
