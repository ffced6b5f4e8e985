//! Loading real files from a temp dir: good configs load, and every kind of mistake is
//! reported with file, line, column and key.

use super::*;
use std::fs;

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
policies:
  - policies/*.yaml
";

const GOOD: &str = "\
fileset: projects
backend: btrfs
mode: hybrid
schedule: \"*/15 * * * *\"
continuous:
  min_interval: 1s
origin:
  node: alpha
  path: /srv/projects
replicas:
  - node: beta
    path: /backup/projects
retention:
  origin:  { within: 1h, last: 10, hourly: 24, daily: 7 }
  replica: { within: 1h, hourly: 48, daily: 30, weekly: 8, monthly: 12 }
transfer:
  compression: zstd:5
  bandwidth_limit: 100MiB/s
";

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(policies: &[(&str, &str)]) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("policies")).unwrap();
        fs::write(dir.path().join("node.yaml"), NODE).unwrap();
        for (name, text) in policies {
            fs::write(dir.path().join("policies").join(name), text).unwrap();
        }
        Setup { dir }
    }

    fn load(&self) -> LoadedConfig {
        load(&self.dir.path().join("node.yaml")).unwrap()
    }

    /// The single error that loading reports, printed.
    fn only_error(&self) -> String {
        let loaded = self.load();
        assert_eq!(loaded.errors.len(), 1, "{:#?}", loaded.errors);
        loaded.errors[0].to_string()
    }
}

fn expect(err: &str, file: &str, line: usize, key: &str, words: &str) {
    assert!(err.contains(&format!("{file}:{line}:")), "wanted {file}:{line}: in {err}");
    assert!(err.contains(&format!("key `{key}`")), "wanted key `{key}` in {err}");
    assert!(err.contains(words), "wanted {words:?} in {err}");
}

#[test]
fn good_policy_loads_with_every_value() {
    let s = Setup::new(&[("projects.yaml", GOOD)]);
    let loaded = s.load();
    assert!(loaded.errors.is_empty(), "{:#?}", loaded.errors);
    let p = loaded.policy("projects").unwrap();
    assert_eq!(p.mode, Mode::Hybrid);
    assert_eq!(p.continuous.as_ref().unwrap().min_interval.0.as_secs(), 1);
    assert_eq!(p.transfer.compression, Compression::Zstd(5));
    assert_eq!(p.transfer.bandwidth_limit.unwrap().0, 100 << 20);
    assert_eq!(p.retention.replica.monthly, Some(12));
    assert_eq!(p.snapshot_dir(), PathBuf::from("/srv/.snapship/projects"));
    assert_eq!(loaded.node.tls.as_ref().unwrap().ca, s.dir.path().join("certs/ca.pem"));
}

#[test]
fn malformed_yaml_names_file_and_line() {
    let bad = GOOD.replace("\"*/15 * * * *\"", "\"*/15 * * * *");
    let s = Setup::new(&[("projects.yaml", &bad)]);
    let err = s.only_error();
    assert!(err.contains("projects.yaml:") && err.contains("key `schedule`") && err.contains("quoted scalar"), "{err}");
    // Bad indentation: the line of the offending key.
    let bad = GOOD.replace("  path: /srv/projects\n", "  path /srv/projects\n");
    let s = Setup::new(&[("projects.yaml", &bad)]);
    let err = s.only_error();
    assert!(err.contains("projects.yaml:10:1: key `origin`: could not find expected ':', while scanning a simple key at line 9 column 3"), "{err}");
}

#[test]
fn unknown_key_is_rejected_with_what_is_valid() {
    let bad = GOOD.replace("  min_interval: 1s\n", "  min_interval: 1s\n  max_interval: 5s\n");
    let s = Setup::new(&[("projects.yaml", &bad)]);
    expect(&s.only_error(), "projects.yaml", 7, "continuous.max_interval", "unknown key `max_interval`; valid keys here: `min_interval`");
}

#[test]
fn bad_cron_names_the_key() {
    let bad = GOOD.replace("\"*/15 * * * *\"", "\"every 15 minutes\"");
    let s = Setup::new(&[("projects.yaml", &bad)]);
    expect(&s.only_error(), "projects.yaml", 4, "schedule", "valid: 5 fields");
}

