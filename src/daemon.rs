//! `snapship run`: the foreground daemon.
//!
//! It loads the node config (broken policies are reported and skipped), serves as replica for
//! every file set whose origin is another node, and stops cleanly on SIGINT or SIGTERM.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::ship::server;

pub async fn run(config_path: &Path) -> Result<()> {
    let loaded = Arc::new(config::load(config_path)?);
    for e in &loaded.errors {
        tracing::error!("skipping a broken policy: {e}");
    }
    let here = &loaded.node.node;
    let replica_of: Vec<&str> = loaded
        .policies
        .iter()
        .filter(|p| p.origin.node != *here && p.replica_on(here).is_some())
        .map(|p| p.fileset.0.as_str())
        .collect();
    let origin_of: Vec<&str> = loaded.policies.iter().filter(|p| p.origin.node == *here).map(|p| p.fileset.0.as_str()).collect();
    tracing::info!(node = %here, origin_of = ?origin_of, replica_of = ?replica_of, "starting");

    let shutdown = CancellationToken::new();
    let mut server_task = None;
    if !replica_of.is_empty() {
        let Some(addr) = loaded.node.listen else {
            bail!("node `{here}` is a replica of {} but {} has no `listen:` address", replica_of.join(", "), loaded.node.file.display());
        };
        server_task = Some(tokio::spawn(server::serve(loaded.clone(), addr, shutdown.clone())));
    }

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
    if let Some(task) = server_task {
        task.await??;
    }
    tracing::info!("stopped");
    Ok(())
}
