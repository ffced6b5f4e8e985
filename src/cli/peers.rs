//! `snapship check --peers`: what `check` cannot see from this node alone. Every peer in the
//! node config is dialled over QUIC with this node's certificate (the handshake checks both
//! certificates against the CA, and that the peer's names it), asked who it is (a peer of
//! another protocol version refuses the hello), and, for every file set both nodes are
//! members of, asked for its policy, which must be the same as this node's: the policy file
//! is one text shared by the whole star, and two members that disagree on the origin, the
//! paths or the retention fence each other off or prune what the other needs.
//!
//! Peers are asked at once, each within [`PEER_TIMEOUT`]: a node that is down costs one
//! timeout, not one each.

use std::sync::Arc;
use std::time::Duration;

use serde_yaml::Value;

use crate::config::LoadedConfig;
use crate::config::units::Name;
use crate::ship::client::{self, Refused};
use crate::ship::protocol::ErrorCode;
use crate::ship::quic::{Connector, QuicDialer};

/// How long one peer may take for the handshake and its answers.
const PEER_TIMEOUT: Duration = Duration::from_secs(15);

/// The most differences shown per policy.
const MAX_SHOWN: usize = 12;

/// What checking the peers found: lines that are fine, and errors (each says what to do).
#[derive(Debug, Default)]
pub struct Findings {
    pub fine: Vec<String>,
    pub errors: Vec<String>,
}

/// Asks every peer of `loaded`'s node config.
pub async fn check(loaded: &LoadedConfig) -> Findings {
    let mut found = Findings::default();
    if loaded.node.peers.is_empty() {
        found.fine.push("no peers to check".into());
        return found;
    }
    let connector = match Connector::new(&loaded.node) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            found.errors.push(format!("cannot reach any peer: {e:#}"));
            return found;
        }
    };
    let asks = loaded.node.peers.iter().map(|(peer, addr)| {
        let connector = connector.clone();
        async move {
            let outcome = tokio::time::timeout(PEER_TIMEOUT, ask(loaded, peer, addr, connector))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {}s; is `snapship run` running there, with `listen:` at {addr}?", PEER_TIMEOUT.as_secs())));
            (peer, addr, outcome)
        }
    });
    for (peer, addr, outcome) in futures::future::join_all(asks).await {
        match outcome {
            Ok(lines) => found.fine.extend(lines.into_iter().map(|l| format!("peer `{peer}` ({addr}): {l}"))),
            Err(e) => found.errors.push(format!("peer `{peer}` ({addr}): {e}")),
        }
    }
    connector.wait_closed(Duration::from_secs(1)).await;
    found
}

/// One peer: who it is, then its policy for each file set both are members of.
async fn ask(loaded: &LoadedConfig, peer: &Name, addr: &str, connector: Arc<Connector>) -> Result<Vec<String>, String> {
    let dialer = QuicDialer::new(peer.0.clone(), addr.to_string(), connector);
    let here = &loaded.node.node.0;
    let who = client::describe(&dialer, &peer.0, None).await.map_err(|e| refusal(&peer.0, e))?;
    if who.node != peer.0 {
        return Err(format!(
            "its certificate names `{peer}` but its node config says `node: {}`; make the two agree there (`snapship certs --renew {}`, or fix `node:`)",
            who.node, who.node
        ));
    }
    let mut lines = vec![format!("reachable, protocol {}", crate::ship::protocol::VERSION)];
    let mut differ = Vec::new();
    for policy in loaded.policies.iter().filter(|p| p.is_member(here) && p.is_member(&peer.0)) {
        let fileset = &policy.fileset.0;
        let theirs = match client::describe(&dialer, &peer.0, Some(fileset)).await {
            Ok(d) => d.policy.unwrap_or_default(),
            Err(e) => {
                differ.push(format!("file set `{fileset}`: {}", refusal(&peer.0, e)));
                continue;
            }
        };
        let diffs = differences(&policy.document, &theirs);
        if diffs.is_empty() {
            lines.push(format!("its policy for `{fileset}` is the same as {}", policy.file.display()));
        } else {
            let more = if diffs.len() > MAX_SHOWN { format!("; and {} more", diffs.len() - MAX_SHOWN) } else { String::new() };
            differ.push(format!(
                "its policy for `{fileset}` differs from {}: {}{more}. Every member must hold the same policy: copy the right file to each member and reload them (`systemctl reload snapship`)",
                policy.file.display(),
                diffs.iter().take(MAX_SHOWN).map(|d| d.shown(&peer.0)).collect::<Vec<_>>().join("; ")
            ));
        }
    }
    if differ.is_empty() { Ok(lines) } else { Err(differ.join("\n  ")) }
}