#[test]
fn bad_duration_names_the_nested_key() {
    let bad = GOOD.replace("within: 1h, last: 10", "within: 1 fortnight, last: 10");
    let s = Setup::new(&[("projects.yaml", &bad)]);
    expect(&s.only_error(), "projects.yaml", 14, "retention.origin.within", "like 500ms, 1s, 15m");
}

#[test]
fn bad_rate_and_compression() {
    let s = Setup::new(&[("projects.yaml", &GOOD.replace("100MiB/s", "fast"))]);
    expect(&s.only_error(), "projects.yaml", 18, "transfer.bandwidth_limit", "100MiB/s");
    let s = Setup::new(&[("projects.yaml", &GOOD.replace("zstd:5", "lz4"))]);
    expect(&s.only_error(), "projects.yaml", 17, "transfer.compression", "valid: none, zstd");
}

#[test]
fn node_missing_from_peers() {
    let bad = GOOD.replace("  - node: beta\n", "  - node: gamma\n");
    let s = Setup::new(&[("projects.yaml", &bad)]);
    let err = s.only_error();
    expect(&err, "projects.yaml", 11, "replicas[0].node", "unknown node `gamma`");
    assert!(err.contains("peers beta") && err.contains("node.yaml"), "{err}");
}

#[test]
fn mode_needs_schedule_and_continuous_refuses_one() {
    let s = Setup::new(&[("projects.yaml", &GOOD.replace("schedule: \"*/15 * * * *\"\n", ""))]);
    expect(&s.only_error(), "projects.yaml", 3, "mode", "needs a `schedule`");
    let s = Setup::new(&[("projects.yaml", &GOOD.replace("mode: hybrid", "mode: continuous"))]);
    expect(&s.only_error(), "projects.yaml", 4, "schedule", "only used in snapshot and hybrid");
    let s = Setup::new(&[("projects.yaml", &GOOD.replace("mode: hybrid", "mode: sometimes"))]);
    expect(&s.only_error(), "projects.yaml", 3, "mode", "valid: `snapshot`, `continuous`, `hybrid`");
}

#[test]
fn paths_must_be_absolute_and_not_overlap() {
    let s = Setup::new(&[("projects.yaml", &GOOD.replace("path: /backup/projects", "path: backup/projects"))]);
    expect(&s.only_error(), "projects.yaml", 12, "replicas[0].path", "must be absolute");
    let local = GOOD.replace("  - node: beta\n", "  - node: alpha\n").replace("/backup/projects", "/srv/projects/copy");
    let s = Setup::new(&[("projects.yaml", &local)]);
    expect(&s.only_error(), "projects.yaml", 12, "replicas[0].path", "must not overlap");
}

#[test]
fn missing_required_key() {
    let s = Setup::new(&[("projects.yaml", &GOOD.replace("backend: btrfs\n", ""))]);
    let err = s.only_error();
    assert!(err.contains("projects.yaml:") && err.contains("missing key `backend`"), "{err}");
}

#[test]
fn one_broken_policy_does_not_stop_the_others() {
    let other = GOOD.replace("fileset: projects", "fileset: mail").replace("/projects", "/mail");
    let s = Setup::new(&[("a-broken.yaml", "fileset: [oops\n"), ("mail.yaml", &other), ("projects.yaml", GOOD)]);
    let loaded = s.load();
    assert_eq!(loaded.errors.len(), 1, "{:#?}", loaded.errors);
    assert!(loaded.errors[0].file.ends_with("a-broken.yaml"));
    let names: Vec<_> = loaded.policies.iter().map(|p| p.fileset.0.clone()).collect();
    assert_eq!(names, ["mail", "projects"]);
}

#[test]
fn duplicate_fileset_names() {
    let s = Setup::new(&[("a.yaml", GOOD), ("b.yaml", GOOD)]);
    let err = s.only_error();
    expect(&err, "b.yaml", 1, "fileset", "already defined in");
}

