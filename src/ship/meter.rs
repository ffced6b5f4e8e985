//! A reader that counts (and optionally hashes) the bytes of a stream as they pass.
//!
//! It also carries the test hook that stalls a stream part way (`SNAPSHIP_TEST_STALL`), so
//! tests can kill a process in the middle of a transfer deterministically instead of racing
//! it. The hook exists only in builds with the `test-hooks` cargo feature (the test suite
//! turns it on): a production binary must not let its environment change the data path, so
//! without the feature the variable is never read. With it, the hook is read once per
//! stream and does nothing unless the variable is set.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// `SNAPSHIP_TEST_STALL=BYTES:MARKER`: after BYTES bytes the stream stops forever and the
/// file MARKER is created, telling the test that the transfer is stuck mid-way. Read only
/// with the `test-hooks` feature.
pub const STALL_ENV: &str = "SNAPSHIP_TEST_STALL";

/// The stall test hook of a new stream: where to stop, and the marker file to create.
#[cfg(feature = "test-hooks")]
fn stall_hook() -> Option<(u64, String)> {
    let value = std::env::var(STALL_ENV).ok()?;
    let (bytes, marker) = value.split_once(':')?;
    Some((bytes.parse().ok()?, marker.to_string()))
}

/// Without the `test-hooks` feature there is no stall hook: the environment is not read.
#[cfg(not(feature = "test-hooks"))]
fn stall_hook() -> Option<(u64, String)> {
    None
}

pub struct Metered<R> {
    inner: R,
    tally: Arc<Tally>,
    stall: Option<(u64, String)>,
}

/// What a [`Metered`] reader has seen so far; shareable while the stream flows.
#[derive(Default)]
pub struct Tally {
    bytes: AtomicU64,
    hasher: Option<Mutex<blake3::Hasher>>,
}

impl Tally {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// BLAKE3 of the bytes so far, in hex, if this tally hashes.
    pub fn digest(&self) -> Option<String> {
        self.hasher.as_ref().map(|h| h.lock().expect("hasher lock").finalize().to_hex().to_string())
    }

    fn add(&self, data: &[u8]) {
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        if let Some(h) = &self.hasher {
            h.lock().expect("hasher lock").update(data);
        }
    }
}

impl<R> Metered<R> {
    /// Counts bytes.
    pub fn new(inner: R) -> Self {
        Self::with_tally(inner, Tally::default())
    }

    /// Counts and hashes bytes.
    pub fn hashing(inner: R) -> Self {
        Self::with_tally(inner, Tally { bytes: AtomicU64::new(0), hasher: Some(Mutex::new(blake3::Hasher::new())) })
    }

    /// Counts and hashes bytes, going on from `bytes` already hashed into `hasher` (a
    /// stream resumed part way).
    pub fn hashing_from(inner: R, bytes: u64, hasher: blake3::Hasher) -> Self {
        Self::with_tally(inner, Tally { bytes: AtomicU64::new(bytes), hasher: Some(Mutex::new(hasher)) })
    }

    fn with_tally(inner: R, tally: Tally) -> Self {
        Metered { inner, tally: Arc::new(tally), stall: stall_hook() }
    }

    /// A handle on the running tally, readable while the stream flows.
    pub fn tally(&self) -> Arc<Tally> {
        self.tally.clone()
    }

    pub fn bytes(&self) -> u64 {
        self.tally.bytes()
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Metered<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let so_far = self.tally.bytes();
        if let Some((limit, marker)) = &self.stall
            && so_far >= *limit
        {
            if !std::path::Path::new(marker).exists() {
                let _ = std::fs::write(marker, so_far.to_string());
                tracing::warn!(bytes = so_far, "test hook: stream stalled on purpose");
            }
            return Poll::Pending; // never woken: stalls until the process is killed
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            self.tally.add(&buf.filled()[before..]);
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn counts_every_byte() {
        let data = vec![7u8; 100_000];
        let mut m = Metered::new(&data[..]);
        let mut out = Vec::new();
        m.read_to_end(&mut out).await.unwrap();
        assert_eq!(m.bytes(), 100_000);
        assert_eq!(out, data);
        assert_eq!(m.tally().digest(), None);
    }

    #[tokio::test]
    async fn hashes_what_it_counts() {
        let data = b"snapship".repeat(1000);
        let mut m = Metered::hashing(&data[..]);
        tokio::io::copy(&mut m, &mut tokio::io::sink()).await.unwrap();
        assert_eq!(m.tally().digest().unwrap(), blake3::hash(&data).to_hex().to_string());
    }

    /// A release build (no `test-hooks`) must ignore `SNAPSHIP_TEST_STALL`: this test runs
    /// the one below in a child process with the variable asking for a stall at byte 0.
    #[cfg(not(feature = "test-hooks"))]
    #[test]
    fn without_the_feature_the_stall_variable_is_ignored() {
        let scratch = tempfile::tempdir().unwrap();
        let marker = scratch.path().join("stalled");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "ship::meter::tests::reads_to_the_end_whatever_the_environment"])
            .env(STALL_ENV, format!("0:{}", marker.display()))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains("1 passed"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(!marker.exists(), "the stall hook ran in a build without test-hooks");
    }

    /// Also run on its own, where it shows nothing more than that a stream reads to its end.
    #[cfg(not(feature = "test-hooks"))]
    #[tokio::test]
    async fn reads_to_the_end_whatever_the_environment() {
        let data = vec![1u8; 10_000];
        let mut m = Metered::new(&data[..]);
        let mut out = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(10), m.read_to_end(&mut out)).await.expect("the stream stalled").unwrap();
        assert_eq!(out, data);
    }
}
