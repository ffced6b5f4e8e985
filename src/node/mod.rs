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

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
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
use crate::ship::client::{EpochSource, PeerReplica};
use crate::ship::local::LocalLink;
use crate::ship::quic::{self, Connector, QuicDialer};
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
    Ok(out)
}

/// The replica role of this node, serving the in-process link (and, when started with
/// [`ReplicaRole::listen`], QUIC) until `shutdown`.
pub struct ReplicaRole {
    pub service: Arc<ReplicaService>,
    pub link: LocalLink,
    pub epochs: Arc<EpochStore>,
    tasks: TaskTracker,
}

impl ReplicaRole {
    pub fn start(config: Arc<LoadedConfig>, epochs: Arc<EpochStore>, status: Arc<StatusBoard>, shutdown: &CancellationToken) -> ReplicaRole {
        let service = ReplicaService::new(config.clone(), epochs.clone(), status, crate::replica::service::real_backends());
        let (link, streams) = LocalLink::pair(&config.node.node.0);
        let tasks = TaskTracker::new();
        tasks.spawn(service.sessions().clone().watch(shutdown.clone()));
        tasks.spawn(crate::ship::local::serve(streams, service.clone(), shutdown.clone()));
        ReplicaRole { service, link, epochs, tasks }
    }

    /// Also serves other nodes over QUIC on `addr`.
    pub fn listen(&self, config: &LoadedConfig, addr: std::net::SocketAddr, shutdown: &CancellationToken) -> Result<()> {
        let files = config.node.tls.as_ref().ok_or_else(|| anyhow!("{} has no `tls:` section; a replica needs one", config.node.file.display()))?;
        let server = quic::bind(files, addr)?;
        tracing::info!(node = %config.node.node, %addr, "listening for origins");
        let peers = config.node.peers.keys().map(|k| k.0.clone()).collect();
        self.tasks.spawn(quic::serve(server, peers, self.service.clone(), shutdown.clone()));
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

    /// After `shutdown` was cancelled: ends the sessions and waits for every task.
    pub async fn stop(self) {
        self.service.shutdown().await;
        self.tasks.close();
        self.tasks.wait().await;
    }
}

pub async fn run(config_path: &Path) -> Result<()> {
    let mut loaded = config::load(config_path)?;
    for e in &loaded.errors {
        if e.file == loaded.node.file {
            tracing::error!("{e}");
        } else {
            tracing::error!("skipping a broken policy: {e}");
        }
    }
    // Without working TLS no peer would accept this node: refuse rather than run idle.
    let tls = preflight::tls(&loaded.node);
    for w in &tls.warnings {
        tracing::warn!("{w}");
    }
    if !tls.errors.is_empty() {
        let reasons: Vec<String> = tls.errors.iter().map(|e| e.to_string()).collect();
        bail!("cannot start: the TLS files are unusable (`snapship check` shows the same):\n  {}", reasons.join("\n  "));
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
        }
        if found.errors.is_empty() {
            usable.push(policy);
        }
    }
    loaded.policies = usable;
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

    // The replica role first: this node's own origin jobs may ship to it. It listens on QUIC
    // wherever `listen:` is set: after a promotion elsewhere, any member is a replica.
    let replica = ReplicaRole::start(loaded.clone(), epochs.clone(), status.clone(), &shutdown);
    match loaded.node.listen {
        Some(addr) => replica.listen(&loaded, addr, &shutdown)?,
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

    let node = Arc::new(Runtime {
        config: loaded.clone(),
        epochs: epochs.clone(),
        status: status.clone(),
        link: replica.link.clone(),
        origins: TaskTracker::new(),
        shutdown: shutdown.clone(),
        syncs: Mutex::default(),
        connector: Mutex::default(),
        handing_over: Mutex::default(),
    });
    replica.service.accept_handovers(Arc::new(node.clone()));
    node.start_origins(&origin_of);
    {
        let control = Arc::new(control::Control { status: status.clone(), node: node.clone() });
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
    // snapship reads its config once; a SIGHUP (a stray `kill -HUP`, a closed terminal) must
    // not stop it, so it is answered with what to do instead.
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
            _ = hup.recv() => tracing::warn!("SIGHUP: snapship does not reload its config in place; restart it to apply changes (`systemctl restart snapship`: transfers in flight resume)"),
        }
    }
    shutdown.cancel();
    node.origins.close();
    node.origins.wait().await;
    background.wait().await;
    // Give the QUIC endpoints a moment to send the connection closes queued above.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    replica.stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// What the running daemon needs to start origin duty, at start-up and after a promotion.
pub struct Runtime {
    pub config: Arc<LoadedConfig>,
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
}

impl Runtime {
    /// `snapship verify` through the control socket: counted in this daemon's metrics and log.
    pub async fn verify(&self, fileset: &str, only: Option<&str>, snapshot: Option<&str>, full: bool) -> Result<Vec<crate::origin::verify::Outcome>> {
        let policy = self.config.policy(fileset).ok_or_else(|| anyhow!("the running daemon has no file set `{fileset}`"))?;
        verify_replicas(&self.config, policy, &self.link, &self.epochs, only, snapshot, full).await
    }

