//! Several nodes on 127.0.0.1 for the multi-node tests: a loop btrfs, a node config and
//! policies per node, certificates from one CA, and `snapship run` daemons.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use super::*;

/// A few nodes on 127.0.0.1, one loop btrfs each, certificates from one CA.
pub struct Cluster {
    pub scratch: Scratch,
    pub fs: BTreeMap<String, LoopBtrfs>,
    pub ports: BTreeMap<String, u16>,
    pub daemons: BTreeMap<String, Daemon>,
    /// (from, to) -> address: how `from` reaches `to` when not directly (a fault proxy).
    pub routes: BTreeMap<(String, String), String>,
    /// Extra node config text per node (e.g. a `transfers:` section).
    pub node_extra: BTreeMap<String, String>,
}

/// Every node gets a port of its own from [`free_port`], so tests run in parallel.
impl Cluster {
    pub fn new(test: &str, nodes: &[&str]) -> Cluster {
        Self::with_size(test, nodes, 400)
    }

    /// With loop images of `size_mib` (sparse) per node.
    pub fn with_size(test: &str, nodes: &[&str], size_mib: u64) -> Cluster {
        let sized: Vec<(&str, u64)> = nodes.iter().map(|n| (*n, size_mib)).collect();
        Self::with_sizes(test, &sized)
    }

    /// With a loop image of its own size (MiB, sparse) per node.
    pub fn with_sizes(test: &str, nodes: &[(&str, u64)]) -> Cluster {
        let scratch = Scratch::new(test);
        run(snapship().arg("certs").arg("--out").arg(scratch.dir.join("certs")).args(nodes.iter().map(|(n, _)| n)));
        let mut fs = BTreeMap::new();
        let mut ports = BTreeMap::new();
        for (n, size) in nodes {
            fs.insert(n.to_string(), LoopBtrfs::new(&scratch, n, *size));
            ports.insert(n.to_string(), free_port());
        }
        Cluster { scratch, fs, ports, daemons: BTreeMap::new(), routes: BTreeMap::new(), node_extra: BTreeMap::new() }
    }

    /// The usual pair: alpha the origin of `projects` (a fresh subvolume on a loop image of
    /// `size_mib`), beta its replica at `backup/projects`, both configured with the same
    /// policy (`shape` may change the text), beta's daemon running. Returns the cluster, the
    /// origin subvolume and beta's replica directory.
    pub fn two_nodes(test: &str, size_mib: u64, shape: impl Fn(String) -> String) -> (Cluster, PathBuf, PathBuf) {
        let mut c = Cluster::with_size(test, &["alpha", "beta"], size_mib);
        let src = c.fs["alpha"].subvolume("projects");
        let dst = c.mnt("beta").join("backup/projects");
        let p = shape(policy("projects", "alpha", &src, &[("beta", dst.clone())]));
        c.configure("alpha", &[("projects", p.clone())]);
        c.configure("beta", &[("projects", p)]);
        c.start("beta");
        (c, src, dst)
    }

    /// Makes `from` reach `to` at `addr` (a proxy in front of it) in configs written later.
    pub fn route(&mut self, from: &str, to: &str, addr: std::net::SocketAddr) {
        self.routes.insert((from.to_string(), to.to_string()), addr.to_string());
    }

    pub fn mnt(&self, node: &str) -> &Path {
        &self.fs[node].mnt
    }

    pub fn dir(&self, node: &str) -> PathBuf {
        self.scratch.dir.join(format!("{node}-conf"))
    }

    /// Writes `node`'s config (all other cluster nodes as peers) and its policies.
    pub fn configure(&self, node: &str, policies: &[(&str, String)]) -> PathBuf {
        self.configure_with_certs(node, policies, &self.scratch.dir.join("certs"))
    }

