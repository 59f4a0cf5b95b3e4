//! Encryption at rest (XChaCha20-Poly1305) and keyed hashing (HMAC-SHA256) for the store.
//!
//! From `CONFAB_DATA_KEY` one 32-byte master key is derived: 64 hex characters are the
//! key itself; anything else is a passphrase stretched with Argon2id (salt in
//! `meta/kdf_salt`). Sub-keys for sealing, index hashing and backups are HMACs of the
//! master key with fixed labels, so one never stands in for another.
//!
//! A sealed value is `CFE2` + 24-byte random nonce + ciphertext, with the tree name and
//! the row's key as associated data: a value moved to another row or tree does not open.
//! `CFE1` values (no associated data, unsalted SHA-256 passphrase key) are the format
//! before schema 2; they are read only while migrating.

use argon2::{Algorithm, Argon2, Block, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const TAG_V1: &[u8] = b"CFE1";
const TAG: &[u8] = b"CFE2";
const NONCE: usize = 24;
/// Length of the random salt for the passphrase KDF.
pub const SALT_LEN: usize = 16;
/// Sealed into `meta/key_check` so a wrong key is detected at open.
pub const CHECK: &[u8] = b"confab key check v1";
/// Sealed into `meta/key_check2` (schema 2).
pub const CHECK2: &[u8] = b"confab key check v2";

/// A value sealed by [`Keys::seal`].
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(TAG) && bytes.len() >= TAG.len() + NONCE + 16
}

/// A value sealed by the pre-schema-2 format.
pub fn is_sealed_v1(bytes: &[u8]) -> bool {
    bytes.starts_with(TAG_V1) && bytes.len() >= TAG_V1.len() + NONCE + 16
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = match <HmacSha256 as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    for p in parts {
        mac.update(&(p.len() as u64).to_be_bytes());
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The master key: a 64-hex key as is, a passphrase through Argon2id with `salt`.
fn master_key(secret: &str, salt: &[u8]) -> Result<[u8; 32], String> {
    let s = secret.trim();
    if let Some(k) = hex32(s) {
        return Ok(k);
    }
    let params = Params::new(
        Params::DEFAULT_M_COST,
        Params::DEFAULT_T_COST,
        Params::DEFAULT_P_COST,
        Some(32),
    )
    .map_err(|e| format!("argon2 parameters: {e}"))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let mut blocks = vec![Block::default(); argon.params().block_count()];
    let mut out = [0u8; 32];
    argon
        .hash_password_into_with_memory(s.as_bytes(), salt, &mut out, &mut blocks)
        .map_err(|e| format!("deriving the key from CONFAB_DATA_KEY: {e}"))?;
    Ok(out)
}

/// Every key the store uses, derived from `CONFAB_DATA_KEY`.
pub struct Keys {
    aead: XChaCha20Poly1305,
    index: [u8; 32],
    backup: [u8; 32],
}

impl Keys {
    /// Derives the keys; `salt` is the store's `meta/kdf_salt` (unused for a hex key).
    pub fn derive(secret: &str, salt: &[u8]) -> Result<Self, String> {
        let master = master_key(secret, salt)?;
        let seal = hmac(&master, &[b"confab seal v2"]);
        Ok(Self {
            aead: XChaCha20Poly1305::new((&seal).into()),
            index: hmac(&master, &[b"confab index v2"]),
            backup: hmac(&master, &[b"confab backup v2"]),
        })
    }

    /// Encrypts `plain` for row `key` of `tree`.
    pub fn seal(&self, tree: &str, key: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE];
        rand::rng().fill_bytes(&mut nonce);
        let aad = associated(tree, key);
        // Encryption with a valid key and nonce cannot fail for in-memory buffers.
        let ct = self
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(TAG.len() + NONCE + ct.len());
        out.extend_from_slice(TAG);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts a value sealed for row `key` of `tree`; anything else is an error.
    pub fn open(&self, tree: &str, key: &[u8], sealed: &[u8]) -> Result<Vec<u8>, String> {
        if !is_sealed(sealed) {
            return Err("not an encrypted value (plaintext in an encrypted store)".into());
        }
        let (nonce, ct) = sealed[TAG.len()..].split_at(NONCE);
        let aad = associated(tree, key);
        self.aead
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
            .map_err(|_| "cannot decrypt (wrong CONFAB_DATA_KEY, damaged or moved value)".into())
    }

    /// A keyed hash standing in for a personal value in a key (username, id, cache key):
    /// without the data key nobody can confirm a guess.
    pub fn index(&self, domain: &[u8], data: &[u8]) -> [u8; 32] {
        hmac(&self.index, &[domain, data])
    }

    /// The keyed hash of [`Keys::index`] on its own, for names outside the store
    /// (coordination's lease and limiter keys on Redis).
    pub fn index_key(&self) -> IndexKey {
        IndexKey { key: self.index }
    }

    /// The authenticator of backups of this store.
    pub fn backup_auth(&self) -> BackupAuth {
        BackupAuth { key: self.backup }
    }
}

fn associated(tree: &str, key: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(tree.len() + key.len() + 1);
    aad.extend_from_slice(tree.as_bytes());
    aad.push(0);
    aad.extend_from_slice(key);
    aad
}

/// The store's keyed id hash ([`Keys::index`]) without the sealing key: what
/// coordination needs to name its Redis keys without revealing ids.
#[derive(Clone)]
pub struct IndexKey {
    key: [u8; 32],
}

impl std::fmt::Debug for IndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IndexKey([REDACTED])")
    }
}

