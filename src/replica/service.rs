//! The replica service: one per node, serving every file set this node is a replica of.
//!
//! A request is authorized only when the peer's certificate names the node that this node's
//! copy of the policy names as origin, and the policy names this node as a replica. The one
//! exception goes the other way: on the origin, a `list` from one of the file set's replicas
//! is answered with the origin's own snapshots (`snapship list` on a replica). What
//! the peer sends (file set, snapshot name, identities) is checked against the policy and the
//! backend before anything touches a filesystem; the target path always comes from the
//! policy.
//!
//! Receives and pruning of one file set never overlap: the file set's lock (the one `begin`
//! takes) is taken before the origin hears `committed` and held while the replica prunes, so
//! the next `begin` waits for the prune, and a prune never races a receive that publishes a
//! new snapshot (and moves `latest`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::task::TaskTracker;

use super::prune;
use super::session::{self, Sessions};
use crate::config::{LoadedConfig, Policy, ReplicaSpec};
use crate::observe::status::StatusBoard;
use crate::ship::frame::FrameReader;
use crate::ship::protocol::{ErrorCode, Message, VERSION, WireSnapshot};
use crate::ship::transfer::{IncomingData, read_message, write_message};
use crate::ship::{Handler, RequestStream};
use crate::snapshot::{self, Incoming, ReplicaSide, SnapshotName};

/// A snapshot name dated further into the future than this (by this node's clock) is refused:
/// retention files snapshots by the time in their names, and a future-dated burst from a
/// compromised origin would otherwise fill every bucket and push real history out.
pub const MAX_FUTURE: Duration = Duration::from_secs(300);

/// Makes the backend's replica side for a policy's replica entry on this node (tests put
/// fakes here).
pub type Backends = Arc<dyn Fn(&Policy, &ReplicaSpec) -> Result<Box<dyn ReplicaSide>> + Send + Sync>;

/// The real backends: btrfs or ZFS, by the policy.
pub fn real_backends() -> Backends {
    Arc::new(snapshot::replica_for)
}

pub struct ReplicaService {
    config: Arc<LoadedConfig>,
    sessions: Arc<Sessions>,
    status: Arc<StatusBoard>,
    backends: Backends,
    /// Prunes after receives (each holds its file set's lock).
    prunes: TaskTracker,
}

impl ReplicaService {
    pub fn new(config: Arc<LoadedConfig>, status: Arc<StatusBoard>, backends: Backends) -> Arc<ReplicaService> {
        let sessions = Sessions::new(&config.node.transfers, &config.node.state_dir);
        Arc::new(ReplicaService { config, sessions, status, backends, prunes: TaskTracker::new() })
    }

    /// The sessions, for their watchdog ([`Sessions::watch`]) and shutdown.
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// Stops every session and waits for the prunes under way.
    pub async fn shutdown(&self) {
        self.sessions.shutdown();
        self.prunes.close();
        self.prunes.wait().await;
    }

    /// Answers `peer` asking about `fileset`: the policy and this node's replica entry, or the
    /// error message to send back.
    #[allow(clippy::result_large_err)] // a refusal is the message to send back; a cold path
    pub fn authorize(&self, peer: &str, fileset: &str) -> Result<(&Policy, &ReplicaSpec), Message> {
        authorize(&self.config, peer, fileset)
    }