#[test]
fn node_config_errors_are_fatal_and_located() {
    let s = Setup::new(&[]);
    fs::write(s.dir.path().join("node.yaml"), NODE.replace("state_dir", "statedir")).unwrap();
    let err = load(&s.dir.path().join("node.yaml")).unwrap_err().to_string();
    assert!(err.contains("node.yaml:3:") && err.contains("unknown key `statedir`"), "{err}");
    fs::write(s.dir.path().join("node.yaml"), NODE.replace("127.0.0.1:7442", "nowhere")).unwrap();
    let err = load(&s.dir.path().join("node.yaml")).unwrap_err().to_string();
    expect(&err, "node.yaml", 9, "peers.beta", "HOST:PORT");
}

#[test]
fn glob_that_matches_nothing_is_reported() {
    let s = Setup::new(&[]);
    let err = s.only_error();
    expect(&err, "node.yaml", 11, "policies[0]", "matches no file");
}

#[test]
fn file_sets_on_one_node_must_not_share_places() {
    // A copy-pasted policy: a new name, but the same replica path on beta... as seen from alpha
    // the origin paths collide too.
    let copy = GOOD.replace("fileset: projects", "fileset: projects2");
    let s = Setup::new(&[("a.yaml", GOOD), ("b.yaml", &copy)]);
    let err = s.only_error();
    expect(&err, "b.yaml", 9, "origin.path", "overlaps /srv/projects");
    // One file set's replica inside another's snapshot directory, both on alpha.
    let other = GOOD
        .replace("fileset: projects", "fileset: mail")
        .replace("/srv/projects", "/srv/mail")
        .replace("  - node: beta\n    path: /backup/projects", "  - node: alpha\n    path: /srv/.snapship/projects/copies");
    let s = Setup::new(&[("a.yaml", GOOD), ("b.yaml", &other)]);
    let err = s.only_error();
    expect(&err, "b.yaml", 12, "replicas[0].path", "the `origin.snapshot_dir` of file set `projects`");
    // A place that contains another file set's, loaded after it, overlaps as well.
    let above = GOOD.replace("fileset: projects", "fileset: all").replace("path: /srv/projects", "path: /srv").replace("/backup/projects", "/backup/all");
    let s = Setup::new(&[("a.yaml", GOOD), ("b.yaml", &above)]);
    expect(&s.only_error(), "b.yaml", 9, "origin.path", "/srv overlaps /srv/");
    assert!(s.only_error().to_string().contains("of file set `projects`"), "{}", s.only_error());
    // Siblings are fine, a name that merely starts like another's too.
    let sibling = GOOD.replace("fileset: projects", "fileset: mail").replace("/projects", "/mail");
    assert!(Setup::new(&[("a.yaml", GOOD), ("b.yaml", &sibling)]).load().errors.is_empty());
    let prefix = GOOD.replace("fileset: projects", "fileset: projects2").replace("/projects", "/projects2");
    assert!(Setup::new(&[("a.yaml", GOOD), ("b.yaml", &prefix)]).load().errors.is_empty());
}

#[test]
fn a_group_must_agree_on_backend_origin_mode_and_schedule() {
    let a = GOOD.replace("transfer:\n", "group: app\ntransfer:\n");
    let b = a.replace("fileset: projects", "fileset: mail").replace("/projects", "/mail").replace("\"*/15 * * * *\"", "\"@daily\"");
    let s = Setup::new(&[("a.yaml", &a), ("b.yaml", &b)]);
    let err = s.only_error();
    expect(&err, "b.yaml", 16, "group", "group `app` also holds `projects`");
    // Agreeing members load, and each sees the whole group.
    let b = a.replace("fileset: projects", "fileset: mail").replace("/projects", "/mail");
    let loaded = Setup::new(&[("a.yaml", &a), ("b.yaml", &b)]).load();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let members: Vec<_> = loaded.group_of(loaded.policy("mail").unwrap()).iter().map(|p| p.fileset.0.clone()).collect();
    assert_eq!(members, ["projects", "mail"]); // in load order (a.yaml, b.yaml)
}

#[test]
fn messages_never_name_rust_types() {
    let s = Setup::new(&[("projects.yaml", &GOOD.replace("origin:\n  node: alpha\n  path: /srv/projects\n", "origin: alpha\n"))]);
    let err = s.only_error();
    expect(&err, "projects.yaml", 7, "origin", "`origin` must be a mapping");
    assert!(!err.contains("struct"), "{err}");
    let s = Setup::new(&[("projects.yaml", &GOOD.replace("last: 10", "last: many"))]);
    let err = s.only_error();
    expect(&err, "projects.yaml", 14, "retention.origin.last", "must be a whole number (0 or more), not the text \"many\"");
    assert!(!err.contains("u32"), "{err}");
}

