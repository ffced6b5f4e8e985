//! `snapship check` as a user runs it: exit status and messages. Needs no root.

use crate::common::{Scratch, snapship};

const POLICY: &str = "fileset: home\nbackend: btrfs\nmode: continuous\ncontinuous:\n  min_interval: 2s\norigin:\n  node: alpha\n  path: /srv/home\nreplicas:\n  - node: alpha\n    path: /backup/home\n";

fn setup(test: &str, policy: &str) -> (Scratch, std::path::PathBuf) {
    let s = Scratch::new(test);
    let cfg = crate::common::single_node_config(&s, "alpha", &[("home", policy.to_string())]);
    (s, cfg)
}

#[test]
fn valid_config_exits_zero() {
    let (_s, cfg) = setup("check_valid", POLICY);
    let out = snapship().arg("check").arg("--config").arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 policy valid"));
}

#[test]
fn broken_policy_exits_non_zero_naming_file_line_and_key() {
    let (_s, cfg) = setup("check_broken", &POLICY.replace("min_interval: 2s", "min_interval: soon"));
    let out = snapship().arg("check").arg("--config").arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policies/home.yaml:5:3: key `continuous.min_interval`: invalid duration \"soon\""), "{err}");
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let s = Scratch::new("check_missing");
    let out = snapship().arg("check").arg("--config").arg(s.dir.join("nope.yaml")).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.yaml: cannot read"), "{err}");
}
