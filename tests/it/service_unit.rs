//! The shipped systemd unit (examples/snapship.service): hardened enough, and still able to
//! do the job.
//!
//! - `systemd-analyze security --offline=yes` scores it at most [`MAX_EXPOSURE`] (no running
//!   systemd needed; skipped with a message where systemd-analyze is absent).
//! - A btrfs sync (full, then incremental) whose files need the privileged parts of a
//!   receive (setuid bits, a device node, a file capability, files of another owner with no
//!   permissions) works with only the unit's `CapabilityBoundingSet=` and
//!   `NoNewPrivileges=` (applied by `setpriv`, root) and its `SystemCallFilter=` and
//!   `MemoryDenyWriteExecute=` (a seccomp filter built like systemd's by
//!   tests/data/seccomp_like_unit.py, where python3-seccomp is installed). The unit's
//!   namespaces (ProtectSystem=, ...) need systemd as PID 1, which a container does not have.
//! - A SIGHUP does not stop the daemon (the unit has no reload).

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// The exposure level the unit must not exceed (systemd's scale: 0 best, 10 worst).
const MAX_EXPOSURE: f64 = 4.0;

fn unit_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/snapship.service")
}

/// The value of `key=` in the unit (the last one wins, as in systemd).
fn setting(key: &str) -> Option<String> {
    let text = std::fs::read_to_string(unit_path()).unwrap();
    text.lines().rev().find_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_string)
}

#[test]
fn systemd_analyze_scores_the_unit_at_most_4() {
    let out = match Command::new("systemd-analyze").args(["security", "--offline=yes"]).arg(unit_path()).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipping: cannot run systemd-analyze ({e}); the Debian package `systemd` has it");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let line =
        text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("no score in:\n{text}{}", String::from_utf8_lossy(&out.stderr)));
    let score: f64 = line
        .rsplit(": ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score of: {line}"));
    assert!(score <= MAX_EXPOSURE, "the unit's exposure level is {score}, above {MAX_EXPOSURE}:\n{text}");
}

#[test]
fn unit_keeps_what_the_daemon_needs() {
    assert_eq!(setting("ProtectSystem").as_deref(), Some("strict"));
    assert_eq!(setting("StateDirectory").as_deref(), Some("snapship"), "the default state_dir must stay writable");
    assert_eq!(setting("RestrictSUIDSGID").as_deref(), Some("no"), "received setuid files must keep their bits");
    let filter = setting("SystemCallFilter").unwrap();
    assert!(!filter.contains("@privileged") && !filter.contains("@chown") && !filter.contains("@file-system"), "receives chown and mknod: {filter}");
    let text = std::fs::read_to_string(unit_path()).unwrap();
    assert!(text.contains("SystemCallFilter=@system-service chroot"), "btrfs receive --chroot needs chroot()");
    // A negated filter after the allow list removes from it, and @mount holds chroot.
    for line in text.lines().filter(|l| l.starts_with("SystemCallFilter=~")) {
        assert!(!line.contains("@mount") && !line.contains("chroot"), "{line} takes chroot() away again");
    }
}

/// `setpriv --bounding-set` arguments for the unit's CapabilityBoundingSet=.
fn bounding_set() -> String {
    let caps = setting("CapabilityBoundingSet").expect("the unit bounds its capabilities");
    let mut arg = String::from("-all");
    for cap in caps.split_whitespace() {
        arg.push_str(&format!(",+{}", cap.trim_start_matches("CAP_").to_lowercase()));
    }
    arg
}

/// The unit's system call filter, as a command prefix (tests/data/seccomp_like_unit.py,
/// with MemoryDenyWriteExecute= when the unit sets it), or `None` without python3-seccomp.
fn seccomp_prefix() -> Option<Vec<String>> {
    let have = Command::new("/usr/bin/python3").args(["-c", "import seccomp"]).output().is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("the sync runs without the unit's system call filter: no python3-seccomp (Debian package)");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/seccomp_like_unit.py");
    let mut prefix = vec!["/usr/bin/python3".to_string(), script.display().to_string(), setting("SystemCallFilter").expect("a system call filter")];
    if setting("MemoryDenyWriteExecute").as_deref() == Some("yes") {
        prefix.push("--mdwe".into());
    }
    prefix.push("--".into());
    Some(prefix)
}

