//! The node: wiring the roles together for `snapship run` and the one-shot commands.
//!
//! `run` loads the node config (broken policies are reported and skipped), runs the origin
//! job of every file set whose origin is this node, serves the replica role for every file
//! set this node holds a replica of (over QUIC for other origins, over the in-process link
//! for its own), and stops cleanly on SIGINT or SIGTERM. A lock file in `state_dir` keeps a
//! second daemon (and `snapship prune` without `--dry-run`) away. [`endpoints`] is how this
//! node reaches a file set's replicas, for `run` and `sync` alike; [`control`] is the Unix
//! socket that `status` and `sync` talk to. [`preflight`] checks what the config points at
//! (TLS files, paths) for `run` and `snapship check`.

pub mod control;
pub mod preflight;
mod scheduled_verify;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::units::Compression;
use crate::config::{self, LoadedConfig, Policy, Transfer};
use crate::observe::status::BrokenPolicy;
use crate::observe::status::StatusBoard;
use crate::origin::job::{GroupHub, GroupMember, OriginJob, SyncHandle};
use crate::origin::state::StateStore;
use crate::replica::ReplicaService;
use crate::schedule::admission::Admission;
use crate::schedule::clock::Clock;
use crate::ship::client::{EpochSource, PeerReplica};
use crate::ship::local::LocalLink;
use crate::ship::quic::{self, Connector, QuicDialer};
use crate::ship::tls::LiveTls;
use crate::ship::{Dialer, ReplicaEndpoint};
use crate::snapshot;
use crate::store::EpochStore;

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

/// How this node, the origin of `policy` now, reaches the other members: the in-process
/// link for a replica on this node, QUIC for the others (through `connector`, made on first
/// need). After a promotion the other members are the replicas, the initial origin among
/// them; every request carries this node's epoch from `epochs`.
pub fn endpoints(
    config: &LoadedConfig,
    policy: &Policy,
    connector: &mut Option<Arc<Connector>>,
    local: &LocalLink,
    epochs: &Arc<EpochStore>,
) -> Result<Vec<Arc<dyn ReplicaEndpoint>>> {
    let here = &config.node.node.0;
    let stall = config.node.transfers.stall_timeout.0;
    let initial_origin = policy.origin.node.0 == *here;
    let mut targets: Vec<(&str, bool)> = Vec::new(); // (node, on this node)
    for r in &policy.replicas {
        match (r.node.0 == *here, initial_origin) {
            (true, true) => targets.push((&r.node.0, true)),
            (true, false) => {} // this node, promoted: it is the origin now
            (false, _) => targets.push((&r.node.0, false)),
        }
    }
    if !initial_origin {
        targets.push((&policy.origin.node.0, false));
    }
    let (fileset, epoch_policy, store) = (policy.fileset.0.clone(), policy.clone(), epochs.clone());
    let epoch: EpochSource = Arc::new(move || store.current(&epoch_policy));
    let mut out: Vec<Arc<dyn ReplicaEndpoint>> = Vec::new();
    for (node, local_replica) in targets {
        let (dialer, transfer): (Arc<dyn Dialer>, _) = if local_replica {
            // Through this process: compressing would only cost CPU.
            let transfer = Transfer { compression: Compression::None, ..policy.transfer.clone() };
            (Arc::new(local.clone()), transfer)
        } else {
            let name = config::units::Name(node.to_string());
            let addr = config.node.peers.get(&name).ok_or_else(|| anyhow!("member `{node}` of `{fileset}` is not in peers"))?;
            let connector = match connector {
                Some(c) => c.clone(),
                None => connector.insert(Arc::new(Connector::new(&config.node)?)).clone(),
            };
            let quic: Arc<dyn Dialer> = Arc::new(QuicDialer::new(node.to_string(), addr.clone(), connector));
            // `encryption: off` for this peer: transfers ask for the LAN path.
            let dialer: Arc<dyn Dialer> =
                if config.node.lan_peers.contains(&name) { Arc::new(crate::ship::lan::LanDialer::new(addr.clone(), quic)) } else { quic };
            (dialer, policy.transfer.clone())
        };
        out.push(Arc::new(PeerReplica::new(node.to_string(), fileset.clone(), transfer, stall, dialer, epoch.clone())));
    }
    // Object-storage replicas are fed by whichever node is the origin now.
    for store in crate::objstore::ObjectReplica::all_of(policy) {
        out.push(Arc::new(store));
    }
    Ok(out)
}

/// Of `endpoints`, those that `origin` feeds: a replica with `from:` is fed by its relay.
fn fed_from(policy: &Policy, origin: &str, mut endpoints: Vec<Arc<dyn ReplicaEndpoint>>) -> Vec<Arc<dyn ReplicaEndpoint>> {
    endpoints.retain(|e| policy.feeder(e.node(), origin) == Some(origin));
    endpoints
}

/// The replica role of this node, serving the in-process link (and, when started with
/// [`ReplicaRole::listen`], QUIC) until `shutdown`.
pub struct ReplicaRole {
    pub service: Arc<ReplicaService>,
    pub link: LocalLink,
    pub epochs: Arc<EpochStore>,
    /// The peers the QUIC side admits (the node config's `peers`), replaced on reload.
    peers: Arc<tokio::sync::watch::Sender<Vec<String>>>,
    tasks: TaskTracker,
}

impl ReplicaRole {
    pub fn start(config: Arc<LoadedConfig>, epochs: Arc<EpochStore>, status: Arc<StatusBoard>, shutdown: &CancellationToken) -> ReplicaRole {
        let service = ReplicaService::new(config.clone(), epochs.clone(), status, crate::replica::service::real_backends());
        let (link, streams) = LocalLink::pair(&config.node.node.0);
        let tasks = TaskTracker::new();
        tasks.spawn(service.sessions().clone().watch(shutdown.clone()));
        tasks.spawn(crate::ship::local::serve(streams, service.clone(), shutdown.clone()));
        let peers = Arc::new(tokio::sync::watch::Sender::new(peer_names(&config)));
        ReplicaRole { service, link, epochs, peers, tasks }
    }

    /// Also serves other nodes over QUIC on `addr`, with the TLS of `tls`.
    pub fn listen(&self, config: &LoadedConfig, tls: Option<&LiveTls>, addr: std::net::SocketAddr, shutdown: &CancellationToken) -> Result<()> {
        let (Some(tls), Some(files)) = (tls, config.node.tls.as_ref()) else {
            bail!("{} has no `tls:` section; a replica needs one", config.node.file.display());
        };
        let server = quic::bind(tls, files, addr, config.node.transfers.stall_timeout.0)?;
        tracing::info!(node = %config.node.node, %addr, "listening for origins");
        self.tasks.spawn(quic::serve(server, self.peers.subscribe(), self.service.clone(), shutdown.clone()));
        if !config.node.lan_peers.is_empty() {
            // The LAN path's TCP listener, at the same address and port, for the peers marked
            // `encryption: off`.
            let listener = crate::ship::lan::bind(addr)?;
            let tickets = crate::ship::lan::LanTickets::new();
            self.service.accept_lan(tickets.clone());
            tracing::info!(node = %config.node.node, %addr, "listening for the LAN path (TCP)");
            self.tasks.spawn(crate::ship::lan::serve(listener, tickets, shutdown.clone()));
        }
        Ok(())
    }

