//! Confluence's encrypted editor tokens: a JWE in compact form (RFC 7516) wrapping the HS256
//! token, `alg` `RSA-OAEP-256`, `enc` `A256GCM`, `cty` `JWT`, encrypted to the public half of
//! `jwt.private.key`. Decrypting gives the inner token, which is then verified as any other.
//!
//! Only that one combination is accepted: a token naming another algorithm is refused by name,
//! before any key is used. Every failure of the cryptography itself (a key that does not fit,
//! a tampered header, ciphertext or tag) is one and the same error, so that a client learns
//! nothing from which step failed.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::{Oaep, RsaPrivateKey};
use serde::Deserialize;

/// The only key management algorithm accepted.
pub const ALG: &str = "RSA-OAEP-256";
/// The only content encryption accepted.
pub const ENC: &str = "A256GCM";
/// Largest encrypted token considered (a real one is about 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;

/// Why an encrypted token cannot be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum JweError {
    #[error("this service has no jwt.private.key to decrypt encrypted tokens with")]
    NoKey,
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Unsupported(String),
    /// Deliberately vague: see the module documentation.
    #[error("it does not decrypt with this service's key")]
    Undecryptable,
    #[error("too many encrypted tokens are being decrypted; try again")]
    Busy,
}

/// `jwt.private.key`, ready to decrypt.
#[derive(Clone)]
pub struct DecryptionKey {
    key: RsaPrivateKey,
}

impl std::fmt::Debug for DecryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptionKey").finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
    enc: Option<String>,
    cty: Option<String>,
    zip: Option<String>,
    crit: Option<serde_json::Value>,
}

fn b64(part: &str, what: &str) -> Result<Vec<u8>, JweError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JweError::Malformed(format!("its {what} is not base64url")))
}

/// Checks that header field `name` holds `accepted`.
fn only(name: &str, value: Option<&str>, accepted: &str) -> Result<(), JweError> {
    match value {
        Some(v) if v == accepted => Ok(()),
        Some(other) => Err(JweError::Unsupported(format!(
            "{name} {other:?} is not accepted, only {accepted}"
        ))),
        None => Err(JweError::Malformed(format!("its header has no {name}"))),
    }
}

/// Whether `token` has the shape of a compact JWE (five parts) rather than a JWS (three).
pub fn is_jwe(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 4
}

impl DecryptionKey {
    /// An RSA private key as Confluence keeps it (base64 of the PKCS#8 DER, as in
    /// `confluence.cfg.xml`), or PEM: `PRIVATE KEY` (PKCS#8) or `RSA PRIVATE KEY` (PKCS#1).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let key = if text.starts_with("-----BEGIN") {
            if text.contains("BEGIN RSA PRIVATE KEY") {
                RsaPrivateKey::from_pkcs1_pem(text).map_err(|e| format!("not an RSA key: {e}"))?
            } else if text.contains("BEGIN PRIVATE KEY") {
                RsaPrivateKey::from_pkcs8_pem(text)
                    .map_err(|e| format!("not an RSA PKCS#8 key: {e}"))?
            } else {
                return Err(
                    "expected a PEM 'PRIVATE KEY' (PKCS#8) or 'RSA PRIVATE KEY' (PKCS#1)".into(),
                );
            }
        } else {
            let compact: String = text.split_whitespace().collect();
            let der = base64::engine::general_purpose::STANDARD
                .decode(compact.as_bytes())
                .map_err(|e| format!("neither PEM nor base64: {e}"))?;
            RsaPrivateKey::from_pkcs8_der(&der)
                .or_else(|_| RsaPrivateKey::from_pkcs1_der(&der))
                .map_err(|e| format!("not an RSA private key in PKCS#8 or PKCS#1 DER: {e}"))?
        };
        if rsa::traits::PublicKeyParts::size(&key) < 256 {
            return Err("the RSA key is shorter than 2048 bits".into());
        }
        Ok(Self { key })
    }

    /// The inner token of the compact JWE `token`.
    pub fn decrypt(&self, token: &str) -> Result<String, JweError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JweError::Malformed(format!(
                "it is longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [header_b64, key_b64, iv_b64, ciphertext_b64, tag_b64] = parts[..] else {
            return Err(JweError::Malformed(
                "a JWE has five parts separated by dots".into(),
            ));
        };
        let header: Header = serde_json::from_slice(&b64(header_b64, "header")?)
            .map_err(|_| JweError::Malformed("its header is not a JSON object".into()))?;
        only("alg", header.alg.as_deref(), ALG)?;
        only("enc", header.enc.as_deref(), ENC)?;
        if let Some(cty) = &header.cty {
            if !cty.eq_ignore_ascii_case("JWT") {
                return Err(JweError::Unsupported(format!(
                    "cty {cty:?}: the content must be a JWT"
                )));
            }
        }
        if header.zip.is_some() {
            return Err(JweError::Unsupported(
                "compressed (zip) content is not accepted".into(),
            ));
        }
        if header.crit.is_some() {
            return Err(JweError::Unsupported(
                "critical header extensions are not understood".into(),
            ));
        }
        let encrypted_key = b64(key_b64, "encrypted key")?;
        let iv = b64(iv_b64, "initialization vector")?;
        let mut ciphertext = b64(ciphertext_b64, "ciphertext")?;
        let tag = b64(tag_b64, "authentication tag")?;
        if iv.len() != 12 {
            return Err(JweError::Malformed(
                "A256GCM needs a 96-bit initialization vector".into(),
            ));
        }
        if tag.len() != 16 {
            return Err(JweError::Malformed(
                "A256GCM needs a 128-bit authentication tag".into(),
            ));
        }
        // Blinded, so that the time taken says nothing about the key; and a key that does not
        // unwrap is replaced by a random one and the content decrypted anyway (RFC 7516 11.5),
        // so that the time taken says nothing about which step failed either.
        let mut rng = rsa::rand_core::OsRng;
        let unwrapped = self
            .key
            .decrypt_blinded(&mut rng, Oaep::new::<sha2::Sha256>(), &encrypted_key)
            .ok()
            .filter(|cek| cek.len() == 32);
        let cek = unwrapped.clone().unwrap_or_else(|| {
            let mut random = vec![0u8; 32];
            rsa::rand_core::RngCore::fill_bytes(&mut rng, &mut random);
            random
        });
        let cipher = Aes256Gcm::new_from_slice(&cek).map_err(|_| JweError::Undecryptable)?;
        ciphertext.extend_from_slice(&tag);
        let decrypted = cipher.decrypt(
            Nonce::from_slice(&iv),
            Payload {
                msg: &ciphertext,
                // RFC 7516 5.2: the additional data is the encoded protected header.
                aad: header_b64.as_bytes(),
            },
        );
        let plaintext = match (unwrapped, decrypted) {
            (Some(_), Ok(plaintext)) => plaintext,
            _ => return Err(JweError::Undecryptable),
        };
        String::from_utf8(plaintext)
            .map_err(|_| JweError::Malformed("its content is not text".into()))
    }
}
