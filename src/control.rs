//! The control socket: `state_dir/control.sock`, through which `snapship status` asks the
//! running daemon what it is doing. One JSON request line, one JSON answer line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::status::{StatusBoard, StatusReport};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Serves status requests until `shutdown`. The daemon holds the state-dir lock, so a socket
/// file left by a killed daemon can be replaced.
pub async fn serve(state_dir: &Path, status: Arc<StatusBoard>, shutdown: CancellationToken) -> Result<()> {
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let status = status.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &status).await {
                        tracing::debug!("control request failed: {e:#}");
                    }
                });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn answer(stream: UnixStream, status: &StatusBoard) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // A request is one short line; refuse to buffer more.
    BufReader::new(read.take_limit()).read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Status) => serde_json::to_string(&status.report())?,
        Err(e) => serde_json::to_string(&serde_json::json!({ "error": format!("bad request: {e}") }))?,
    };
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    Ok(())
}

trait TakeLimit: Sized {
    fn take_limit(self) -> tokio::io::Take<Self>;
}

impl TakeLimit for tokio::net::unix::OwnedReadHalf {
    fn take_limit(self) -> tokio::io::Take<Self> {
        tokio::io::AsyncReadExt::take(self, 4096)
    }
}

/// Asks the daemon of `state_dir` for its status.
pub async fn status(state_dir: &Path) -> Result<StatusReport> {
    let path = socket_path(state_dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            bail!("no snapship run is running for this node (nothing answers on {}); start it with `snapship run --config ...`", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot reach the daemon on {}", path.display())),
    };
    let (read, mut write) = stream.into_split();
    write.write_all(serde_json::to_string(&Request::Status)?.as_bytes()).await?;
    write.write_all(b"\n").await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    serde_json::from_str(&line).with_context(|| format!("the daemon answered something unexpected: {line:?}"))
}
