//! The control socket: `state_dir/control.sock`, through which `snapship status` asks the
//! running daemon what it is doing, and `snapship sync` asks it to snapshot and ship now
//! (so that a one-shot sync never races the daemon's own transfers and pruning), and
//! `snapship verify` asks it to verify (counted in its metrics), and `snapship restore --from
//! NODE` asks it to fetch a snapshot from another member (its replica service receives it). One JSON request line, one
//! JSON answer line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::observe::status::{StatusBoard, StatusReport};
use crate::origin::job::SyncRequest;
use crate::replicate::ReplicaReport;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// `wait_seconds`: how long the daemon waits, after a replica's first attempt failed, for
    /// a retry to succeed; `no_wait`: answer once the snapshot is taken.
    Sync {
        fileset: String,
        #[serde(default = "default_sync_wait")]
        wait_seconds: f64,
        #[serde(default)]
        no_wait: bool,
    },
    Promote {
        fileset: String,
        force: bool,
    },
    Switchover {
        fileset: String,
        to: String,
    },
    Verify {
        fileset: String,
        replica: Option<String>,
        snapshot: Option<String>,
        full: bool,
    },
    /// `restore --from NODE`: fetch the snapshot named `snapshot`, or the newest at or before
    /// `at`, from the member `from`.
    Fetch {
        fileset: String,
        from: String,
        snapshot: Option<String>,
        at: Option<chrono::DateTime<chrono::Utc>>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Status(Box<StatusReport>),
    Sync { results: Vec<SyncReply> },
    Promoted { report: String },
    Verified { results: Vec<crate::origin::verify::Outcome> },
    Fetched { snapshot: String, report: String },
    Error { message: String },
}