    /// Answers by `config` from now on (the daemon reloaded): requests, and which peers may
    /// connect. Sessions and connections under way keep going.
    pub fn replace_config(&self, config: Arc<LoadedConfig>) {
        self.peers.send_replace(peer_names(&config));
        self.service.replace_config(config);
    }

    /// After `shutdown` was cancelled: ends the sessions and waits for every task. Takes
    /// `&self`: the daemon's runtime (which the service holds for handovers) shares the role.
    pub async fn stop(&self) {
        self.service.shutdown().await;
        self.tasks.close();
        self.tasks.wait().await;
    }
}

fn peer_names(config: &LoadedConfig) -> Vec<String> {
    config.node.peers.keys().map(|k| k.0.clone()).collect()
}

/// The config at `path` as `run` uses it, at start-up and on reload: the node config and its
/// TLS files must be usable (else an error: `run` refuses to start, a reload keeps the old
/// config); a broken policy, or one whose places on this node are wrong, is left out and
/// listed.
async fn prepare(path: &Path) -> Result<(LoadedConfig, Vec<BrokenPolicy>)> {
    let mut loaded = config::load(path)?;
    let mut broken = Vec::new();
    for e in &loaded.errors {
        if e.file == loaded.node.file {
            tracing::error!("{e}");
        } else {
            tracing::error!("skipping a broken policy: {e}");
            broken.push(BrokenPolicy { file: e.file.display().to_string(), error: e.to_string() });
        }
    }
    // Without working TLS no peer would accept this node: refuse rather than run idle.
    let tls = preflight::tls(&loaded.node);
    for w in &tls.warnings {
        tracing::warn!("{w}");
    }
    if !tls.errors.is_empty() {
        let reasons: Vec<String> = tls.errors.iter().map(|e| e.to_string()).collect();
        bail!("the TLS files are unusable (`snapship check` shows the same):\n  {}", reasons.join("\n  "));
    }
    // A file set whose places on this node are wrong is skipped, like a broken policy.
    let mut usable = Vec::new();
    for policy in std::mem::take(&mut loaded.policies) {
        let found = preflight::places(&policy, &loaded.node).await;
        for w in &found.warnings {
            tracing::warn!(fileset = %policy.fileset, "{w}");
        }
        for e in &found.errors {
            tracing::error!(fileset = %policy.fileset, "skipping the file set: {e}");
            broken.push(BrokenPolicy { file: policy.file.display().to_string(), error: format!("file set `{}`: {e}", policy.fileset) });
        }
        if found.errors.is_empty() {
            usable.push(policy);
        }
    }
    loaded.policies = usable;
    Ok((loaded, broken))
}

pub async fn run(config_path: &Path) -> Result<()> {
    let (loaded, broken) = prepare(config_path).await.context("cannot start")?;
    let tls = loaded.node.tls.as_ref().map(LiveTls::load).transpose().context("cannot start")?;
    let loaded = Arc::new(loaded);
    let here = &loaded.node.node;
    let _lock = lock_state_dir(&loaded.node.state_dir)?;
    let epochs = Arc::new(EpochStore::open(&loaded.node.state_dir));
    let (mut origin_of, mut replica_of) = (Vec::new(), Vec::new());
    for p in loaded.policies.iter().filter(|p| p.is_member(&here.0)) {
        match epochs.current(p) {
            Ok(e) if e.origin == here.0 => origin_of.push(p.fileset.0.as_str()),
            Ok(_) => replica_of.push(p.fileset.0.as_str()),
            Err(e) => tracing::error!(fileset = %p.fileset, "skipping: {e:#}"),
        }
    }
    tracing::info!(node = %here, origin_of = ?origin_of, replica_of = ?replica_of, "starting");

    let shutdown = CancellationToken::new();
    let status = StatusBoard::new(&here.0);
    let background = TaskTracker::new();
    observe(&loaded, &status, &background, &shutdown)?;
    status.config_loaded(broken);

    // The replica role first: this node's own origin jobs may ship to it. It listens on QUIC
    // wherever `listen:` is set: after a promotion elsewhere, any member is a replica.
    let replica = ReplicaRole::start(loaded.clone(), epochs.clone(), status.clone(), &shutdown);
    match loaded.node.listen {
        Some(addr) => replica.listen(&loaded, tls.as_ref(), addr, &shutdown)?,
        None if !replica_of.is_empty() => {
            bail!(
                "node `{here}` is a replica of {} but {} has no `listen:` address; add one, like `listen: 0.0.0.0:7441`",
                replica_of.join(", "),
                loaded.node.file.display()
            )
        }
        None => {}
    }
    report_replicas(&loaded, &epochs, &status).await;

    let replica = Arc::new(replica);
    let node = Arc::new(Runtime {
        config: std::sync::RwLock::new(loaded.clone()),
        config_path: config_path.to_path_buf(),
        tls,
        replica: replica.clone(),
        epochs: epochs.clone(),
        status: status.clone(),
        link: replica.link.clone(),
        origins: TaskTracker::new(),
        shutdown: shutdown.clone(),
        syncs: Mutex::default(),
        connector: Mutex::default(),
        handing_over: Mutex::default(),
        duties: Mutex::default(),
        relays: Mutex::default(),
        admission: Arc::default(),
        reloading: tokio::sync::Mutex::new(()),
        verifying: tokio::sync::Mutex::new(()),
    });
    replica.service.accept_handovers(Arc::new(node.clone()));
    replica.service.accept_fetches(Arc::new(node.clone()));
    node.start_origins(&origin_of);
    let relayed: Vec<String> = Runtime::relayed(&loaded).into_keys().collect();
    node.start_relays(&relayed.iter().map(String::as_str).collect::<Vec<_>>());
    {
        let control = Arc::new(control::Control { status: status.clone(), node: node.clone() });
        let (shutdown, dir) = (shutdown.clone(), loaded.node.state_dir.clone());
        // Bound here, before "running" is logged: a `sync` run right after start finds it.
        match control::listen(&dir) {
            Ok(listener) => {
                background.spawn(async move {
                    if let Err(e) = control::serve(&dir, listener, control, shutdown).await {
                        tracing::error!("control socket: {e:#}");
                    }
                });
            }
            Err(e) => tracing::error!("control socket: {e:#}"),
        }
    }
    // The gauges go nowhere without an exporter (`metrics:` unset): then nothing refreshes
    // them, which on a node with thousands of file sets is most of its idle work.
    if loaded.node.metrics.is_some() {
        let (node, shutdown) = (node.clone(), shutdown.clone());
        background.spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(15));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => node.export_epochs(),
                }
            }
        });
    }
    background.close();
    tracing::info!(node = %here, "running");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // SIGHUP (`systemctl reload`) rereads the config in a task of its own, so that a reload
    // waiting for transfers in flight never delays a SIGTERM.
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping");
                break;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping");
                break;
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: rereading {}", config_path.display());
                let node = node.clone();
                node.origins.clone().spawn(async move { node.reload().await });
            }
        }
    }
    shutdown.cancel();
    node.origins.close();
    node.origins.wait().await;
    background.wait().await;
    // Give the QUIC endpoints a moment to send the connection closes queued above.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    drop(node);
    replica.stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// Fails, naming the key, when `new` changes what a running daemon cannot apply in place.