#[test]
fn an_unquoted_cron_is_told_to_be_quoted() {
    let s = Setup::new(&[("projects.yaml", &GOOD.replace("\"*/15 * * * *\"", "*/15 * * * *"))]);
    let err = s.only_error();
    expect(&err, "projects.yaml", 4, "schedule", "must be quoted: write schedule: \"*/15 * * * *\"");
}

#[test]
fn a_duplicate_key_is_reported_where_it_repeats() {
    let s = Setup::new(&[("projects.yaml", &GOOD.replace("mode: hybrid\n", "mode: hybrid\nmode: snapshot\n"))]);
    expect(&s.only_error(), "projects.yaml", 4, "mode", "`mode` is written twice");
    let s = Setup::new(&[("projects.yaml", &GOOD.replace("  node: alpha\n", "  node: alpha\n  node: alpha\n"))]);
    expect(&s.only_error(), "projects.yaml", 9, "origin.node", "written twice");
    let s = Setup::new(&[]);
    fs::write(s.dir.path().join("node.yaml"), NODE.replace("state_dir: state\n", "state_dir: state\nstate_dir: other\n")).unwrap();
    let err = load(&s.dir.path().join("node.yaml")).unwrap_err().to_string();
    expect(&err, "node.yaml", 4, "state_dir", "written twice");
}

#[test]
fn a_bad_listen_address_gets_an_example() {
    let s = Setup::new(&[]);
    for bad in ["7441", "localhost:7441", "[1, 2]"] {
        fs::write(s.dir.path().join("node.yaml"), NODE.replace("127.0.0.1:7441", bad)).unwrap();
        let err = load(&s.dir.path().join("node.yaml")).unwrap_err().to_string();
        expect(&err, "node.yaml", 2, "listen", "like `listen: 0.0.0.0:7441`");
    }
}

#[test]
fn a_replica_of_another_origin_needs_listen() {
    // beta's view of the file set alpha is the origin of.
    let s = Setup::new(&[("projects.yaml", GOOD)]);
    let beta = NODE.replace("node: alpha", "node: beta").replace("listen: 127.0.0.1:7441\n", "").replace("beta: 127.0.0.1:7442", "alpha: 127.0.0.1:7441");
    fs::write(s.dir.path().join("node.yaml"), beta).unwrap();
    let err = s.only_error();
    assert!(err.contains("node.yaml: key `listen`") && err.contains("`projects` from `alpha`") && err.contains("listen: 0.0.0.0:7441"), "{err}");
    // The origin itself needs none.
    fs::write(s.dir.path().join("node.yaml"), NODE.replace("listen: 127.0.0.1:7441\n", "")).unwrap();
    assert!(s.load().errors.is_empty());
}

#[test]
fn min_interval_has_a_floor_of_100ms() {
    for (value, ok) in [("0s", false), ("99ms", false), ("100ms", true)] {
        let s = Setup::new(&[("projects.yaml", &GOOD.replace("min_interval: 1s", &format!("min_interval: {value}")))]);
        let errors = s.load().errors;
        assert_eq!(errors.is_empty(), ok, "{value}: {errors:?}");
        if !ok {
            expect(&errors[0].to_string(), "projects.yaml", 6, "continuous.min_interval", "100ms or more");
        }
    }
}

#[test]
fn rpo_is_a_duration_above_zero() {
    let s = Setup::new(&[("projects.yaml", &format!("{GOOD}rpo: 5m\n"))]);
    assert_eq!(s.load().policy("projects").unwrap().rpo.unwrap().0.as_secs(), 300);
    let s = Setup::new(&[("projects.yaml", GOOD)]);
    assert!(s.load().policy("projects").unwrap().rpo.is_none());
    let s = Setup::new(&[("projects.yaml", &format!("{GOOD}rpo: 0s\n"))]);
    expect(&s.only_error(), "projects.yaml", 19, "rpo", "like `rpo: 5m`");
    let s = Setup::new(&[("projects.yaml", &format!("{GOOD}rpo: soon\n"))]);
    expect(&s.only_error(), "projects.yaml", 19, "rpo", "like 500ms, 1s, 15m");
}

