//! Getting a snapshot another member holds, on real loop btrfs and QUIC: `promote` on a
//! replica that missed the last snapshot first fetches it from the survivor that has it (no
//! write that reached a survivor is lost), and `restore --from NODE` restores a snapshot this
//! node lost from another member's copy, shipped incrementally from the base both hold.

use std::path::Path;
use std::time::Duration;

use crate::common::cluster::*;
use crate::common::*;

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The number before "stream bytes" in a fetch report.
fn stream_bytes(text: &str) -> Option<u64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words.windows(3).find(|w| w[1] == "stream" && w[2].starts_with("bytes")).and_then(|w| w[0].trim_start_matches('(').parse().ok())
}

#[test]
fn promote_first_fetches_the_newer_snapshot_a_survivor_holds() {
    require_root!();
    let mut c = Cluster::new("fetch-promote", &["alpha", "beta", "gamma"]);
    let Failover { src, beta_dst, gamma_dst, beta_live } = three_node_failover(&c, "mode: snapshot\nschedule: \"@hourly\"\n");
    fill(&src, 31);
    c.start("beta");
    c.start("gamma");
    c.start("alpha");
    c.sync_ok("alpha", "projects");
    // beta misses the last snapshot: only gamma holds the last write when alpha dies.
    c.stop("beta");
    std::fs::write(src.join("last.txt"), "the last write on alpha").unwrap();
    let _ = c.sync("alpha", "projects");
    wait_for(Duration::from_secs(60), "the last write on gamma", || read(&gamma_dst.join("latest/last.txt")).is_some());
    let newest = snapshots(&gamma_dst).last().cloned().unwrap();
    assert!(!snapshots(&beta_dst).contains(&newest), "beta got the last snapshot too");
    c.kill9("alpha");
    c.start("beta");

    let out = snapship().args(["promote", "--config"]).arg(c.dir("beta").join("node.yaml")).arg("projects").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "promote failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(text.contains(&format!("fetched {newest} from `gamma` first")), "{text}");
    let bytes = stream_bytes(&text).unwrap_or_else(|| panic!("no stream bytes in {text}"));
    assert!(bytes < 1 << 20, "the fetch shipped {bytes} bytes: not an incremental");
    assert!(text.contains(&format!("from {newest}")), "promoted from another snapshot: {text}");
    // The promoted file set holds the last write that reached a survivor.
    assert_eq!(read(&beta_live.join("last.txt")).as_deref(), Some("the last write on alpha"));
    assert_same_tree(&gamma_dst.join(&newest), &beta_live);
    // gamma follows beta from the snapshot both hold now.
    std::fs::write(beta_live.join("after.txt"), "written on beta").unwrap();
    let _ = c.sync("beta", "projects");
    wait_for(Duration::from_secs(60), "beta's write on gamma", || read(&gamma_dst.join("latest/after.txt")).is_some());
    c.stop("gamma");
    c.stop("beta");
}

#[test]
fn restore_from_another_member_ships_the_snapshot_incrementally() {
    require_root!();
    let (mut c, src, dst) = Cluster::two_nodes("fetch-restore", 400, |p| p);
    let alpha_config = c.dir("alpha").join("node.yaml");
    let snapdir = c.mnt("alpha").join(".snapship/projects");
    fill(&src, 32);
    // Without alpha's daemon there is nothing to receive the snapshot: said so.
    let out = snapship()
        .args(["restore", "--config"])
        .arg(&alpha_config)
        .args(["projects", "--from", "beta", "--at", "now", "--to"])
        .arg(c.mnt("alpha").join("early"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("needs this node's daemon"), "{err}");
    c.start("alpha");
    c.sync_ok("alpha", "projects");
    write_random(&src.join("new.bin"), 200 << 10, 33);
    c.sync_ok("alpha", "projects");
    let names = snapshots(&snapdir);
    let (first, second) = (names[0].clone(), names[1].clone());
    assert!(snapshots(&dst).contains(&second));
    // alpha loses its newest snapshot; beta still holds it.
    sh(&format!("btrfs subvolume delete {} >/dev/null", snapdir.join(&second).display()));
    let to = c.mnt("alpha").join("restored");
    let out = snapship()
        .args(["restore", "--config"])
        .arg(&alpha_config)
        .args(["projects", "--from", "beta", "--snapshot", &second, "--to"])
        .arg(&to)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "restore --from failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(text.contains(&format!("fetched {second} from `beta`")) && text.contains(&format!("incremental from {first}")), "{text}");
    let bytes = stream_bytes(&text).unwrap_or_else(|| panic!("no stream bytes in {text}"));
    assert!(bytes < 1 << 20, "{bytes} bytes shipped for a 200 KiB change: not an incremental");
    assert_same_tree(&dst.join(&second), &to);
    assert!(snapshots(&snapdir).contains(&second), "alpha holds the snapshot again");
    // Held now: a second restore fetches nothing.
    let again = c.mnt("alpha").join("again");
    let out = snapship()
        .args(["restore", "--config"])
        .arg(&alpha_config)
        .args(["projects", "--from", "beta", "--snapshot", &second, "--to"])
        .arg(&again)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("held here already"), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    c.stop("alpha");
    c.stop("beta");
}