fn needs_restart(old: &config::NodeConfig, new: &config::NodeConfig) -> Result<()> {
    let differs = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let keys: [(&str, bool); 6] = [
        ("node", old.node != new.node),
        ("listen", old.listen != new.listen),
        ("state_dir", old.state_dir != new.state_dir),
        ("metrics", old.metrics != new.metrics),
        ("transfers", differs(&old.transfers, &new.transfers)),
        ("tls", old.tls.is_some() != new.tls.is_some()),
    ];
    if let Some((key, _)) = keys.iter().find(|(_, changed)| *changed) {
        bail!("`{key}` changed in {}: that takes a restart (`systemctl restart snapship`); nothing was reloaded", new.file.display());
    }
    Ok(())
}

/// Whether the origin job of `fileset` must start anew under `new`: its policy changed, or
/// the address of one of its members did.
fn changed(old: &LoadedConfig, new: &LoadedConfig, fileset: &str) -> bool {
    let (Some(a), Some(b)) = (old.policy(fileset), new.policy(fileset)) else { return true };
    // The parsed values, compared whole: any key of the policy counts.
    format!("{a:?}") != format!("{b:?}")
        || b.members().iter().any(|m| old.node.peers.get(&config::units::Name(m.to_string())) != new.node.peers.get(&config::units::Name(m.to_string())))
}

/// What the running daemon needs to start origin duty, at start-up, after a promotion and
/// after a reload.
pub struct Runtime {
    /// The config in use; replaced by [`Runtime::reload`].
    config: std::sync::RwLock<Arc<LoadedConfig>>,
    config_path: std::path::PathBuf,
    /// This node's TLS, replaced in place by a reload.
    tls: Option<LiveTls>,
    replica: Arc<ReplicaRole>,
    pub epochs: Arc<EpochStore>,
    status: Arc<StatusBoard>,
    link: LocalLink,
    origins: TaskTracker,
    shutdown: CancellationToken,
    /// Where each origin job takes `sync` requests.
    pub syncs: Mutex<BTreeMap<String, SyncHandle>>,
    connector: Mutex<Option<Arc<Connector>>>,
    /// File sets being handed over in a planned switchover: stepping down keeps no diverged
    /// data (writes were frozen before the final snapshot).
    handing_over: Mutex<std::collections::BTreeSet<String>>,
    /// The origin duty running per file set, to drain when a reload changes it.
    duties: Mutex<BTreeMap<String, Duty>>,
    /// The relay running per file set (cascades), to restart when a reload changes it.
    relays: Mutex<BTreeMap<String, Duty>>,
    /// Slots for the origin jobs' transfers, per replica node (`schedule::admission`).
    admission: Arc<Admission>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// One verify at a time (scheduled or asked for): they share the kept hashes, and the
    /// disks.
    verifying: tokio::sync::Mutex<()>,
}

/// How long a switchover waits, after the final snapshot's first attempt to reach the new
/// origin failed, for a retry: not at all. Writes are frozen meanwhile, so a failure calls the
/// switchover off at once (writes thawed, the error says what failed).
const FINAL_SYNC_WAIT: std::time::Duration = std::time::Duration::ZERO;