    /// How this node, the origin of `policy` now, reaches the other members (one QUIC client
    /// for the daemon).
    fn endpoints(&self, policy: &Policy) -> Result<Vec<Arc<dyn ReplicaEndpoint>>> {
        endpoints(&self.config, policy, &mut self.connector.lock().expect("connector lock"), &self.link, &self.epochs)
    }

    /// Makes the origin job of `policy` on this node.
    fn job(&self, policy: &Policy) -> Result<(OriginJob, SyncHandle)> {
        let here = &self.config.node.node.0;
        let origin = snapshot::origin_on(policy, here)?.into();
        let replicas = self.endpoints(policy)?;
        let state = StateStore::open(&self.config.node.state_dir, &policy.fileset.0)?.into();
        let (job, handle) = OriginJob::new(policy.clone(), origin, replicas, state, Clock::System, self.status.clone());
        Ok((job.with_stall_timeout(self.config.node.transfers.stall_timeout.0).with_epochs(self.epochs.clone()), handle))
    }

    /// Starts the origin jobs of `filesets` (consistency groups sharing a hub).
    fn start_origins(self: &Arc<Self>, filesets: &[&str]) {
        let mut jobs = Vec::new();
        for policy in filesets.iter().filter_map(|f| self.config.policy(f)) {
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
                let backend = self.config.policies.iter().find(|p| p.group.as_ref().is_some_and(|g| g.0 == name)).map(|p| p.backend).expect("a member");
                (name.clone(), GroupHub::new(&name, backend, members))
            })
            .collect();
        for (job, sync) in jobs {
            let job = match job.policy.group.as_ref().and_then(|g| hubs.get(&g.0)) {
                Some(hub) => job.in_group(hub.clone()),
                None => job,
            };
            self.syncs.lock().expect("syncs lock").insert(job.policy.fileset.0.clone(), sync);
            let me = self.clone();
            self.origins.spawn(async move { me.origin_duty(job).await });
        }
    }