#[test]
fn verify_takes_a_cron_schedule_and_is_incremental_by_default() {
    let s = Setup::new(&[("projects.yaml", &format!("{GOOD}verify: {{ schedule: \"0 3 * * SUN\" }}\n"))]);
    let l = s.load();
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    let v = l.policy("projects").unwrap().verify.clone().unwrap();
    assert_eq!((v.schedule.as_str(), v.full), ("0 3 * * SUN", false));
    let s = Setup::new(&[("projects.yaml", &format!("{GOOD}verify:\n  schedule: \"@weekly\"\n  full: true\n"))]);
    assert!(s.load().policy("projects").unwrap().verify.as_ref().unwrap().full);
    let s = Setup::new(&[("projects.yaml", GOOD)]);
    assert!(s.load().policy("projects").unwrap().verify.is_none());
    let s = Setup::new(&[("projects.yaml", &format!("{GOOD}verify: {{ schedule: \"every sunday\" }}\n"))]);
    expect(&s.only_error(), "projects.yaml", 19, "verify.schedule", "5 fields");
    let s = Setup::new(&[("projects.yaml", &format!("{GOOD}verify: {{ every: 1w }}\n"))]);
    expect(&s.only_error(), "projects.yaml", 19, "verify.every", "valid keys here: `schedule` or `full`");
}

/// GOOD with a third node, gamma, as a replica whose entry ends with `from` (if any).
fn cascade(gamma_from: Option<&str>, beta_from: Option<&str>) -> Setup {
    let mut text = GOOD.replace("    path: /backup/projects\n", "    path: /backup/projects\n  - node: gamma\n    path: /backup/projects\n");
    if let Some(f) = gamma_from {
        text = text.replacen("  - node: gamma\n    path: /backup/projects\n", &format!("  - node: gamma\n    path: /backup/projects\n    from: {f}\n"), 1);
    }
    if let Some(f) = beta_from {
        text = text.replacen("  - node: beta\n    path: /backup/projects\n", &format!("  - node: beta\n    path: /backup/projects\n    from: {f}\n"), 1);
    }
    let s = Setup::new(&[("projects.yaml", &text)]);
    fs::write(s.dir.path().join("node.yaml"), NODE.replace("  beta: 127.0.0.1:7442\n", "  beta: 127.0.0.1:7442\n  gamma: 127.0.0.1:7443\n")).unwrap();
    s
}

#[test]
fn from_names_a_relay_and_says_who_feeds_whom() {
    let loaded = cascade(Some("beta"), None).load();
    assert!(loaded.errors.is_empty(), "{:#?}", loaded.errors);
    let p = &loaded.policies[0];
    assert_eq!(p.feeder("gamma", "alpha"), Some("beta"));
    assert_eq!(p.feeder("beta", "alpha"), Some("alpha"));
    assert_eq!(p.feeder("alpha", "alpha"), None);
    assert_eq!(p.downstreams("alpha", "alpha"), ["beta"], "the origin skips gamma, which beta feeds");
    assert_eq!(p.downstreams("beta", "alpha"), ["gamma"]);
    // beta promoted: it is the origin and feeds everyone; alpha, now a replica, too.
    assert_eq!(p.downstreams("beta", "beta"), ["alpha", "gamma"]);
    // gamma promoted: beta and alpha are fed by gamma; nothing names gamma's relay as fed.
    assert_eq!(p.downstreams("gamma", "gamma"), ["alpha", "beta"]);
    assert!(p.downstreams("beta", "gamma").is_empty());
    // A replica on the origin's own node is the origin's to feed.
    let local = GOOD.replace("  - node: beta\n    path: /backup/projects\n", "  - node: alpha\n    path: /backup/projects\n");
    let loaded = Setup::new(&[("projects.yaml", &local)]).load();
    assert!(loaded.errors.is_empty(), "{:#?}", loaded.errors);
    assert_eq!(loaded.policies[0].feeder("alpha", "alpha"), Some("alpha"));
}

