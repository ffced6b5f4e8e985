//! A reader that counts the bytes of a stream as they pass.
//!
//! It also carries the test hook that stalls a stream part way (`SNAPSHIP_TEST_STALL`), so
//! tests can kill a process in the middle of a transfer deterministically instead of racing
//! it. The hook is read once per stream and does nothing unless the variable is set.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// `SNAPSHIP_TEST_STALL=BYTES:MARKER`: after BYTES bytes the stream stops forever and the
/// file MARKER is created, telling the test that the transfer is stuck mid-way.
pub const STALL_ENV: &str = "SNAPSHIP_TEST_STALL";

pub struct Metered<R> {
    inner: R,
    bytes: Arc<AtomicU64>,
    stall: Option<(u64, String)>,
}

impl<R> Metered<R> {
    pub fn new(inner: R) -> Self {
        let stall = std::env::var(STALL_ENV).ok().and_then(|v| {
            let (bytes, marker) = v.split_once(':')?;
            Some((bytes.parse().ok()?, marker.to_string()))
        });
        Metered { inner, bytes: Arc::new(AtomicU64::new(0)), stall }
    }

    /// A handle on the running count, readable while the stream flows.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.bytes.clone()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Metered<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let so_far = self.bytes.load(Ordering::Relaxed);
        if let Some((limit, marker)) = &self.stall {
            if so_far >= *limit {
                if !std::path::Path::new(marker).exists() {
                    let _ = std::fs::write(marker, so_far.to_string());
                    tracing::warn!(bytes = so_far, "test hook: stream stalled on purpose");
                }
                return Poll::Pending; // never woken: stalls until the process is killed
            }
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let n = (buf.filled().len() - before) as u64;
            self.bytes.fetch_add(n, Ordering::Relaxed);
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
    }
}
