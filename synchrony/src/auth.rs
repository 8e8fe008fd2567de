//! Tokens: who may do what to which document.
//!
//! Synchrony's model with Yjs semantics. A token is a JWT whose `iss` names a registered app
//! (HS256 with that app's secret) or which is signed with a statically configured key (an HS256
//! secret, or an RS256/EdDSA public key). Its `access` claim maps `/data/<docId>` (or a prefix
//! ending in `*`) to `full` or `read`, or is `{"admin":"admin"}` for host operations.
//!
//! A token may come encrypted, as Confluence sends it: a JWE wrapping the JWT, decrypted with
//! `jwt.private.key` first (`crate::jwe`).
//!
//! Verification is pure: keys come in as arguments and the clock is a parameter, so every rule
//! is unit-tested without I/O.

use std::collections::HashMap;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use synchrony_protocol::DocId;

/// What a principal may do with one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    Read,
    Full,
}

/// A document pattern from the `access` claim.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn matches(&self, doc: &DocId) -> bool {
        match self {
            Pattern::Exact(id) => id == doc.as_str(),
            Pattern::Prefix(prefix) => doc.as_str().starts_with(prefix.as_str()),
        }
    }
}

/// Who is asking, after verification.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub subject: Option<String>,
    pub issuer: Option<String>,
    admin: bool,
    grants: Vec<(Pattern, Access)>,
    /// Unix seconds; sessions are closed with 4401 then.
    pub expires_at: Option<u64>,
    /// The `session` claim (name, fullname, avatarURL), for presence.
    pub session: Option<serde_json::Value>,
}

impl Principal {
    /// Everything allowed: used when the engine runs without auth (loopback development only).
    pub fn open() -> Self {
        Self {
            subject: None,
            issuer: None,
            admin: true,
            grants: Vec::new(),
            expires_at: None,
            session: None,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.admin
    }

    /// The strongest access any grant gives to `doc` (admins have full access everywhere).
    pub fn access_to(&self, doc: &DocId) -> Option<Access> {
        if self.admin {
            return Some(Access::Full);
        }
        self.grants
            .iter()
            .filter(|(p, _)| p.matches(doc))
            .map(|(_, a)| *a)
            .max()
    }
}

/// Why a token was refused. `kind` is the Synchrony-style error type clients see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: pass it as ?token=, Authorization: Bearer or x-token")]
    Missing,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token signature does not verify")]
    InvalidSignature,
    #[error("token issuer {0:?} is not a registered app and no static key accepts it")]
    UnknownIssuer(String),
    #[error("token audience is not one of this service's URLs")]
    InvalidAudience,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token does not grant this access")]
    Forbidden,
    #[error("encrypted token (JWE) refused: {0}")]
    Encrypted(#[from] crate::jwe::JweError),
}

impl AuthError {
    pub fn kind(&self) -> &'static str {
        match self {
            AuthError::Missing => "jwt/missing",
            AuthError::Malformed(_) => "jwt/malformed",
            AuthError::InvalidSignature => "jwt/invalid-signature",
            AuthError::UnknownIssuer(_) => "jwt/unknown-iss",
            AuthError::InvalidAudience => "jwt/invalid-aud",
            AuthError::Expired => "jwt/expired",
            AuthError::NotYetValid => "jwt/not-yet-valid",
            AuthError::Forbidden => "forbidden",
            AuthError::Encrypted(_) => "jwt/undecryptable",
        }
    }

    /// 401 for "who are you?", 403 for "not allowed".
    pub fn is_forbidden(&self) -> bool {
        matches!(self, AuthError::Forbidden)
    }
}

