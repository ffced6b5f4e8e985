//! A replica on the origin's own node: the stream goes through a local pipe, no network.

use anyhow::Result;
use async_trait::async_trait;
use tokio::io::AsyncRead;

use super::{ReplicaEndpoint, StreamStart};
use crate::config::Policy;
use crate::schedule::prune::prune_replica_after_receive;
use crate::snapshot::{Incoming, ReplicaSide, Snapshot};

pub struct LocalReplica {
    node: String,
    policy: Policy,
    side: Box<dyn ReplicaSide>,
}

impl LocalReplica {
    pub fn new(node: String, policy: Policy, side: Box<dyn ReplicaSide>) -> Self {
        LocalReplica { node, policy, side }
    }
}

#[async_trait]
impl ReplicaEndpoint for LocalReplica {
    fn node(&self) -> &str {
        &self.node
    }

    async fn list(&self) -> Result<Vec<Snapshot>> {
        self.side.list().await
    }

    async fn accepts_compact(&self) -> bool {
        self.side.accepts_compact().await
    }

    async fn receive(&self, incoming: &Incoming, start: StreamStart, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<()> {
        // A local pipe is never cut part way, so it never offers a partial to resume.
        anyhow::ensure!(start.resumed.is_none() && !start.from_token, "a local replica cannot resume a stream");
        self.side.receive(incoming, stream).await?;
        // As a remote replica does after a receive: prune by the replica side's retention.
        prune_replica_after_receive(&self.policy, self.side.as_ref()).await;
        Ok(())
    }
}
