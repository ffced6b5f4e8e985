//! The node: wiring the roles together for `snapship run` and the one-shot commands.
//!
//! `run` loads the node config (broken policies are reported and skipped), runs the origin
//! job of every file set whose origin is this node, serves the replica role for every file
//! set this node holds a replica of (over QUIC for other origins, over the in-process link
//! for its own), and stops cleanly on SIGINT or SIGTERM. A lock file in `state_dir` keeps a
//! second daemon (and `snapship prune` without `--dry-run`) away. [`endpoints`] is how this
//! node reaches a file set's replicas, for `run` and `sync` alike; [`control`] is the Unix
//! socket that `status` and `sync` talk to.

pub mod control;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::units::Compression;
use crate::config::{self, LoadedConfig, Policy, Transfer};
use crate::observe::status::StatusBoard;
use crate::origin::job::{GroupHub, GroupMember, OriginJob, SyncHandle};
use crate::origin::state::StateStore;
use crate::replica::ReplicaService;
use crate::schedule::clock::Clock;
use crate::ship::client::PeerReplica;
use crate::ship::local::LocalLink;
use crate::ship::quic::{self, Connector, QuicDialer};
use crate::ship::{Dialer, ReplicaEndpoint};
use crate::snapshot;

/// Holds `state_dir/daemon.lock` while the daemon runs.
pub fn lock_state_dir(state_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    // Made private (0700) when missing: it holds the control socket and the spool.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(state_dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", state_dir.display()))?;
    control::check_state_dir(state_dir)?;
    let path = state_dir.join("daemon.lock");
    let file = std::fs::File::create(&path).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| anyhow::anyhow!("another snapship process (run, sync or prune) is using {} (its lock {} is held)", state_dir.display(), path.display()))
}

/// How this node, the origin of `policy`, reaches its replicas: the in-process link for a
/// replica on this node, QUIC for the others (through `connector`, made on first need).
pub fn endpoints(config: &LoadedConfig, policy: &Policy, connector: &mut Option<Arc<Connector>>, local: &LocalLink) -> Result<Vec<Arc<dyn ReplicaEndpoint>>> {
    let here = &config.node.node;
    let stall = config.node.transfers.stall_timeout.0;
    let mut out: Vec<Arc<dyn ReplicaEndpoint>> = Vec::new();
    for replica in &policy.replicas {
        let (dialer, transfer): (Arc<dyn Dialer>, _) = if &replica.node == here {
            // Through this process: compressing would only cost CPU.
            let transfer = Transfer { compression: Compression::None, ..policy.transfer.clone() };
            (Arc::new(local.clone()), transfer)
        } else {
            let addr = config.node.peers.get(&replica.node).ok_or_else(|| anyhow!("replica `{}` is not in peers", replica.node))?;
            let connector = match connector {
                Some(c) => c.clone(),
                None => connector.insert(Arc::new(Connector::new(&config.node)?)).clone(),
            };
            (Arc::new(QuicDialer::new(replica.node.0.clone(), addr.clone(), connector)), policy.transfer.clone())
        };
        out.push(Arc::new(PeerReplica::new(replica.node.0.clone(), policy.fileset.0.clone(), transfer, stall, dialer)));
    }
    Ok(out)
}

/// The replica role of this node, serving the in-process link (and, when started with
/// [`ReplicaRole::listen`], QUIC) until `shutdown`.
pub struct ReplicaRole {
    pub service: Arc<ReplicaService>,
    pub link: LocalLink,
    tasks: TaskTracker,
}

impl ReplicaRole {
    pub fn start(config: Arc<LoadedConfig>, status: Arc<StatusBoard>, shutdown: &CancellationToken) -> ReplicaRole {
        let service = ReplicaService::new(config.clone(), status, crate::replica::service::real_backends());
        let (link, streams) = LocalLink::pair(&config.node.node.0);
        let tasks = TaskTracker::new();
        tasks.spawn(service.sessions().clone().watch(shutdown.clone()));
        tasks.spawn(crate::ship::local::serve(streams, service.clone(), shutdown.clone()));
        ReplicaRole { service, link, tasks }
    }

