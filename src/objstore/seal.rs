//! Encryption at rest: everything snapship writes to an object store (stream parts,
//! manifests, upload records) is sealed here first with XChaCha20-Poly1305 under the key
//! named by the replica's `encryption_key`, so the store only ever holds ciphertext.
//!
//! A sealed blob is `version (1 byte) | nonce (24 bytes) | ciphertext and tag`. Each nonce is
//! drawn at random from the operating system (192 bits: no two seals share one, even when a
//! cut upload sends a part again). The associated data binds a blob to where it belongs (its
//! object key, and for a part its number), so a blob moved, swapped or replayed elsewhere is
//! refused like a changed one.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const VERSION: u8 = 1;
const NONCE: usize = 24;
/// What sealing adds to the plain bytes.
pub const OVERHEAD: usize = 1 + NONCE + 16;

/// The replica's key, read from its key file.
#[derive(Clone)]
pub struct SealKey(XChaCha20Poly1305);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// Reads a key file: 64 hex digits (whitespace around them ignored), readable by its
    /// owner only.
    pub fn load(path: &Path) -> Result<SealKey> {
        let meta = std::fs::metadata(path)
            .map_err(|e| anyhow!("cannot read the encryption key {}: {e}; make one with `openssl rand -hex 32 > {0}`", path.display()))?;
        if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
            bail!("the encryption key {} is readable by others; `chmod 600 {0}`", path.display());
        }
        let text = std::fs::read_to_string(path).map_err(|e| anyhow!("cannot read the encryption key {}: {e}", path.display()))?;
        Self::from_hex(text.trim()).map_err(|e| anyhow!("the encryption key {}: {e}", path.display()))
    }

    pub fn from_hex(hex: &str) -> Result<SealKey> {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("expected 64 hex digits (256 bits), like the output of `openssl rand -hex 32`");
        }
        let bytes: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex")).collect();
        Ok(SealKey(XChaCha20Poly1305::new_from_slice(&bytes).expect("32 bytes")))
    }

    /// Seals `plain`, bound to `context`.
    pub fn seal(&self, plain: &[u8], context: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self.0.encrypt(&nonce, Payload { msg: plain, aad: context }).expect("XChaCha20-Poly1305 seals any length we use");
        let mut out = Vec::with_capacity(1 + NONCE + sealed.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a blob sealed with [`seal`](Self::seal) for the same `context`; an error if it was
    /// changed, cut, moved or sealed under another key.
    pub fn open(&self, blob: &[u8], context: &[u8]) -> Result<Vec<u8>> {
        if blob.len() < OVERHEAD || blob[0] != VERSION {
            bail!("not a sealed snapship object (too short or unknown format)");
        }
        let nonce = XNonce::from_slice(&blob[1..1 + NONCE]);
        self.0
            .decrypt(nonce, Payload { msg: &blob[1 + NONCE..], aad: context })
            .map_err(|_| anyhow!("its authentication failed: the bytes in the store were changed, or sealed under another key"))
    }
}

/// The context of a stream's part `index` (0-based) in the object `key`.
pub fn part_context(key: &str, index: usize) -> Vec<u8> {
    let mut c = key.as_bytes().to_vec();
    c.extend_from_slice(b"#part");
    c.extend_from_slice(&(index as u64).to_be_bytes());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SealKey {
        SealKey::from_hex(&"ab".repeat(32)).unwrap()
    }

    #[test]
    fn sealed_bytes_open_only_unchanged_in_their_place() {
        let k = key();
        let plain = b"snapship marker: hello";
        let blob = k.seal(plain, b"a/part0");
        assert_eq!(blob.len(), plain.len() + OVERHEAD);
        assert!(!blob.windows(8).any(|w| w == b"snapship"), "no plaintext in the sealed blob");
        assert_eq!(k.open(&blob, b"a/part0").unwrap(), plain);
        // Moved to another place, changed, cut, or under another key: refused.
        assert!(k.open(&blob, b"a/part1").is_err());
        let mut changed = blob.clone();
        changed[30] ^= 1;
        assert!(k.open(&changed, b"a/part0").is_err());
        assert!(k.open(&blob[..blob.len() - 1], b"a/part0").is_err());
        assert!(SealKey::from_hex(&"cd".repeat(32)).unwrap().open(&blob, b"a/part0").is_err());
        // Two seals of the same bytes differ (fresh nonces).
        assert_ne!(k.seal(plain, b"a/part0"), blob);
    }

    #[test]
    fn keys_are_64_hex_digits() {
        assert!(SealKey::from_hex("abc").unwrap_err().to_string().contains("64 hex digits"));
        assert!(SealKey::from_hex(&"zz".repeat(32)).is_err());
        assert_ne!(part_context("k", 1), part_context("k", 2));
    }
}
