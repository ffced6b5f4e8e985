//! SIGHUP (`systemctl reload`): a running daemon rereads its config. A policy added starts,
//! one changed restarts with its new values, one broken is left out and listed in `status`,
//! an unchanged one is left alone; a node config that cannot be used is refused and the
//! daemon keeps running with the one it had.

use std::time::Duration;

use crate::common::*;
use snapship::observe::status::StatusReport;

fn status(config: &std::path::Path) -> StatusReport {
    let out = run(snapship().args(["status", "--json", "--config"]).arg(config));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status --json is not a report ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn hup(d: &Daemon) {
    let pid = nix::unistd::Pid::from_raw(d.child.as_ref().expect("running").id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
}

/// Sends SIGHUP and waits for the reload's outcome in `status` (a reload after `before`).
fn reload(d: &Daemon, config: &std::path::Path) -> StatusReport {
    let before = status(config).config.reload.map(|r| r.at);
    hup(d);
    wait_until(Duration::from_secs(30), "the reload's outcome in status", || {
        let s = status(config);
        (s.config.reload.as_ref().map(|r| r.at) != before && s.config.reload.is_some()).then_some(s)
    })
}

fn mode_of(s: &StatusReport, fileset: &str) -> Option<String> {
    s.origin_of.iter().find(|o| o.fileset == fileset).map(|o| o.mode.clone())
}

#[test]
fn sighup_adds_changes_and_leaves_out_broken_policies() {
    require_root!();
    let scratch = Scratch::new("reload_policies");
    let fs = LoopBtrfs::new(&scratch, "reload", 512);
    let (one, two, three) = (fs.subvolume("one"), fs.subvolume("two"), fs.subvolume("three"));
    std::fs::create_dir_all(fs.mnt.join("backup")).unwrap();
    let replica = |name: &str| fs.mnt.join("backup").join(name);
    let config = single_node_config(
        &scratch,
        "alpha",
        &[("one", local_policy("one", "alpha", &one, &replica("one"))), ("two", local_policy("two", "alpha", &two, &replica("two")))],
    );
    let mut d = Daemon::start(&config, &scratch.dir.join("run.log"), "running");
    let s = status(&config);
    assert_eq!(mode_of(&s, "one").as_deref(), Some("snapshot"));
    assert_eq!(mode_of(&s, "two").as_deref(), Some("snapshot"));
    assert!(s.config.broken.is_empty() && s.config.reload.is_none(), "{:?}", s.config);
    std::fs::write(one.join("a"), "one").unwrap();
    let out = run(snapship().args(["sync", "--config"]).arg(&config).arg("one"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Added: three. Changed: two (continuous now). Broken: one (an unknown mode).
    let pdir = scratch.dir.join("policies");
    std::fs::write(pdir.join("three.yaml"), local_policy("three", "alpha", &three, &replica("three"))).unwrap();
    let continuous = local_policy("two", "alpha", &two, &replica("two")).replace("mode: snapshot\nschedule: \"@hourly\"\n", "mode: continuous\n");
    std::fs::write(pdir.join("two.yaml"), continuous).unwrap();
    let broken = local_policy("one", "alpha", &one, &replica("one")).replace("mode: snapshot", "mode: sometimes");
    std::fs::write(pdir.join("one.yaml"), broken).unwrap();
    let s = reload(&d, &config);
    let outcome = s.config.reload.as_ref().unwrap();
    assert!(outcome.ok, "{outcome:?}");
    assert!(
        outcome.message.contains("started: three") && outcome.message.contains("restarted: two") && outcome.message.contains("stopped: one"),
        "{outcome:?}"
    );
    assert_eq!(mode_of(&s, "two").as_deref(), Some("continuous"), "the changed policy runs with its new values: {:#?}", s.origin_of);
    assert_eq!(mode_of(&s, "one"), None, "the broken policy is left out: {:#?}", s.origin_of);
    assert_eq!(s.config.broken.len(), 1, "{:?}", s.config.broken);
    assert!(s.config.broken[0].file.ends_with("one.yaml") && s.config.broken[0].error.contains("mode"), "{:?}", s.config.broken);
    let text = String::from_utf8_lossy(&run(snapship().args(["status", "--config"]).arg(&config)).stdout).into_owned();
    assert!(text.contains("one.yaml") && text.contains("broken"), "status shows the broken policy: {text}");

    // The new file set works: sync through the daemon; the continuous one ships by itself.
    std::fs::write(three.join("b"), "three").unwrap();
    let out = run(snapship().args(["sync", "--config"]).arg(&config).arg("three"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(replica("three").join("latest/b")).unwrap(), "three");
    std::fs::write(two.join("c"), "two").unwrap();
    wait_for(Duration::from_secs(30), "the continuous file set to ship a change", || {
        std::fs::read_to_string(replica("two").join("latest/c")).is_ok_and(|t| t == "two")
    });

    // A node config that cannot be used (a key only a restart applies): refused, old one kept.
    // `status` reads a copy of the good one (it finds the daemon through `state_dir`).
    let node = std::fs::read_to_string(&config).unwrap();
    let good = scratch.dir.join("good.yaml");
    std::fs::write(&good, &node).unwrap();
    let reload = |d: &Daemon| {
        let before = status(&good).config.reload.map(|r| r.at);
        hup(d);
        wait_until(Duration::from_secs(30), "the reload's outcome in status", || {
            let s = status(&good);
            (s.config.reload.as_ref().map(|r| r.at) != before).then_some(s)
        })
    };
    std::fs::write(&config, format!("{node}listen: 127.0.0.1:{}\n", free_port())).unwrap();
    let s = reload(&d);
    let outcome = s.config.reload.as_ref().unwrap();
    assert!(!outcome.ok && outcome.message.contains("`listen` changed") && outcome.message.contains("restart"), "{outcome:?}");
    assert_eq!(mode_of(&s, "three").as_deref(), Some("snapshot"), "still running as before: {:#?}", s.origin_of);
    std::fs::write(&config, "node: [unterminated\n").unwrap();
    let s = reload(&d);
    assert!(!s.config.reload.as_ref().unwrap().ok, "{:?}", s.config.reload);
    std::fs::write(&config, &node).unwrap();
    std::fs::write(three.join("d"), "again").unwrap();
    let out = run(snapship().args(["sync", "--config"]).arg(&config).arg("three"));
    assert!(out.status.success(), "the daemon still works after refused reloads: {}", String::from_utf8_lossy(&out.stderr));
    let log = d.log_text();
    assert!(log.contains("the new config was refused"), "{log}");
    assert_eq!(d.stop().and_then(|s| s.code()), Some(0), "{}", d.log_text());
}

/// A reload that names beta in gamma's `from:` starts beta's relay (and alpha stops feeding
/// gamma); one that takes it out again stops the relay, and alpha feeds gamma itself.
#[test]
fn sighup_starts_and_stops_a_relay() {
    require_root!();
    use crate::common::cluster::*;
    let nodes = ["alpha", "beta", "gamma"];
    let mut c = Cluster::with_size("reload_relay", &nodes, 300);
    let src = c.fs["alpha"].subvolume("projects");
    let (beta, gamma) = (c.mnt("beta").join("backup/projects"), c.mnt("gamma").join("backup/projects"));
    let direct = policy("projects", "alpha", &src, &[("beta", beta.clone()), ("gamma", gamma.clone())]);
    let relayed = direct.replace(&format!("    path: {}\n", gamma.display()), &format!("    path: {}\n    from: beta\n", gamma.display()));
    assert_ne!(direct, relayed);
    let configure = |c: &Cluster, text: &str| {
        for n in nodes {
            c.configure(n, &[("projects", text.to_string())]);
        }
    };
    configure(&c, &direct);
    for n in ["beta", "gamma", "alpha"] {
        c.start(n);
    }
    let alpha_dir = c.mnt("alpha").join(".snapship/projects");
    let newest = |dir: &std::path::Path| snapshots(dir).into_iter().rfind(|n| n.starts_with("snapship-"));
    let current = |dir: &std::path::Path| newest(dir).is_some() && newest(dir) == newest(&alpha_dir);
    let round = |c: &Cluster, i: u64| {
        write_random(&src.join(format!("round-{i}.bin")), 1 << 20, 300 + i);
        c.sync_ok("alpha", "projects");
        for dir in [&beta, &gamma] {
            wait_for(Duration::from_secs(60), &format!("alpha's newest in {}", dir.display()), || current(dir));
        }
        newest(&alpha_dir).unwrap()
    };
    let reload_all = |c: &Cluster| -> Vec<String> {
        nodes
            .iter()
            .map(|n| {
                let s = reload(&c.daemons[*n], &c.dir(n).join("node.yaml"));
                let outcome = s.config.reload.unwrap();
                assert!(outcome.ok, "{n}: {outcome:?}");
                outcome.message
            })
            .collect()
    };
    let fed_by = |c: &Cluster, snapshot: &str| -> &'static str {
        let line = format!("snapshot={snapshot}");
        let to_gamma = |l: &str| l.contains("replica=gamma") || l.contains("replica=\"gamma\"");
        if c.daemons["beta"].log_text().lines().any(|l| l.contains("relayed") && to_gamma(l) && l.contains(&line)) {
            "beta"
        } else if c.daemons["alpha"].log_text().lines().any(|l| l.contains("replica up to date") && to_gamma(l) && l.contains(&line)) {
            "alpha"
        } else {
            "nobody"
        }
    };
    let first = round(&c, 0);
    wait_until(Duration::from_secs(30), "alpha's log of its transfer to gamma", || (fed_by(&c, &first) == "alpha").then_some(()));

    configure(&c, &relayed);
    let messages = reload_all(&c);
    assert!(messages[1].contains("relays started: projects"), "beta's reload: {}", messages[1]);
    let second = round(&c, 1);
    wait_until(Duration::from_secs(30), "beta's log of the relayed snapshot", || (fed_by(&c, &second) == "beta").then_some(()));
    assert_same_tree(&src, &gamma.join("latest"));

    configure(&c, &direct);
    let messages = reload_all(&c);
    assert!(messages[1].contains("stopped: projects"), "beta's reload: {}", messages[1]);
    let third = round(&c, 2);
    wait_until(Duration::from_secs(30), "alpha's log of its transfer to gamma", || (fed_by(&c, &third) == "alpha").then_some(()));
    assert_same_tree(&src, &gamma.join("latest"));
    for n in nodes {
        c.stop(n);
    }
}
