//! A `peers:` entry of the node config: how to reach one other node, and whether the bulk of
//! transfers with it may go over the LAN path (authenticated and integrity-checked TCP, not
//! encrypted; docs/configuration.md, "The LAN path").
//!
//! ```yaml
//! peers:
//!   gamma: gamma.example.net:7441                       # plain HOST:PORT
//!   beta: { address: backup.lan:7441, encryption: off } # a mapping
//! ```

use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

/// One entry under `peers:`, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    /// `HOST:PORT` of the peer's QUIC `listen:` address (checked by the node config's loader).
    pub address: String,
    /// `encryption: off`: this node allows the LAN path with that peer. The path is used only
    /// when both nodes mark each other so.
    pub lan: bool,
    /// Written as a mapping (errors about the address then point at `address:`).
    pub mapping: bool,
}

/// `encryption:` of a peer mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Encryption {
    /// Everything over QUIC with TLS (the default).
    On,
    /// The control conversation over QUIC with TLS, the stream over the LAN path.
    Off,
}

/// The mapping form.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerMapping {
    address: String,
    #[serde(default = "encryption_on")]
    encryption: Encryption,
}

fn encryption_on() -> Encryption {
    Encryption::On
}

impl<'de> Deserialize<'de> for PeerEntry {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> Visitor<'de> for Entry {
            type Value = PeerEntry;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("HOST:PORT, or a mapping like { address: HOST:PORT, encryption: off }")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PeerEntry, E> {
                Ok(PeerEntry { address: v.to_string(), lan: false, mapping: false })
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PeerEntry, A::Error> {
                let m = PeerMapping::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(PeerEntry { address: m.address, lan: m.encryption == Encryption::Off, mapping: true })
            }
        }
        d.deserialize_any(Entry)
    }
}
