//! `snapship verify`: on the origin, proves each replica's copy of a snapshot equal to the
//! origin's (`origin::verify`) and prints what differs. With a daemon running it does the
//! work (so its metrics count the mismatches and its log has them); otherwise this process
//! does, holding the `state_dir` lock. Exit codes: 0 every replica asked is equal, 1 one
//! differs, 2 one could not be verified (and none differs): a finding beats a failure, so a
//! script that sees 1 knows a copy is wrong.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;

use crate::config;
use crate::node::control;
use crate::origin::verify::Outcome;

/// Runs the verb; every error is reported here, as exit 2.
pub async fn verify(path: &std::path::Path, fileset: &str, replica: Option<&str>, snapshot: Option<&str>, full: bool) -> ExitCode {
    let outcomes = match outcomes(path, fileset, replica, snapshot, full).await {
        Ok(outcomes) => outcomes,
        Err(e) => {
            eprintln!("error: could not verify: {e:#}");
            return ExitCode::from(2);
        }
    };
    let (mut differ, mut failed) = (false, false);
    for o in &outcomes {
        match &o.result {
            Ok(s) => {
                let how = match &s.how {
                    Some(how) => how.clone(),
                    None => format!("{} files hashed, {} reused from the last verify, {:.1}s", s.hashed, s.reused, s.seconds),
                };
                if s.differences.is_empty() {
                    println!("{fileset} -> {}: {} equal ({how})", o.replica, s.snapshot);
                } else {
                    differ = true;
                    println!("{fileset} -> {}: {} DIFFERS in {} places ({how}):", o.replica, s.snapshot, s.differences.len());
                    for d in &s.differences {
                        println!("  {d}");
                    }
                }
            }
            Err(e) => {
                failed = true;
                println!("{fileset} -> {}: COULD NOT VERIFY: {e}", o.replica);
            }
        }
    }
    match (differ, failed) {
        (true, _) => ExitCode::from(1),
        (false, true) => ExitCode::from(2),
        (false, false) => ExitCode::SUCCESS,
    }
}

/// Each replica's outcome, from the running daemon or from this process.
async fn outcomes(path: &std::path::Path, fileset: &str, replica: Option<&str>, snapshot: Option<&str>, full: bool) -> Result<Vec<Outcome>> {
    let loaded = Arc::new(config::load(path)?);
    let policy = super::find_policy(&loaded, path, fileset)?;
    if let Some(results) = control::verify_through_daemon(&loaded.node.state_dir, fileset, replica, snapshot, full).await? {
        tracing::info!("verified by the running snapship run");
        return Ok(results);
    }
    let _lock = crate::node::lock_state_dir(&loaded.node.state_dir)?;
    crate::node::verify(&loaded, policy, replica, snapshot, full).await
}
