//! The engine's door: turns a request's token into a [`Principal`], and registers apps.
//!
//! App secrets live in the database, so every node on it accepts an app registered through any
//! of them; each node caches a secret for a few seconds, which bounds how long a rotated secret
//! stays valid elsewhere.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use subtle::ConstantTimeEq;

use crate::auth::{AuthError, Principal, PublicKey, Verifier};
use crate::config::{AuthConfig, ConfigError};
use crate::store::{Store, StoreError};

/// How long a looked-up secret (or its absence) is trusted.
const SECRET_TTL: Duration = Duration::from_secs(5);
/// Bound on cached issuers, so garbage tokens cannot grow memory.
const MAX_CACHED: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
}

/// Why an app registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("{0}")]
    Invalid(&'static str),
    #[error("registration needs the configured auth-token (synchrony.service.authtoken) or an admin token")]
    Unauthorized,
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
}

pub struct Gate {
    verifier: Verifier,
    store: Store,
    authtoken: Option<String>,
    /// Tokens are required: something is configured or an app is registered.
    enforced: AtomicBool,
    secrets: Mutex<HashMap<String, (Option<String>, Instant)>>,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Gate {
    pub fn new(config: &AuthConfig, store: Store) -> Result<Self, ConfigError> {
        let (audiences, mistaken) = Verifier::audiences_for(&config.service_urls);
        for url in mistaken {
            tracing::warn!(
                %url,
                "synchrony.service.url ends in /v1; it should be the base URL (tokens carry <url>/v1). \
                 Accepting both forms"
            );
        }
        let public_key = config
            .jwt_public_key
            .as_deref()
            .map(PublicKey::parse)
            .transpose()
            .map_err(ConfigError::PublicKey)?;
        Ok(Self {
            verifier: Verifier {
                audiences,
                static_secret: config.jwt_secret.clone(),
                public_key,
                leeway_secs: config.jwt_leeway_secs,
            },
            store,
            authtoken: config.service_authtoken.clone(),
            enforced: AtomicBool::new(config.configured()),
            secrets: Mutex::new(HashMap::new()),
        })
    }

    /// Looks at storage: registered apps make tokens required.
    pub async fn load(&self) -> Result<(), StoreError> {
        if self.store.app_count().await? > 0 {
            self.enforced.store(true, Ordering::Release);
        }
        Ok(())
    }

    pub fn enforced(&self) -> bool {
        self.enforced.load(Ordering::Acquire)
    }

    pub fn public_key(&self) -> Option<&PublicKey> {
        self.verifier.public_key.as_ref()
    }

    /// The principal behind `token`. Without any auth configured (loopback development) every
    /// request is allowed everything.
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Principal, GateError> {
        if !self.enforced() {
            return Ok(Principal::open());
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let issuer = Verifier::issuer_of(token)?;
        let secret = match &issuer {
            Some(app) => self.secret(app).await?,
            None => None,
        };
        Ok(self.verifier.verify(token, secret.as_deref(), unix_now())?)
    }

    async fn secret(&self, app: &str) -> Result<Option<String>, StoreError> {
        if let Some((secret, at)) = self.cache().get(app) {
            if at.elapsed() < SECRET_TTL {
                return Ok(secret.clone());
            }
        }
        let secret = self.store.app_secret(app).await?;
        let mut cache = self.cache();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(app.to_owned(), (secret.clone(), Instant::now()));
        Ok(secret)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Option<String>, Instant)>> {
        self.secrets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `app_id` with `secret`, or rotates its secret. Allowed with the configured
    /// auth-token, with an admin token, or (no auth configured at all) from anyone, since the
    /// engine then only listens on loopback.
    pub async fn register(
        &self,
        app_id: &str,
        secret: &str,
        auth_token: Option<&str>,
        caller: Option<&str>,
    ) -> Result<(), RegisterError> {
        if app_id.is_empty()
            || app_id.len() > 128
            || !app_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(RegisterError::Invalid(
                "appid must be 1-128 characters of [A-Za-z0-9._-]",
            ));
        }
        if secret.len() < 16 || secret.len() > 1024 {
            return Err(RegisterError::Invalid("secret must be 16 to 1024 bytes"));
        }
        let allowed = match &self.authtoken {
            Some(expected) => {
                auth_token.is_some_and(|t| bool::from(t.as_bytes().ct_eq(expected.as_bytes())))
            }
            None if self.enforced() => match caller {
                Some(token) => self
                    .authenticate(Some(token))
                    .await
                    .is_ok_and(|p| p.is_admin()),
                None => false,
            },
            None => true,
        };
        if !allowed {
            return Err(RegisterError::Unauthorized);
        }
        self.store.put_app_secret(app_id, secret).await?;
        self.cache().remove(app_id);
        self.enforced.store(true, Ordering::Release);
        tracing::info!(app_id, "app registered");
        Ok(())
    }
}
