//! Arbitrary text as a node config and as a policy file: the loader must answer with a
//! value or with `ConfigError`s that name the file, never panic.
//!
//! The text goes through the same code as `config::load`, minus the filesystem: as the node
//! config `/fuzz/node.yaml`, and as the policy `/fuzz/policies/fuzz.yaml` checked against a
//! fixed, valid node config (alpha, with peers beta and gamma, as in policies/ and examples/).

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use snapship::config::{self, ConfigError, Mode, NodeConfig};

const NODE_PATH: &str = "/fuzz/node.yaml";
const POLICY_PATH: &str = "/fuzz/policies/fuzz.yaml";

const NODE: &str = "\
node: alpha
listen: 127.0.0.1:7441
state_dir: state
tls:
  ca: certs/ca.pem
  cert: certs/alpha.pem
  key: certs/alpha.key
peers:
  beta: 127.0.0.1:7442
  gamma: gamma.example.lan:7441
policies:
  - policies/*.yaml
";

fn node() -> &'static NodeConfig {
    static NODE_CONFIG: OnceLock<NodeConfig> = OnceLock::new();
    NODE_CONFIG.get_or_init(|| config::parse_node_text(Path::new(NODE_PATH), NODE).expect("the fixed node config is valid"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };

    match config::parse_node_text(Path::new(NODE_PATH), text) {
        Ok(n) => {
            assert_eq!(n.file, Path::new(NODE_PATH));
            // Relative paths were resolved against the file's directory.
            assert!(n.state_dir.is_absolute(), "{:?}", n.state_dir);
            if let Some(tls) = &n.tls {
                for p in [&tls.ca, &tls.cert, &tls.key] {
                    assert!(p.is_absolute(), "{p:?}");
                }
            }
            assert!(!n.peers.contains_key(&n.node), "a node listed as its own peer was accepted");
            for addr in n.peers.values() {
                let (host, port) = addr.rsplit_once(':').expect("peer address without a port was accepted");
                assert!(!host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0), "{addr:?} accepted");
            }
        }
        Err(e) => check_error(&e, NODE_PATH, text),
    }

    let node = node();
    match config::parse_policy_text(Path::new(POLICY_PATH), text, node) {
        Ok(p) => {
            assert_eq!(p.file, Path::new(POLICY_PATH));
            assert!(!p.replicas.is_empty());
            for n in p.nodes() {
                assert!(*n == node.node || node.peers.contains_key(n), "unknown node `{n}` accepted");
            }
            match p.mode {
                Mode::Snapshot | Mode::Hybrid => assert!(p.schedule.is_some()),
                Mode::Continuous => assert!(p.schedule.is_none()),
            }
            let _ = p.snapshot_dir();
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "a refused policy must say why");
            for e in &errors {
                check_error(e, POLICY_PATH, text);
            }
        }
    }
});

/// An error names its file, first thing, and a position it gives is 1-based and in the text.
fn check_error(e: &ConfigError, file: &str, text: &str) {
    assert_eq!(e.file, Path::new(file));
    let shown = e.to_string();
    assert!(shown.starts_with(file), "error does not name {file}: {shown}");
    if let Some((line, col)) = e.position {
        assert!(line >= 1 && col >= 1, "position {line}:{col} is not 1-based: {shown}");
        assert!(line <= text.len() + 1 && col <= text.len() + 1, "position {line}:{col} outside the text: {shown}");
    }
}