#[test]
fn a_zfs_replica_may_be_fed_by_a_relay() {
    let text = GOOD
        .replace("backend: btrfs", "backend: zfs")
        .replace("path: /srv/projects", "path: tank/projects")
        .replace("    path: /backup/projects\n", "    path: backup/projects\n  - node: gamma\n    path: backup/projects\n    from: beta\n");
    let s = Setup::new(&[("projects.yaml", &text)]);
    fs::write(s.dir.path().join("node.yaml"), NODE.replace("  beta: 127.0.0.1:7442\n", "  beta: 127.0.0.1:7442\n  gamma: 127.0.0.1:7443\n")).unwrap();
    let loaded = s.load();
    assert!(loaded.errors.is_empty(), "{:#?}", loaded.errors);
    assert_eq!(loaded.policies[0].feeder("gamma", "alpha"), Some("beta"));
    assert_eq!(loaded.policies[0].downstreams("beta", "alpha"), ["gamma"]);
}

#[test]
fn a_bad_from_is_located() {
    expect(&cascade(Some("gamma"), None).only_error(), "projects.yaml", 15, "replicas[1].from", "cannot feed itself");
    expect(&cascade(Some("alpha"), None).only_error(), "projects.yaml", 15, "replicas[1].from", "is the origin");
    let err = cascade(Some("delta"), None).only_error();
    expect(&err, "projects.yaml", 15, "replicas[1].from", "`delta` is not a replica of `projects`");
    let loaded = cascade(Some("beta"), Some("gamma")).load();
    let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors.iter().all(|e| e.contains("makes a cycle")), "{errors:#?}");
    expect(&errors[0], "projects.yaml", 13, "replicas[0].from", "beta <- gamma <- beta");
}

const OFFSITE: &str = "  - name: offsite
    object_store:
      endpoint: http://127.0.0.1:3900
      bucket: snapship
      prefix: projects/
      region: garage
      credentials: keys/offsite.env
    encryption_key: keys/offsite.key
    full_every: 7d
";

#[test]
fn object_store_replicas_load_beside_node_replicas() {
    let text = GOOD.replace("retention:", &format!("{OFFSITE}retention:"));
    let s = Setup::new(&[("projects.yaml", &text)]);
    let loaded = s.load();
    assert!(loaded.errors.is_empty(), "{:#?}", loaded.errors);
    let p = loaded.policy("projects").unwrap();
    assert_eq!(p.replicas.len(), 1, "the node replica stays a node replica");
    let o = &p.object_stores[0];
    assert_eq!((o.name.0.as_str(), o.object_store.bucket.as_str(), o.object_store.region.as_str()), ("offsite", "snapship", "garage"));
    assert_eq!(o.full_every.0.as_secs(), 7 * 86400);
    assert_eq!((o.full_ratio, o.part_size.0), (0.5, 16 << 20));
    // Files are named relative to the policy.
    assert_eq!(o.encryption_key, s.dir.path().join("policies/keys/offsite.key"));
    assert_eq!(o.object_store.credentials.as_deref(), Some(s.dir.path().join("policies/keys/offsite.env").as_path()));
    // An object store alone is a replica too.
    let only = GOOD.replace("  - node: beta\n    path: /backup/projects\n", OFFSITE);
    let s = Setup::new(&[("projects.yaml", &only)]);
    let loaded = s.load();
    assert!(loaded.errors.is_empty(), "{:#?}", loaded.errors);
    assert!(loaded.policy("projects").unwrap().replicas.is_empty());
}