/// A configured public key, from PEM or Synchrony's base64 X.509 (`jwt.public.key`) form.
#[derive(Clone)]
pub struct PublicKey {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
    /// The key as base64 X.509 (SubjectPublicKeyInfo DER), served by `GET {ctx}/jwt-key`.
    pub x509_base64: String,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

impl PublicKey {
    /// Parses a PEM `PUBLIC KEY`, or bare base64 of the same DER. RSA keys verify RS256,
    /// Ed25519 keys verify EdDSA.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let der_b64: String = if text.starts_with("-----BEGIN") {
            if !text.contains("BEGIN PUBLIC KEY") {
                return Err("expected a PEM 'PUBLIC KEY' (SubjectPublicKeyInfo)".into());
            }
            text.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>()
        } else {
            text.split_whitespace().collect()
        };
        let der = base64::engine::general_purpose::STANDARD
            .decode(der_b64.as_bytes())
            .map_err(|e| format!("not base64: {e}"))?;
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(&der)
        );
        let (key, algorithms) = if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
            (key, vec![Algorithm::RS256])
        } else if let Ok(key) = DecodingKey::from_ed_pem(pem.as_bytes()) {
            (key, vec![Algorithm::EdDSA])
        } else {
            return Err("neither an RSA nor an Ed25519 public key".into());
        };
        Ok(Self {
            key,
            algorithms,
            x509_base64: base64::engine::general_purpose::STANDARD.encode(&der),
        })
    }
}

/// Static verification settings.
#[derive(Clone, Debug, Default)]
pub struct Verifier {
    /// Accepted `aud` values; empty means audiences are not checked.
    pub audiences: Vec<String>,
    /// HS256 secret from configuration, for tokens of no registered app.
    pub static_secret: Option<String>,
    pub public_key: Option<PublicKey>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, seconds.
    pub leeway_secs: u64,
}

#[derive(Deserialize)]
struct Peek {
    iss: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
    iat: Option<u64>,
    #[serde(default)]
    access: HashMap<String, String>,
    session: Option<serde_json::Value>,
}

impl Verifier {
    /// Audiences for the configured service URLs: each URL without a trailing `/v1`, and with it
    /// (Synchrony's tokens carry `<service url>/v1`). Returns the URLs that had the common
    /// mistake of ending in `/v1`, for a warning.
    pub fn audiences_for(service_urls: &[String]) -> (Vec<String>, Vec<String>) {
        let mut audiences = Vec::new();
        let mut mistaken = Vec::new();
        for url in service_urls {
            let url = url.trim().trim_end_matches('/');
            if url.is_empty() {
                continue;
            }
            let base = match url.strip_suffix("/v1") {
                Some(base) => {
                    mistaken.push(url.to_owned());
                    base
                }
                None => url,
            };
            audiences.push(base.to_owned());
            audiences.push(format!("{base}/v1"));
        }
        (audiences, mistaken)
    }

    /// Whether any static key is configured.
    pub fn has_static_key(&self) -> bool {
        self.static_secret.is_some() || self.public_key.is_some()
    }