    /// Also serves other nodes over QUIC on `addr`.
    pub fn listen(&self, config: &LoadedConfig, addr: std::net::SocketAddr, shutdown: &CancellationToken) -> Result<()> {
        let files = config.node.tls.as_ref().ok_or_else(|| anyhow!("{} has no `tls:` section; a replica needs one", config.node.file.display()))?;
        let server = quic::bind(files, addr)?;
        tracing::info!(node = %config.node.node, %addr, "listening for origins");
        let peers = config.node.peers.keys().map(|k| k.0.clone()).collect();
        self.tasks.spawn(quic::serve(server, peers, self.service.clone(), shutdown.clone()));
        Ok(())
    }

    /// After `shutdown` was cancelled: ends the sessions and waits for every task.
    pub async fn stop(self) {
        self.service.shutdown().await;
        self.tasks.close();
        self.tasks.wait().await;
    }
}

pub async fn run(config_path: &Path) -> Result<()> {
    let loaded = Arc::new(config::load(config_path)?);
    for e in &loaded.errors {
        tracing::error!("skipping a broken policy: {e}");
    }
    let here = &loaded.node.node;
    let replica_of: Vec<&str> =
        loaded.policies.iter().filter(|p| p.origin.node != *here && p.replica_on(here).is_some()).map(|p| p.fileset.0.as_str()).collect();
    let origin_of: Vec<&str> = loaded.policies.iter().filter(|p| p.origin.node == *here).map(|p| p.fileset.0.as_str()).collect();
    tracing::info!(node = %here, origin_of = ?origin_of, replica_of = ?replica_of, "starting");

    let _lock = lock_state_dir(&loaded.node.state_dir)?;
    let shutdown = CancellationToken::new();
    let status = StatusBoard::new(&here.0);
    let background = TaskTracker::new();
    observe(&loaded, &status, &background, &shutdown)?;

    // The replica role first: this node's own origin jobs may ship to it.
    let replica = ReplicaRole::start(loaded.clone(), status.clone(), &shutdown);
    if !replica_of.is_empty() {
        let Some(addr) = loaded.node.listen else {
            bail!("node `{here}` is a replica of {} but {} has no `listen:` address", replica_of.join(", "), loaded.node.file.display());
        };
        replica.listen(&loaded, addr, &shutdown)?;
    } else if let (Some(addr), Some(_), false) = (loaded.node.listen, &loaded.node.tls, origin_of.is_empty()) {
        // An origin with an address listens too: its replicas ask it what it holds
        // (`snapship list` on a replica). It serves nothing else, so failing is not fatal.
        if let Err(e) = replica.listen(&loaded, addr, &shutdown) {
            tracing::warn!("cannot listen on {addr}, so replicas cannot list this origin's snapshots: {e:#}");
        }
    }
    report_replicas(&loaded, &status).await;

    let origins = TaskTracker::new();
    let syncs = start_origins(&loaded, &status, &replica.link, &origins, &shutdown);
    origins.close();
    {
        let control = Arc::new(control::Control { status: status.clone(), syncs });
        let (shutdown, dir) = (shutdown.clone(), loaded.node.state_dir.clone());
        background.spawn(async move {
            if let Err(e) = control::serve(&dir, control, shutdown).await {
                tracing::error!("control socket: {e:#}");
            }
        });
    }
    background.close();
    tracing::info!(node = %here, "running");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    shutdown.cancel();
    origins.wait().await;
    background.wait().await;
    // Give the QUIC endpoints a moment to send the connection closes queued above.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    replica.stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// Runs `work` with this node's replica role serving the in-process link (a replica on this
/// node is reached through it, as in the daemon), and stops the role afterwards. For the
/// one-shot commands, which hold the `state_dir` lock (the role clears its spool directory).
pub async fn with_replica_role<T, F, Fut>(loaded: &Arc<LoadedConfig>, work: F) -> Result<T>
where
    F: FnOnce(Arc<ReplicaRole>) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let shutdown = CancellationToken::new();
    let status = StatusBoard::new(&loaded.node.node.0);
    let role = Arc::new(ReplicaRole::start(loaded.clone(), status, &shutdown));
    let result = work(role.clone()).await;
    shutdown.cancel();
    if let Ok(role) = Arc::try_unwrap(role) {
        role.stop().await;
    }
    result
}