/// `e` from asking `peer`, worded for the admin.
fn refusal(peer: &str, e: anyhow::Error) -> String {
    match e.downcast_ref::<Refused>() {
        Some(r) if r.code == ErrorCode::Version => {
            format!("it speaks another protocol version ({}); run the same snapship version on every node", r.message.escape_debug())
        }
        Some(r) => format!("it refused: {}", r.message.escape_debug()),
        None => format!("cannot ask `{peer}`: {e:#}; is `snapship run` running there?"),
    }
}

/// One key whose value differs between two policies.
#[derive(Debug, PartialEq, Eq)]
pub struct Difference {
    /// Where, like `retention.replica.last` or `replicas[1].path`.
    pub key: String,
    pub here: Option<String>,
    pub there: Option<String>,
}

impl Difference {
    fn shown(&self, peer: &str) -> String {
        let show = |v: &Option<String>| v.as_ref().map_or("absent".to_string(), |v| format!("`{v}`"));
        format!("`{}` here {}, on {peer} {}", self.key, show(&self.here), show(&self.there))
    }
}

/// Where two canonical policy documents differ, key by key. A text that does not parse (a
/// hostile or broken peer) differs as a whole.
pub fn differences(ours: &str, theirs: &str) -> Vec<Difference> {
    let parse = |text: &str| serde_yaml::from_str::<Value>(text).ok();
    let mut out = Vec::new();
    match (parse(ours), parse(theirs)) {
        (Some(a), Some(b)) => walk(Some(&a), Some(&b), String::new(), &mut out),
        _ => out.push(Difference { key: "(the whole policy)".into(), here: Some(short(ours)), there: Some(short(theirs)) }),
    }
    out
}

fn walk(a: Option<&Value>, b: Option<&Value>, key: String, out: &mut Vec<Difference>) {
    let at = |k: &str| if key.is_empty() { k.to_string() } else { format!("{key}.{k}") };
    match (a, b) {
        (Some(Value::Mapping(x)), Some(Value::Mapping(y))) => {
            let mut keys: Vec<&Value> = x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))).collect();
            keys.sort_by_key(|k| scalar(k));
            for k in keys {
                walk(x.get(k), y.get(k), at(&scalar(k)), out);
            }
        }
        (Some(Value::Sequence(x)), Some(Value::Sequence(y))) => {
            for i in 0..x.len().max(y.len()) {
                walk(x.get(i), y.get(i), format!("{key}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(Difference { key: if key.is_empty() { "(the whole policy)".into() } else { key }, here: a.map(render), there: b.map(render) }),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => render(other),
    }
}

/// A value on one line, cut short.
fn render(v: &Value) -> String {
    short(serde_yaml::to_string(v).unwrap_or_default().trim())
}

fn short(text: &str) -> String {
    let one: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let one = one.escape_debug().to_string();
    if one.chars().count() > 60 { format!("{}…", one.chars().take(60).collect::<String>()) } else { one }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(a: &str, b: &str) -> Vec<String> {
        differences(a, b).iter().map(|d| d.shown("beta")).collect()
    }

    #[test]
    fn the_same_policy_in_another_layout_agrees() {
        let a = "fileset: p\nretention: { replica: { last: 2 } }\nreplicas:\n  - node: beta\n    path: /b\n";
        let b = "replicas:\n- path: /b\n  node: beta\nretention:\n  replica:\n    last: 2\nfileset: p\n";
        assert!(diff(a, b).is_empty(), "{:?}", diff(a, b));
    }

    #[test]
    fn each_differing_key_is_named_with_both_values() {
        let a = "fileset: p\nmode: continuous\nretention: { replica: { last: 2 } }\nreplicas:\n  - node: beta\n    path: /b\n";
        let b = "fileset: p\nmode: snapshot\nretention: { replica: { last: 3 } }\nreplicas:\n  - node: beta\n    path: /c\n  - node: gamma\n    path: /g\n";
        let shown = diff(a, b);
        assert_eq!(
            shown,
            [
                "`mode` here `continuous`, on beta `snapshot`",
                "`replicas[0].path` here `/b`, on beta `/c`",
                "`replicas[1]` here absent, on beta `node: gamma path: /g`",
                "`retention.replica.last` here `2`, on beta `3`",
            ]
        );
    }

    #[test]
    fn a_peer_text_that_does_not_parse_differs_whole_and_is_escaped() {
        let shown = diff("fileset: p\n", "fileset: [\u{1b}[31m");
        assert_eq!(shown.len(), 1);
        assert!(shown[0].starts_with("`(the whole policy)`") && !shown[0].contains('\u{1b}'), "{shown:?}");
    }
}