    /// The issuer a token claims, read before verification to pick the key.
    pub fn issuer_of(token: &str) -> Result<Option<String>, AuthError> {
        let payload = token
            .split('.')
            .nth(1)
            .ok_or_else(|| AuthError::Malformed("not a JWS (header.payload.signature)".into()))?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|_| AuthError::Malformed("payload is not base64url".into()))?;
        let peek: Peek = serde_json::from_slice(&bytes)
            .map_err(|_| AuthError::Malformed("payload is not a JSON object".into()))?;
        Ok(peek.iss)
    }

    /// Verifies `token` at time `now` (Unix seconds). `app_secret` is the secret of the app named
    /// by the token's `iss`, if that app is registered.
    pub fn verify(
        &self,
        token: &str,
        app_secret: Option<&str>,
        now: u64,
    ) -> Result<Principal, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        let issuer = Self::issuer_of(token)?;
        let (key, algorithms) = match header.alg {
            Algorithm::HS256 => match (app_secret, self.static_secret.as_deref()) {
                (Some(secret), _) | (None, Some(secret)) => (
                    DecodingKey::from_secret(secret.as_bytes()),
                    vec![Algorithm::HS256],
                ),
                (None, None) => return Err(AuthError::UnknownIssuer(issuer.unwrap_or_default())),
            },
            alg => match &self.public_key {
                Some(pk) if pk.algorithms.contains(&alg) => (pk.key.clone(), pk.algorithms.clone()),
                _ => return Err(AuthError::UnknownIssuer(issuer.unwrap_or_default())),
            },
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        // Times are checked below against the injected clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
            validation.required_spec_claims.insert("aud".to_owned());
        }
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => AuthError::InvalidSignature,
                ErrorKind::InvalidAudience | ErrorKind::MissingRequiredClaim(_) => {
                    AuthError::InvalidAudience
                }
                ErrorKind::InvalidAlgorithm => AuthError::InvalidSignature,
                _ => AuthError::Malformed(e.to_string()),
            }
        })?;
        let claims = data.claims;
        let exp = claims
            .exp
            .ok_or_else(|| AuthError::Malformed("no exp claim".into()))?;
        if now > exp.saturating_add(self.leeway_secs) {
            return Err(AuthError::Expired);
        }
        let not_before = claims.nbf.into_iter().chain(claims.iat).max();
        if not_before.is_some_and(|nbf| nbf > now.saturating_add(self.leeway_secs)) {
            return Err(AuthError::NotYetValid);
        }
        let mut admin = false;
        let mut grants = Vec::new();
        for (key, value) in claims.access {
            if key == "admin" {
                if value != "admin" {
                    return Err(AuthError::Malformed(format!(
                        "access.admin must be \"admin\", not {value:?}"
                    )));
                }
                admin = true;
                continue;
            }
            let Some(target) = key.strip_prefix("/data/") else {
                return Err(AuthError::Malformed(format!(
                    "access key {key:?} is neither \"admin\" nor /data/…"
                )));
            };
            let access = match value.as_str() {
                "full" | "admin" => Access::Full,
                "read" => Access::Read,
                other => {
                    return Err(AuthError::Malformed(format!(
                        "access {other:?} is not full or read"
                    )))
                }
            };
            let pattern = match target.strip_suffix('*') {
                Some(prefix) => Pattern::Prefix(prefix.to_owned()),
                None => Pattern::Exact(target.to_owned()),
            };
            grants.push((pattern, access));
        }
        Ok(Principal {
            subject: claims.sub,
            issuer: claims.iss,
            admin,
            grants,
            expires_at: Some(exp.saturating_add(self.leeway_secs)),
            session: claims.session,
        })
    }
}

/// Claims for minting a token (`synchrony token`, tests, host libraries).
#[derive(Debug, Clone, serde::Serialize)]
pub struct MintClaims {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    pub iat: u64,
    pub exp: u64,
    pub access: HashMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<serde_json::Value>,
}

/// Signs `claims` with an HS256 secret.
pub fn mint_hs256(claims: &MintClaims, secret: &str) -> Result<String, String> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

