//! `snapship verify`: on the origin, proves each replica's copy of a snapshot equal to the
//! origin's (`origin::verify`) and prints what differs. Exit codes: 0 every replica asked is
//! equal, 1 one differs, 2 one could not be verified (and none differs): a finding beats a
//! failure, so a script that sees 1 knows a copy is wrong.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Result, bail};

use crate::config::{self, LoadedConfig, Policy};
use crate::origin::verify::{Verified, verify as verify_one};

/// Runs the verb; every error is reported here, as exit 2.
pub async fn verify(path: &std::path::Path, fileset: &str, replica: Option<&str>, snapshot: Option<&str>, full: bool) -> ExitCode {
    let loaded = match config::load(path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let (policy, members) = match plan(&loaded, path, fileset, replica) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("error: could not verify: {e:#}");
            return ExitCode::from(2);
        }
    };
    let connector = match crate::ship::quic::Connector::new(&loaded.node) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("error: could not verify: {e:#}");
            return ExitCode::from(2);
        }
    };
    let (mut differ, mut failed) = (false, false);
    for member in members {
        let outcome = match super::remote_member(&loaded, policy, &member, connector.clone()) {
            Ok(endpoint) => {
                let outcome = verify_one(&loaded, policy, &endpoint, snapshot, full).await;
                // Close the connection now: the replica counts open connections per peer, and
                // one left to its idle timeout would hold a slot after this process exits.
                crate::ship::ReplicaEndpoint::close(&endpoint).await;
                outcome
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(v) => differ |= !print(fileset, &v),
            Err(e) => {
                failed = true;
                tracing::error!(%fileset, replica = %member, "could not verify: {e:#}");
                println!("{fileset} -> {member}: COULD NOT VERIFY: {e:#}");
            }
        }
    }
    connector.wait_closed(std::time::Duration::from_secs(2)).await;
    match (differ, failed) {
        (true, _) => ExitCode::from(1),
        (false, true) => ExitCode::from(2),
        (false, false) => ExitCode::SUCCESS,
    }
}

/// The policy and the replicas to verify; this node must be the file set's origin.
fn plan<'a>(loaded: &'a LoadedConfig, path: &std::path::Path, fileset: &str, replica: Option<&str>) -> Result<(&'a Policy, Vec<config::units::Name>)> {
    let policy = super::find_policy(loaded, path, fileset)?;
    let here = &loaded.node.node;
    let current = crate::store::EpochStore::open(&loaded.node.state_dir).current(policy)?;
    if policy.origin.node != *here || current.origin != here.0 {
        bail!("run verify on the origin of `{fileset}` (`{}` in {current}): it compares each replica's copy with its own", current.origin);
    }
    let mut members: Vec<config::units::Name> = policy.replicas.iter().map(|r| r.node.clone()).collect();
    if let Some(only) = replica {
        members.retain(|m| m.0 == only);
        if members.is_empty() {
            let known: Vec<&str> = policy.replicas.iter().map(|r| r.node.0.as_str()).collect();
            bail!("`{only}` is not a replica of `{fileset}` (its replicas: {})", known.join(", "));
        }
    }
    if let Some(local) = members.iter().find(|m| *m == here) {
        bail!("`{local}` is this node: verifying a replica on the origin's own node is not supported yet; pass --replica with another member");
    }
    Ok((policy, members))
}

/// Prints one replica's outcome; whether it is equal.
fn print(fileset: &str, v: &Verified) -> bool {
    let how = format!("{} files hashed, {} reused from the last verify, {:.1}s", v.hashed, v.reused, v.elapsed.as_secs_f64());
    if v.differences.is_empty() {
        println!("{fileset} -> {}: {} equal ({how})", v.replica, v.snapshot);
        return true;
    }
    println!("{fileset} -> {}: {} DIFFERS in {} places ({how}):", v.replica, v.snapshot, v.differences.len());
    for d in &v.differences {
        println!("  {d}");
    }
    false
}