/// `snapship sync` of `fileset` as the unit would run it: the unit's capability bounding
/// set and no_new_privs (setpriv), and its seccomp filter where python3-seccomp is there.
fn sync_like_the_unit(config: &Path, fileset: &str) -> std::process::Output {
    let mut argv = seccomp_prefix().unwrap_or_default();
    argv.extend(["setpriv".into(), "--no-new-privs".into(), format!("--bounding-set={}", bounding_set()), "--inh-caps=-all".into()]);
    argv.extend([env!("CARGO_BIN_EXE_snapship").to_string(), "sync".into(), "--config".into(), config.display().to_string(), fileset.into()]);
    Command::new(&argv[0]).args(&argv[1..]).output().unwrap()
}

#[test]
fn a_sync_works_with_only_what_the_unit_allows() {
    require_root!();
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipping: no setpriv (Debian package util-linux)");
        return;
    }
    let scratch = Scratch::new("unit_caps");
    let origin = LoopBtrfs::new(&scratch, "origin", 256);
    let replica = LoopBtrfs::new(&scratch, "replica", 256);
    let source = origin.subvolume("data");
    let replica_dir = replica.mnt.join("backup/data");
    let config = single_node_config(&scratch, "alpha", &[("data", local_policy("data", "alpha", &source, &replica_dir))]);
    // What replaying these takes: CHOWN, FSETID and FOWNER (owner, setuid/setgid bits kept),
    // MKNOD (a device node), SETFCAP (a file capability), DAC_OVERRIDE (a mode-000 file of
    // another owner), SYS_ADMIN (the ioctls); chroot() (`btrfs receive --chroot`).
    sh(&format!(
        "cd {dir}
         echo hi > setuid && chown 1234:5678 setuid && chmod 6755 setuid
         mknod null-like c 1 3
         echo cap > capable && setcap cap_net_bind_service+ep capable
         mkdir private && echo secret > private/file && chown -R 4321:4321 private && chmod 000 private/file private",
        dir = source.display()
    ));
    for (round, kind) in [(1, "full"), (2, "incremental")] {
        if round == 2 {
            std::fs::write(source.join("second"), "more").unwrap();
        }
        let out = sync_like_the_unit(&config, "data");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "the {kind} sync failed with only what the unit allows:\n{text}");
        assert!(text.contains(&format!("-> alpha: {kind}")), "{text}");
    }
    let got = replica_dir.join("latest");
    assert_same_tree(&source, &got);
    let facts = sh(&format!("cd {}; stat -c '%u:%g %a' setuid; stat -c %F null-like; getcap capable", got.display()));
    assert_eq!(facts, "1234:5678 6755\ncharacter special file\ncapable cap_net_bind_service=ep\n");
}

/// `systemctl reload` sends SIGHUP (the unit's ExecReload=), and the daemon reloads and keeps
/// running (tests/it/reload.rs checks what a reload applies).
#[test]
fn sighup_reloads_and_leaves_the_daemon_running() {
    let scratch = Scratch::new("sighup");
    let config = single_node_config(&scratch, "alpha", &[]);
    let mut daemon = Daemon::start(&config, &scratch.dir.join("run.log"), "running");
    let pid = nix::unistd::Pid::from_raw(daemon.child.as_ref().unwrap().id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for(std::time::Duration::from_secs(10), "the reload", || daemon.log_text().contains("reloaded: "));
    assert!(daemon.child.as_mut().unwrap().try_wait().unwrap().is_none(), "SIGHUP stopped the daemon:\n{}", daemon.log_text());
    let status = daemon.stop().unwrap();
    assert!(status.success(), "after a SIGHUP, SIGTERM should still stop it cleanly: {status}\n{}", daemon.log_text());
    assert_eq!(setting("ExecReload").as_deref(), Some("/bin/kill -HUP $MAINPID"), "`systemctl reload` sends SIGHUP");
}
