//! `snapship run`: the foreground daemon.
//!
//! It loads the node config (broken policies are reported and skipped), runs the origin loop
//! of every file set whose origin is this node, serves as replica for every file set whose
//! origin is another node, and stops cleanly on SIGINT or SIGTERM. A lock file in
//! `state_dir` keeps a second daemon (and `snapship prune` without `--dry-run`) away.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::replicate;
use crate::schedule::clock::Clock;
use crate::schedule::origin::{GroupHub, GroupMember, OriginJob};
use crate::ship::server;
use crate::snapshot;
use crate::state::StateStore;
use crate::status::StatusBoard;

/// Holds `state_dir/daemon.lock` while the daemon runs.
pub fn lock_state_dir(state_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    std::fs::create_dir_all(state_dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", state_dir.display()))?;
    let path = state_dir.join("daemon.lock");
    let file = std::fs::File::create(&path).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| anyhow::anyhow!("another snapship process (run, sync or prune) is using {} (its lock {} is held)", state_dir.display(), path.display()))
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
    if let Some(addr) = loaded.node.metrics {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
        crate::status::describe_metrics();
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    }
    let background = tokio_util::task::TaskTracker::new();
    {
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
    }

    for policy in loaded.policies.iter().filter(|p| p.origin.node != *here) {
        if let Some(replica) = policy.replica_on(here) {
            let held = match snapshot::replica_for(policy, replica) {
                Ok(side) => side.list().await.unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            status.receiver(&policy.fileset.0, &policy.origin.node.0, held.last().map(|s| &s.name), held.len());
        }
    }
    let origins = tokio_util::task::TaskTracker::new();
    let mut syncs = std::collections::BTreeMap::new();
    let mut connector = None;
    let mut jobs = Vec::new();
    for policy in loaded.policies.iter().filter(|p| p.origin.node == *here) {
        let job = (|| -> Result<(OriginJob, crate::schedule::origin::SyncHandle)> {
            let origin = snapshot::origin_for(policy)?.into();
            let replicas = replicate::endpoints(&loaded, policy, &mut connector)?;
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
    let mut hubs: std::collections::BTreeMap<String, Vec<GroupMember>> = Default::default();
    for (job, _) in &jobs {
        if let Some(g) = &job.policy.group {
            hubs.entry(g.0.clone()).or_default().push(GroupMember {
                fileset: job.policy.fileset.0.clone(),
                path: job.policy.origin.path.clone(),
                origin: job.origin.clone(),
                replicas: job.replicas.iter().map(|r| r.node().to_string()).collect(),
            });
        }
    }
    let hubs: std::collections::BTreeMap<String, _> = hubs
        .into_iter()
        .map(|(name, members)| {
            let backend = loaded.policies.iter().find(|p| p.group.as_ref().is_some_and(|g| g.0 == name)).map(|p| p.backend).expect("a member");
            (name.clone(), GroupHub::new(&name, backend, members))
        })
        .collect();
    for (job, sync) in jobs {
        let job = match job.policy.group.as_ref().and_then(|g| hubs.get(&g.0)) {
            Some(hub) => job.in_group(hub.clone()),
            None => job,
        };
        syncs.insert(job.policy.fileset.0.clone(), sync);
        origins.spawn(job.run(shutdown.clone()));
    }
    origins.close();
    {
        let control = Arc::new(crate::control::Control { status: status.clone(), syncs });
        let (shutdown, dir) = (shutdown.clone(), loaded.node.state_dir.clone());
        background.spawn(async move {
            if let Err(e) = crate::control::serve(&dir, control, shutdown).await {
                tracing::error!("control socket: {e:#}");
            }
        });
    }
    background.close();
    let mut server_task = None;
    if !replica_of.is_empty() {
        let Some(addr) = loaded.node.listen else {
            bail!("node `{here}` is a replica of {} but {} has no `listen:` address", replica_of.join(", "), loaded.node.file.display());
        };
        let bound = server::bind(&loaded, addr)?;
        server_task = Some(tokio::spawn(server::serve(bound, loaded.clone(), status.clone(), shutdown.clone())));
    }
    tracing::info!(node = %here, "running");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let server_failed = async {
        match &mut server_task {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
        result = server_failed => {
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(e) => bail!("the server task failed: {e}"),
            };
        }
    }
    shutdown.cancel();
    origins.wait().await;
    background.wait().await;
    // Give the QUIC endpoints a moment to send the connection closes queued above.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    if let Some(task) = server_task {
        task.await??;
    }
    tracing::info!("stopped");
    Ok(())
}
