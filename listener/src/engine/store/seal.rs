//! Credentials at rest in a shared store: sealed with ChaCha20-Poly1305 (a random 96-bit nonce
//! per write, the mailbox id as associated data so a blob cannot be moved to another mailbox,
//! a format byte and the sealing key's id in front, so a replica given another key says which
//! key it lacks), and fingerprinted with a keyed HMAC-SHA256 so the store can tell "the same
//! credentials again" without holding anything a password could be guessed from.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::creatio::contract::Credentials;

/// The format byte of a blob sealed without its key's id (read, no longer written).
const SEALED_V1: u8 = 1;
/// The format byte of a blob sealed with its key's id after it.
const SEALED_V2: u8 = 2;
/// The key-id byte of credentials kept in plain text (`--insecure-plaintext-credentials`).
const PLAIN: u8 = 0;

/// Why credentials could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the secret key must be 32 bytes, base64-encoded: {0}")]
    BadKey(String),
    #[error("stored credentials could not be opened (another key, or damaged)")]
    Open,
    #[error("stored credentials are sealed but this listener has no secret key")]
    NoKey,
    #[error(
        "stored credentials were sealed with key {sealed_with}, and this replica's key is {ours}: the replicas were given different secret keys, or the key changed (under GitOps, create the Secret yourself and name it with secretKey.existingSecret); the mailbox is served again once a replica with key {sealed_with} takes it, or when Creatio sends its credentials anew"
    )]
    OtherKey { sealed_with: String, ours: String },
}

/// A key's id: the first four bytes of an HMAC of a fixed text under it, in hex. It tells keys
/// apart and says nothing of the key.
fn key_id(key: &[u8; 32]) -> [u8; 4] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(b"exchange-listener sealing key id");
    let tag = mac.finalize().into_bytes();
    [tag[0], tag[1], tag[2], tag[3]]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seals and opens one deployment's credentials.
#[derive(Clone)]
pub struct Sealer {
    /// `None`: plain text, by the administrator's explicit choice.
    key: Option<[u8; 32]>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = if self.key.is_some() {
            "sealed"
        } else {
            "plaintext"
        };
        f.debug_struct("Sealer").field("mode", &mode).finish()
    }
}

