//! Replication between nodes over real QUIC on loopback, each node with its own loop btrfs:
//! two nodes, a star of three, both directions at once, and the ways a peer gets refused.

use crate::common::cluster::*;
use crate::common::*;

#[test]
fn two_nodes_full_then_incremental() {
    require_root!();
    let (mut c, src, dst) = Cluster::two_nodes("quic_two_nodes", 400, |p| p);

    fill(&src, 1);
    let out = c.sync_ok("alpha", "projects");
    assert!(out.contains("-> beta: full"), "{out}");
    std::fs::write(src.join("sub/f3.txt"), "changed").unwrap();
    std::fs::remove_file(src.join("sub/f4.txt")).unwrap();
    let out = c.sync_ok("alpha", "projects");
    assert!(out.contains("-> beta: incremental from snapship-"), "{out}");

    let names = snapshots(&dst);
    assert_eq!(names.len(), 2);
    let snapdir = c.mnt("alpha").join(".snapship/projects");
    for n in &names {
        assert_eq!(subvol(&dst.join(n)).received.as_deref(), Some(subvol(&snapdir.join(n)).uuid.as_str()));
        assert_same_tree(&snapdir.join(n), &dst.join(n));
    }
    assert_eq!(subvol(&dst.join(&names[1])).parent.as_deref(), Some(subvol(&dst.join(&names[0])).uuid.as_str()));
    assert_same_tree(&src, &dst.join("latest"));
    c.stop("beta");
}

#[test]
fn star_of_three_with_one_replica_down() {
    require_root!();
    let mut c = Cluster::new("quic_star", &["alpha", "beta", "gamma"]);
    let src = c.fs["alpha"].subvolume("projects");
    let (bdst, gdst) = (c.mnt("beta").join("r/projects"), c.mnt("gamma").join("r/projects"));
    let p = policy("projects", "alpha", &src, &[("beta", bdst.clone()), ("gamma", gdst.clone())]);
    for n in ["alpha", "beta", "gamma"] {
        c.configure(n, &[("projects", p.clone())]);
    }
    c.start("beta");
    c.start("gamma");

    fill(&src, 2);
    c.sync_ok("alpha", "projects");
    assert_same_tree(&src, &bdst.join("latest"));
    assert_same_tree(&src, &gdst.join("latest"));

    // gamma down: beta still receives; the sync reports gamma's failure.
    c.stop("gamma");
    std::fs::write(src.join("while-gamma-was-down"), "x").unwrap();
    let out = c.sync("alpha", "projects");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "a failed replica makes sync fail:\n{text}");
    assert!(text.contains("-> beta: incremental"), "{text}");
    assert!(text.contains("-> gamma: FAILED"), "{text}");
    assert_same_tree(&src, &bdst.join("latest"));
    assert_eq!(snapshots(&gdst).len(), 1);

    // gamma back: it catches up, incrementally from the snapshot it has.
    c.start("gamma");
    std::fs::write(src.join("after"), "y").unwrap();
    let text = c.sync_ok("alpha", "projects");
    assert!(text.contains("-> gamma: incremental"), "{text}");
    assert_same_tree(&src, &gdst.join("latest"));
    assert_eq!(snapshots(&gdst).len(), 2);
    assert_eq!(snapshots(&bdst).len(), 3);
}

#[test]
fn bidirectional_both_flow_at_once() {
    require_root!();
    let mut c = Cluster::new("quic_bidi", &["alpha", "beta"]);
    let x = c.fs["alpha"].subvolume("x");
    let y = c.fs["beta"].subvolume("y");
    let px = policy("x", "alpha", &x, &[("beta", c.mnt("beta").join("replicas/x"))]);
    let py = policy("y", "beta", &y, &[("alpha", c.mnt("alpha").join("replicas/y"))]);
    let both = [("x", px), ("y", py)];
    c.configure("alpha", &both);
    c.configure("beta", &both);
    c.start("alpha");
    c.start("beta");
    fill(&x, 3);
    fill(&y, 4);
    // Both syncs at the same time.
    let cx = snapship().args(["sync", "--config"]).arg(c.dir("alpha").join("node.yaml")).arg("x").output();
    let cy = std::thread::scope(|s| {
        let h = s.spawn(|| snapship().args(["sync", "--config"]).arg(c.dir("beta").join("node.yaml")).arg("y").output().unwrap());
        h.join().unwrap()
    });
    let cx = cx.unwrap();
    assert!(cx.status.success() && cy.status.success(), "{}\n{}", String::from_utf8_lossy(&cx.stderr), String::from_utf8_lossy(&cy.stderr));
    assert_same_tree(&x, &c.mnt("beta").join("replicas/x/latest"));
    assert_same_tree(&y, &c.mnt("alpha").join("replicas/y/latest"));
}