/// `snapship sync` without a daemon: snapshot `policy`'s file set (with its group) now and
/// bring every replica up to it. The caller holds the `state_dir` lock.
pub async fn sync(loaded: &Arc<LoadedConfig>, policy: &Policy, on_start: crate::origin::sync::OnStart<'_>) -> Result<Vec<crate::origin::sync::SyncReport>> {
    with_replica_role(loaded, |role| async move {
        let connector = std::sync::Mutex::new(None);
        let endpoints = |p: &Policy| endpoints(loaded, p, &mut connector.lock().expect("connector lock"), &role.link);
        crate::origin::sync::sync(loaded, policy, &endpoints, on_start).await
    })
    .await
}

/// Metrics (when `metrics:` is set) and the lag gauges' refresh.
fn observe(loaded: &LoadedConfig, status: &Arc<StatusBoard>, background: &TaskTracker, shutdown: &CancellationToken) -> Result<()> {
    if let Some(addr) = loaded.node.metrics {
        metrics_exporter_prometheus::PrometheusBuilder::new().with_http_listener(addr).install().map_err(|e| anyhow!("cannot serve metrics on {addr}: {e}"))?;
        crate::observe::status::describe_metrics();
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    }
    let (status, shutdown) = (status.clone(), shutdown.clone());
    background.spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => status.refresh_lag_metrics(),
            }
        }
    });
    Ok(())
}

/// Tells the status board what this node holds of the file sets it is a replica of.
async fn report_replicas(loaded: &LoadedConfig, status: &StatusBoard) {
    let here = &loaded.node.node;
    for policy in loaded.policies.iter().filter(|p| p.origin.node != *here) {
        if let Some(replica) = policy.replica_on(here) {
            let held = match snapshot::replica_for(policy, replica) {
                Ok(side) => side.list().await.unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            status.receiver(&policy.fileset.0, &policy.origin.node.0, held.last().map(|s| &s.name), held.len());
        }
    }
}

/// Starts the origin job of every file set this node is origin of (consistency groups
/// sharing a hub) on `origins`; returns where their sync requests go.
fn start_origins(
    loaded: &LoadedConfig,
    status: &Arc<StatusBoard>,
    local: &LocalLink,
    origins: &TaskTracker,
    shutdown: &CancellationToken,
) -> BTreeMap<String, SyncHandle> {
    let here = &loaded.node.node;
    let mut connector = None;
    let mut jobs = Vec::new();
    for policy in loaded.policies.iter().filter(|p| p.origin.node == *here) {
        let job = (|| -> Result<(OriginJob, SyncHandle)> {
            let origin = snapshot::origin_for(policy)?.into();
            let replicas = endpoints(loaded, policy, &mut connector, local)?;
            let state = StateStore::open(&loaded.node.state_dir, &policy.fileset.0)?.into();
            let (job, handle) = OriginJob::new(policy.clone(), origin, replicas, state, Clock::System, status.clone());
            Ok((job.with_stall_timeout(loaded.node.transfers.stall_timeout.0), handle))
        })();
        match job {
            Ok(job) => jobs.push(job),
            // One file set's trouble never stops the others.
            Err(e) => tracing::error!(fileset = %policy.fileset, "cannot start: {e:#}"),
        }
    }
    // Consistency groups: members share a hub that snapshots them together.
    let mut members: BTreeMap<String, Vec<GroupMember>> = Default::default();
    for (job, _) in &jobs {
        if let Some(g) = &job.policy.group {
            members.entry(g.0.clone()).or_default().push(GroupMember {
                fileset: job.policy.fileset.0.clone(),
                path: job.policy.origin.path.clone(),
                origin: job.origin.clone(),
                replicas: job.replicas.iter().map(|r| r.node().to_string()).collect(),
            });
        }
    }
    let hubs: BTreeMap<String, _> = members
        .into_iter()
        .map(|(name, members)| {
            let backend = loaded.policies.iter().find(|p| p.group.as_ref().is_some_and(|g| g.0 == name)).map(|p| p.backend).expect("a member");
            (name.clone(), GroupHub::new(&name, backend, members))
        })
        .collect();
    let mut syncs = BTreeMap::new();
    for (job, sync) in jobs {
        let job = match job.policy.group.as_ref().and_then(|g| hubs.get(&g.0)) {
            Some(hub) => job.in_group(hub.clone()),
            None => job,
        };
        syncs.insert(job.policy.fileset.0.clone(), sync);
        origins.spawn(job.run(shutdown.clone()));
    }
    syncs
}