    /// Serves one request; returns the final reply to send.
    async fn serve_request<W: AsyncWrite + Unpin>(
        &self,
        mut frames: FrameReader<Box<dyn tokio::io::AsyncRead + Send + Unpin>>,
        send: &mut W,
        peer: &str,
    ) -> Result<Message> {
        match read_message(&mut frames).await? {
            Message::Hello { version } if version == VERSION => {}
            Message::Hello { version } => {
                return Ok(Message::error(
                    ErrorCode::Version,
                    format!("this node speaks protocol {VERSION}, the origin {version}; run the same snapship version on both"),
                ));
            }
            other => return Ok(Message::error(ErrorCode::BadRequest, format!("expected hello, got {}", other.kind()))),
        }
        match read_message(&mut frames).await? {
            Message::List { fileset } => {
                if let Some(policy) = origin_listed_to(&self.config, peer, &fileset) {
                    return origin_listing(policy).await;
                }
                let (policy, replica) = match self.authorize(peer, &fileset) {
                    Ok(found) => found,
                    Err(refusal) => return Ok(refusal),
                };
                let side = (self.backends)(policy, replica)?;
                let snapshots = side.list().await?.into_iter().map(|s| WireSnapshot { name: s.name.to_string(), identity: s.identity }).collect();
                let partial = self.sessions.resumable(&fileset, side.as_ref()).await;
                Ok(Message::Snapshots { snapshots, compact: side.accepts_compact().await, partial })
            }
            Message::Begin { fileset, snapshot, identity, base, compression, compact, resume, from_token } => {
                let (policy, replica) = match self.authorize(peer, &fileset) {
                    Ok(found) => found,
                    Err(refusal) => return Ok(refusal),
                };
                let name = match check_name(&snapshot, chrono::Utc::now()) {
                    Ok(name) => name,
                    Err(refusal) => return Ok(refusal),
                };
                let from = resume.as_ref().map_or(0, |r| r.offset);
                let incoming = Incoming { name, identity, base: base.clone(), from_token };
                let attached = self.sessions.begin(peer, &fileset, incoming, compact, resume, (self.backends)(policy, replica)?).await?;
                write_message(send, &Message::Ready).await?;
                tracing::info!(%peer, %fileset, %snapshot, base = base.as_deref().unwrap_or("none (full)"), from, "receiving");
                let data = IncomingData::new(frames, compression, self.sessions.stall_timeout());
                self.sessions.feed(attached, data, send).await?;
                tracing::info!(%peer, %fileset, %snapshot, "received and committed");
                // Hold the file set's lock before the origin hears `committed`, so that its next
                // `begin` waits for this prune; prune once it has its answer.
                let lock = self.sessions.fileset_lock(&fileset).lock_owned().await;
                let side = (self.backends)(policy, replica)?;
                let (policy, status, sessions) = (policy.clone(), self.status.clone(), self.sessions.clone());
                let origin_is_remote = policy.origin.node != self.config.node.node;
                self.prunes.spawn(async move {
                    prune::after_receive(&policy, side.as_ref(), &sessions).await;
                    drop(lock);
                    if origin_is_remote {
                        if let Ok(held) = side.list().await {
                            status.received(&policy.fileset.0, &policy.origin.node.0, held.last().map(|s| &s.name), held.len());
                        }
                    }
                });
                Ok(Message::Committed { snapshot })
            }
            other => Ok(Message::error(ErrorCode::BadRequest, format!("expected list or begin, got {}", other.kind()))),
        }
    }
}

#[async_trait]
impl Handler for ReplicaService {
    async fn handle(&self, peer: String, stream: RequestStream) {
        let RequestStream { recv, mut send } = stream;
        let frames = FrameReader::new(recv);
        let reply = match self.serve_request(frames, &mut send, &peer).await {
            Ok(reply) => reply,
            Err(e) => Message::error(session::error_code(&e), format!("{e:#}")),
        };
        if let Message::Error { code, message } = &reply {
            tracing::warn!(%peer, ?code, "request failed: {}", message.escape_debug());
        }
        let _ = write_message(&mut send, &reply).await;
        let _ = send.shutdown().await;
    }
}

/// The policy of `fileset` when `peer` asks for it as one of its replicas and this node is
/// its origin: then `list` is a replica asking what the origin holds (`snapship list` run on
/// a replica). A replica learns nothing new from it: the names and identities are those the
/// origin ships to it anyway.
fn origin_listed_to<'a>(config: &'a LoadedConfig, peer: &str, fileset: &str) -> Option<&'a Policy> {
    let policy = config.policy(fileset)?;
    let is_member = policy.replicas.iter().any(|r| r.node.0 == peer);
    (policy.origin.node == config.node.node && policy.origin.node.0 != peer && is_member).then_some(policy)
}

/// The origin's own snapshots of `policy`'s file set, as the answer to a replica's `list`.
async fn origin_listing(policy: &Policy) -> Result<Message> {
    let snapshots = snapshot::origin_for(policy)?.list().await?.into_iter().map(|s| WireSnapshot { name: s.name.to_string(), identity: s.identity }).collect();
    Ok(Message::Snapshots { snapshots, compact: false, partial: None })
}