static NEXT_DUTY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One origin job running in the daemon.
struct Duty {
    /// Tells this duty apart from a later one of the same file set.
    id: u64,
    /// Cancelled by a reload: the job ends once its transfers under way have finished.
    drain: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Runtime {
    /// The config in use now.
    pub fn config(&self) -> Arc<LoadedConfig> {
        self.config.read().expect("config lock").clone()
    }
    /// `snapship verify` through the control socket, and the `verify:` schedule: counted in
    /// this daemon's metrics and log, each replica's outcome on the status board.
    pub async fn verify(&self, fileset: &str, only: Option<&str>, snapshot: Option<&str>, full: bool) -> Result<Vec<crate::origin::verify::Outcome>> {
        let config = self.config();
        let policy = config.policy(fileset).ok_or_else(|| anyhow!("the running daemon has no file set `{fileset}`"))?;
        let _one = self.verifying.lock().await;
        let outcomes = verify_replicas(&config, policy, &self.link, &self.epochs, only, snapshot, full).await?;
        for o in &outcomes {
            let result = match &o.result {
                Ok(s) => Ok((s.snapshot.as_str(), s.differences.as_slice())),
                Err(e) => Err(e.as_str()),
            };
            self.status.verified(fileset, &o.replica, result);
        }
        Ok(outcomes)
    }

    /// How this node, the origin of `policy` now, reaches the other members (one QUIC client
    /// for the daemon).
    fn endpoints(&self, policy: &Policy) -> Result<Vec<Arc<dyn ReplicaEndpoint>>> {
        let config = self.config();
        let mut connector = self.connector.lock().expect("connector lock");
        if let (None, Some(live), Some(files)) = (connector.as_ref(), &self.tls, &config.node.tls) {
            // Handshakes through the daemon's TLS, which a reload replaces.
            *connector = Some(Arc::new(Connector::with_tls(&config.node, files, live.clone())));
        }
        endpoints(&config, policy, &mut connector, &self.link, &self.epochs)
    }

    /// Makes the origin job of `policy` on this node.
    fn job(&self, policy: &Policy) -> Result<(OriginJob, SyncHandle)> {
        let config = self.config();
        let here = &config.node.node.0;
        let origin = snapshot::origin_on(policy, here)?.into();
        let replicas = fed_from(policy, here, self.endpoints(policy)?);
        let state = StateStore::open(&config.node.state_dir, &policy.fileset.0)?.into();
        let (job, handle) = OriginJob::new(policy.clone(), origin, replicas, state, Clock::System, self.status.clone());
        Ok((job.with_stall_timeout(config.node.transfers.stall_timeout.0).with_epochs(self.epochs.clone()).with_admission(self.admission.clone()), handle))
    }

    /// Starts the origin jobs of `filesets` (consistency groups sharing a hub).
    fn start_origins(self: &Arc<Self>, filesets: &[&str]) {
        let config = self.config();
        let mut jobs = Vec::new();
        for policy in filesets.iter().filter_map(|f| config.policy(f)) {
            match self.job(policy) {
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
                let backend = config.policies.iter().find(|p| p.group.as_ref().is_some_and(|g| g.0 == name)).map(|p| p.backend).expect("a member");
                (name.clone(), GroupHub::new(&name, backend, members))
            })
            .collect();
        for (job, sync) in jobs {
            let job = match job.policy.group.as_ref().and_then(|g| hubs.get(&g.0)) {
                Some(hub) => job.in_group(hub.clone()),
                None => job,
            };
            let fileset = job.policy.fileset.0.clone();
            self.syncs.lock().expect("syncs lock").insert(fileset.clone(), sync);
            let (id, drain) = (NEXT_DUTY.fetch_add(1, std::sync::atomic::Ordering::Relaxed), CancellationToken::new());
            let job = job.with_drain(drain.clone());
            let me = self.clone();
            // Registered under the lock the duty takes to deregister, so it cannot end first.
            let mut duties = self.duties.lock().expect("duties lock");
            let done = self.origins.spawn(async move { me.origin_duty(job, id).await });
            duties.insert(fileset, Duty { id, drain, done });
        }
    }

    /// The file sets whose replicas (nodes or object stores) name this node in `from:`
    /// (cascades), and whom it feeds.
    fn relayed(config: &LoadedConfig) -> BTreeMap<String, Vec<String>> {
        let here = &config.node.node.0;
        config
            .policies
            .iter()
            .filter(|p| p.is_member(here))
            .map(|p| (p.fileset.0.clone(), crate::replica::relay::relayed_to(p, here).into_iter().map(str::to_string).collect::<Vec<_>>()))
            .filter(|(_, feeds)| !feeds.is_empty())
            .collect()
    }

    /// Starts the relay of each of `filesets` whose replicas name this node in `from:`
    /// (cascades, `replica::relay`): it feeds them what this node received, whenever the
    /// epoch names another node as origin.
    fn start_relays(&self, filesets: &[&str]) {
        let config = self.config();
        let here = &config.node.node.0;
        let service = &self.replica.service;
        for (fileset, feeds) in Self::relayed(&config).into_iter().filter(|(f, _)| filesets.contains(&f.as_str())) {
            let policy = config.policy(&fileset).expect("a relayed file set has a policy");
            let started = (|| {
                let side: Arc<dyn snapshot::OriginSide> = snapshot::relay_on(policy, here)?.into();
                let mut downstreams = self.endpoints(policy)?;
                downstreams.retain(|d| feeds.iter().any(|f| f == d.node()));
                Ok::<_, anyhow::Error>(crate::replica::relay::RelayJob::new(
                    policy.clone(),
                    here,
                    side,
                    downstreams,
                    self.epochs.clone(),
                    service.relay_guard().clone(),
                    self.status.clone(),
                    service.subscribe_received(),
                    config.node.transfers.stall_timeout.0,
                ))
            })();
            match started {
                Ok(job) => {
                    tracing::info!(fileset = %policy.fileset, downstreams = ?feeds, "relaying");
                    let stop = self.shutdown.child_token();
                    let done = self.origins.spawn(job.run(stop.clone()));
                    self.relays.lock().expect("relays lock").insert(fileset, Duty { id: 0, drain: stop, done });
                }
                Err(e) => tracing::error!(fileset = %policy.fileset, "cannot relay: {e:#}"),
            }
        }
    }

    /// After a reload: stops the relays whose file set, policy or downstream addresses
    /// changed (a transfer under way is cut, and resumes when the relay starts again: relays
    /// send from read-only snapshots, so the stream regenerates the same), and starts the
    /// relays the new config asks for. Returns (started, restarted, stopped).
    async fn reload_relays(&self, old: &LoadedConfig, new: &LoadedConfig) -> (Vec<String>, Vec<String>, Vec<String>) {
        let (was, wanted) = (Self::relayed(old), Self::relayed(new));
        let running: Vec<String> = self.relays.lock().expect("relays lock").keys().cloned().collect();
        let stop: Vec<String> = running.iter().filter(|f| wanted.get(*f) != was.get(*f) || changed(old, new, f)).cloned().collect();
        let mut stopping = Vec::new();
        for f in &stop {
            if let Some(relay) = self.relays.lock().expect("relays lock").remove(f) {
                relay.drain.cancel();
                stopping.push(relay.done);
            }
        }
        for done in stopping {
            let _ = done.await;
        }
        let start: Vec<String> = wanted.keys().filter(|f| !running.contains(*f) || stop.contains(*f)).cloned().collect();
        let names: Vec<&str> = start.iter().map(String::as_str).collect();
        self.start_relays(&names);
        let restarted: Vec<String> = stop.iter().filter(|f| wanted.contains_key(*f)).cloned().collect();
        let stopped: Vec<String> = stop.iter().filter(|f| !wanted.contains_key(*f)).cloned().collect();
        let started: Vec<String> = start.into_iter().filter(|f| !running.contains(f)).collect();
        (started, restarted, stopped)
    }

    /// Runs `job` until shutdown, or until a newer epoch names another origin: then this node
    /// steps down (its live file set frozen, what it wrote kept as diverged data) and serves
    /// the file set as a replica (the replica service goes by the epochs).
    async fn origin_duty(self: Arc<Self>, job: OriginJob, id: u64) {
        let config = self.config();
        let policy = job.policy.clone();
        let origin = job.origin.clone();
        let here = config.node.node.0.clone();
        let stop = self.shutdown.child_token();
        let mut changes = self.epochs.subscribe();
        let moved_on = async {
            while changes.changed().await.is_ok() {
                if self.epochs.current(&policy).is_ok_and(|e| e.origin != here) {
                    return;
                }
            }
            std::future::pending().await
        };
        // The `verify:` schedule runs beside the job, and ends with it.
        let verify_stop = stop.child_token();
        let scheduled = self.origins.spawn(self.clone().verify_on_schedule(policy.clone(), verify_stop.clone()));
        let duty = job.run(stop.clone());
        tokio::pin!(duty);
        tokio::select! {
            () = &mut duty => {}
            () = moved_on => {
                stop.cancel();
                duty.await;
            }
        }
        verify_stop.cancel();
        let _ = scheduled.await;
        let drained = {
            let mut duties = self.duties.lock().expect("duties lock");
            match duties.get(&policy.fileset.0) {
                Some(d) if d.id == id => {
                    duties.remove(&policy.fileset.0);
                    false
                }
                // A reload took it out of the map to drain it, and starts its successor.
                _ => true,
            }
        };
        if !drained {
            self.syncs.lock().expect("syncs lock").remove(&policy.fileset.0);
        }
        if self.shutdown.is_cancelled() || drained {
            return;
        }
        let epoch = self.epochs.current(&policy).map(|e| e.to_string()).unwrap_or_default();
        if self.handing_over.lock().expect("handover lock").remove(&policy.fileset.0) {
            tracing::info!(fileset = %policy.fileset, "handed over ({epoch}): this node is a replica now");
            return;
        }
        tracing::warn!(fileset = %policy.fileset, "this node is no longer the origin ({epoch}): stepping down");
        if let Err(e) = crate::origin::failover::step_down(&policy, origin.as_ref(), &self.epochs).await {
            tracing::error!(fileset = %policy.fileset, "stepping down: {e:#}");
        }
    }

    /// SIGHUP: rereads the node config, the policies and the TLS files. A new config whose
    /// node file or TLS files are unusable, or that changes what only a restart can apply, is
    /// refused (the daemon keeps running as it was, and says why in its log and `status`).
    /// Otherwise it is used from now on: new connections use the new certificates, the
    /// replica side answers by the new policies, and each origin job whose policy changed
    /// (or whose members' addresses did) is drained and started anew: its transfers under
    /// way finish first. Jobs of unchanged file sets are left alone.
    pub async fn reload(self: Arc<Self>) {
        let _one = self.reloading.lock().await;
        match self.apply_new_config().await {
            Ok(summary) => {
                tracing::info!("reloaded: {summary}");
                self.status.reloaded(true, &summary);
            }
            Err(e) => {
                let message = format!("the new config was refused, the daemon runs with the one it had: {e:#}");
                tracing::error!("{message}");
                self.status.reloaded(false, &message);
            }
        }
    }

    async fn apply_new_config(self: &Arc<Self>) -> Result<String> {
        let old = self.config();
        let (new, broken) = prepare(&self.config_path).await?;
        needs_restart(&old.node, &new.node)?;
        if let (Some(live), Some(files)) = (&self.tls, &new.node.tls) {
            live.replace(files)?;
        }
        let new = Arc::new(new);
        let here = new.node.node.0.clone();
        let origin_here = |c: &LoadedConfig| -> std::collections::BTreeSet<String> {
            c.policies.iter().filter(|p| p.is_member(&here) && self.epochs.current(p).is_ok_and(|e| e.origin == here)).map(|p| p.fileset.0.clone()).collect()
        };
        let wanted = origin_here(&new);
        let running: std::collections::BTreeSet<String> = self.duties.lock().expect("duties lock").keys().cloned().collect();
        let mut restart: std::collections::BTreeSet<String> = running.iter().filter(|f| !wanted.contains(*f) || changed(&old, &new, f)).cloned().collect();
        // A consistency group's members share one hub: restart the group as a whole.
        let groups: std::collections::BTreeSet<String> =
            restart.iter().flat_map(|f| [old.policy(f), new.policy(f)]).flatten().filter_map(|p| p.group.as_ref().map(|g| g.0.clone())).collect();
        for c in [&old, &new] {
            for p in c.policies.iter().filter(|p| p.group.as_ref().is_some_and(|g| groups.contains(&g.0))) {
                if running.contains(&p.fileset.0) {
                    restart.insert(p.fileset.0.clone());
                }
            }
        }
        let start: Vec<String> = wanted.iter().filter(|f| !running.contains(*f) || restart.contains(*f)).cloned().collect();
        let removed: Vec<&String> = restart.iter().filter(|f| !wanted.contains(*f)).collect();

        *self.config.write().expect("config lock") = new.clone();
        self.replica.replace_config(new.clone());
        self.status.config_loaded(broken.clone());
        report_replicas(&new, &self.epochs, &self.status).await;
        let mut draining = Vec::new();
        for f in &restart {
            let Some(duty) = self.duties.lock().expect("duties lock").remove(f) else { continue };
            self.syncs.lock().expect("syncs lock").remove(f);
            duty.drain.cancel();
            draining.push(duty.done);
        }
        if !draining.is_empty() {
            tracing::info!(filesets = ?restart, "reload: waiting for the transfers under way of the changed file sets to finish");
        }
        for done in draining {
            let _ = done.await;
        }
        for f in &removed {
            self.status.forget_origin(f);
        }
        if self.shutdown.is_cancelled() {
            bail!("stopping");
        }
        let names: Vec<&str> = start.iter().map(String::as_str).collect();
        self.start_origins(&names);
        let (relays_started, relays_restarted, relays_stopped) = self.reload_relays(&old, &new).await;
        let list = |v: &[&String]| if v.is_empty() { "none".to_string() } else { v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ") };
        let restarted: Vec<&String> = restart.iter().filter(|f| wanted.contains(*f)).collect();
        let added: Vec<&String> = start.iter().filter(|f| !running.contains(*f)).collect();
        Ok(format!(
            "{} policies in use, {} broken; origin jobs started: {}, restarted: {}, stopped: {}{}",
            new.policies.len(),
            broken.len(),
            list(&added),
            list(&restarted),
            list(&removed),
            if relays_started.is_empty() && relays_restarted.is_empty() && relays_stopped.is_empty() {
                String::new()
            } else {
                let list = |v: &Vec<String>| if v.is_empty() { "none".to_string() } else { v.join(", ") };
                format!("; relays started: {}, restarted: {}, stopped: {}", list(&relays_started), list(&relays_restarted), list(&relays_stopped))
            }
        ))
    }

    /// The epoch gauges of every file set this node is a member of, refreshed every 15 s (a
    /// promotion elsewhere is learned from a request, not announced; each refresh reads one
    /// small file per file set).
    fn export_epochs(&self) {
        use crate::observe::metrics as names;
        let config = self.config();
        let here = &config.node.node.0;
        for policy in config.policies.iter().filter(|p| p.is_member(here)) {
            if let Ok(r) = self.epochs.record(policy) {
                let fileset = policy.fileset.0.clone();
                metrics::gauge!(names::EPOCH, "fileset" => fileset.clone()).set(r.epoch.number as f64);
                metrics::gauge!(names::IS_ORIGIN, "fileset" => fileset.clone()).set(if r.epoch.origin == *here { 1.0 } else { 0.0 });
                metrics::gauge!(names::DIVERGED, "fileset" => fileset).set(r.diverged.len() as f64);
            }
        }
    }

    /// `report` with the epoch of every file set this node is a member of.
    pub fn report(&self, mut report: crate::observe::status::StatusReport) -> crate::observe::status::StatusReport {
        let config = self.config();
        let here = &config.node.node.0;
        for policy in config.policies.iter().filter(|p| p.is_member(here)) {
            if let Ok(r) = self.epochs.record(policy) {
                report.epochs.push(crate::observe::status::EpochStatus {
                    fileset: policy.fileset.0.clone(),
                    epoch: r.epoch.number,
                    origin: r.epoch.origin,
                    promoted_at: r.promoted_at,
                    promoted_from: r.promoted_from,
                    diverged: r.diverged,
                });
            }
        }
        report
    }

    /// `snapship promote` in the running daemon: this node becomes the origin of `fileset` in
    /// a new epoch, and starts origin duty.
    pub async fn promote(self: &Arc<Self>, fileset: &str, force: bool) -> Result<String> {
        let config = self.config();
        let policy = config.policy(fileset).ok_or_else(|| anyhow!("no file set `{fileset}` in this node's policies"))?;
        let here = &config.node.node.0;
        // Before anything is asked or fetched (`failover::promote` checks it again).
        crate::origin::failover::may_be_origin(policy, here)?;
        let known = crate::origin::failover::other_origin(policy, here, &self.epochs)?;
        // The old origin, once it did not answer: not asked again what it holds (that would
        // cost the promotion another answer timeout).
        let mut silent = None;
        if !force {
            if let Some(ep) = self.endpoints(policy)?.iter().find(|e| e.node() == known.origin) {
                if crate::origin::failover::answers(ep.as_ref()).await {
                    bail!(
                        "the origin `{}` still answers: a planned change is `snapship switchover --to {here}` run there; \
                         to promote anyway (the old origin will be fenced off), add --force",
                        known.origin
                    );
                }
                silent = Some(known.origin.clone());
            }
        }
        // No write that reached a survivor is lost: the newest snapshot any reachable member
        // holds beyond this node's comes here first.
        let before = self.fetch_newest(policy, &known, silent.as_deref()).await?;
        let report = crate::origin::failover::promote(policy, here, &self.epochs, before.past).await?;
        self.start_origins(&[fileset]);
        let doubted: String = before.doubted.iter().map(|d| format!("{d}; ")).collect();
        Ok(format!("{doubted}{}{report}", before.fetched.unwrap_or_default()))
    }

    /// Before a promotion: asks every other member what it holds and, when one holds a
    /// snapshot newer than this node's newest, fetches it (what to say about it). A member
    /// that knows an epoch newer than `known` stops the promotion; one that does not answer
    /// is passed over (and named in the log), and `silent` (the old origin, which did not
    /// answer just now) is not asked.
    async fn fetch_newest(&self, policy: &Policy, known: &crate::store::Epoch, silent: Option<&str>) -> Result<BeforePromoting> {
        use crate::replica::fetch;
        let config = self.config();
        let (here, fileset) = (&config.node.node.0, &policy.fileset);
        let members: Vec<_> = self.endpoints(policy)?.into_iter().filter(|e| policy.is_member(e.node()) && Some(e.node()) != silent).collect();
        let mut heard = Vec::new();
        for (node, answer) in fetch::ask_members(&members).await {
            match answer {
                Ok(h) => heard.push((node, h)),
                Err(e) => tracing::warn!(%fileset, member = %node, "not asked what it holds before promoting: {e:#}"),
            }
        }
        let (promoted, doubted) = fetch::promoted_elsewhere(policy, known, &heard);
        if let Some((node, epoch)) = promoted {
            bail!(
                "`{node}` knows a newer epoch of `{fileset}`, {epoch} (this node knows {known}): another member was promoted already; nothing was promoted here"
            );
        }
        for why in &doubted {
            tracing::warn!(%fileset, "ignoring a newer epoch a member claims: {why}");
        }
        let past = fetch::promote_past(policy, known, &heard);
        let mut before = BeforePromoting { fetched: None, past, doubted };
        let held = snapshot::replica_on(policy, here)?.list().await?;
        let Some((newest, holders)) = fetch::newest_elsewhere(&held, &heard, chrono::Utc::now()) else { return Ok(before) };
        let ours = held.iter().map(|s| s.name.to_string()).max().unwrap_or_else(|| "none".to_string());
        let named = holders.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        // From the first holder that ships it; a holder that fails (or is hostile) is passed
        // over for the next one.
        let mut failures = Vec::new();
        for node in &holders {
            let ep = members.iter().find(|e| e.node() == *node).expect("an asked member");
            tracing::warn!(%fileset, member = node, snapshot = %newest.name, newest_here = %ours, "a member holds a newer snapshot: fetching it before promoting");
            match fetch::fetch(self.replica.service.grants(), policy, ep.as_ref(), newest).await {
                Ok(got) => {
                    before.fetched = Some(format!("fetched {} from `{node}` first ({}); ", got.snapshot, shipped(&got)));
                    return Ok(before);
                }
                Err(e) => {
                    tracing::error!(%fileset, member = node, snapshot = %newest.name, "fetching before promoting failed: {e:#}");
                    failures.push(format!("from `{node}`: {e:#}"));
                }
            }
        }
        bail!(
            "{named} holds {}, newer than this node's newest ({ours}), but fetching it failed ({}); nothing was promoted: retry, or promote `{}` instead",
            newest.name,
            failures.join("; "),
            holders[0]
        )
    }

    /// `restore --from NODE`: fetches `wanted` of `fileset` from `from`, another member,
    /// unless this node holds it already; the snapshot's name here and what was done.
    pub async fn fetch(&self, fileset: &str, from: &str, wanted: &crate::replica::fetch::Wanted) -> Result<(String, String)> {
        use crate::replica::fetch;
        let config = self.config();
        let policy = config.policy(fileset).ok_or_else(|| anyhow!("no file set `{fileset}` in this node's policies"))?;
        let here = &config.node.node.0;
        if from == here || !policy.is_member(from) || !policy.is_member(here) {
            bail!("`{from}` is not another member of `{fileset}` with this node (members: {})", policy.members().join(", "));
        }
        let ep = self.endpoints(policy)?.into_iter().find(|e| e.node() == from).ok_or_else(|| anyhow!("`{from}` is not reached from here"))?;
        let theirs = ep.holds().await.with_context(|| format!("cannot ask `{from}` what it holds of `{fileset}`"))?;
        let chosen = fetch::pick(from, &theirs.snapshots, wanted)?.clone();
        let held = snapshot::replica_on(policy, here)?.list().await?;
        if let Some(h) = held.iter().find(|h| h.identity == chosen.identity) {
            return Ok((h.name.to_string(), format!("{} is held here already: nothing fetched from `{from}`", h.name)));
        }
        if held.iter().any(|h| h.name == chosen.name) {
            bail!("this node holds another snapshot named {} (not the copy `{from}` holds: changed or diverged); restore on `{from}` instead", chosen.name);
        }
        if policy.backend == config::BackendKind::Zfs {
            zfs_fetch_fits(policy, here, &self.epochs.current(policy)?, &held, &chosen, from)?;
        }
        let got = fetch::fetch(self.replica.service.grants(), policy, ep.as_ref(), &chosen)
            .await
            .with_context(|| format!("fetching {} of `{fileset}` from `{from}` failed (nothing was changed here)", chosen.name))?;
        Ok((chosen.name.to_string(), format!("fetched {} from `{from}` ({})", got.snapshot, shipped(&got))))
    }

    /// `snapship switchover --to NODE` in the running daemon, the origin: freeze writes, take
    /// a final snapshot and ship it (to every member, NODE among them), have NODE take over,
    /// and become a replica. If anything fails before NODE took over, writes are thawed and
    /// this node stays the origin.
    pub async fn switchover(self: &Arc<Self>, fileset: &str, to: &str) -> Result<String> {
        let config = self.config();
        let policy = config.policy(fileset).ok_or_else(|| anyhow!("no file set `{fileset}` in this node's policies"))?;
        let here = &config.node.node.0;
        let known = self.epochs.current(policy)?;
        if known.origin != *here {
            bail!("this node is not the origin of `{fileset}` ({known}); run switchover on `{}`", known.origin);
        }
        if to == here || !policy.is_member(to) {
            bail!("`{to}` is not another member of `{fileset}` (members: {})", policy.members().join(", "));
        }
        if let Some(why) = policy.origin_refusal(to) {
            bail!("{why}; switch over to another member");
        }
        let origin = snapshot::origin_on(policy, here)?;
        let target = self.endpoints(policy)?.into_iter().find(|e| e.node() == to).ok_or_else(|| anyhow!("`{to}` is not reached from here"))?;
        self.handing_over.lock().expect("handover lock").insert(fileset.to_string());
        origin.freeze(true).await?;
        // Whether the live file set was moved to where this node receives as a replica, and
        // could not be moved back: then it is not thawed.
        let mut stuck = None;
        let attempt = async {
            let snapshot = self.final_sync(fileset, to).await?;
            // Before `to` takes over (and ships here at once): the live file set goes where
            // this node receives as a replica (a failure leaves it where it was).
            origin.place_as_replica(true).await?;
            // The answer must name `to` in an epoch newer than this node's.
            let took = target.hand_over(&snapshot).await.with_context(|| format!("`{to}` did not take over")).and_then(|epoch| {
                match epoch.origin == to && epoch.number > known.number {
                    true => Ok(epoch),
                    false => Err(anyhow!("`{to}` answered epoch {} naming `{}`, not a newer one naming itself", epoch.number, epoch.origin.escape_debug())),
                }
            });
            match took {
                Ok(epoch) => Ok::<_, anyhow::Error>((snapshot, epoch)),
                Err(e) => {
                    if let Err(back) = origin.place_as_replica(false).await {
                        stuck = Some(format!("{back:#}"));
                    }
                    Err(e)
                }
            }
        };
        match attempt.await {
            Ok((snapshot, epoch)) => {
                self.epochs.learn(policy, &epoch)?;
                Ok(format!(
                    "{fileset}: `{to}` is the origin in epoch {} from {snapshot} (writes were frozen here first: nothing lost); this node is a replica",
                    epoch.number
                ))
            }
            Err(e) => {
                self.handing_over.lock().expect("handover lock").remove(fileset);
                // Another member is origin by now (its answer was lost, or an epoch came in
                // meanwhile): nothing is undone; this node stays frozen, a replica.
                let now = self.epochs.current(policy)?;
                if now.origin != *here {
                    return Err(e.context(format!(
                        "switchover of `{fileset}` to `{to}`: `{}` is the origin in epoch {} by now; this node stays frozen, a replica",
                        now.origin, now.number
                    )));
                }
                let thawed = match (&stuck, origin.freeze(false).await) {
                    (Some(back), _) => {
                        format!("the live file set could not be moved back ({back}), so it stays frozen: move it back and make it writable by hand")
                    }
                    (None, Ok(())) => "writes are thawed and this node is still the origin".to_string(),
                    (None, Err(t)) => format!("and thawing failed too ({t:#}): make the live file set writable by hand"),
                };
                Err(e.context(format!("switchover of `{fileset}` to `{to}` failed; {thawed}")))
            }
        }
    }

    /// A snapshot now through the origin job, shipped; the snapshot's name once `to` has it.
    async fn final_sync(&self, fileset: &str, to: &str) -> Result<crate::snapshot::SnapshotName> {
        let handle = self.syncs.lock().expect("syncs lock").get(fileset).cloned().ok_or_else(|| anyhow!("no origin job runs for `{fileset}`"))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        handle
            .send(crate::origin::job::SyncRequest { reply: tx, wait: Some(FINAL_SYNC_WAIT) })
            .await
            .map_err(|_| anyhow!("the origin job of `{fileset}` is stopping"))?;
        let answers = rx.await.map_err(|_| anyhow!("the origin job of `{fileset}` stopped"))?.map_err(|e| anyhow!("{e}"))?;
        let (_, snapshot, outcomes) = answers.into_iter().find(|(f, _, _)| f == fileset).ok_or_else(|| anyhow!("no snapshot of `{fileset}` was taken"))?;
        match outcomes.into_iter().find(|o| o.replica == to).map(|o| o.result) {
            Some(Ok(_)) => Ok(snapshot),
            Some(Err(e)) => bail!("the final snapshot {snapshot} did not reach `{to}`: {e}"),
            None => bail!("the final snapshot {snapshot} was not shipped to `{to}`"),
        }
    }
}

/// Whether `chosen` (of `from`) can be fetched onto this node, `here`, holding `held` of
/// `policy`'s ZFS file set, without making room: a ZFS dataset receives nothing older than
/// its newest snapshot, and the origin's snapshots are in its live dataset, which takes an
/// incremental only by rolling back what was written since (the receive checks both again,
/// as it does against a hostile sender; this says it before anything is shipped).
fn zfs_fetch_fits(
    policy: &Policy,
    here: &str,
    epoch: &crate::store::Epoch,
    held: &[snapshot::Snapshot],
    chosen: &snapshot::Snapshot,
    from: &str,
) -> Result<()> {
    let fileset = &policy.fileset;
    let home = policy.replica_home(here).unwrap_or_default();
    if let Some(newest) = held.iter().map(|s| &s.name).max().filter(|n| **n > chosen.name) {
        bail!(
            "`{fileset}` is ZFS, whose datasets receive nothing older than their newest snapshot: {home} holds {newest}, newer than {}; \
             restore it on `{from}` (snapship restore there), or restore a snapshot this node holds (snapship list)",
            chosen.name
        );
    }
    if epoch.origin == here && !held.is_empty() && policy.live_on(here).as_deref() == Some(home.as_str()) {
        bail!(
            "this node is the origin of `{fileset}` and on ZFS its snapshots are in its live dataset {home}, which would receive {} only by \
             rolling back what was written since its newest snapshot; restore it on `{from}` (snapship restore there) and copy what you need",
            chosen.name
        );
    }
    Ok(())
}

/// What `promote` learned from the other members before it promoted.
struct BeforePromoting {
    /// What was fetched first, if anything (said before the promotion's report).
    fetched: Option<String>,
    /// The highest epoch number a member claimed that this node could follow: the new epoch
    /// is numbered past it.
    past: u64,
    /// Claims of a promotion elsewhere that were not believed, with why.
    doubted: Vec<String>,
}

/// How a fetched snapshot came: its stream's size and base.
fn shipped(got: &crate::ship::Fetched) -> String {
    let how = match &got.base {
        Some(b) => format!("incremental from {b}"),
        None => "a full stream".to_string(),
    };
    format!("{} stream bytes, {how}", got.bytes)
}

/// This node ships what another member fetches: from its home, to that member as replication
/// reaches it.
impl crate::replica::fetch::Pushes for Arc<Runtime> {
    fn sender(&self, policy: &Policy) -> Result<Arc<dyn snapshot::OriginSide>> {
        let here = self.config().node.node.0.clone();
        Ok(snapshot::relay_on(policy, &here)?.into())
    }

    fn endpoint(&self, policy: &Policy, member: &str) -> Result<Arc<dyn ReplicaEndpoint>> {
        let found = self.endpoints(policy)?.into_iter().find(|e| e.node() == member && policy.is_member(member));
        found.ok_or_else(|| anyhow!("member `{member}` of `{}` is not reached from here", policy.fileset))
    }
}

#[async_trait::async_trait]
impl crate::replica::service::TakeOver for Arc<Runtime> {
    async fn take_over(&self, policy: &Policy, _snapshot: &crate::snapshot::SnapshotName) -> Result<crate::store::Epoch> {
        let config = self.config();
        // The service checked that the snapshot is the newest this node holds, which is what
        // promotion starts from.
        let here = config.node.node.0.clone();
        crate::origin::failover::promote(policy, &here, &self.epochs, 0).await?;
        self.start_origins(&[policy.fileset.0.as_str()]);
        self.epochs.current(policy)
    }
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
    let epochs = Arc::new(EpochStore::open(&loaded.node.state_dir));
    let role = Arc::new(ReplicaRole::start(loaded.clone(), epochs, status, &shutdown));
    let result = work(role.clone()).await;
    shutdown.cancel();
    role.stop().await;
    result
}

/// How long a one-shot command waits at most for its connections' close to go out
/// ([`Connector::wait_closed`](crate::ship::quic::Connector::wait_closed)): on loopback it
/// is out within a millisecond or two; a peer never told keeps the connection until its
/// idle timeout, which is harmless but holds one of that peer's connection slots.
const CLOSE_SENT: std::time::Duration = std::time::Duration::from_millis(150);

/// `snapship verify` of `policy`'s replicas (or only `only`) from this node, reaching them as
/// replication does (`endpoints`): each replica's outcome, one after the other. Node replicas
/// are compared with this node's copy, which must be the origin's; object stores are checked
/// against their own manifests (`objstore::verify`), from any node with their key. The daemon
/// calls it with its own link and epochs, [`verify`] with a replica role of its own. Each
/// connection is closed afterwards (a replica counts them per peer).
async fn verify_replicas(
    config: &LoadedConfig,
    policy: &Policy,
    link: &LocalLink,
    epochs: &Arc<EpochStore>,
    only: Option<&str>,
    snapshot: Option<&str>,
    full: bool,
) -> Result<Vec<crate::origin::verify::Outcome>> {
    let (here, fileset) = (&config.node.node.0, &policy.fileset.0);
    let stores: Vec<&crate::config::object_store::StoreReplica> = policy.object_stores.iter().filter(|s| only.is_none_or(|o| o == s.name.0)).collect();
    let mut out = Vec::new();
    let mut connector = None;
    if only.is_none() || stores.is_empty() {
        let current = epochs.current(policy)?;
        if current.origin != *here {
            bail!("run verify on the origin of `{fileset}` (`{}` in {current}): it compares each replica's copy with its own", current.origin);
        }
        let mut targets = endpoints(config, policy, &mut connector, link, epochs)?;
        targets.retain(|e| !policy.object_stores.iter().any(|s| s.name.0 == e.node()));
        if let Some(only) = only {
            targets.retain(|e| e.node() == only);
            if targets.is_empty() {
                let known: Vec<&str> =
                    policy.replicas.iter().map(|r| r.node.0.as_str()).chain(policy.object_stores.iter().map(|s| s.name.0.as_str())).collect();
                bail!("`{only}` is not a replica of `{fileset}` (its replicas: {})", known.join(", "));
            }
        }
        for replica in targets {
            let result = crate::origin::verify::verify(config, policy, replica.as_ref(), snapshot, full).await;
            replica.close().await;
            if let Err(e) = &result {
                tracing::error!(%fileset, replica = %replica.node(), "could not verify: {e:#}");
            }
            out.push(crate::origin::verify::Outcome { replica: replica.node().to_string(), result: result.map(Into::into).map_err(|e| format!("{e:#}")) });
        }
    }
    for spec in stores {
        let store = crate::objstore::ObjectReplica::new(policy, spec);
        let result = crate::objstore::verify::verify(&store, snapshot, full).await;
        out.push(crate::origin::verify::Outcome { replica: spec.name.0.clone(), result: store_summary(fileset, &spec.name.0, result) });
    }
    if let Some(connector) = connector {
        connector.wait_closed(CLOSE_SENT).await;
    }
    Ok(out)
}

/// An object store's verify as `verify` reports it, logged and counted like a node's.
fn store_summary(fileset: &str, store: &str, result: Result<crate::objstore::verify::StoreVerified>) -> Result<crate::origin::verify::Summary, String> {
    let v = result.map_err(|e| {
        tracing::error!(%fileset, replica = %store, "could not verify: {e:#}");
        format!("{e:#}")
    })?;
    let n = v.differences.len();
    metrics::counter!(crate::observe::metrics::VERIFY_MISMATCHES, "fileset" => fileset.to_string(), "replica" => store.to_string()).increment(n as u64);
    for d in &v.differences {
        tracing::error!(%fileset, replica = %store, snapshot = %v.snapshot, "verify: {d}");
    }
    if n == 0 {
        tracing::info!(%fileset, replica = %store, snapshot = %v.snapshot, streams = v.streams, parts = v.parts, full = v.full, "verified the object store's copy: intact");
    }
    Ok(crate::origin::verify::Summary {
        snapshot: v.snapshot.clone(),
        differences: v.differences.clone(),
        hashed: v.parts,
        reused: 0,
        seconds: v.elapsed.as_secs_f64(),
        how: Some(v.how()),
    })
}

/// `snapship verify` without a daemon (the caller holds the `state_dir` lock).
pub async fn verify(
    loaded: &Arc<LoadedConfig>,
    policy: &Policy,
    only: Option<&str>,
    snapshot: Option<&str>,
    full: bool,
) -> Result<Vec<crate::origin::verify::Outcome>> {
    with_replica_role(loaded, |role| async move { verify_replicas(loaded, policy, &role.link, &role.epochs, only, snapshot, full).await }).await
}

/// `snapship sync` without a daemon: snapshot `policy`'s file set (with its group) now and
/// bring every replica up to it. The caller holds the `state_dir` lock.
pub async fn sync(loaded: &Arc<LoadedConfig>, policy: &Policy, on_start: crate::origin::sync::OnStart<'_>) -> Result<Vec<crate::origin::sync::SyncReport>> {
    with_replica_role(loaded, |role| async move {
        let connector = std::sync::Mutex::new(None);
        let here = &loaded.node.node.0;
        let endpoints = |p: &Policy| Ok(fed_from(p, here, endpoints(loaded, p, &mut connector.lock().expect("connector lock"), &role.link, &role.epochs)?));
        let result = crate::origin::sync::sync(loaded, policy, &endpoints, on_start).await;
        let connector = connector.lock().expect("connector lock").take();
        if let Some(connector) = connector {
            connector.wait_closed(CLOSE_SENT).await;
        }
        result
    })
    .await
}

/// Metrics (when `metrics:` is set) and the lag gauges' refresh (every second, then).
fn observe(loaded: &LoadedConfig, status: &Arc<StatusBoard>, background: &TaskTracker, shutdown: &CancellationToken) -> Result<()> {
    if let Some(addr) = loaded.node.metrics {
        metrics_exporter_prometheus::PrometheusBuilder::new().with_http_listener(addr).install().map_err(|e| anyhow!("cannot serve metrics on {addr}: {e}"))?;
        crate::observe::status::describe_metrics();
        export_certificate_expiry(loaded);
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    }
    if loaded.node.metrics.is_none() {
        return Ok(()); // no exporter: nothing would read the lag gauges
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

/// Exports when this node's certificate expires, for an alert before peers start refusing
/// it (examples/monitoring/). Read once here: a renewed certificate takes a restart anyway.
fn export_certificate_expiry(loaded: &LoadedConfig) {
    use crate::observe::metrics as names;
    let Some(files) = &loaded.node.tls else { return };
    metrics::describe_gauge!(names::CERTIFICATE_EXPIRY, metrics::Unit::Seconds, "When this node's TLS certificate expires (Unix time, its notAfter)");
    match preflight::certificate_expiry(&files.cert) {
        Some(not_after) => metrics::gauge!(names::CERTIFICATE_EXPIRY).set(not_after as f64),
        None => {
            tracing::warn!(cert = %files.cert.display(), "cannot read the certificate's expiry for {}; `snapship check` says what is wrong", names::CERTIFICATE_EXPIRY)
        }
    }
}

/// Tells the status board what this node holds of the file sets it is a replica of.
async fn report_replicas(loaded: &LoadedConfig, epochs: &EpochStore, status: &StatusBoard) {
    let here = &loaded.node.node.0;
    for policy in loaded.policies.iter().filter(|p| p.is_member(here)) {
        let Ok(epoch) = epochs.current(policy) else { continue };
        if epoch.origin == *here {
            continue;
        }
        let held = match snapshot::replica_on(policy, here) {
            Ok(side) => side.list().await.unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        status.receiver(&policy.fileset.0, &epoch.origin, held.last().map(|s| &s.name), held.len());
        status.tampered(&policy.fileset.0, held.iter().filter(|s| snapshot::is_tampered(s)).map(|s| s.name.to_string()).collect());
    }
}
