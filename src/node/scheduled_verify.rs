//! The policy's `verify:` key in the running daemon: on its cron schedule, the origin's
//! daemon verifies each replica's copy of the newest snapshot both hold, exactly as
//! `snapship verify` does through the daemon (`Runtime::verify`: one verify at a time, the
//! outcome in `status`, the gauges, and the log, a mismatch as an error).
//!
//! It runs beside the file set's origin job and ends with it (a promotion elsewhere, a
//! reload, the shutdown). Firings missed while a verify ran are not made up: the next one
//! is the first after the verify ended.
//!
//! # Cancel safety
//! `stop` is looked at only between verifies: a verify under way finishes (its ZFS clones
//! are destroyed on the way out) before the loop returns, so the duty awaits it.

use std::sync::Arc;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::Runtime;
use crate::config::Policy;

impl Runtime {
    /// Verifies `policy`'s replicas at each firing of its `verify:` schedule until `stop`;
    /// returns at once when the policy has none.
    pub(super) async fn verify_on_schedule(self: Arc<Self>, policy: Policy, stop: CancellationToken) {
        let Some(plan) = policy.verify.clone() else { return };
        let fileset = policy.fileset.0.clone();
        loop {
            let now = Utc::now();
            let Some(next) = plan.schedule.next_after(now) else {
                self.status.next_verify(&fileset, None);
                return;
            };
            self.status.next_verify(&fileset, Some(next));
            tokio::select! {
                _ = stop.cancelled() => {
                    self.status.next_verify(&fileset, None);
                    return;
                }
                _ = tokio::time::sleep((next - now).to_std().unwrap_or_default()) => {}
            }
            tracing::info!(%fileset, full = plan.full, "scheduled verify");
            if let Err(e) = self.verify(&fileset, None, None, plan.full).await {
                // Nothing was compared (this node is no longer the origin, say): every replica's
                // entry says why.
                let message = format!("{e:#}");
                tracing::error!(%fileset, "scheduled verify could not run: {message}");
                for r in &policy.replicas {
                    self.status.verified(&fileset, &r.node.0, Err(&message));
                }
            }
        }
    }
}
