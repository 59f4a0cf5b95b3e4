//! Encryption at rest of message text (XChaCha20-Poly1305). A sealed value is
//! `CFE1` + 24-byte random nonce + ciphertext; plaintext values stay readable so a store
//! can start encrypting without a migration.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

const TAG: &[u8] = b"CFE1";
const NONCE: usize = 24;
/// Sealed into `meta/key_check` so a wrong key is detected at open.
pub const CHECK: &[u8] = b"confab key check v1";

pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(TAG) && bytes.len() >= TAG.len() + NONCE + 16
}

pub struct Cipher {
    aead: XChaCha20Poly1305,
}

impl Cipher {
    /// 64 hex characters are used as the 32-byte key; anything else is hashed (SHA-256)
    /// into one, so a passphrase works too.
    pub fn from_secret(secret: &str) -> Self {
        let s = secret.trim();
        let key: [u8; 32] = match hex32(s) {
            Some(k) => k,
            None => Sha256::digest(s.as_bytes()).into(),
        };
        Self {
            aead: XChaCha20Poly1305::new((&key).into()),
        }
    }

    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE];
        rand::rng().fill_bytes(&mut nonce);
        // Encryption with a valid key and nonce cannot fail for in-memory buffers.
        let ct = self
            .aead
            .encrypt(XNonce::from_slice(&nonce), plain)
            .unwrap_or_default();
        let mut out = Vec::with_capacity(TAG.len() + NONCE + ct.len());
        out.extend_from_slice(TAG);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, String> {
        if !is_sealed(sealed) {
            return Err("not an encrypted value".into());
        }
        let (nonce, ct) = sealed[TAG.len()..].split_at(NONCE);
        self.aead
            .decrypt(XNonce::from_slice(nonce), ct)
            .map_err(|_| "cannot decrypt (wrong CONFAB_DATA_KEY or damaged value)".to_string())
    }
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_wrong_key() {
        let c = Cipher::from_secret("correct horse battery staple");
        let sealed = c.seal(b"hello");
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
        assert_eq!(c.open(&sealed).unwrap(), b"hello");
        let other = Cipher::from_secret(&"ab".repeat(32));
        assert!(other.open(&sealed).is_err());
    }
}
