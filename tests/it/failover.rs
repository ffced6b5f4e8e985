//! The day of the disaster, on real loop btrfs and QUIC, three nodes: alpha the origin, beta
//! and gamma replicas, continuous mode. alpha dies; `snapship promote` on beta makes it the
//! origin (a new epoch); gamma follows incrementally with no configuration change; alpha,
//! restarted with its unchanged config, is fenced off, steps down (keeping what it held as
//! diverged data) and receives from beta incrementally, its own snapshots serving as bases.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::cluster::*;
use crate::common::*;

/// The size of the first stream a daemon log shows shipped to `replica` (lines "replica up
/// to date" with bytes > 0; 0 means the replica already held the snapshot).
fn first_stream_bytes(log: &str, replica: &str) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains("replica up to date") && l.contains(&format!("replica=\"{replica}\"")))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("bytes=")).and_then(|b| b.parse().ok()))
        .find(|&b: &u64| b > 0)
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[test]
fn promote_a_replica_then_fail_back_without_a_full_resend() {
    require_root!();
    let mut c = Cluster::new("failover", &["alpha", "beta", "gamma"]);
    let Failover { src, beta_dst, gamma_dst, beta_live } = three_node_failover(&c, "mode: continuous\ncontinuous:\n  min_interval: 1s\n");
    fill(&src, 21);
    c.start("beta");
    c.start("gamma");
    c.start("alpha");
    std::fs::write(src.join("before.txt"), "written on alpha").unwrap();
    for dst in [&beta_dst, &gamma_dst] {
        wait_for(Duration::from_secs(60), "alpha's write on both replicas", || read(&dst.join("latest/before.txt")).is_some());
    }

    // The disaster: alpha is gone, its port silent.
    c.kill9("alpha");
    let started = Instant::now();
    let out = snapship().args(["promote", "--config"]).arg(c.dir("beta").join("node.yaml")).arg("projects").output().unwrap();
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "promote failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("promote took {:.2}s:\n{text}", took.as_secs_f64());
    assert!(text.contains("promoted `beta` to origin in epoch 1"), "{text}");
    // Writable at the promote path, with what beta held.
    assert_same_tree(&beta_dst.join("latest"), &beta_live);
    std::fs::write(beta_live.join("after.txt"), "written on beta").unwrap();
    let status = c.status_json("beta");
    let epoch = &status["epochs"][0];
    assert_eq!((epoch["epoch"].as_u64(), epoch["origin"].as_str()), (Some(1), Some("beta")), "{status}");
    assert!(epoch["promoted_from"].as_str().is_some_and(|s| s.starts_with("snapship-")), "{status}");

    // gamma follows the new origin, incrementally.
    wait_for(Duration::from_secs(60), "beta's write on gamma", || read(&gamma_dst.join("latest/after.txt")).is_some());
    // beta logs a transfer after recording it (an fsync'ed state file), a moment after gamma
    // committed it.
    let to_gamma = wait_until(Duration::from_secs(30), "beta's log of its stream to gamma", || first_stream_bytes(&c.daemons["beta"].log_text(), "gamma"));
    eprintln!("first stream beta -> gamma: {to_gamma} bytes");
    assert!(to_gamma < 1 << 20, "gamma got {to_gamma} bytes: not an incremental");

    // alpha comes back with its unchanged config: fenced off, it steps down and fails back.
    c.start("alpha");
    let alpha_dir = c.mnt("alpha").join(".snapship/projects");
    wait_for(Duration::from_secs(90), "beta's write on alpha", || read(&alpha_dir.join("latest/after.txt")).is_some());
    assert_same_tree(&beta_live, &gamma_dst.join("latest"));
    assert_same_tree(&beta_live, &alpha_dir.join("latest"));
    // `list` on the new origin labels it so, and asks the others, the old origin among them.
    let out = snapship().args(["list", "--config"]).arg(c.dir("beta").join("node.yaml")).arg("projects").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "list on beta failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let header = text.lines().next().unwrap_or_default();
    assert!(header.contains("beta (origin)") && header.contains("gamma") && header.contains("alpha"), "{text}");
    // Before it learned the new epoch, alpha was refused: nothing it sent was written.
    let refused = ["beta", "gamma"].iter().any(|n| c.daemons[*n].log_text().contains("refusing a stale origin"));
    assert!(refused, "no member fenced the stale origin off");
    let alpha_log = c.daemons["alpha"].log_text();
    assert!(alpha_log.contains("stepping down") && alpha_log.contains("stepped down"), "{alpha_log}");
    let diverged: Vec<String> =
        std::fs::read_dir(&alpha_dir).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with("diverged-")).collect();
    assert_eq!(diverged.len(), 1, "alpha kept what it held as diverged data: {diverged:?}");
    assert!(libbtrfsutil::subvolume_read_only(&src).unwrap(), "alpha's live file set is frozen");
    let status = c.status_json("alpha");
    assert_eq!(status["epochs"][0]["diverged"][0].as_str(), Some(diverged[0].as_str()), "{status}");
    // The admin looks at the diverged data, then removes it (retention never does).
    let alpha_config = c.dir("alpha").join("node.yaml");
    let out = snapship().args(["diverged", "--config"]).arg(&alpha_config).arg("projects").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&diverged[0]), "{}", String::from_utf8_lossy(&out.stdout));
    let out = snapship().args(["diverged", "--config"]).arg(&alpha_config).args(["projects", "--remove", &diverged[0]]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!alpha_dir.join(&diverged[0]).exists(), "the diverged data is still there");
    let log = c.daemons["beta"].log_text();
    let to_alpha = first_stream_bytes(&log, "alpha").unwrap_or_else(|| panic!("beta shipped nothing to alpha:\n{log}"));
    eprintln!("failback: first stream beta -> alpha: {to_alpha} bytes");
    assert!(to_alpha < 1 << 20, "alpha got {to_alpha} bytes: a full resend");

    // Planned switchover back to alpha, with writes going on right up to the command.
    for i in 0..5 {
        std::fs::write(beta_live.join(format!("late-{i}.txt")), format!("written on beta {i}")).unwrap();
    }
    let started = Instant::now();
    let out = snapship().args(["switchover", "--config"]).arg(c.dir("beta").join("node.yaml")).args(["projects", "--to", "alpha"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "switchover failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("switchover took {:.2}s:\n{text}", started.elapsed().as_secs_f64());
    // Every write made on beta before the command is in alpha's live file set, writable.
    for i in 0..5 {
        assert_eq!(read(&src.join(format!("late-{i}.txt"))).as_deref(), Some(format!("written on beta {i}").as_str()));
    }
    assert!(!libbtrfsutil::subvolume_read_only(&src).unwrap(), "alpha's live file set is writable again");
    assert!(libbtrfsutil::subvolume_read_only(&beta_live).unwrap(), "beta froze its writes");
    // gamma follows alpha.
    std::fs::write(src.join("back.txt"), "alpha again").unwrap();
    wait_for(Duration::from_secs(60), "alpha's new write on gamma", || read(&gamma_dst.join("latest/back.txt")).is_some());
    wait_for(Duration::from_secs(60), "alpha's new write on beta", || read(&beta_dst.join("latest/back.txt")).is_some());
    c.stop("alpha");
    c.stop("gamma");
    c.stop("beta");
}

/// A member the policy marks `promotable: false` never becomes the origin: `promote` and
/// `switchover --to` refuse it, and when it promotes itself anyway (its own copy of the
/// policy says nothing: hostile, or just stale), the members whose policy marks it refuse its
/// epoch, and the origin keeps its role and its writes.
#[test]
fn a_member_not_promotable_that_promotes_itself_anyway_is_not_followed() {
    require_root!();
    let mut c = Cluster::new("not_promotable", &["alpha", "beta", "gamma"]);
    let Failover { src, beta_dst, .. } = three_node_failover(&c, "mode: snapshot\nschedule: \"@hourly\"\n");
    // gamma's entry is the last of the policy: the key goes to it.
    let marked = std::fs::read_to_string(c.dir("alpha").join("policies/projects.yaml")).unwrap() + "    promotable: false\n";
    let unmarked = std::fs::read_to_string(c.dir("gamma").join("policies/projects.yaml")).unwrap()
        + &format!("    promote_path: {}\n", c.mnt("gamma").join("projects").display());
    for n in ["alpha", "beta", "gamma"] {
        c.configure(n, &[("projects", marked.clone())]);
    }
    fill(&src, 31);
    c.start("beta");
    c.start("gamma");
    c.start("alpha");
    c.sync_ok("alpha", "projects");
    let promote_gamma = |c: &Cluster, force: bool| {
        let mut cmd = snapship();
        cmd.args(["promote", "--config"]).arg(c.dir("gamma").join("node.yaml")).arg("projects");
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let out = promote_gamma(&c, true);
    let said = text(&out);
    assert!(!out.status.success() && said.contains("`gamma` may not be the origin of `projects`: its replica entry says `promotable: false`"), "{said}");
    let out = snapship().args(["switchover", "--config"]).arg(c.dir("alpha").join("node.yaml")).args(["projects", "--to", "gamma"]).output().unwrap();
    let said = text(&out);
    assert!(!out.status.success() && said.contains("may not be the origin"), "{said}");

    // An origin whose copy lacks the key asks gamma to take over: gamma itself refuses, and
    // alpha thaws and stays the origin.
    c.stop("alpha");
    c.configure("alpha", &[("projects", unmarked.clone())]);
    c.start("alpha");
    let out = snapship().args(["switchover", "--config"]).arg(c.dir("alpha").join("node.yaml")).args(["projects", "--to", "gamma"]).output().unwrap();
    let said = text(&out);
    assert!(!out.status.success() && said.contains("in the policy on `gamma`: it does not take over") && said.contains("writes are thawed"), "{said}");
    std::fs::write(src.join("thawed.txt"), "alpha writes again").unwrap();
    c.stop("alpha");
    c.configure("alpha", &[("projects", marked.clone())]);
    c.start("alpha");

    // gamma's own copy drops the key: it promotes itself while alpha runs.
    c.stop("gamma");
    c.configure("gamma", &[("projects", unmarked)]);
    c.start("gamma");
    let out = promote_gamma(&c, true);
    assert!(out.status.success(), "gamma's promotion (by its own policy) failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let out = c.sync("gamma", "projects");
    let said = text(&out);
    assert!(!out.status.success(), "gamma shipped as origin:\n{said}");
    assert!(said.contains("does not follow epoch 1 (origin `gamma`)"), "{said}");

    // alpha is still the origin: beta takes its next snapshot, alpha's writes stay writable.
    std::fs::write(src.join("still-alpha.txt"), "alpha keeps the role").unwrap();
    let out = c.sync("alpha", "projects");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.lines().any(|l| l.contains(" -> beta: incremental from")), "{said}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(beta_dst.join("latest/still-alpha.txt")).ok().as_deref(), Some("alpha keeps the role"));
    for n in ["alpha", "beta"] {
        let status = c.status_json(n);
        assert_eq!(status["epochs"][0]["origin"].as_str(), Some("alpha"), "{n}: {status}");
    }
    std::fs::write(src.join("writable.txt"), "yes").unwrap();
    let log = c.daemons["alpha"].log_text();
    assert!(!log.contains("stepped down") && log.contains("not stepping down: refusing epoch 1: `gamma` may not be the origin"), "alpha stepped down:\n{log}");
    c.stop("alpha");
    c.stop("beta");
    c.stop("gamma");
}

/// Epochs are not signed, so a member's fenced answer naming another member is confirmed with
/// that member before the origin steps down: gamma (hostile, or with a corrupted state)
/// claims that beta was promoted; beta, asked, still follows alpha, so alpha stays the
/// origin and beta keeps receiving.
#[test]
fn an_epoch_a_member_claims_for_another_is_confirmed_before_stepping_down() {
    require_root!();
    let mut c = Cluster::new("unconfirmed_epoch", &["alpha", "beta", "gamma"]);
    let Failover { src, beta_dst, .. } = three_node_failover(&c, "mode: snapshot\nschedule: \"@hourly\"\n");
    let epochs = c.dir("gamma").join("state/epochs");
    std::fs::create_dir_all(&epochs).unwrap();
    std::fs::write(epochs.join("projects.json"), r#"{"epoch":{"number":1,"origin":"beta"}}"#).unwrap();
    fill(&src, 41);
    c.start("beta");
    c.start("gamma");
    c.start("alpha");
    let out = c.sync("alpha", "projects");
    let said = text(&out);
    assert!(said.lines().any(|l| l.contains(" -> beta: full")), "{said}");
    wait_for(Duration::from_secs(30), "alpha asking beta", || c.daemons["alpha"].log_text().contains("not stepping down"));
    let log = c.daemons["alpha"].log_text();
    assert!(log.contains("not stepping down: `gamma` says `beta` is the origin in epoch 1, but `beta` still answers this node as a replica"), "{log}");
    assert!(!log.contains("stepped down"), "{log}");
    std::fs::write(src.join("still-alpha.txt"), "alpha keeps the role").unwrap();
    let out = c.sync("alpha", "projects");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.lines().any(|l| l.contains(" -> beta: incremental from")), "{said}");
    assert_eq!(std::fs::read_to_string(beta_dst.join("latest/still-alpha.txt")).ok().as_deref(), Some("alpha keeps the role"));
    assert_eq!(c.status_json("alpha")["epochs"][0]["origin"].as_str(), Some("alpha"));
    c.stop("alpha");
    c.stop("beta");
    c.stop("gamma");
}