fn default_sync_wait() -> f64 {
    600.0
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
    /// Origin jobs (their sync handles) and promotion.
    pub node: Arc<super::Runtime>,
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Refuses a `state_dir` that others could tamper with: it holds the control socket (which
/// can start transfers), the state files and the spool, so it must belong to the user the
/// daemon runs as and be writable by no one else.
pub fn check_state_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read the state_dir {}", path.display()))?;
    if !meta.is_dir() {
        bail!("the state_dir {} is not a directory", path.display());
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        bail!(
            "the state_dir {} belongs to uid {}, but snapship runs as uid {euid}; give it to this user (`chown {euid} {0}`, then `chmod 700 {0}`) or run snapship as its owner",
            path.display(),
            meta.uid()
        );
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        bail!(
            "the state_dir {0} can be written by other users (mode {mode:04o}), who could replace its control socket or state files; restrict it with `chmod 700 {0}`",
            path.display()
        );
    }
    Ok(())
}

/// The control socket of `state_dir`, bound (before the daemon says it runs, so that a
/// command run right after finds it). The daemon holds the state-dir lock, so a socket file
/// left by a killed daemon can be replaced.
pub fn listen(state_dir: &Path) -> Result<UnixListener> {
    check_state_dir(state_dir)?;
    bind_private(&socket_path(state_dir))
}

/// Serves requests on `listener` (from [`listen`]) until `shutdown`, then removes the socket.
pub async fn serve(state_dir: &Path, listener: UnixListener, control: Arc<Control>, shutdown: CancellationToken) -> Result<()> {
    let path = socket_path(state_dir);
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

/// Binds the socket at `path` so that no one else can ever connect to it: `bind` creates
/// the socket file with the process umask (often world-connectable), so it is bound inside
/// a fresh directory only we can enter, restricted to 0600 there, and then renamed into
/// place (which also replaces a socket a killed daemon left). Setting the umask instead
/// would not do: it is per process, and the daemon's other threads create files and
/// directories meanwhile.
fn bind_private(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let private = path.with_extension("sock.new");
    let _ = std::fs::remove_dir_all(&private); // left by a killed daemon; we hold the state-dir lock
    std::fs::DirBuilder::new().mode(0o700).create(&private).with_context(|| format!("cannot create {}", private.display()))?;
    let bound = (|| -> Result<UnixListener> {
        let inner = private.join("control.sock");
        let listener = UnixListener::bind(&inner).with_context(|| format!("cannot listen on {}", inner.display()))?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600)).with_context(|| format!("cannot restrict {}", inner.display()))?;
        std::fs::rename(&inner, path).with_context(|| format!("cannot move the control socket to {}", path.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

async fn answer(stream: UnixStream, control: &Control) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // A request is one short line; refuse to buffer more.
    BufReader::new(read.take_limit()).read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Status) => Reply::Status(Box::new(control.node.report(control.status.report()))),
        Ok(Request::Sync { fileset, wait_seconds, no_wait }) => {
            let wait = std::time::Duration::try_from_secs_f64(wait_seconds).unwrap_or(std::time::Duration::from_secs(600));
            sync(control, &fileset, (!no_wait).then_some(wait)).await
        }
        Ok(Request::Promote { fileset, force }) => match control.node.promote(&fileset, force).await {
            Ok(report) => Reply::Promoted { report },
            Err(e) => Reply::Error { message: format!("{e:#}") },
        },
        Ok(Request::Switchover { fileset, to }) => match control.node.switchover(&fileset, &to).await {
            Ok(report) => Reply::Promoted { report },
            Err(e) => Reply::Error { message: format!("{e:#}") },
        },
        Ok(Request::Verify { fileset, replica, snapshot, full }) => match control.node.verify(&fileset, replica.as_deref(), snapshot.as_deref(), full).await {
            Ok(results) => Reply::Verified { results },
            Err(e) => Reply::Error { message: format!("{e:#}") },
        },
        Ok(Request::Fetch { fileset, from, snapshot, at }) => {
            use crate::replica::fetch::Wanted;
            let wanted = match (snapshot, at) {
                (Some(name), _) => Some(Wanted::Named(name)),
                (None, Some(at)) => Some(Wanted::At(at)),
                (None, None) => None,
            };
            match wanted {
                None => Reply::Error { message: "say which snapshot to fetch: a name or a time".to_string() },
                Some(wanted) => match control.node.fetch(&fileset, &from, &wanted).await {
                    Ok((snapshot, report)) => Reply::Fetched { snapshot, report },
                    Err(e) => Reply::Error { message: format!("{e:#}") },
                },
            }
        }
        Err(e) => Reply::Error { message: format!("bad request: {e}") },
    };
    let reply = serde_json::to_string(&reply)
        .unwrap_or_else(|e| serde_json::to_string(&Reply::Error { message: format!("cannot encode the answer: {e}") }).expect("a plain error encodes"));
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    Ok(())
}

async fn sync(control: &Control, fileset: &str, wait: Option<std::time::Duration>) -> Reply {
    let handle = control.node.syncs.lock().expect("syncs lock").get(fileset).cloned();
    let Some(handle) = handle else {
        return Reply::Error { message: format!("the running daemon is not the origin of a file set `{fileset}`") };
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if handle.send(SyncRequest { reply: tx, wait }).await.is_err() {
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
/// Asks the running daemon `request` (`verb` in messages); `pick` takes the reply that
/// answers it, or gives back any other. `Ok(None)` when no daemon runs; the daemon's own error
/// is an error here.
async fn ask_for<T>(state_dir: &Path, request: &Request, verb: &str, pick: impl FnOnce(Reply) -> Result<T, Reply>) -> Result<Option<T>> {
    match ask(state_dir, request).await? {
        None => Ok(None),
        Some(Reply::Error { message }) => bail!("{message}"),
        Some(reply) => match pick(reply) {
            Ok(answer) => Ok(Some(answer)),
            Err(other) => bail!("the daemon answered {other:?} to {verb}"),
        },
    }
}

pub async fn status(state_dir: &Path) -> Result<StatusReport> {
    let report = ask_for(state_dir, &Request::Status, "status", |r| match r {
        Reply::Status(report) => Ok(*report),
        other => Err(other),
    })
    .await?;
    report.ok_or_else(|| {
        anyhow::anyhow!(
            "no snapship run is running for this node (nothing answers on {}); start it with `snapship run --config ...`",
            socket_path(state_dir).display()
        )
    })
}

/// Asks the running daemon, the origin of `fileset`, to hand it over to `to`; `None` when no
/// daemon runs.
pub async fn switchover_through_daemon(state_dir: &Path, fileset: &str, to: &str) -> Result<Option<String>> {
    ask_for(state_dir, &Request::Switchover { fileset: fileset.to_string(), to: to.to_string() }, "switchover", |r| match r {
        Reply::Promoted { report } => Ok(report),
        other => Err(other),
    })
    .await
}

/// Asks the running daemon to promote this node for `fileset`; `None` when no daemon runs.
pub async fn promote_through_daemon(state_dir: &Path, fileset: &str, force: bool) -> Result<Option<String>> {
    ask_for(state_dir, &Request::Promote { fileset: fileset.to_string(), force }, "promote", |r| match r {
        Reply::Promoted { report } => Ok(report),
        other => Err(other),
    })
    .await
}

/// Asks the running daemon, the origin of `fileset`, to verify its replicas; `None` when no
/// daemon runs.
pub async fn verify_through_daemon(
    state_dir: &Path,
    fileset: &str,
    replica: Option<&str>,
    snapshot: Option<&str>,
    full: bool,
) -> Result<Option<Vec<crate::origin::verify::Outcome>>> {
    let request = Request::Verify { fileset: fileset.to_string(), replica: replica.map(str::to_string), snapshot: snapshot.map(str::to_string), full };
    ask_for(state_dir, &request, "verify", |r| match r {
        Reply::Verified { results } => Ok(results),
        other => Err(other),
    })
    .await
}

/// Asks the running daemon to fetch a snapshot of `fileset` from the member `from` (the one
/// named `snapshot`, else the newest at or before `at`): its name here and what was done;
/// `None` when no daemon runs.
pub async fn fetch_through_daemon(
    state_dir: &Path,
    fileset: &str,
    from: &str,
    snapshot: Option<&str>,
    at: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Option<(String, String)>> {
    let request = Request::Fetch { fileset: fileset.to_string(), from: from.to_string(), snapshot: snapshot.map(str::to_string), at };
    ask_for(state_dir, &request, "fetch", |r| match r {
        Reply::Fetched { snapshot, report } => Ok((snapshot, report)),
        other => Err(other),
    })
    .await
}

/// Asks the daemon of `state_dir` to sync `fileset`: every replica's first attempt, then up
/// to `wait` for a retry of those that failed (`None`: only the snapshot); `Ok(None)` when no
/// daemon runs.
pub async fn sync_through_daemon(state_dir: &Path, fileset: &str, wait: Option<std::time::Duration>) -> Result<Option<Vec<SyncReply>>> {
    let request = Request::Sync { fileset: fileset.to_string(), wait_seconds: wait.unwrap_or_default().as_secs_f64(), no_wait: wait.is_none() };
    ask_for(state_dir, &request, "sync", |r| match r {
        Reply::Sync { results } => Ok(results),
        other => Err(other),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_state_dir_only_its_owner_can_write_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o700, 0o750, 0o755] {
            chmod(dir.path(), mode);
            check_state_dir(dir.path()).unwrap();
        }
    }

    #[test]
    fn a_state_dir_others_can_write_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o770, 0o707, 0o777, 0o1777] {
            chmod(dir.path(), mode);
            let e = check_state_dir(dir.path()).unwrap_err().to_string();
            assert!(e.contains(&format!("chmod 700 {}", dir.path().display())), "{e}");
            assert!(e.contains(&format!("{mode:04o}")), "{e}");
        }
    }

    #[test]
    fn a_state_dir_of_another_user_or_missing_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(check_state_dir(&missing).unwrap_err().to_string().contains(&missing.display().to_string()));
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(check_state_dir(&file).unwrap_err().to_string().contains("not a directory"));
        // Another owner: only root can make one; elsewhere the check is covered by the mode tests.
        if nix::unistd::geteuid().is_root() {
            let theirs = dir.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            chmod(&theirs, 0o700);
            nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let e = check_state_dir(&theirs).unwrap_err().to_string();
            assert!(e.contains("belongs to uid 65534") && e.contains("chmod 700"), "{e}");
        }
    }

    #[tokio::test]
    async fn the_socket_is_bound_private_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        std::fs::write(&path, "stale").unwrap();
        let listener = bind_private(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only the socket is left");
        let (client, accepted) = tokio::join!(UnixStream::connect(&path), listener.accept());
        client.unwrap();
        accepted.unwrap();
    }

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
            Reply::Fetched { snapshot: "s".into(), report: "fetched s from `gamma`".into() },
            Reply::Error { message: "no".into() },
        ];
        for r in replies {
            let text = serde_json::to_string(&r).unwrap();
            let back: Reply = serde_json::from_str(&text).unwrap();
            assert_eq!(format!("{back:?}"), format!("{r:?}"));
        }
    }
}
