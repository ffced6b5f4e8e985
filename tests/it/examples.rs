//! The shipped examples and policies load with `snapship check --config-only`, so they cannot
//! rot. (Only the files: the certificates and paths they name are not on this machine.)

use std::path::Path;

fn check(config: &Path) {
    let out = crate::common::snapship().arg("check").arg("--config-only").arg("--config").arg(config).output().unwrap();
    assert!(out.status.success(), "{} does not check:\n{}{}", config.display(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn every_example_node_config_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut n = 0;
    for dir in ["two-node", "three-node-star"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                check(&path);
                n += 1;
            }
        }
    }
    assert_eq!(n, 5, "two two-node and three star node configs");
}

#[test]
fn every_policy_is_loaded_by_the_two_node_example() {
    let policies = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap().count();
    let out = crate::common::snapship()
        .arg("check")
        .arg("--config-only")
        .arg("--config")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/two-node/alpha.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{policies} policies valid")), "{text}");
}
