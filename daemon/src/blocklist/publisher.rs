//! This host as a list publisher: a minisign key pair made at first start, so other hosts can
//! sync this host's full list over plain `http://` and still know it came from here.
//!
//! The public API signs the identity bytes of each version's full list once
//! (`/api/v1/blocklist.minisig`); a subscriber pins the public key (`blocklist status` →
//! `publisher_key`) as its source's `minisign_key`. The secret key never leaves the state
//! directory (0600) and is not encrypted: the daemon signs unattended, and whoever can read the
//! state directory already controls the list itself.

use std::{io::Read, path::Path};

use minisign::{KeyPair, PublicKey, SecretKey, SecretKeyBox};
use tracing::{error, info};

use crate::{error::Error, store};

const KEY_FILE: &str = "blocklist-publisher.key";

/// The publisher key pair of this installation.
pub struct Publisher {
    public: PublicKey,
    secret: SecretKey,
}

impl Publisher {
    /// Loads the key from the state directory, or makes and writes one. A file that does not
    /// hold a key is moved aside (the error names it) and a new key is made: subscribers
    /// pinned to the old key then refuse this host's list until they are given the new one,
    /// which is the safe way to fail.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, Error> {
        let path = state_dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => match Self::parse(&text) {
                Some(publisher) => return Ok(publisher),
                None => {
                    let moved = store::set_aside(&path)?;
                    error!(
                        module = "blocklist",
                        file = %path.display(),
                        moved_to = %moved.display(),
                        "the list publisher key does not parse: moved aside, a new key is made \
                         (hosts syncing this list need the new publisher_key)"
                    );
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
        let pair = KeyPair::generate_unencrypted_keypair().map_err(|e| key_error(&path, e))?;
        let boxed = pair
            .sk
            .to_box(Some("phantom blocklist publisher"))
            .map_err(|e| key_error(&path, e))?;
        store::write_atomic(&path, boxed.to_string().as_bytes())?;
        info!(path = %path.display(), "list publisher key made for this installation");
        Ok(Self {
            public: pair.pk,
            secret: pair.sk,
        })
    }

    fn parse(text: &str) -> Option<Self> {
        let secret = SecretKeyBox::from_string(text)
            .ok()?
            .into_unencrypted_secret_key()
            .ok()?;
        let public = PublicKey::from_secret_key(&secret).ok()?;
        Some(Self { public, secret })
    }

    /// The public key as a subscriber writes it in `minisign_key` (the `RW...` line of a
    /// `minisign.pub`).
    pub fn public_key(&self) -> String {
        self.public.to_base64()
    }

    /// The minisign signature (the text of a `.minisig` file) of `data`, list version
    /// `version` named in the trusted comment.
    pub fn sign(&self, data: impl Read, version: u64) -> Result<String, minisign::PError> {
        let trusted = format!("phantom blocklist version {version}");
        minisign::sign(
            Some(&self.public),
            &self.secret,
            data,
            Some(&trusted),
            Some("signature from a phantom list publisher"),
        )
        .map(|signature| signature.into_string())
    }
}

fn key_error(path: &Path, e: minisign::PError) -> Error {
    Error::io(path, std::io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_key_is_made_once_kept_and_signs_what_minisign_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let first = Publisher::load_or_create(dir.path()).unwrap();
        let again = Publisher::load_or_create(dir.path()).unwrap();
        assert_eq!(first.public_key(), again.public_key());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let data = b"{\"entries\":[]}".as_slice();
        let text = again.sign(data, 7).unwrap();
        let signature = minisign::SignatureBox::from_string(&text).unwrap();
        assert_eq!(
            signature.trusted_comment().unwrap(),
            "phantom blocklist version 7"
        );
        let key = PublicKey::from_base64(&first.public_key()).unwrap();
        minisign::verify(
            &key,
            &signature,
            std::io::Cursor::new(data),
            true,
            false,
            false,
        )
        .unwrap();
        let tampered = b"{\"entries\":[1]}".as_slice();
        assert!(
            minisign::verify(
                &key,
                &signature,
                std::io::Cursor::new(tampered),
                true,
                false,
                false
            )
            .is_err()
        );
    }

    #[test]
    fn a_damaged_key_file_is_set_aside_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::write(&path, "not a key").unwrap();
        let publisher = Publisher::load_or_create(dir.path()).unwrap();
        assert!(!publisher.public_key().is_empty());
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(
            std::fs::read_to_string(aside[0].path()).unwrap(),
            "not a key"
        );
    }
}