impl IndexKey {
    /// The same value as [`Keys::index`] of the keys it came from.
    pub fn hash(&self, domain: &[u8], data: &[u8]) -> [u8; 32] {
        hmac(&self.key, &[domain, data])
    }

    /// The first 16 bytes of [`IndexKey::hash`] in lowercase hex (a Redis key part).
    pub fn hex16(&self, domain: &[u8], data: &[u8]) -> String {
        self.hash(domain, data)[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// HMAC-SHA256 over a backup body, with a key derived from the data key.
#[derive(Clone)]
pub struct BackupAuth {
    key: [u8; 32],
}

impl std::fmt::Debug for BackupAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupAuth([REDACTED])")
    }
}

impl BackupAuth {
    /// An incremental MAC, for a backup written as a stream.
    pub fn start(&self) -> BackupMac {
        BackupMac {
            mac: <HmacSha256 as Mac>::new_from_slice(&self.key).ok(),
        }
    }

    pub fn mac(&self, body: &[u8]) -> [u8; 32] {
        let mut m = self.start();
        m.update(body);
        m.finish()
    }

    /// Constant-time check of `tag` against the MAC of `body`.
    pub fn verify(&self, body: &[u8], tag: &[u8]) -> bool {
        let mut m = self.start();
        m.update(body);
        m.verify(tag)
    }
}

/// See [`BackupAuth::start`].
pub struct BackupMac {
    mac: Option<HmacSha256>,
}

impl BackupMac {
    pub fn update(&mut self, bytes: &[u8]) {
        if let Some(m) = self.mac.as_mut() {
            m.update(bytes);
        }
    }

    pub fn finish(self) -> [u8; 32] {
        self.mac
            .map(|m| m.finalize().into_bytes().into())
            .unwrap_or([0; 32])
    }

    pub fn verify(self, tag: &[u8]) -> bool {
        self.mac.is_some_and(|m| m.verify_slice(tag).is_ok())
    }
}

/// A fresh random salt for [`Keys::derive`].
pub fn new_salt() -> [u8; SALT_LEN] {
    let mut salt = [0u8; SALT_LEN];
    rand::rng().fill_bytes(&mut salt);
    salt
}

/// The pre-schema-2 cipher (`CFE1`, key = hex or unsalted SHA-256), for migration only.
pub struct LegacyCipher {
    aead: XChaCha20Poly1305,
}

impl LegacyCipher {
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

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, String> {
        if !is_sealed_v1(sealed) {
            return Err("not a CFE1 value".into());
        }
        let (nonce, ct) = sealed[TAG_V1.len()..].split_at(NONCE);
        self.aead
            .decrypt(XNonce::from_slice(nonce), ct)
            .map_err(|_| "cannot decrypt (wrong CONFAB_DATA_KEY or damaged value)".to_string())
    }