/// Answers `peer` asking about `fileset` with `config`'s policy and this node's replica
/// entry, or the refusal to send back.
#[allow(clippy::result_large_err)] // a refusal is the message to send back; a cold path
pub fn authorize<'a>(config: &'a LoadedConfig, peer: &str, fileset: &str) -> Result<(&'a Policy, &'a ReplicaSpec), Message> {
    let here = &config.node.node;
    let Some(policy) = config.policy(fileset) else {
        return Err(Message::error(ErrorCode::Unauthorized, format!("node `{here}` has no policy for file set {fileset:?}")));
    };
    if policy.origin.node.0 != peer {
        return Err(Message::error(
            ErrorCode::Unauthorized,
            format!("node `{peer}` is not the origin of `{fileset}` (the policy on `{here}` names `{}`)", policy.origin.node),
        ));
    }
    match policy.replica_on(here) {
        Some(replica) => Ok((policy, replica)),
        None => Err(Message::error(ErrorCode::Unauthorized, format!("node `{here}` is not a replica of `{fileset}`"))),
    }
}

/// The snapshot name an origin sent, if it is one snapship makes and not dated beyond
/// [`MAX_FUTURE`] from `now`.
#[allow(clippy::result_large_err)] // a refusal is the message to send back; a cold path
fn check_name(text: &str, now: chrono::DateTime<chrono::Utc>) -> Result<SnapshotName, Message> {
    let Some(name) = SnapshotName::parse(text) else {
        return Err(Message::error(ErrorCode::BadRequest, format!("{text:?} is not a snapship snapshot name")));
    };
    if name.time() > now + MAX_FUTURE {
        return Err(Message::error(
            ErrorCode::BadRequest,
            format!(
                "snapshot {name} is dated {} ahead of this replica's clock (more than {}s); check the clocks of both nodes (NTP)",
                humantime::format_duration(Duration::from_secs((name.time() - now).num_seconds().max(0) as u64)),
                MAX_FUTURE.as_secs()
            ),
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_the_future_are_refused() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-06-01T12:00:00Z").unwrap().with_timezone(&chrono::Utc);
        assert!(check_name("snapship-20260601T120400.000Z", now).is_ok(), "a few minutes of clock skew is fine");
        let Err(Message::Error { code, message }) = check_name("snapship-20260601T130000.000Z", now) else { panic!("an hour ahead passed") };
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(message.contains("ahead of this replica's clock"), "{message}");
        assert!(check_name("../etc/passwd", now).is_err());
    }

    /// `node`'s view of a file set with origin alpha and replicas beta and gamma.
    fn config_of(node: &str) -> LoadedConfig {
        let file = std::path::Path::new("/nonexistent/node.yaml");
        let peers: String = ["alpha", "beta", "gamma", "delta"].iter().filter(|n| **n != node).map(|n| format!("  {n}: 127.0.0.1:1\n")).collect();
        let node = crate::config::parse_node_text(
            file,
            &format!("node: {node}\nstate_dir: state\ntls:\n  ca: ca.pem\n  cert: c.pem\n  key: c.key\npeers:\n{peers}policies: []\n"),
        )
        .unwrap();
        let text = "fileset: projects\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: /srv/projects\nreplicas:\n  - node: beta\n    path: /backup/projects\n  - node: gamma\n    path: /backup/projects\n";
        let policy = crate::config::parse_policy_text(std::path::Path::new("/nonexistent/projects.yaml"), text, &node).unwrap();
        LoadedConfig { node, policies: vec![policy], errors: vec![] }
    }

    #[test]
    fn only_the_origin_lists_its_own_snapshots_and_only_to_its_replicas() {
        let origin = config_of("alpha");
        assert!(origin_listed_to(&origin, "beta", "projects").is_some());
        assert!(origin_listed_to(&origin, "gamma", "projects").is_some());
        assert!(origin_listed_to(&origin, "delta", "projects").is_none(), "not a member");
        assert!(origin_listed_to(&origin, "beta", "other").is_none(), "no such file set");
        // A replica answers a replica nothing of the kind (and `authorize` refuses it).
        let replica = config_of("beta");
        assert!(origin_listed_to(&replica, "gamma", "projects").is_none());
        assert!(authorize(&replica, "gamma", "projects").is_err());
        // Its origin's `list` is the usual one: what the replica holds.
        assert!(origin_listed_to(&replica, "alpha", "projects").is_none());
        assert!(authorize(&replica, "alpha", "projects").is_ok());
    }
}
