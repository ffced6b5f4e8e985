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

/// One Garage node serving S3 on 127.0.0.1, with a bucket and a key that may use it.
pub struct Garage {
    child: Child,
    bin: PathBuf,
    config: PathBuf,
    pub dir: PathBuf,
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
}

impl Garage {
    /// Starts Garage under `scratch` (`None`: not installed and not required).
    pub fn start(scratch: &Scratch, test: &str) -> Option<Garage> {
        let bin = binary(test)?;
        let dir = scratch.dir.join("garage");
        std::fs::create_dir_all(dir.join("meta")).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let secret: String = (0..32).map(|i| format!("{:02x}", (i * 37 + 11) as u8)).collect();
        let config = dir.join("garage.toml");
        // compression off: plaintext reaching the store would show in its data directory.
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\ncompression_level = \"none\"\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\n\
                 [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\n[admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                meta = dir.join("meta").display(),
                data = dir.join("data").display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("garage.log")).unwrap();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut g = Garage { child, bin, config, endpoint: format!("http://127.0.0.1:{s3}"), dir, key_id: String::new(), secret: String::new() };
        let id = super::wait_until(std::time::Duration::from_secs(60), "garage to answer", || {
            let out = g.command(&["node", "id", "-q"]).output().ok()?;
            out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        });
        let node = id.split('@').next().unwrap().to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
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

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("-c").arg(&self.config).args(args).stdin(Stdio::null());
        c
    }

    /// Runs a `garage` CLI command against this node; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        String::from_utf8(super::run(&mut self.command(args)).stdout).unwrap()
    }

    /// The directories Garage keeps everything in.
    pub fn dirs(&self) -> [PathBuf; 2] {
        [self.dir.join("meta"), self.dir.join("data")]
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