/// Signs `claims` with a PEM private key (RSA → RS256, Ed25519 → EdDSA).
pub fn mint_with_private_key(claims: &MintClaims, pem: &str) -> Result<String, String> {
    use jsonwebtoken::{EncodingKey, Header};
    let (key, alg) = if let Ok(k) = EncodingKey::from_rsa_pem(pem.as_bytes()) {
        (k, Algorithm::RS256)
    } else if let Ok(k) = EncodingKey::from_ed_pem(pem.as_bytes()) {
        (k, Algorithm::EdDSA)
    } else {
        return Err("the private key is neither an RSA nor an Ed25519 PEM key".into());
    };
    jsonwebtoken::encode(&Header::new(alg), claims, &key).map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const AUD: &str = "https://wiki.example.com/synchrony/v1";

    fn claims(access: &[(&str, &str)]) -> MintClaims {
        MintClaims {
            iss: Some("confluence".into()),
            aud: Some(AUD.into()),
            sub: Some("alice".into()),
            iat: NOW - 10,
            exp: NOW + 300,
            access: access
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            session: Some(serde_json::json!({"name": "alice", "fullname": "Alice A."})),
        }
    }

    fn verifier() -> Verifier {
        let (audiences, _) =
            Verifier::audiences_for(&["https://wiki.example.com/synchrony".into()]);
        Verifier {
            audiences,
            leeway_secs: 30,
            ..Verifier::default()
        }
    }

    fn doc(id: &str) -> DocId {
        DocId::parse(id).unwrap()
    }

    #[test]
    fn app_tokens_grant_what_their_access_claim_says() {
        let token = mint_hs256(
            &claims(&[("/data/app/page-1", "full"), ("/data/app/space-*", "read")]),
            "s3cret-s3cret",
        )
        .unwrap();
        let p = verifier()
            .verify(&token, Some("s3cret-s3cret"), NOW)
            .unwrap();
        assert_eq!(p.subject.as_deref(), Some("alice"));
        assert_eq!(p.access_to(&doc("app/page-1")), Some(Access::Full));
        assert_eq!(p.access_to(&doc("app/space-9/x")), Some(Access::Read));
        assert_eq!(p.access_to(&doc("app/page-2")), None);
        assert!(!p.is_admin());
        assert_eq!(p.session.unwrap()["name"], "alice");
        let admin = mint_hs256(&claims(&[("admin", "admin")]), "k").unwrap();
        assert!(verifier()
            .verify(&admin, Some("k"), NOW)
            .unwrap()
            .is_admin());
    }

    #[test]
    fn the_error_matrix() {
        let v = verifier();
        let good = claims(&[("/data/a", "full")]);
        let token = mint_hs256(&good, "right").unwrap();
        assert_eq!(
            v.verify(&token, Some("wrong"), NOW),
            Err(AuthError::InvalidSignature)
        );
        assert_eq!(
            v.verify(&token, None, NOW).unwrap_err().kind(),
            "jwt/unknown-iss"
        );
        assert_eq!(
            v.verify("garbage", Some("right"), NOW).unwrap_err().kind(),
            "jwt/malformed"
        );
        assert_eq!(
            v.verify(&token, Some("right"), NOW + 300 + 31),
            Err(AuthError::Expired)
        );
        assert!(
            v.verify(&token, Some("right"), NOW + 300 + 29).is_ok(),
            "leeway"
        );
        assert_eq!(
            v.verify(&token, Some("right"), NOW - 100),
            Err(AuthError::NotYetValid)
        );
        let mut wrong_aud = good.clone();
        wrong_aud.aud = Some("https://evil.example.com/synchrony/v1".into());
        let t = mint_hs256(&wrong_aud, "right").unwrap();
        assert_eq!(
            v.verify(&t, Some("right"), NOW),
            Err(AuthError::InvalidAudience)
        );
        let mut no_aud = good.clone();
        no_aud.aud = None;
        let t = mint_hs256(&no_aud, "right").unwrap();
        assert_eq!(
            v.verify(&t, Some("right"), NOW),
            Err(AuthError::InvalidAudience)
        );
        let bad_access = mint_hs256(&claims(&[("/data/a", "write")]), "right").unwrap();
        assert_eq!(
            v.verify(&bad_access, Some("right"), NOW)
                .unwrap_err()
                .kind(),
            "jwt/malformed"
        );
        let bad_key = mint_hs256(&claims(&[("/wiki/a", "full")]), "right").unwrap();
        assert_eq!(
            v.verify(&bad_key, Some("right"), NOW).unwrap_err().kind(),
            "jwt/malformed"
        );
    }

    #[test]
    fn static_secret_and_audience_forms() {
        let (audiences, mistaken) = Verifier::audiences_for(&[
            "https://a.example/synchrony/v1/".into(),
            " https://b.example/synchrony ".into(),
        ]);
        assert_eq!(mistaken, vec!["https://a.example/synchrony/v1".to_owned()]);
        assert!(audiences.contains(&"https://a.example/synchrony/v1".to_owned()));
        assert!(audiences.contains(&"https://b.example/synchrony".to_owned()));
        let v = Verifier {
            audiences,
            static_secret: Some("static".into()),
            leeway_secs: 0,
            public_key: None,
        };
        let mut c = claims(&[("/data/x", "read")]);
        c.aud = Some("https://b.example/synchrony/v1".into());
        c.iss = Some("unregistered".into());
        let t = mint_hs256(&c, "static").unwrap();
        assert_eq!(
            v.verify(&t, None, NOW).unwrap().access_to(&doc("x")),
            Some(Access::Read)
        );
    }

    #[test]
    fn ed25519_public_keys_in_both_forms() {
        // An Ed25519 key pair generated for this test only.
        let private = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINNlHM/MwnDKAUiIAYQMBUiJoGtaEy2W79X5bYHTPD5e\n-----END PRIVATE KEY-----\n";
        let public_pem = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAb6a6iB8DIJ7FlLCnG0MOuhpcNnNQIqEEqPnsIpPqSIs=\n-----END PUBLIC KEY-----\n";
        let token = mint_with_private_key(&claims(&[("/data/d", "full")]), private).unwrap();
        for form in [
            public_pem.to_owned(),
            "MCowBQYDK2VwAyEAb6a6iB8DIJ7FlLCnG0MOuhpcNnNQIqEEqPnsIpPqSIs=".to_owned(),
        ] {
            let key = PublicKey::parse(&form).unwrap();
            let v = Verifier {
                public_key: Some(key),
                ..verifier()
            };
            assert_eq!(
                v.verify(&token, None, NOW).unwrap().access_to(&doc("d")),
                Some(Access::Full)
            );
        }
        assert!(PublicKey::parse("not a key").is_err());
    }

    #[test]
    fn rsa_public_keys_verify_rs256() {
        // An RSA key pair generated for this test only.
        let private = "-----BEGIN PRIVATE KEY-----\nMIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCvqbrzWtqplWBB\nN8S+S3LfbQCgvJouHY3sxn04Yx/Hdh2+/dfEjSo5NtiGtqI6zuNJ+RYwYRD+PW/g\nR05qyV4rKogfobSbp2qBqwk0+e1HoYCihQ76xrGzzf+cjh2+vxUd9mbIw6YbJgJT\nnIjCz/oSQiMo+tSwby7plAugEvHzZ2iNIgFEnHsw7G35LANruH6fuwY9bJezU87Y\nKXxwECUIRRk/SphmqiSHhnS3X4na99O4iB/cdxfWcTqOhQ7NYPL4sIByGCfhMhgO\nQ4thoghafI8j61VqRYZXsdz+97XeEoHvAEPwQljv+x4Hxi3jnjV2GyQalK4zbxrE\noZu9udRDAgMBAAECggEAGSe8Luc+0vQiMZSz5vBVBevNIDeB+MKgtVyDSBTh0yV2\nAwjE4k+40TKqdTgoKTXBVLGH3Ou5jD7uC3cKor4tbw8LKUR14ahq1yDQE7cKpKxb\nCGr3hy/2+KGyThAH8G3ar0y+0Vc7LT4XLTQIXaV80SqJcG/jD1UMqcRamdS8szdJ\n0gYksOO9dSZPF7mzCIdJHAkFp7cZfA6efsm5k6PlJwm1GFelqjPT3COnYe7AmT8T\ntl1K3O5tELIZBB4AK8bFXMTtk7cFQForBQ59MWgQ84+VWG9BrQ8mSsSxwkfDK8fQ\niPPhJzsnvzd0fxYmBQRgeZWdf1UvoO9tmmW2b2xgUQKBgQDlzLOoQgfq7D1d1mrH\nyxgVvUtcMBjwi1bFJ4Lv245g4BNhWDfbjpEYLsH7G+5igsv9exAIT/AaJOmbdU5B\nF1cPZ9wZCayNMMwQ6Wh9Wmzr/445TwLW9XwAwLZJYysutsbWy+RTqGxiA7lDo4oG\nqG+e71vPQpidpwSi0j4KDv6qKwKBgQDDsOk9rVN/QAaXE7QJgyh65/9KA9BHWmUB\nQAryq4snxsoyRLlgS6HX8otebDiJygli7QAJhaw5l3mpyRJ2Q+kt6N+v+dkY62N0\nI5ZH/u9vICIcVH8JLmpzLf3hfJtAmVDzpbPtJAMOEkbTT9dOH93HRb4TDTY4sqFW\nGaH8FrDqSQKBgQDMnr3KsSFDuh/akrZ6OQm1Md0MtXc/mZMl8szQr3vUHzKil18F\njaj9E4V/B5v48+aYSyA3hpaRcRTibE3F//ZxrVV6pfaTskPDO1Lja8VZTzFhLk2l\nAunr8a1fI4KsEex0DxG8vFfl3tL0u4aH7yuVJiVmJDKpDrM+GF9NrZRuCQKBgDLM\n2S+msBdHkq5jcghKIRcO5MndBZOQVsolSvJGMACqbVDxYEIsQB5kG2Puqhqy9Q7W\nQX03U0c8GFxIE1/aL004t+Dh9kauzImYt2mHN7bcW56JHNVQVFgEJ3UCuPbjFg26\nBWRZReXAPtyaTGU+hn81jqs5ccr0LEfCrbdYWKLpAoGBAN2OKsi1/WdKNx5vnxMF\nvGoDvms+84Ep9n1K5eHF3UYZvt96ogS0XYlrXULxm5KToZW9XraKZqHk+UNLTSRw\nv7y+c31g5DdVsz3tVAsFj55hso2LotvOLypltePlZj+2K/67BovtVk4Id39e9RBy\nuCB1aZdZi8B2UrodgDHxQupU\n-----END PRIVATE KEY-----\n";
        let public = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAr6m681raqZVgQTfEvkty\n320AoLyaLh2N7MZ9OGMfx3Ydvv3XxI0qOTbYhraiOs7jSfkWMGEQ/j1v4EdOasle\nKyqIH6G0m6dqgasJNPntR6GAooUO+saxs83/nI4dvr8VHfZmyMOmGyYCU5yIws/6\nEkIjKPrUsG8u6ZQLoBLx82dojSIBRJx7MOxt+SwDa7h+n7sGPWyXs1PO2Cl8cBAl\nCEUZP0qYZqokh4Z0t1+J2vfTuIgf3HcX1nE6joUOzWDy+LCAchgn4TIYDkOLYaII\nWnyPI+tVakWGV7Hc/ve13hKB7wBD8EJY7/seB8Yt4541dhskGpSuM28axKGbvbnU\nQwIDAQAB\n-----END PUBLIC KEY-----\n";
        let token = mint_with_private_key(&claims(&[("/data/d", "read")]), private).unwrap();
        let v = Verifier {
            public_key: Some(PublicKey::parse(public).unwrap()),
            ..verifier()
        };
        assert_eq!(
            v.verify(&token, None, NOW).unwrap().access_to(&doc("d")),
            Some(Access::Read)
        );
        // An HS256 token with no app and no static secret is refused.
        let other = mint_hs256(&claims(&[("/data/d", "read")]), "hs").unwrap();
        assert_eq!(
            v.verify(&other, None, NOW).unwrap_err().kind(),
            "jwt/unknown-iss"
        );
    }
}