    pub fn configure_with_certs(&self, node: &str, policies: &[(&str, String)], certs: &Path) -> PathBuf {
        let dir = self.dir(node);
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        for entry in std::fs::read_dir(dir.join("policies")).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        for (name, text) in policies {
            std::fs::write(dir.join("policies").join(format!("{name}.yaml")), text).unwrap();
        }
        let address = |n: &String, p: &u16| self.routes.get(&(node.to_string(), n.clone())).cloned().unwrap_or_else(|| format!("127.0.0.1:{p}"));
        let peers: String = self.ports.iter().filter(|(n, _)| *n != node).map(|(n, p)| format!("  {n}: {}\n", address(n, p))).collect();
        let text = format!(
            "node: {node}\nlisten: 127.0.0.1:{}\nstate_dir: state\ntls:\n  ca: {c}/ca.pem\n  cert: {c}/{node}.pem\n  key: {c}/{node}.key\npeers:\n{peers}policies:\n  - policies/*.yaml\n{}",
            self.ports[node],
            self.node_extra.get(node).map(String::as_str).unwrap_or(""),
            c = certs.display()
        );
        let path = dir.join("node.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn start(&mut self, node: &str) {
        self.start_with_env(node, &[]);
    }

    pub fn start_with_env(&mut self, node: &str, env: &[(&str, String)]) {
        let log = self.scratch.dir.join(format!("{node}-run.log"));
        let d = Daemon::start_with_env(&self.dir(node).join("node.yaml"), &log, " running ", env);
        self.daemons.insert(node.to_string(), d);
    }

    /// Kills `node`'s daemon with SIGKILL: no cleanup of any kind.
    pub fn kill9(&mut self, node: &str) {
        if let Some(mut d) = self.daemons.remove(node) {
            let mut child = d.child.take().expect("a running daemon");
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// `snapship status --json` of `node`.
    pub fn status_json(&self, node: &str) -> serde_json::Value {
        let out = snapship().args(["status", "--json", "--config"]).arg(self.dir(node).join("node.yaml")).output().unwrap();
        assert!(out.status.success(), "status on {node} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn stop(&mut self, node: &str) {
        if let Some(mut d) = self.daemons.remove(node) {
            let status = d.stop().unwrap();
            assert!(status.success(), "snapship run on {node} did not exit cleanly: {status}\n{}", d.log_text());
        }
    }

    /// `snapship sync` reporting each replica's first attempt (`--wait 0s`: with a daemon, no
    /// waiting for its retries; without one it changes nothing).
    pub fn sync(&self, node: &str, fileset: &str) -> Output {
        snapship().args(["sync", "--wait", "0s", "--config"]).arg(self.dir(node).join("node.yaml")).arg(fileset).output().unwrap()
    }

    pub fn sync_ok(&self, node: &str, fileset: &str) -> String {
        let out = self.sync(node, fileset);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "sync {fileset} on {node} failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
        text
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.daemons.clear(); // stop daemons before unmounting
    }
}

/// The places of a three-node failover setup ([`three_node_failover`]).
pub struct Failover {
    /// alpha's live subvolume, the origin.
    pub src: PathBuf,
    pub beta_dst: PathBuf,
    pub gamma_dst: PathBuf,
    /// Where beta serves the file set once promoted (`promote_path`).
    pub beta_live: PathBuf,
}

/// `projects` on the nodes alpha, beta and gamma of `c`: alpha the origin, beta a replica
/// that can be promoted (to `beta_live`) and gamma a replica; `mode` the policy's mode lines
/// (e.g. `mode: snapshot\nschedule: "@hourly"\n`). Configured on all three, none started.
pub fn three_node_failover(c: &Cluster, mode: &str) -> Failover {
    let src = c.fs["alpha"].subvolume("projects");
    let (beta_dst, gamma_dst) = (c.mnt("beta").join("backup/projects"), c.mnt("gamma").join("backup/projects"));
    let beta_live = c.mnt("beta").join("projects");
    let policy = format!(
        "fileset: projects\nbackend: btrfs\n{mode}origin:\n  node: alpha\n  path: {}\nreplicas:\n  - node: beta\n    path: {}\n    promote_path: {}\n  - node: gamma\n    path: {}\n",
        src.display(),
        beta_dst.display(),
        beta_live.display(),
        gamma_dst.display()
    );
    for n in ["alpha", "beta", "gamma"] {
        c.configure(n, &[("projects", policy.clone())]);
    }
    Failover { src, beta_dst, gamma_dst, beta_live }
}

/// A daily schedule 12 hours from now (UTC), in place of [`policy`]'s `@hourly`, for a test
/// that counts the snapshots its running daemons take: `@hourly` fires when a test runs across
/// the hour.
pub fn quiet_schedule() -> String {
    use chrono::Timelike;
    format!("schedule: \"0 {} * * *\"", (chrono::Utc::now().hour() + 12) % 24)
}

/// [`policy`] with the [`quiet_schedule`].
pub fn quiet_policy(fileset: &str, origin: &str, origin_path: &Path, replicas: &[(&str, PathBuf)]) -> String {
    policy(fileset, origin, origin_path, replicas).replace("schedule: \"@hourly\"", &quiet_schedule())
}

pub fn policy(fileset: &str, origin: &str, origin_path: &Path, replicas: &[(&str, PathBuf)]) -> String {
    let mut text = format!(
        "fileset: {fileset}\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: {origin}\n  path: {}\nreplicas:\n",
        origin_path.display()
    );
    for (node, path) in replicas {
        text += &format!("  - node: {node}\n    path: {}\n", path.display());
    }
    text
}

pub fn fill(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    write_random(&dir.join("data.bin"), 6 << 20, seed);
    for i in 0..30 {
        std::fs::write(dir.join(format!("sub/f{i}.txt")), format!("file {i} seed {seed}\n").repeat(50)).unwrap();
    }
}

/// Names of complete snapshots in a replica directory.
pub fn snapshots(dir: &Path) -> Vec<String> {
    if !dir.exists() {
        return Vec::new();
    }
    visible(dir).into_iter().filter(|n| n != "latest").collect()
}