    /// Runs `job` until shutdown, or until a newer epoch names another origin: then this node
    /// steps down (its live file set frozen, what it wrote kept as diverged data) and serves
    /// the file set as a replica (the replica service goes by the epochs).
    async fn origin_duty(self: Arc<Self>, job: OriginJob) {
        let policy = job.policy.clone();
        let origin = job.origin.clone();
        let here = self.config.node.node.0.clone();
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
        let duty = job.run(stop.clone());
        tokio::pin!(duty);
        tokio::select! {
            () = &mut duty => {}
            () = moved_on => {
                stop.cancel();
                duty.await;
            }
        }
        self.syncs.lock().expect("syncs lock").remove(&policy.fileset.0);
        if self.shutdown.is_cancelled() {
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

    /// `report` with the epoch of every file set this node is a member of.
    pub fn report(&self, mut report: crate::observe::status::StatusReport) -> crate::observe::status::StatusReport {
        let here = &self.config.node.node.0;
        for policy in self.config.policies.iter().filter(|p| p.is_member(here)) {
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
        let policy = self.config.policy(fileset).ok_or_else(|| anyhow!("no file set `{fileset}` in this node's policies"))?;
        let here = &self.config.node.node.0;
        let known = crate::origin::failover::other_origin(policy, here, &self.epochs)?;
        if !force {
            if let Some(ep) = self.endpoints(policy)?.iter().find(|e| e.node() == known.origin) {
                if crate::origin::failover::answers(ep.as_ref()).await {
                    bail!(
                        "the origin `{}` still answers: a planned change is `snapship switchover --to {here}` run there; \
                         to promote anyway (the old origin will be fenced off), add --force",
                        known.origin
                    );
                }
            }
        }
        let report = crate::origin::failover::promote(policy, here, &self.epochs).await?;
        self.start_origins(&[fileset]);
        Ok(report)
    }

    /// `snapship switchover --to NODE` in the running daemon, the origin: freeze writes, take
    /// a final snapshot and ship it (to every member, NODE among them), have NODE take over,
    /// and become a replica. If anything fails before NODE took over, writes are thawed and
    /// this node stays the origin.
    pub async fn switchover(self: &Arc<Self>, fileset: &str, to: &str) -> Result<String> {
        let policy = self.config.policy(fileset).ok_or_else(|| anyhow!("no file set `{fileset}` in this node's policies"))?;
        let here = &self.config.node.node.0;
        let known = self.epochs.current(policy)?;
        if known.origin != *here {
            bail!("this node is not the origin of `{fileset}` ({known}); run switchover on `{}`", known.origin);
        }
        if to == here || !policy.is_member(to) {
            bail!("`{to}` is not another member of `{fileset}` (members: {})", policy.members().join(", "));
        }
        let origin = snapshot::origin_on(policy, here)?;
        let target = self.endpoints(policy)?.into_iter().find(|e| e.node() == to).ok_or_else(|| anyhow!("`{to}` is not reached from here"))?;
        self.handing_over.lock().expect("handover lock").insert(fileset.to_string());
        origin.freeze(true).await?;
        let attempt = async {
            let snapshot = self.final_sync(fileset, to).await?;
            let epoch = target.hand_over(&snapshot).await.with_context(|| format!("`{to}` did not take over"))?;
            Ok::<_, anyhow::Error>((snapshot, epoch))
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
                let thawed = match origin.freeze(false).await {
                    Ok(()) => "writes are thawed and this node is still the origin".to_string(),
                    Err(t) => format!("and thawing failed too ({t:#}): make the live file set writable by hand"),
                };
                Err(e.context(format!("switchover of `{fileset}` to `{to}` failed; {thawed}")))
            }
        }
    }

    /// A snapshot now through the origin job, shipped; the snapshot's name once `to` has it.
    async fn final_sync(&self, fileset: &str, to: &str) -> Result<crate::snapshot::SnapshotName> {
        let handle = self.syncs.lock().expect("syncs lock").get(fileset).cloned().ok_or_else(|| anyhow!("no origin job runs for `{fileset}`"))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        handle.send(crate::origin::job::SyncRequest { reply: tx }).await.map_err(|_| anyhow!("the origin job of `{fileset}` is stopping"))?;
        let answers = rx.await.map_err(|_| anyhow!("the origin job of `{fileset}` stopped"))?.map_err(|e| anyhow!("{e}"))?;
        let (_, snapshot, outcomes) = answers.into_iter().find(|(f, _, _)| f == fileset).ok_or_else(|| anyhow!("no snapshot of `{fileset}` was taken"))?;
        match outcomes.into_iter().find(|o| o.replica == to).map(|o| o.result) {
            Some(Ok(_)) => Ok(snapshot),
            Some(Err(e)) => bail!("the final snapshot {snapshot} did not reach `{to}`: {e}"),
            None => bail!("the final snapshot {snapshot} was not shipped to `{to}`"),
        }
    }
}

#[async_trait::async_trait]
impl crate::replica::service::TakeOver for Arc<Runtime> {
    async fn take_over(&self, policy: &Policy, _snapshot: &crate::snapshot::SnapshotName) -> Result<crate::store::Epoch> {
        // The service checked that the snapshot is the newest this node holds, which is what
        // promotion starts from.
        let here = self.config.node.node.0.clone();
        crate::origin::failover::promote(policy, &here, &self.epochs).await?;
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
    if let Ok(role) = Arc::try_unwrap(role) {
        role.stop().await;
    }
    result
}

/// `snapship verify` of `policy`'s replicas (or only `only`) from this node, which must be its
/// origin, reaching them as replication does (`endpoints`): each replica's outcome, one after
/// the other. The daemon calls it with its own link and epochs, [`verify`] with a replica role
/// of its own. Each connection is closed afterwards (a replica counts them per peer).
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
    let current = epochs.current(policy)?;
    if policy.origin.node.0 != *here || current.origin != *here {
        bail!("run verify on the origin of `{fileset}` (`{}` in {current}): it compares each replica's copy with its own", current.origin);
    }
    let mut connector = None;
    let mut targets = endpoints(config, policy, &mut connector, link, epochs)?;
    if let Some(only) = only {
        targets.retain(|e| e.node() == only);
        if targets.is_empty() {
            let known: Vec<&str> = policy.replicas.iter().map(|r| r.node.0.as_str()).collect();
            bail!("`{only}` is not a replica of `{fileset}` (its replicas: {})", known.join(", "));
        }
    }
    let mut out = Vec::new();
    for replica in targets {
        let result = crate::origin::verify::verify(config, policy, replica.as_ref(), snapshot, full).await;
        replica.close().await;
        if let Err(e) = &result {
            tracing::error!(%fileset, replica = %replica.node(), "could not verify: {e:#}");
        }
        out.push(crate::origin::verify::Outcome { replica: replica.node().to_string(), result: result.map(Into::into).map_err(|e| format!("{e:#}")) });
    }
    if let Some(connector) = connector {
        connector.wait_closed(std::time::Duration::from_secs(2)).await;
    }
    Ok(out)
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
        let endpoints = |p: &Policy| endpoints(loaded, p, &mut connector.lock().expect("connector lock"), &role.link, &role.epochs);
        crate::origin::sync::sync(loaded, policy, &endpoints, on_start).await
    })
    .await
}

/// Metrics (when `metrics:` is set) and the lag gauges' refresh.
fn observe(loaded: &LoadedConfig, status: &Arc<StatusBoard>, background: &TaskTracker, shutdown: &CancellationToken) -> Result<()> {
    if let Some(addr) = loaded.node.metrics {
        metrics_exporter_prometheus::PrometheusBuilder::new().with_http_listener(addr).install().map_err(|e| anyhow!("cannot serve metrics on {addr}: {e}"))?;
        crate::observe::status::describe_metrics();
        export_certificate_expiry(loaded);
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
    }
}
