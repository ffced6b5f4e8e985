//! examples/monitoring: the Prometheus alert rules pass `promtool check rules` and their own
//! unit tests (`promtool test rules`), and the Grafana dashboard is valid JSON whose queries
//! name only metrics that snapship exports (the constants of src/observe/metrics.rs), so a
//! renamed metric cannot leave a dead panel or a silent alert behind. No root.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/monitoring")
}

/// The metric names defined in src/observe/metrics.rs (the string of each `pub const`).
fn exported() -> BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/observe/metrics.rs")).unwrap();
    let names: BTreeSet<String> = text.lines().filter(|l| l.starts_with("pub const ")).filter_map(|l| l.split('"').nth(1)).map(str::to_string).collect();
    assert!(names.contains("snapship_certificate_expiry_timestamp_seconds"), "{names:?}");
    names
}

/// Every `snapship_...` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices("snapship_") {
        let name: String = text[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        found.insert(name);
    }
    found
}

/// promtool from PATH, or where scripts/fetch-promtool.sh unpacks it.
fn promtool() -> Option<PathBuf> {
    if Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some(PathBuf::from("promtool"));
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/promtool");
    local.exists().then_some(local)
}

#[test]
fn alert_rules_pass_promtool() {
    let Some(promtool) = promtool() else {
        eprintln!("skipping: no promtool (scripts/fetch-promtool.sh unpacks it from Debian's prometheus package)");
        return;
    };
    for args in [["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]] {
        let out = Command::new(&promtool).current_dir(dir()).args(args).output().unwrap();
        assert!(out.status.success(), "promtool {}: {}{}", args.join(" "), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn alert_rules_name_only_exported_metrics() {
    let text = std::fs::read_to_string(dir().join("alerts.yml")).unwrap();
    let known = exported();
    let used = metric_names(&text);
    for name in &used {
        assert!(known.contains(name), "alerts.yml uses {name}, which src/observe/metrics.rs does not define");
    }
    for needed in [
        "snapship_replica_lag_seconds",
        "snapship_transfers_total",
        "snapship_verify_mismatches_total",
        "snapship_verify_last_mismatches",
        "snapship_certificate_expiry_timestamp_seconds",
    ] {
        assert!(used.contains(needed), "alerts.yml has no rule on {needed}");
    }
}

#[test]
fn dashboard_is_json_and_names_only_exported_metrics() {
    let text = std::fs::read_to_string(dir().join("grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("grafana-dashboard.json is not JSON: {e}"));
    let panels = dashboard["panels"].as_array().expect("a `panels` list");
    assert!(!panels.is_empty());
    let known = exported();
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        assert!(ids.insert(panel["id"].as_u64().expect("a panel id")), "panel `{title}`: id used twice");
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("panel `{title}` has no targets"));
        assert!(!targets.is_empty(), "panel `{title}` has no queries");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("panel `{title}`: a target without expr"));
            let names = metric_names(expr);
            assert!(!names.is_empty(), "panel `{title}` queries no snapship metric: {expr}");
            for name in names {
                assert!(known.contains(&name), "panel `{title}` queries {name}, which src/observe/metrics.rs does not define");
            }
        }
    }
    // The template variable's query too.
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        for name in metric_names(var["query"].as_str().unwrap_or("")) {
            assert!(known.contains(&name), "variable {} queries {name}, which src/observe/metrics.rs does not define", var["name"]);
        }
    }
}

/// The daemon exports its certificate's notAfter as
/// snapship_certificate_expiry_timestamp_seconds, which the certificate alerts use.
#[test]
fn daemon_exports_its_certificate_expiry() {
    use std::io::{Read, Write};
    let scratch = crate::common::Scratch::new("cert_expiry_metric");
    let certs = scratch.dir.join("certs");
    crate::common::run(crate::common::snapship().args(["certs", "--days", "30", "--out"]).arg(&certs).arg("alpha"));
    let port = crate::common::free_port();
    let config = scratch.dir.join("node.yaml");
    std::fs::write(
        &config,
        format!(
            "node: alpha\nstate_dir: state\nmetrics: 127.0.0.1:{port}\ntls:\n  ca: {c}/ca.pem\n  cert: {c}/alpha.pem\n  key: {c}/alpha.key\n",
            c = certs.display()
        ),
    )
    .unwrap();
    let mut daemon = crate::common::Daemon::start(&config, &scratch.dir.join("run.log"), "running");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    daemon.stop();
    let value: f64 = text
        .lines()
        .find(|l| l.starts_with("snapship_certificate_expiry_timestamp_seconds "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no snapship_certificate_expiry_timestamp_seconds in:\n{text}"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let days = (value - now) / 86_400.0;
    assert!((28.0..=31.0).contains(&days), "the certificate made for 30 days expires in {days:.1} days by the metric");
}
