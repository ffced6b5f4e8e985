//! The control socket: `state_dir/control.sock`, through which `snapship status` asks the
//! running daemon what it is doing, and `snapship sync` asks it to snapshot and ship now
//! (so that a one-shot sync never races the daemon's own transfers and pruning). One JSON
//! request line, one JSON answer line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::observe::status::{StatusBoard, StatusReport};
use crate::origin::job::{SyncHandle, SyncRequest};
use crate::replicate::ReplicaReport;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    Sync { fileset: String },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Status(StatusReport),
    Sync { results: Vec<SyncReply> },
    Error { message: String },
}

/// How a sync through the daemon went, per file set (several for a consistency group): the
/// snapshot taken and each replica's outcome.
#[derive(Debug, Serialize, Deserialize)]
pub struct SyncReply {
    pub fileset: String,
    pub snapshot: String,
    pub replicas: Vec<(String, Result<ReplicaReport, String>)>,
}

/// What the control socket serves from.
pub struct Control {
    pub status: Arc<StatusBoard>,
    pub syncs: BTreeMap<String, SyncHandle>,
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Serves status requests until `shutdown`. The daemon holds the state-dir lock, so a socket
/// file left by a killed daemon can be replaced.
pub async fn serve(state_dir: &Path, control: Arc<Control>, shutdown: CancellationToken) -> Result<()> {
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let control = control.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &control).await {
                        tracing::debug!("control request failed: {e:#}");
                    }
                });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn answer(stream: UnixStream, control: &Control) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // A request is one short line; refuse to buffer more.
    BufReader::new(read.take_limit()).read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Status) => Reply::Status(control.status.report()),
        Ok(Request::Sync { fileset }) => sync(control, &fileset).await,
        Err(e) => Reply::Error { message: format!("bad request: {e}") },
    };
    let reply = serde_json::to_string(&reply)
        .unwrap_or_else(|e| serde_json::to_string(&Reply::Error { message: format!("cannot encode the answer: {e}") }).expect("a plain error encodes"));
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    Ok(())
}

async fn sync(control: &Control, fileset: &str) -> Reply {
    let Some(handle) = control.syncs.get(fileset) else {
        return Reply::Error { message: format!("the running daemon is not the origin of a file set `{fileset}`") };
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if handle.send(SyncRequest { reply: tx }).await.is_err() {
        return Reply::Error { message: format!("file set `{fileset}` is stopping") };
    }
    match rx.await {
        Ok(Ok(per_fileset)) => Reply::Sync {
            results: per_fileset
                .into_iter()
                .map(|(fileset, snapshot, outcomes)| SyncReply {
                    fileset,
                    snapshot: snapshot.to_string(),
                    replicas: outcomes.into_iter().map(|o| (o.replica, o.result)).collect(),
                })
                .collect(),
        },
        Ok(Err(message)) => Reply::Error { message },
        Err(_) => Reply::Error { message: format!("file set `{fileset}` stopped before the sync finished") },
    }
}

trait TakeLimit: Sized {
    fn take_limit(self) -> tokio::io::Take<Self>;
}

impl TakeLimit for tokio::net::unix::OwnedReadHalf {
    fn take_limit(self) -> tokio::io::Take<Self> {
        tokio::io::AsyncReadExt::take(self, 4096)
    }
}

/// Sends `request` to the daemon of `state_dir`; `Ok(None)` when no daemon runs.
async fn ask(state_dir: &Path, request: &Request) -> Result<Option<Reply>> {
    let path = socket_path(state_dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot reach the daemon on {}", path.display())),
    };
    let (read, mut write) = stream.into_split();
    write.write_all(serde_json::to_string(request)?.as_bytes()).await?;
    write.write_all(b"\n").await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let reply = serde_json::from_str(&line).with_context(|| format!("the daemon answered something unexpected: {line:?}"))?;
    Ok(Some(reply))
}

/// Asks the daemon of `state_dir` for its status.
pub async fn status(state_dir: &Path) -> Result<StatusReport> {
    match ask(state_dir, &Request::Status).await? {
        Some(Reply::Status(report)) => Ok(report),
        Some(Reply::Error { message }) => bail!("{message}"),
        Some(other) => bail!("the daemon answered {other:?} to status"),
        None => bail!(
            "no snapship run is running for this node (nothing answers on {}); start it with `snapship run --config ...`",
            socket_path(state_dir).display()
        ),
    }
}

/// Asks the daemon of `state_dir` to sync `fileset`; `Ok(None)` when no daemon runs.
pub async fn sync_through_daemon(state_dir: &Path, fileset: &str) -> Result<Option<Vec<SyncReply>>> {
    match ask(state_dir, &Request::Sync { fileset: fileset.to_string() }).await? {
        Some(Reply::Sync { results }) => Ok(Some(results)),
        Some(Reply::Error { message }) => bail!("{message}"),
        Some(other) => bail!("the daemon answered {other:?} to sync"),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reply_encodes_and_decodes() {
        let report = crate::replicate::ReplicaReport {
            node: "beta".into(),
            snapshot: "s".into(),
            base: None,
            bytes: 3,
            resumed_from: 0,
            elapsed: std::time::Duration::from_millis(5),
        };
        let replies = [
            Reply::Sync {
                results: vec![SyncReply {
                    fileset: "db".into(),
                    snapshot: "s".into(),
                    replicas: vec![("beta".into(), Ok(report)), ("gamma".into(), Err("down".into()))],
                }],
            },
            Reply::Error { message: "no".into() },
        ];
        for r in replies {
            let text = serde_json::to_string(&r).unwrap();
            let back: Reply = serde_json::from_str(&text).unwrap();
            assert_eq!(format!("{back:?}"), format!("{r:?}"));
        }
    }
}
