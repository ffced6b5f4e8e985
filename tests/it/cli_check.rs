//! `snapship check` as a user runs it: exit status and messages, one test per kind of
//! mistake. The config and TLS cases need no root; the path cases need root and loop btrfs
//! (`require_root!`), the ZFS ones a zfs-fuse daemon. Also `snapship run` refusing to start
//! with unusable TLS.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::common::{LoopBtrfs, Scratch, have_zfs, run, snapship};

const POLICY: &str = "fileset: home\nbackend: btrfs\nmode: continuous\ncontinuous:\n  min_interval: 2s\norigin:\n  node: alpha\n  path: /srv/home\nreplicas:\n  - node: alpha\n    path: /backup/home\n";

fn setup(test: &str, policy: &str) -> (Scratch, PathBuf) {
    let s = Scratch::new(test);
    let cfg = crate::common::single_node_config(&s, "alpha", &[("home", policy.to_string())]);
    (s, cfg)
}

/// Runs `snapship check` (with `extra` arguments first); returns success, stdout, stderr.
fn check_with(cfg: &Path, extra: &[&str]) -> (bool, String, String) {
    let out = snapship().arg("check").args(extra).arg("--config").arg(cfg).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn check(cfg: &Path) -> (bool, String, String) {
    check_with(cfg, &[])
}

/// `check` fails, and its errors contain each of `words`.
fn fails_with(cfg: &Path, words: &[&str]) -> String {
    let (ok, _, err) = check(cfg);
    assert!(!ok, "check passed, wanted an error with {words:?}:\n{err}");
    for w in words {
        assert!(err.contains(w), "wanted {w:?} in:\n{err}");
    }
    err
}

// ---------------------------------------------------------------------------------------
// The config files

#[test]
fn valid_config_files_exit_zero() {
    let (_s, cfg) = setup("check_valid", POLICY);
    let (ok, out, err) = check_with(&cfg, &["--config-only"]);
    assert!(ok, "{err}");
    assert!(out.contains("1 policy valid") && out.contains("home (btrfs, continuous): origin"), "{out}");
}

#[test]
fn broken_policy_exits_non_zero_naming_file_line_and_key() {
    let (_s, cfg) = setup("check_broken", &POLICY.replace("min_interval: 2s", "min_interval: soon"));
    fails_with(&cfg, &["policies/home.yaml:5:3: key `continuous.min_interval`: invalid duration \"soon\""]);
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let s = Scratch::new("check_missing");
    let (ok, _, err) = check(&s.dir.join("nope.yaml"));
    assert!(!ok);
    assert!(err.contains("nope.yaml: cannot read"), "{err}");
}

#[test]
fn min_interval_below_100ms_is_refused() {
    let (_s, cfg) = setup("check_min_interval", &POLICY.replace("min_interval: 2s", "min_interval: 0s"));
    fails_with(&cfg, &["policies/home.yaml:5:3: key `continuous.min_interval`", "100ms or more"]);
}

#[test]
fn an_unquoted_cron_is_told_to_be_quoted() {
    let policy = POLICY.replace("mode: continuous\ncontinuous:\n  min_interval: 2s\n", "mode: snapshot\nschedule: */15 * * * *\n");
    let (_s, cfg) = setup("check_cron", &policy);
    fails_with(&cfg, &["policies/home.yaml:4:", "key `schedule`", "must be quoted: write schedule: \"*/15 * * * *\""]);
}

#[test]
fn a_duplicate_key_is_reported_at_its_own_line() {
    let (_s, cfg) = setup("check_duplicate", &POLICY.replace("mode: continuous\n", "mode: continuous\nmode: snapshot\n"));
    fails_with(&cfg, &["policies/home.yaml:4:1: key `mode`", "written twice"]);
}

#[test]
fn type_mistakes_are_told_without_rust_types() {
    let (_s, cfg) = setup("check_types", &POLICY.replace("origin:\n  node: alpha\n  path: /srv/home\n", "origin: alpha\n"));
    let err = fails_with(&cfg, &["policies/home.yaml:6:1: key `origin`", "must be a mapping"]);
    assert!(!err.contains("struct"), "{err}");
    let (_s, cfg) = setup("check_types", &format!("{POLICY}retention:\n  origin: {{ last: many }}\n"));
    let err = fails_with(&cfg, &["key `retention.origin.last`", "a whole number"]);
    assert!(!err.contains("u32"), "{err}");
}

#[test]
fn a_bad_listen_address_gets_an_example() {
    let (s, cfg) = setup("check_listen", POLICY);
    std::fs::write(&cfg, "node: alpha\nlisten: localhost\nstate_dir: state\npolicies: []\n").unwrap();
    fails_with(&cfg, &["node.yaml:2:1: key `listen`", "`listen: 0.0.0.0:7441`"]);
    drop(s);
}

#[test]
fn a_replica_of_another_origin_needs_listen() {
    let s = Scratch::new("check_no_listen");
    make_certs(&s);
    let policy = POLICY.replace("  - node: alpha\n", "  - node: beta\n");
    let cfg = node_config(&s, "beta", &tls_lines("certs/ca.pem", "certs/beta.pem", "certs/beta.key"), "alpha: 127.0.0.1:7441", &[("home", &policy)]);
    fails_with(&cfg, &["node.yaml: key `listen`", "`home` from `alpha`", "add `listen: 0.0.0.0:7441`"]);
}

// ---------------------------------------------------------------------------------------
// TLS

/// `snapship certs` for alpha and beta into `certs/`, and for alpha by another CA into `other/`.
fn make_certs(s: &Scratch) {
    run(snapship().arg("certs").arg("--out").arg(s.dir.join("certs")).args(["alpha", "beta"]));
    run(snapship().arg("certs").arg("--out").arg(s.dir.join("other")).arg("alpha"));
}

fn tls_lines(ca: &str, cert: &str, key: &str) -> String {
    format!("tls:\n  ca: {ca}\n  cert: {cert}\n  key: {key}\n")
}

/// Writes `node`'s config (with `tls`, one peer, and `policies`) into the scratch dir.
fn node_config(s: &Scratch, node: &str, tls: &str, peer: &str, policies: &[(&str, &str)]) -> PathBuf {
    let pdir = s.dir.join("policies");
    std::fs::create_dir_all(&pdir).unwrap();
    for (name, text) in policies {
        std::fs::write(pdir.join(format!("{name}.yaml")), text).unwrap();
    }
    let list = if policies.is_empty() { "policies: []\n" } else { "policies:\n  - policies/*.yaml\n" };
    let path = s.dir.join("node.yaml");
    std::fs::write(&path, format!("node: {node}\nstate_dir: state\n{tls}peers:\n  {peer}\n{list}")).unwrap();
    path
}

/// alpha's config with the given TLS files (relative to the scratch dir), no policies.
fn tls_setup(test: &str, ca: &str, cert: &str, key: &str) -> (Scratch, PathBuf) {
    let s = Scratch::new(test);
    make_certs(&s);
    let cfg = node_config(&s, "alpha", &tls_lines(ca, cert, key), "beta: 127.0.0.1:7442", &[]);
    (s, cfg)
}

#[test]
fn good_certificates_exit_zero() {
    let (_s, cfg) = tls_setup("check_tls_good", "certs/ca.pem", "certs/alpha.pem", "certs/alpha.key");
    let (ok, out, err) = check(&cfg);
    assert!(ok, "{err}");
    assert!(out.contains("0 policies valid") && !err.contains("warning"), "{out}{err}");
}

#[test]
fn a_missing_certificate_is_named_with_how_to_make_it() {
    let (_s, cfg) = tls_setup("check_tls_missing", "certs/ca.pem", "certs/gone.pem", "certs/alpha.key");
    fails_with(&cfg, &["node.yaml:5:3: key `tls.cert`", "certs/gone.pem: No such file", "snapship certs --out"]);
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused() {
    let (_s, cfg) = tls_setup("check_tls_key", "certs/ca.pem", "certs/alpha.pem", "certs/beta.key");
    fails_with(&cfg, &["node.yaml:6:3: key `tls.key`", "beta.key is not the key of the certificate", "--renew alpha"]);
}

#[test]
fn another_nodes_certificate_is_refused() {
    let (_s, cfg) = tls_setup("check_tls_other_node", "certs/ca.pem", "certs/beta.pem", "certs/beta.key");
    fails_with(&cfg, &["node.yaml:5:3: key `tls.cert`", "the certificate of node `beta`, but this node is `alpha`", "alpha.pem"]);
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let (_s, cfg) = tls_setup("check_tls_other_ca", "certs/ca.pem", "other/alpha.pem", "other/alpha.key");
    let err = fails_with(&cfg, &["node.yaml:5:3: key `tls.cert`", "is not signed by the CA", "certs/ca.pem"]);
    assert_eq!(err.matches("error:").count(), 1, "only the chain is wrong:\n{err}");
}

#[test]
fn garbage_pem_is_refused() {
    let (s, cfg) = tls_setup("check_tls_garbage", "garbage.pem", "certs/alpha.pem", "certs/alpha.key");
    std::fs::write(s.dir.join("garbage.pem"), "not a certificate\n").unwrap();
    fails_with(&cfg, &["node.yaml:4:3: key `tls.ca`", "garbage.pem is not a PEM certificate"]);
    // A key where the certificate belongs says so.
    let cfg = node_config(&s, "alpha", &tls_lines("certs/ca.pem", "certs/alpha.key", "certs/alpha.key"), "beta: 127.0.0.1:7442", &[]);
    fails_with(&cfg, &["key `tls.cert`", "holds a private key where the certificate belongs"]);
}

fn reissue(s: &Scratch, node: &str, not_before: SystemTime, not_after: SystemTime) {
    snapship::ship::tls::make_node_cert_with_validity(&s.dir.join("certs"), &node.parse().unwrap(), not_before, not_after).unwrap();
}

const DAY: Duration = Duration::from_secs(86_400);

#[test]
fn an_expired_certificate_is_refused() {
    let (s, cfg) = tls_setup("check_tls_expired", "certs/ca.pem", "certs/alpha.pem", "certs/alpha.key");
    let now = SystemTime::now();
    reissue(&s, "alpha", now - DAY * 30, now - DAY);
    fails_with(&cfg, &["node.yaml:5:3: key `tls.cert`", "expired on", "--renew alpha"]);
}

#[test]
fn a_certificate_not_yet_valid_is_refused_with_a_word_on_clocks() {
    let (s, cfg) = tls_setup("check_tls_future", "certs/ca.pem", "certs/alpha.pem", "certs/alpha.key");
    let now = SystemTime::now();
    reissue(&s, "alpha", now + DAY, now + DAY * 100);
    fails_with(&cfg, &["node.yaml:5:3: key `tls.cert`", "is not valid before", "clock"]);
}

#[test]
fn a_certificate_near_expiry_warns_and_exits_zero() {
    let (s, cfg) = tls_setup("check_tls_expiring", "certs/ca.pem", "certs/alpha.pem", "certs/alpha.key");
    let now = SystemTime::now();
    reissue(&s, "alpha", now - DAY, now + DAY * 10);
    let (ok, _, err) = check(&cfg);
    assert!(ok, "a warning alone exits 0:\n{err}");
    assert!(err.contains("warning: ") && err.contains("key `tls.cert`") && err.contains("expires on") && err.contains("--renew alpha"), "{err}");
}

#[test]
fn run_refuses_to_start_with_broken_tls() {
    let (s, cfg) = tls_setup("run_tls_broken", "certs/ca.pem", "certs/alpha.pem", "certs/beta.key");
    let mut child = snapship().arg("run").arg("--config").arg(&cfg).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("snapship run with a key that does not match its certificate is still running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("cannot start") && err.contains("key `tls.key`") && err.contains("is not the key of the certificate"), "{err}");
    assert!(!err.contains("running"), "{err}");
    drop(s);
}

#[test]
fn run_skips_a_file_set_whose_path_is_wrong_and_runs_the_others() {
    // /srv/home does not exist here: that file set is skipped, the daemon still runs.
    let (s, cfg) = setup("run_path_wrong", POLICY);
    let mut daemon = crate::common::Daemon::start(&cfg, &s.dir.join("run.log"), "running");
    let log = daemon.log_text();
    assert!(log.contains("skipping the file set") && log.contains("key `origin.path`") && log.contains("/srv/home does not exist"), "{log}");
    assert!(daemon.stop().is_some_and(|st| st.success()), "{}", daemon.log_text());
}

// ---------------------------------------------------------------------------------------
// Paths on this node (root, loop btrfs)

/// A btrfs policy for `home`, origin `origin` (with `extra` lines under `origin:`), one local
/// replica at `replica`.
fn path_policy(origin: &Path, extra: &str, replica: &Path) -> String {
    format!(
        "fileset: home\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {}\n{extra}replicas:\n  - node: alpha\n    path: {}\n",
        origin.display(),
        replica.display()
    )
}

#[test]
fn real_subvolume_and_replica_directory_exit_zero() {
    require_root!();
    let s = Scratch::new("check_paths_good");
    let fs = LoopBtrfs::new(&s, "b", 200);
    let origin = fs.subvolume("home");
    std::fs::create_dir(fs.mnt.join("backup")).unwrap();
    let cfg = crate::common::single_node_config(&s, "alpha", &[("home", path_policy(&origin, "", &fs.mnt.join("backup/home")))]);
    let (ok, out, err) = check(&cfg);
    assert!(ok && !err.contains("warning"), "{out}{err}");
}

#[test]
fn an_origin_path_that_does_not_exist_is_refused() {
    require_root!();
    let s = Scratch::new("check_origin_missing");
    let fs = LoopBtrfs::new(&s, "b", 200);
    let cfg = crate::common::single_node_config(&s, "alpha", &[("home", path_policy(&fs.mnt.join("nothing"), "", &fs.mnt.join("backup")))]);
    fails_with(&cfg, &["policies/home.yaml:7:3: key `origin.path`", "nothing does not exist", "btrfs subvolume create"]);
}

#[test]
fn an_origin_path_that_is_a_plain_directory_is_refused() {
    require_root!();
    let s = Scratch::new("check_origin_plain");
    let fs = LoopBtrfs::new(&s, "b", 200);
    std::fs::create_dir(fs.mnt.join("plain")).unwrap();
    let cfg = crate::common::single_node_config(&s, "alpha", &[("home", path_policy(&fs.mnt.join("plain"), "", &fs.mnt.join("backup")))]);
    fails_with(&cfg, &["policies/home.yaml:7:3: key `origin.path`", "plain is a plain directory, not a btrfs subvolume"]);
}

#[test]
fn an_origin_path_on_ext4_is_refused() {
    require_root!();
    let s = Scratch::new("check_origin_ext4");
    let fs = LoopBtrfs::new(&s, "b", 200);
    let plain = s.dir.join("on-tmp");
    std::fs::create_dir(&plain).unwrap();
    let cfg = crate::common::single_node_config(&s, "alpha", &[("home", path_policy(&plain, "", &fs.mnt.join("backup")))]);
    fails_with(&cfg, &["policies/home.yaml:7:3: key `origin.path`", "on-tmp is on ", ", not btrfs"]);
}

#[test]
fn a_snapshot_dir_on_another_filesystem_is_refused() {
    require_root!();
    let s = Scratch::new("check_snapdir_other_fs");
    let fs = LoopBtrfs::new(&s, "b", 200);
    let origin = fs.subvolume("home");
    let elsewhere = s.dir.join("snapshots");
    let extra = format!("  snapshot_dir: {}\n", elsewhere.display());
    let cfg = crate::common::single_node_config(&s, "alpha", &[("home", path_policy(&origin, &extra, &fs.mnt.join("backup")))]);
    fails_with(&cfg, &["policies/home.yaml:8:3: key `origin.snapshot_dir`", "is on another filesystem than the subvolume", "set `origin.snapshot_dir`"]);
}

#[test]
fn a_replica_whose_parent_does_not_exist_is_refused_off_btrfs() {
    require_root!();
    let s = Scratch::new("check_replica_parent");
    let fs = LoopBtrfs::new(&s, "b", 200);
    let origin = fs.subvolume("home");
    // Its nearest existing directory is the scratch dir, on ext4.
    let cfg = crate::common::single_node_config(&s, "alpha", &[("home", path_policy(&origin, "", &s.dir.join("no/such/home")))]);
    fails_with(&cfg, &["policies/home.yaml:10:5: key `replicas[0].path`", "no/such of the replica does not exist", ", not btrfs", "mkdir -p"]);
}

#[test]
fn a_replica_parent_still_to_be_made_on_btrfs_is_a_warning() {
    require_root!();
    let s = Scratch::new("check_replica_parent_later");
    let fs = LoopBtrfs::new(&s, "b", 200);
    let origin = fs.subvolume("home");
    // The first receive makes b/backup/home (as the replica does today).
    let cfg = crate::common::single_node_config(&s, "alpha", &[("home", path_policy(&origin, "", &fs.mnt.join("backup/home")))]);
    let (ok, _, err) = check(&cfg);
    assert!(ok, "{err}");
    assert!(err.contains("warning: ") && err.contains("key `replicas[0].path`") && err.contains("does not exist yet; the first receive creates it"), "{err}");
}

#[test]
fn a_replica_on_ext4_is_refused() {
    require_root!();
    let s = Scratch::new("check_replica_ext4");
    let fs = LoopBtrfs::new(&s, "b", 200);
    let origin = fs.subvolume("home");
    let cfg = crate::common::single_node_config(&s, "alpha", &[("home", path_policy(&origin, "", &s.dir.join("backup-home")))]);
    fails_with(&cfg, &["policies/home.yaml:10:5: key `replicas[0].path`", ", not btrfs", "a directory on a btrfs filesystem"]);
}

#[test]
fn zfs_dataset_and_replica_pool_must_exist() {
    if !have_zfs("zfs_dataset_and_replica_pool_must_exist") {
        return;
    }
    let policy = "fileset: db\nbackend: zfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: sstestnopool/db\nreplicas:\n  - node: alpha\n    path: sstestnopool2/db\n";
    let s = Scratch::new("check_zfs_missing");
    let cfg = crate::common::single_node_config(&s, "alpha", &[("db", policy.to_string())]);
    fails_with(
        &cfg,
        &[
            "policies/db.yaml:7:3: key `origin.path`",
            "zfs create sstestnopool/db",
            "policies/db.yaml:10:5: key `replicas[0].path`",
            "the pool sstestnopool2 of the replica dataset",
        ],
    );
}

// ---------------------------------------------------------------------------------------
// --peers: what only the peers can tell

/// `check --peers` reaches beta (handshake, protocol), finds the same policy there; then,
/// with alpha's copy of the policy changed, names the key that differs and what to do; with
/// beta down, says it cannot be reached.
#[test]
fn check_peers_reaches_each_peer_and_compares_policies() {
    require_root!();
    use crate::common::cluster::{Cluster, policy};
    let (mut c, src, dst) = Cluster::two_nodes("check_peers", 300, |p| p);
    let cfg = c.dir("alpha").join("node.yaml");
    let (ok, out, err) = check_with(&cfg, &["--peers"]);
    assert!(ok, "check --peers failed:\n{out}\n{err}");
    assert!(out.contains("peer `beta`") && out.contains("reachable, protocol") && out.contains("its policy for `projects` is the same"), "{out}");

    let changed = policy("projects", "alpha", &src, &[("beta", dst.clone())]).replace("mode: snapshot", "mode: hybrid");
    c.configure("alpha", &[("projects", changed)]);
    let (ok, out, err) = check_with(&cfg, &["--peers"]);
    assert!(!ok, "a policy that differs from beta's passed:\n{out}\n{err}");
    assert!(err.contains("peer `beta`") && err.contains("`mode` here `hybrid`, on beta `snapshot`") && err.contains("systemctl reload"), "{err}");

    c.stop("beta");
    let (ok, _, err) = check_with(&cfg, &["--peers"]);
    assert!(!ok && err.contains("peer `beta`") && err.contains("snapship run"), "beta down:\n{err}");
}