#[test]
fn object_store_mistakes_name_their_key_and_no_secret_is_taken() {
    let with = |o: &str| GOOD.replace("retention:", &format!("{o}retention:"));
    // A secret written into the policy is not a key we take.
    let s = Setup::new(&[("projects.yaml", &with(&OFFSITE.replace("      region: garage\n", "      region: garage\n      secret_access_key: abc\n")))]);
    let err = s.only_error();
    assert!(err.contains("key `replicas[1].object_store.secret_access_key`") && err.contains("unknown key"), "{err}");
    assert!(err.contains("projects.yaml:19:"), "{err}");
    let s = Setup::new(&[("projects.yaml", &with(&OFFSITE.replace("      bucket: snapship\n", "")))]);
    let err = s.only_error();
    assert!(err.contains("key `replicas[1].object_store`") && err.contains("bucket"), "{err}");
    let s = Setup::new(&[("projects.yaml", &with(&OFFSITE.replace("http://127.0.0.1:3900", "127.0.0.1:3900")))]);
    expect(&s.only_error(), "projects.yaml", 15, "replicas[1].object_store.endpoint", "is not an http:// or https:// URL");
    let s = Setup::new(&[("projects.yaml", &with(&OFFSITE.replace("name: offsite", "name: beta")))]);
    expect(&s.only_error(), "projects.yaml", 13, "replicas[1].name", "already the name of a member");
    let s = Setup::new(&[("projects.yaml", &with(&format!("{OFFSITE}    part_size: 1MiB\n")))]);
    expect(&s.only_error(), "projects.yaml", 22, "replicas[1].part_size", "write 5MiB to 5GiB");
}

#[test]
fn an_object_store_may_be_fed_by_a_relay_named_in_from() {
    let with = |from: &str| Setup::new(&[("projects.yaml", &GOOD.replace("retention:", &format!("{OFFSITE}    from: {from}\nretention:")))]);
    let loaded = with("beta").load();
    assert!(loaded.errors.is_empty(), "{:#?}", loaded.errors);
    let p = loaded.policy("projects").unwrap();
    assert_eq!(p.feeder("offsite", "alpha"), Some("beta"), "beta uploads to it");
    // beta promoted: the origin uploads to it, as to every store.
    assert_eq!(p.feeder("offsite", "beta"), Some("beta"));
    expect(&with("alpha").only_error(), "projects.yaml", 22, "replicas[1].from", "is the origin");
    expect(&with("gamma").only_error(), "projects.yaml", 22, "replicas[1].from", "`gamma` is not a replica node of `projects`");
    // Without `from:` the origin feeds it.
    let loaded = Setup::new(&[("projects.yaml", &GOOD.replace("retention:", &format!("{OFFSITE}retention:")))]).load();
    assert_eq!(loaded.policy("projects").unwrap().feeder("offsite", "alpha"), Some("alpha"));
}

#[test]
fn peers_may_be_mappings_that_allow_the_lan_path() {
    let text = NODE.replace(
        "  beta: 127.0.0.1:7442\n",
        "  beta: { address: backup.lan:7442, encryption: off }\n  gamma: 127.0.0.1:7443\n  delta:\n    address: 127.0.0.1:7444\n    encryption: on\n",
    );
    let node = parse_node_text(Path::new("/etc/snapship/node.yaml"), &text).unwrap();
    assert_eq!(node.peers[&Name("beta".into())], "backup.lan:7442");
    assert_eq!(node.peers[&Name("gamma".into())], "127.0.0.1:7443");
    assert_eq!(node.peers[&Name("delta".into())], "127.0.0.1:7444");
    assert_eq!(node.lan_peers.iter().map(|n| n.0.as_str()).collect::<Vec<_>>(), ["beta"]);
}

#[test]
fn bad_peer_mappings_are_located() {
    let file = Path::new("/etc/snapship/node.yaml");
    let with = |entry: &str| parse_node_text(file, &NODE.replace("  beta: 127.0.0.1:7442\n", entry)).unwrap_err().to_string();
    let err = with("  beta: { address: 127.0.0.1:7442, encryption: maybe }\n");
    expect(&err, "node.yaml", 9, "peers.beta.encryption", "unknown value `maybe`; valid: `on` or `off`");
    let err = with("  beta:\n    address: nowhere\n    encryption: off\n");
    expect(&err, "node.yaml", 10, "peers.beta.address", "HOST:PORT");
    let err = with("  beta:\n    adress: 127.0.0.1:7442\n");
    expect(&err, "node.yaml", 10, "peers.beta.adress", "unknown key `adress`; valid keys here: `address` or `encryption`");
    let err = with("  beta:\n    encryption: off\n");
    expect(&err, "node.yaml", 9, "peers.beta", "missing key `address`");
    let err = with("  beta: [1, 2]\n");
    expect(&err, "node.yaml", 9, "peers.beta", "HOST:PORT, or a mapping");
}