impl Sealer {
    /// Seals with this key: 32 bytes, base64-encoded.
    pub fn from_base64(key: &str) -> Result<Sealer, SealError> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|e| SealError::BadKey(e.to_string()))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| SealError::BadKey(format!("{} bytes", b.len())))?;
        Ok(Sealer { key: Some(key) })
    }

    /// Keeps credentials in plain text.
    pub fn plaintext() -> Sealer {
        Sealer { key: None }
    }

    /// The sealing key's id, as errors and the start-up log name it.
    pub fn key_id(&self) -> Option<String> {
        self.key.as_ref().map(|k| hex(&key_id(k)))
    }

    pub fn seal(&self, creds: &Credentials) -> Vec<u8> {
        let plain = serde_json::to_vec(creds).unwrap_or_default();
        match &self.key {
            None => [&[PLAIN][..], &plain].concat(),
            Some(key) => {
                let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
                let mut nonce = [0u8; 12];
                fill_random(&mut nonce);
                let sealed = cipher
                    .encrypt(
                        Nonce::from_slice(&nonce),
                        Payload {
                            msg: &plain,
                            aad: creds.id.as_bytes(),
                        },
                    )
                    .unwrap_or_default();
                [&[SEALED_V2][..], &key_id(key), &nonce, &sealed].concat()
            }
        }
    }

    /// Opens what [`Sealer::seal`] made for mailbox `id`.
    pub fn open(&self, id: &str, blob: &[u8]) -> Result<Credentials, SealError> {
        let plain = match blob.split_first() {
            Some((&PLAIN, rest)) => rest.to_vec(),
            Some((&SEALED_V1, rest)) => self.decrypt(id, rest)?,
            Some((&SEALED_V2, rest)) if rest.len() > 4 => {
                let (their_id, rest) = rest.split_at(4);
                let ours = key_id(self.key.as_ref().ok_or(SealError::NoKey)?);
                if their_id != ours {
                    return Err(SealError::OtherKey {
                        sealed_with: hex(their_id),
                        ours: hex(&ours),
                    });
                }
                self.decrypt(id, rest)?
            }
            _ => return Err(SealError::Open),
        };
        let creds: Credentials = serde_json::from_slice(&plain).map_err(|_| SealError::Open)?;
        if creds.id != id {
            return Err(SealError::Open);
        }
        Ok(creds)
    }

    /// The text of `<nonce><sealed>` for mailbox `id`.
    fn decrypt(&self, id: &str, nonce_and_sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if nonce_and_sealed.len() <= 12 {
            return Err(SealError::Open);
        }
        let key = self.key.as_ref().ok_or(SealError::NoKey)?;
        let (nonce, sealed) = nonce_and_sealed.split_at(12);
        ChaCha20Poly1305::new(Key::from_slice(key))
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| SealError::Open)
    }

    /// A fingerprint of the credentials: equal for equal credentials, and without the key
    /// nothing can be learnt from it. `Context` is left out: Creatio sends a new one with
    /// each call (`UserRequested`), which is no reason to restart a mailbox.
    pub fn fingerprint(&self, creds: &Credentials) -> String {
        let key = self.key.unwrap_or([0u8; 32]);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key");
        mac.update(&serde_json::to_vec(&creds.without_context()).unwrap_or_default());
        let tag = mac.finalize().into_bytes();
        tag.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Random bytes from the operating system.
fn fill_random(out: &mut [u8]) {
    use chacha20poly1305::aead::OsRng;
    use chacha20poly1305::aead::rand_core::RngCore as _;
    OsRng.fill_bytes(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creatio::contract::parse_credentials_list;

    fn creds(id: &str, password: &str) -> Credentials {
        let body = serde_json::json!([{
            "Id": id, "SenderEmailAddress": "a@contoso.com", "Password": password,
            "AccessToken": "tok", "ServiceUrl": "mail.contoso.com", "Context": "{UserRequested:true}",
            "BpmEndpoint": "https://creatio.contoso.com/0/x/NewEmail",
        }]);
        parse_credentials_list(body.to_string().as_bytes())
            .unwrap()
            .remove(0)
    }

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn sealed_credentials_open_only_for_their_mailbox_and_key() {
        let sealer = Sealer::from_base64(KEY).unwrap();
        let c = creds("m1", "Zebra-Pa55");
        let blob = sealer.seal(&c);
        assert!(
            !blob.windows(5).any(|w| w == b"Zebra"),
            "the password is not in the blob"
        );
        assert_ne!(blob, sealer.seal(&c), "a fresh nonce each time");
        assert_eq!(sealer.open("m1", &blob).unwrap(), c);
        assert_eq!(sealer.open("m2", &blob), Err(SealError::Open));
        let other =
            Sealer::from_base64(&"A".repeat(43).chars().chain(['=']).collect::<String>()).unwrap();
        // Another key is named, with this replica's, and neither key is in the words.
        let err = other.open("m1", &blob).unwrap_err();
        assert_eq!(
            err,
            SealError::OtherKey {
                sealed_with: sealer.key_id().unwrap(),
                ours: other.key_id().unwrap()
            }
        );
        assert_eq!(sealer.key_id().unwrap().len(), 8);
        assert_ne!(sealer.key_id(), other.key_id());
        assert!(
            err.to_string().contains("secretKey.existingSecret"),
            "{err}"
        );
        assert_eq!(Sealer::plaintext().open("m1", &blob), Err(SealError::NoKey));
        let mut damaged = blob.clone();
        *damaged.last_mut().unwrap() ^= 1;
        assert_eq!(sealer.open("m1", &damaged), Err(SealError::Open));
    }

    #[test]
    fn credentials_sealed_before_key_ids_still_open() {
        let sealer = Sealer::from_base64(KEY).unwrap();
        let c = creds("m1", "pw");
        // The earlier form: the format byte, the nonce, the sealed text.
        let v2 = sealer.seal(&c);
        let v1 = [&[SEALED_V1][..], &v2[5..]].concat();
        assert_eq!(sealer.open("m1", &v1).unwrap(), c);
    }

    #[test]
    fn plaintext_mode_round_trips() {
        let sealer = Sealer::plaintext();
        let c = creds("m1", "pw");
        assert_eq!(sealer.open("m1", &sealer.seal(&c)).unwrap(), c);
    }

    #[test]
    fn fingerprints_tell_equal_credentials_without_revealing_them() {
        let sealer = Sealer::from_base64(KEY).unwrap();
        let f = sealer.fingerprint(&creds("m1", "Zebra-Pa55"));
        assert_eq!(f, sealer.fingerprint(&creds("m1", "Zebra-Pa55")));
        assert_ne!(f, sealer.fingerprint(&creds("m1", "Zebra-Pa56")));
        let mut other_context = creds("m1", "Zebra-Pa55");
        other_context.context = Some("{UserRequested:false}".into());
        assert_eq!(f, sealer.fingerprint(&other_context));
        assert_ne!(
            f,
            Sealer::plaintext().fingerprint(&creds("m1", "Zebra-Pa55"))
        );
        assert_eq!(f.len(), 64);
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(matches!(
            Sealer::from_base64("c2hvcnQ="),
            Err(SealError::BadKey(_))
        ));
        assert!(matches!(
            Sealer::from_base64("not base64!"),
            Err(SealError::BadKey(_))
        ));
    }
}
