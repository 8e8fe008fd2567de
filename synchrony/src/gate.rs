//! The engine's door: turns a request's token into a [`Principal`], and registers apps.
//!
//! App secrets live in the database, so every node on it accepts an app registered through any
//! of them. Each node keeps the whole (small) table of apps and re-reads it at most every few
//! seconds, which bounds how long a rotated secret stays valid elsewhere. A token naming an
//! unknown app is answered from that table: a flood of tokens with random issuers costs no
//! database query, and while storage is unreachable the last table read keeps serving.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::auth::{AuthError, Principal, PublicKey, Verifier};
use crate::config::{AuthConfig, ConfigError};
use crate::store::{Store, StoreError};

/// How long the table of app secrets is trusted before it is read again.
const SECRET_TTL: Duration = Duration::from_secs(5);
/// How long a read of the table may take before the last one read is used instead.
const READ_DEADLINE: Duration = Duration::from_secs(1);
/// After a failed read, how long the last table keeps serving before the next attempt.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The registered apps and their secrets, as last read.
#[derive(Default)]
struct AppTable {
    secrets: HashMap<String, String>,
    /// When the table was read (or last failed to be); None: never read.
    read_at: Option<Instant>,
    /// Whether the last read succeeded.
    fresh: bool,
}

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
    /// `jwt.private.key`: decrypts encrypted tokens.
    decryption_key: Option<Arc<crate::jwe::DecryptionKey>>,
    /// Decryptions under way at once, at most one per core: each is an RSA private-key
    /// operation, far dearer than checking a token's signature, and comes before anything
    /// proves who sent the token.
    decryptions: Arc<tokio::sync::Semaphore>,
    store: Store,
    authtoken: Option<String>,
    /// Tokens are required: something is configured or an app is registered.
    enforced: AtomicBool,
    /// Held across a read, so that concurrent token checks wait for one query.
    apps: tokio::sync::Mutex<AppTable>,
    /// Tokens refused, by error type (exported by `crate::metrics`).
    pub refusals: prometheus_client::metrics::family::Family<
        crate::metrics::TypeLabel,
        prometheus_client::metrics::counter::Counter,
    >,
}

/// How long a token waits for a decryption slot before it is refused.
const DECRYPTION_QUEUE_WAIT: Duration = Duration::from_secs(5);

pub use crate::util::clock::unix_secs as unix_now;

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
        let decryption_key = config
            .jwt_private_key
            .as_deref()
            .map(crate::jwe::DecryptionKey::parse)
            .transpose()
            .map_err(ConfigError::PrivateKey)?
            .map(Arc::new);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Self {
            decryption_key,
            decryptions: Arc::new(tokio::sync::Semaphore::new(cores)),
            verifier: Verifier {
                audiences,
                static_secret: config.jwt_secret.clone(),
                public_key,
                leeway_secs: config.jwt_leeway_secs,
            },
            store,
            authtoken: config.service_authtoken.clone(),
            enforced: AtomicBool::new(config.configured()),
            apps: tokio::sync::Mutex::new(AppTable::default()),
            refusals: Default::default(),
        })
    }

    /// Looks at storage: registered apps make tokens required.
    pub async fn load(&self) -> Result<(), StoreError> {
        let rows = self.store.app_secrets().await?;
        if !rows.is_empty() {
            self.enforced.store(true, Ordering::Release);
        }
        let mut apps = self.apps.lock().await;
        apps.secrets = rows.into_iter().collect();
        apps.read_at = Some(Instant::now());
        apps.fresh = true;
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
        let outcome = self.check(token).await;
        if let Err(GateError::Auth(error)) = &outcome {
            self.refusals
                .get_or_create(&crate::metrics::TypeLabel {
                    r#type: error.kind().to_owned(),
                })
                .inc();
        }
        outcome
    }

    async fn check(&self, token: Option<&str>) -> Result<Principal, GateError> {
        if !self.enforced() {
            return Ok(Principal::open());
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let inner;
        let token = if crate::jwe::is_jwe(token) {
            inner = self.decrypt(token).await?;
            inner.as_str()
        } else {
            token
        };
        let issuer = Verifier::issuer_of(token)?;
        let secret = match &issuer {
            Some(app) => self.secret(app).await?,
            None => None,
        };
        Ok(self.verifier.verify(token, secret.as_deref(), unix_now())?)
    }

    /// The JWT inside an encrypted token. An RSA private-key operation is costly, so it runs
    /// off the threads that serve connections.
    async fn decrypt(&self, token: &str) -> Result<String, AuthError> {
        let key = self
            .decryption_key
            .clone()
            .ok_or(crate::jwe::JweError::NoKey)?;
        let token = token.to_owned();
        // Waiting callers queue here (each is one connection or request, bounded elsewhere);
        // one that waits past the deadline is refused rather than left hanging.
        let permit = tokio::time::timeout(
            DECRYPTION_QUEUE_WAIT,
            self.decryptions.clone().acquire_owned(),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or(crate::jwe::JweError::Busy)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            key.decrypt(&token)
        })
        .await
        .map_err(|_| crate::jwe::JweError::Undecryptable)?
        .map_err(AuthError::from)
    }

    async fn secret(&self, app: &str) -> Result<Option<String>, StoreError> {
        let mut apps = self.apps.lock().await;
        let due = match (apps.read_at, apps.fresh) {
            (None, _) => true,
            (Some(at), true) => at.elapsed() >= SECRET_TTL,
            (Some(at), false) => at.elapsed() >= RETRY_AFTER_FAILURE,
        };
        if due {
            // Bounded: token checks wait behind this read, and a database that swallows
            // packets would otherwise hold them for the pool's whole acquire timeout.
            let read = tokio::time::timeout(READ_DEADLINE, self.store.app_secrets()).await;
            let read =
                read.unwrap_or_else(|_| Err(StoreError::Database(sqlx::Error::PoolTimedOut)));
            match read {
                Ok(rows) => {
                    apps.secrets = rows.into_iter().collect();
                    apps.fresh = true;
                }
                Err(error) if apps.read_at.is_some() => {
                    tracing::warn!(%error, "cannot re-read app secrets; using the last ones read");
                    apps.fresh = false;
                }
                Err(error) => return Err(error),
            }
            apps.read_at = Some(Instant::now());
        }
        Ok(apps.secrets.get(app).cloned())
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
        self.apps
            .lock()
            .await
            .secrets
            .insert(app_id.to_owned(), secret.to_owned());
        self.enforced.store(true, Ordering::Release);
        tracing::info!(app_id, "app registered");
        Ok(())
    }
}