#[test]
fn refusals_write_nothing() {
    require_root!();
    let mut c = Cluster::new("quic_refusals", &["alpha", "beta", "gamma"]);
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    let p = policy("projects", "alpha", &src, &[("beta", dst.clone())]);
    c.configure("beta", &[("projects", p.clone())]);
    c.start("beta");
    fill(&src, 5);

    // 1. alpha with a certificate from another CA (while trusting the real one, so that it
    // is beta that must refuse): the handshake fails.
    let rogue = c.scratch.dir.join("rogue-certs");
    run(snapship().arg("certs").arg("--out").arg(&rogue).arg("alpha"));
    std::fs::copy(c.scratch.dir.join("certs/ca.pem"), rogue.join("ca.pem")).unwrap();
    c.configure_with_certs("alpha", &[("projects", p.clone())], &rogue);
    let out = c.sync("alpha", "projects");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("-> beta: FAILED") && text.contains("HANDSHAKE_FAILURE by the remote endpoint"), "{text}");
    assert!(text.contains("certificates from the same CA"), "{text}");
    assert!(!dst.exists() || snapshots(&dst).is_empty(), "a rogue peer wrote to the replica");

    // 2. gamma has a good certificate, but beta's policy names alpha as origin.
    let gsrc = c.fs["gamma"].subvolume("projects");
    let claim = policy("projects", "gamma", &gsrc, &[("beta", dst.clone())]);
    c.configure("gamma", &[("projects", claim)]);
    fill(&gsrc, 6);
    let out = c.sync("gamma", "projects");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("not the origin of `projects`") && text.contains("Unauthorized"), "{text}");
    assert!(text.contains("change `origin.node` in the policy on `beta`"), "the impostor is not told what to do: {text}");
    let log = c.daemons["beta"].log_text();
    let refusal = log.lines().find(|l| l.contains("not the origin of `projects`")).unwrap_or_else(|| panic!("beta did not log the refusal:\n{log}"));
    assert!(refusal.contains("peer=gamma") && refusal.contains("names `alpha`"), "the log names neither the peer nor the policy's origin: {refusal}");
    assert!(!dst.exists() || snapshots(&dst).is_empty(), "a non-origin peer wrote to the replica");

    // 3. alpha (good certificate now) whose copy of the policy names another path on beta:
    // beta receives into the path of its own policy, and nothing appears at the other.
    let elsewhere = c.mnt("beta").join("elsewhere");
    c.configure("alpha", &[("projects", policy("projects", "alpha", &src, &[("beta", elsewhere.clone())]))]);
    c.sync_ok("alpha", "projects");
    assert!(!elsewhere.exists(), "the sender chose where data lands");
    assert_same_tree(&src, &dst.join("latest"));
    let log = c.daemons["beta"].log_text();
    assert!(log.contains("not the origin of `projects`"), "beta did not log the refusal:\n{log}");
}

#[test]
fn corrupted_byte_is_caught_and_retry_succeeds() {
    require_root!();
    let mut c = Cluster::new("quic_corrupt", &["alpha", "beta"]);
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    // No compression: the flipped byte would otherwise most likely break zstd first.
    let p = policy("projects", "alpha", &src, &[("beta", dst.clone())]) + "transfer:\n  compression: none\n";
    c.configure("alpha", &[("projects", p.clone())]);
    c.configure("beta", &[("projects", p)]);
    c.start("beta");
    fill(&src, 7);

    require_test_hooks();
    let out =
        snapship().args(["sync", "--config"]).arg(c.dir("alpha").join("node.yaml")).arg("projects").env("SNAPSHIP_TEST_FLIP_BYTE", "3000000").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("checksum mismatch") && text.contains("Checksum"), "{text}");
    assert!(snapshots(&dst).is_empty(), "a corrupted stream became visible");

    // The replica kept the stream up to the last good frame: the next sync (nothing changed
    // since) ships that same snapshot, finishing it from there.
    let text = c.sync_ok("alpha", "projects");
    assert!(text.contains("-> beta: full"), "{text}");
    assert_eq!(snapshots(&dst).len(), 1, "the cut snapshot was finished, and no other taken");
    assert_same_tree(&src, &dst.join("latest"));
    let log = c.daemons["beta"].log_text();
    assert!(log.contains("resuming a cut transfer"), "{log}");
}