    #[cfg(test)]
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let nonce = [7u8; NONCE];
        let ct = self
            .aead
            .encrypt(XNonce::from_slice(&nonce), plain)
            .unwrap_or_default();
        [TAG_V1, &nonce, &ct].concat()
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
        let salt = new_salt();
        let c = Keys::derive("correct horse battery staple", &salt).unwrap();
        let sealed = c.seal("turns", b"k", b"hello");
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
        assert_eq!(c.open("turns", b"k", &sealed).unwrap(), b"hello");
        let other = Keys::derive(&"ab".repeat(32), &salt).unwrap();
        assert!(other.open("turns", b"k", &sealed).is_err());
        // bound to its row and tree
        assert!(c.open("turns", b"other", &sealed).is_err());
        assert!(c.open("cache", b"k", &sealed).is_err());
        // plaintext is refused
        assert!(c.open("turns", b"k", b"{\"text\":\"hi\"}").is_err());
    }

    #[test]
    fn passphrases_are_salted_and_hex_keys_are_raw() {
        let a = Keys::derive("a passphrase", &[1; SALT_LEN]).unwrap();
        let b = Keys::derive("a passphrase", &[2; SALT_LEN]).unwrap();
        assert_ne!(a.index(b"d", b"x"), b.index(b"d", b"x"), "salt matters");
        let again = Keys::derive("a passphrase", &[1; SALT_LEN]).unwrap();
        assert_eq!(a.index(b"d", b"x"), again.index(b"d", b"x"));
        // not the old unsalted SHA-256 of the passphrase
        let sha: [u8; 32] = Sha256::digest(b"a passphrase").into();
        assert_ne!(master_key("a passphrase", &[1; SALT_LEN]).unwrap(), sha);
        let hex = "0f".repeat(32);
        assert_eq!(master_key(&hex, &[1; SALT_LEN]).unwrap(), [0x0f; 32]);
        assert_eq!(master_key(&hex, &[9; SALT_LEN]).unwrap(), [0x0f; 32]);
    }

    #[test]
    fn the_index_key_hashes_like_the_store_and_never_prints() {
        let k = Keys::derive(&"0f".repeat(32), &[0; SALT_LEN]).unwrap();
        let ik = k.index_key();
        assert_eq!(ik.hash(b"lease", b"x"), k.index(b"lease", b"x"));
        assert_eq!(ik.hex16(b"lease", b"x").len(), 32);
        assert_ne!(ik.hex16(b"lease", b"x"), ik.hex16(b"limit", b"x"));
        assert_eq!(format!("{ik:?}"), "IndexKey([REDACTED])");
    }

    #[test]
    fn backup_mac_detects_changes_and_other_keys() {
        let k = Keys::derive(&"0f".repeat(32), &[0; SALT_LEN]).unwrap();
        let auth = k.backup_auth();
        let tag = auth.mac(b"body");
        assert!(auth.verify(b"body", &tag));
        assert!(!auth.verify(b"bodz", &tag));
        let other = Keys::derive(&"0e".repeat(32), &[0; SALT_LEN]).unwrap();
        assert!(!other.backup_auth().verify(b"body", &tag));
        let mut inc = auth.start();
        inc.update(b"bo");
        inc.update(b"dy");
        assert_eq!(inc.finish(), tag);
        assert_eq!(format!("{auth:?}"), "BackupAuth([REDACTED])");
    }

    #[test]
    fn legacy_values_open_with_the_legacy_cipher() {
        let l = LegacyCipher::from_secret("pass");
        let v = l.seal(b"old");
        assert!(is_sealed_v1(&v) && !is_sealed(&v));
        assert_eq!(l.open(&v).unwrap(), b"old");
    }
}
