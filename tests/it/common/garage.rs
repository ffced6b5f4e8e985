//! A real S3-compatible store for the object-storage tests: Garage 2.5.0 (installed by
//! `make test` through scripts/fetch-garage.sh into ~/.cache/snapship/tools), one node on
//! loopback with its own metadata and data directories in the test's scratch directory and
//! ports from the OS, a bucket and a key made through its CLI. Killed on drop, failures
//! included. Without the binary a test skips under plain `cargo test` and fails under
//! `make test` (SNAPSHIP_REQUIRE_ROOT_TESTS), never silently.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{REQUIRE_ENV, Scratch, free_port};

pub const VERSION: &str = "2.5.0";
pub const BUCKET: &str = "snapship";
pub const REGION: &str = "garage";

/// Where scripts/fetch-garage.sh installs Garage.
pub fn binary_path() -> PathBuf {
    let tools = std::env::var_os("SNAPSHIP_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/snapship/tools"));
    tools.join(format!("garage-{VERSION}/bin/garage"))
}

/// The Garage binary, if installed; under `make test` its absence is a failure.
pub fn binary(test: &str) -> Option<PathBuf> {
    let path = binary_path();
    if path.is_file() {
        return Some(path);
    }
    if std::env::var_os(REQUIRE_ENV).is_some() {
        panic!("{test}: needs Garage at {} and {REQUIRE_ENV} is set: run scripts/fetch-garage.sh (make test does)", path.display());
    }
    eprintln!("SKIPPED {test}: needs Garage at {} (scripts/fetch-garage.sh installs it)", path.display());
    None
}

/// One Garage node: its process, config and directories.
struct Node {
    child: Option<Child>,
    config: PathBuf,
    dir: PathBuf,
}

/// Garage on 127.0.0.1 (one node, or a cluster), with a bucket and a key that may use it.
/// S3 requests go to the first node.
pub struct Garage {
    nodes: Vec<Node>,
    bin: PathBuf,
    pub dir: PathBuf,
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
}

impl Garage {
    /// Starts one Garage node under `scratch` (`None`: not installed and not required).
    pub fn start(scratch: &Scratch, test: &str) -> Option<Garage> {
        Self::cluster(scratch, test, 1)
    }

    /// Starts `n` Garage nodes replicating everything `n` times (one zone each).
    pub fn cluster(scratch: &Scratch, test: &str, n: usize) -> Option<Garage> {
        let bin = binary(test)?;
        let dir = scratch.dir.join("garage");
        let secret: String = (0..32).map(|i| format!("{:02x}", (i * 37 + 11) as u8)).collect();
        let mut nodes = Vec::new();
        let mut endpoint = String::new();
        for i in 0..n {
            let ndir = dir.join(format!("node{i}"));
            std::fs::create_dir_all(ndir.join("meta")).unwrap();
            std::fs::create_dir_all(ndir.join("data")).unwrap();
            let (rpc, s3, admin) = (free_port(), free_port(), free_port());
            if i == 0 {
                endpoint = format!("http://127.0.0.1:{s3}");
            }
            let config = ndir.join("garage.toml");
            // compression off: plaintext reaching the store would show in its data directory.
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\nreplication_factor = {n}\ncompression_level = \"none\"\n\
                     rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\n\
                     [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\n[admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                    meta = ndir.join("meta").display(),
                    data = ndir.join("data").display(),
                ),
            )
            .unwrap();
            let log = std::fs::File::create(ndir.join("garage.log")).unwrap();
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&config)
                .arg("server")
                .env("RUST_LOG", "garage=warn")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            nodes.push(Node { child: Some(child), config, dir: ndir });
        }
        let mut g = Garage { nodes, bin, dir, endpoint, key_id: String::new(), secret: String::new() };
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(super::wait_until(std::time::Duration::from_secs(60), "garage to answer", || {
                let out = g.command_on(i, &["node", "id", "-q"]).output().ok()?;
                out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
            }));
        }
        for id in &ids[1..] {
            // `node id` answers from the node's files: its RPC may not listen yet.
            super::wait_until(std::time::Duration::from_secs(60), "garage nodes to connect", || {
                g.command(&["node", "connect", id]).output().ok()?.status.success().then_some(())
            });
        }
        for (i, id) in ids.iter().enumerate() {
            let node = id.split('@').next().unwrap();
            let zone = format!("dc{}", i + 1);
            // The other nodes are known once they connected.
            super::wait_until(std::time::Duration::from_secs(60), "garage to know every node", || {
                g.command(&["layout", "assign", "-z", &zone, "-c", "1G", node]).output().ok()?.status.success().then_some(())
            });
        }
        g.cli(&["layout", "apply", "--version", "1"]);
        // The layout takes a moment to be in force: bucket creation fails until it is.
        super::wait_until(std::time::Duration::from_secs(60), "garage to take the bucket", || {
            g.command(&["bucket", "create", BUCKET]).output().ok()?.status.success().then_some(())
        });
        let key = g.cli(&["key", "create", "snapship-test"]);
        let field = |label: &str| {
            key.lines().find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_string())).unwrap_or_else(|| panic!("no {label} in:\n{key}"))
        };
        g.key_id = field("Key ID:");
        g.secret = field("Secret key:");
        g.cli(&["bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "snapship-test"]);
        Some(g)
    }

    /// Kills node `i` (SIGKILL), as a crashed server.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn command_on(&self, i: usize, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("-c").arg(&self.nodes[i].config).args(args).stdin(Stdio::null());
        c
    }

    fn command(&self, args: &[&str]) -> Command {
        self.command_on(0, args)
    }

    /// Runs a `garage` CLI command against this node; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        String::from_utf8(super::run(&mut self.command(args)).stdout).unwrap()
    }

    /// The directories Garage keeps everything in (every node's).
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.nodes.iter().flat_map(|n| [n.dir.join("meta"), n.dir.join("data")]).collect()
    }

    /// A credentials file for snapship, and the object_store client the tests look with.
    pub fn credentials_file(&self, path: &Path) {
        std::fs::write(path, format!("AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\n", self.key_id, self.secret)).unwrap();
    }

    pub fn client(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name(BUCKET)
            .with_region(REGION)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .build()
            .unwrap()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
