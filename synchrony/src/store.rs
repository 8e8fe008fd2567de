//! Durable storage: an append-only update log plus one snapshot per document.
//!
//! The same schema runs on SQLite (the embedded default) and PostgreSQL, through sqlx's `Any`
//! driver; only the migrations differ in dialect (`migrations/sqlite`, `migrations/postgres`).
//!
//! Loading a document applies its snapshot and then every log row still present. Applying a Yjs
//! update twice is harmless, so the one rule that keeps data safe is: compaction deletes exactly
//! the rows it merged, never a row that committed after it looked. On PostgreSQL the compaction
//! transaction runs at REPEATABLE READ, whose DELETE cannot see rows committed after its
//! snapshot. On SQLite (one writer at a time) the log is read and merged without a lock, and a
//! short `BEGIN IMMEDIATE` transaction deletes those rows only if they and the snapshot are
//! unchanged; holding the write lock through the merge stalled every append (seconds of
//! fan-out latency at 12,000 updates/s in `loadtest`).

use std::sync::Arc;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor, Row};
use synchrony_protocol::DocId;
use yrs::updates::decoder::Decode;
use yrs::{ReadTxn, StateVector, Transact, Update};

/// Rows per INSERT statement in a group commit; keeps far below SQLite's bind-parameter limit.
const ROWS_PER_INSERT: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored update for {doc} is corrupt: {reason}")]
    Corrupt { doc: String, reason: String },
    #[error(
        "unsupported database url (expected sqlite:, postgres:, postgresql: or jdbc:postgresql:)"
    )]
    UnsupportedUrl,
}

/// Which SQL dialect the pool speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// A document as stored: its snapshot (if any) and the log rows written since.
#[derive(Debug, Default)]
pub struct StoredDoc {
    pub snapshot: Option<Vec<u8>>,
    pub updates: Vec<Vec<u8>>,
}

impl StoredDoc {
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.updates.is_empty()
    }

    pub fn log_bytes(&self) -> usize {
        self.updates.iter().map(Vec::len).sum()
    }
}

/// A row of the document list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DocSummary {
    pub id: String,
    /// Bytes stored (snapshot plus log); the encoded state is usually smaller.
    pub stored_bytes: u64,
    /// Unix milliseconds of the last stored change.
    pub changed_at_ms: i64,
}

/// What one compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compaction {
    /// Log rows merged into the snapshot and deleted.
    pub merged_rows: u64,
    /// Size of the new snapshot.
    pub snapshot_bytes: u64,
}

/// One row for the group commit.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub doc: DocId,
    pub data: bytes::Bytes,
}

/// A named version, as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionInfo {
    pub id: i64,
    pub label: String,
    pub user: String,
    #[serde(rename = "created-at")]
    pub created_at: i64,
    /// Size of the stored state.
    pub bytes: i64,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Kept for [`Store::probe`]; may hold a password, so never logged.
    url: Arc<str>,
    /// Compactions running at once. Documents edited at similar rates reach the threshold
    /// together; unbounded, their reads took every pooled connection and appends waited seconds.
    compactions: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// A database's identity (table `store_identity`): nodes of one cluster must all show the same.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreIdentity {
    pub id: String,
    /// When the first engine started on it (ms since the epoch).
    pub created_ms: i64,
}

pub use crate::util::clock::unix_ms as now_millis;

impl Store {
    /// Connects to `url` (`sqlite://path`, `postgres://...`). Does not migrate.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = Self::connect_lazy(url)?;
        store.probe().await?;
        Ok(store)
    }

    /// Prepares a pool for `url` without touching the database yet, so that the engine can
    /// answer its heartbeat (503) while storage comes up.
    pub fn connect_lazy(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl);
        };
        let mut options = AnyPoolOptions::new()
            .acquire_timeout(Duration::from_secs(10))
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 8,
            });
        if backend == Backend::Sqlite {
            options = options.after_connect(|conn, _meta| {
                Box::pin(async move {
                    // WAL lets readers run beside the writer; FULL makes each group commit
                    // durable across power loss, not only across a crash of the engine.
                    conn.execute("PRAGMA journal_mode=WAL").await?;
                    conn.execute("PRAGMA synchronous=FULL").await?;
                    conn.execute("PRAGMA busy_timeout=10000").await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect_lazy(url)?;
        Ok(Self {
            pool,
            backend,
            url: url.into(),
            compactions: Arc::new(tokio::sync::Semaphore::new(match backend {
                Backend::Sqlite => 1,
                Backend::Postgres => 2,
            })),
        })
    }

    /// Opens one connection outside the pool, so that a failure reports its real cause
    /// (refused, authentication, unknown database) instead of a pool timeout.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&self.url).await?;
        conn.execute("SELECT 1").await?;
        sqlx::Connection::close(conn).await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Where the database is, for messages: `host:port/database` or the SQLite file, never the
    /// credentials.
    pub fn target(&self) -> String {
        match url::Url::parse(&self.url) {
            Ok(url) if self.backend == Backend::Postgres => {
                let host = url.host_str().unwrap_or("?");
                let port = url.port().unwrap_or(5432);
                let socket = url
                    .query_pairs()
                    .find(|(k, _)| k == "host")
                    .map(|(_, v)| format!(" (socket {v})"))
                    .unwrap_or_default();
                format!("{host}:{port}{}{socket}", url.path())
            }
            Ok(url) => url.path().to_owned(),
            Err(_) => "?".into(),
        }
    }

    /// Runs the migrations of this backend's dialect.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        // A database a newer release migrated further still opens: during a rolling upgrade
        // an old node may restart (its tables are all there; the newer ones it ignores).
        let mut migrator = match self.backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        migrator.set_ignore_missing(true);
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// Which database this is: the row the first engine to start on it wrote (written now if
    /// none is there yet; concurrent first starts agree on one).
    pub async fn identity(&self) -> Result<StoreIdentity, StoreError> {
        sqlx::query(
            "INSERT INTO store_identity (singleton, id, created_at) VALUES (1, $1, $2) \
             ON CONFLICT (singleton) DO NOTHING",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(now_millis())
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT id, created_at FROM store_identity WHERE singleton = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(StoreIdentity {
            id: row.try_get(0)?,
            created_ms: row.try_get(1)?,
        })
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Appends every entry in one transaction (the group commit).
    pub async fn append(&self, entries: &[LogEntry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let now = now_millis();
        let mut tx = self.pool.begin().await?;
        for chunk in entries.chunks(ROWS_PER_INSERT) {
            let mut sql =
                String::from("INSERT INTO doc_updates (doc_id, data, created_at) VALUES ");
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push(',');
                }
                match self.backend {
                    // Positional: SQLite resolves each `$N` by scanning every parameter's name,
                    // quadratic in a 1,500-parameter insert (it showed in profiles).
                    Backend::Sqlite => sql.push_str("(?, ?, ?)"),
                    Backend::Postgres => {
                        let n = i * 3;
                        sql.push_str(&format!("(${}, ${}, ${})", n + 1, n + 2, n + 3));
                    }
                }
            }
            let mut query = sqlx::query(&sql);
            for entry in chunk {
                query = query
                    .bind(entry.doc.as_str())
                    .bind(entry.data.as_ref())
                    .bind(now);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Reads a document's snapshot and log as one consistent view. One statement reads both: read
    /// by two, a compaction committing in between left a load with the old snapshot and without
    /// the rows merged into the new one (acknowledged edits missing from the loaded document).
    pub async fn load(&self, doc: &DocId) -> Result<StoredDoc, StoreError> {
        let rows = sqlx::query(
            "SELECT CAST(0 AS BIGINT) AS part, CAST(0 AS BIGINT) AS id, data FROM doc_snapshots \
             WHERE doc_id = $1 \
             UNION ALL SELECT CAST(1 AS BIGINT) AS part, id, data FROM doc_updates WHERE doc_id = $1 \
             ORDER BY part, id",
        )
        .bind(doc.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut stored = StoredDoc::default();
        for row in rows {
            let data = row.try_get::<Vec<u8>, _>(2)?;
            if row.try_get::<i64, _>(0)? == 0 {
                stored.snapshot = Some(data);
            } else {
                stored.updates.push(data);
            }
        }
        Ok(stored)
    }

    /// Merges a document's log into its snapshot inside one transaction, reading what is in the
    /// database (never one engine's memory) and deleting exactly the rows it merged.
    pub async fn compact(&self, doc: &DocId) -> Result<Compaction, StoreError> {
        // The semaphore is never closed.
        let _slot = self.compactions.acquire().await.ok();
        match self.backend {
            Backend::Sqlite => self.compact_optimistic(doc).await,
            Backend::Postgres => self.compact_in_one_transaction(doc).await,
        }
    }

    /// SQLite has one writer at a time, so the log is read and merged outside any write lock;
    /// a short write transaction then replaces exactly those rows, unless the snapshot or those
    /// rows changed meanwhile (another compaction, a deletion): then nothing is written. SQLite
    /// assigns ids in commit order, so no row with an id below the ones read can appear later.
    async fn compact_optimistic(&self, doc: &DocId) -> Result<Compaction, StoreError> {
        let Some(read) = read_and_merge(&mut *self.pool.acquire().await?, doc).await? else {
            return Ok(Compaction::default());
        };
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now_merged: Option<i64> =
            sqlx::query("SELECT merged FROM doc_snapshots WHERE doc_id = $1")
                .bind(doc.as_str())
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| row.try_get::<i64, _>(0))
                .transpose()?;
        let still_there: i64 =
            sqlx::query("SELECT COUNT(*) FROM doc_updates WHERE doc_id = $1 AND id <= $2")
                .bind(doc.as_str())
                .bind(read.head)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
        if now_merged != read.merged_before || still_there != read.rows {
            tx.rollback().await?;
            return Ok(Compaction::default());
        }
        self.write_snapshot(&mut tx, doc, &read).await?;
        tx.commit().await?;
        Ok(read.outcome())
    }

    /// Stores a merged snapshot and deletes the log rows it holds.
    async fn write_snapshot(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        doc: &DocId,
        read: &MergedLog,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO doc_snapshots (doc_id, data, merged, updated_at, head) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (doc_id) DO UPDATE SET data = excluded.data, merged = excluded.merged, \
             updated_at = excluded.updated_at, head = excluded.head",
        )
        .bind(doc.as_str())
        .bind(&read.state[..])
        .bind(read.merged_before.unwrap_or(0) + read.rows)
        .bind(now_millis())
        .bind(read.head)
        .execute(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM doc_updates WHERE doc_id = $1 AND id <= $2")
            .bind(doc.as_str())
            .bind(read.head)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// PostgreSQL: everything in one REPEATABLE READ transaction, which sees exactly the rows it
    /// read (ids from a sequence may commit out of order) and does not block writers.
    async fn compact_in_one_transaction(&self, doc: &DocId) -> Result<Compaction, StoreError> {
        let mut tx = self.pool.begin().await?;
        tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .await?;
        let Some(read) = read_and_merge(&mut tx, doc).await? else {
            tx.rollback().await?;
            return Ok(Compaction::default());
        };
        // Under the isolation described in the module docs, this deletes exactly the rows read.
        self.write_snapshot(&mut tx, doc, &read).await?;
        tx.commit().await?;
        Ok(read.outcome())
    }

    /// The document's head: the highest update id it has ever stored (0 for none). It only grows,
    /// across compactions and restarts.
    pub async fn head(&self, doc: &DocId) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "SELECT COALESCE(MAX(h), 0) FROM (SELECT MAX(id) AS h FROM doc_updates WHERE doc_id = $1 \
             UNION ALL SELECT head AS h FROM doc_snapshots WHERE doc_id = $1) heads",
        )
        .bind(doc.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>(0)?.max(0) as u64)
    }

    /// Removes a document: its snapshot, every log row and, with `versions`, its named
    /// versions. True if there was anything.
    pub async fn delete_doc(&self, doc: &DocId, versions: bool) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let updates = sqlx::query("DELETE FROM doc_updates WHERE doc_id = $1")
            .bind(doc.as_str())
            .execute(&mut *tx)
            .await?;
        let snapshots = sqlx::query("DELETE FROM doc_snapshots WHERE doc_id = $1")
            .bind(doc.as_str())
            .execute(&mut *tx)
            .await?;
        let mut removed = updates.rows_affected() + snapshots.rows_affected();
        if versions {
            removed += sqlx::query("DELETE FROM doc_versions WHERE doc_id = $1")
                .bind(doc.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(removed > 0)
    }

    /// Documents nobody has changed after `before_ms` (newest log row and snapshot no newer), after
    /// `after` in id order, at most `limit`; with `with_log`, only those that have log rows.
    pub async fn idle_docs(
        &self,
        before_ms: i64,
        with_log: bool,
        after: &str,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT doc_id FROM ( \
               SELECT doc_id, created_at AS changed, 1 AS logged FROM doc_updates \
               UNION ALL SELECT doc_id, updated_at AS changed, 0 AS logged FROM doc_snapshots \
             ) docs WHERE doc_id > $1 \
             GROUP BY doc_id HAVING MAX(changed) <= $2 AND SUM(logged) >= $3 \
             ORDER BY doc_id LIMIT $4",
        )
        .bind(after)
        .bind(before_ms)
        .bind(i64::from(with_log))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// Documents with log rows written at or before `before_ms`, after `after` in id order, at most
    /// `limit`.
    pub async fn docs_with_log_before(
        &self,
        before_ms: i64,
        after: &str,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT DISTINCT doc_id FROM doc_updates WHERE created_at <= $1 AND doc_id > $2 \
             ORDER BY doc_id LIMIT $3",
        )
        .bind(before_ms)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// A document's stored rows: (log rows, snapshots, named versions).
    pub async fn history_counts(&self, doc: &DocId) -> Result<(u64, u64, u64, u64), StoreError> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM doc_updates WHERE doc_id = $1), \
                    (SELECT COUNT(*) FROM doc_snapshots WHERE doc_id = $1), \
                    (SELECT COUNT(*) FROM doc_versions WHERE doc_id = $1), \
                    (SELECT COALESCE(SUM(LENGTH(data)), 0) FROM doc_versions WHERE doc_id = $1)",
        )
        .bind(doc.as_str())
        .fetch_one(&self.pool)
        .await?;
        let count =
            |i: usize| -> Result<u64, StoreError> { Ok(row.try_get::<i64, _>(i)?.max(0) as u64) };
        Ok((count(0)?, count(1)?, count(2)?, count(3)?))
    }

    /// Stores `state` as a named version of `doc` unless the document would then keep more than
    /// `max_count` versions or `max_bytes` of them; returns its id and creation time, or None
    /// when a cap refused it. The caps are checked in the insert itself (under a per-document
    /// lock on PostgreSQL; SQLite runs one writer at a time), so concurrent marks cannot pass
    /// them together.
    pub async fn add_version(
        &self,
        doc: &DocId,
        label: &str,
        user: &str,
        state: &[u8],
        max_count: u64,
        max_bytes: u64,
    ) -> Result<Option<VersionInfo>, StoreError> {
        let now = now_millis();
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(format!("doc_versions:{}", doc.as_str()))
                .execute(&mut *tx)
                .await?;
        }
        let row = sqlx::query(
            "INSERT INTO doc_versions (doc_id, label, created_by, created_at, data) \
             SELECT $1, $2, $3, $4, $5 \
             WHERE (SELECT COUNT(*) FROM doc_versions WHERE doc_id = $1) < $6 \
             AND (SELECT COALESCE(SUM(LENGTH(data)), 0) FROM doc_versions WHERE doc_id = $1) + $7 <= $8 \
             RETURNING id",
        )
        .bind(doc.as_str())
        .bind(label)
        .bind(user)
        .bind(now)
        .bind(state)
        .bind(max_count.min(i64::MAX as u64) as i64)
        .bind(state.len() as i64)
        .bind(max_bytes.min(i64::MAX as u64) as i64)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(VersionInfo {
            id: row.try_get(0)?,
            label: label.to_owned(),
            user: user.to_owned(),
            created_at: now,
            bytes: state.len() as i64,
        }))
    }

    /// The named versions of `doc`, oldest first.
    pub async fn versions(&self, doc: &DocId) -> Result<Vec<VersionInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, label, created_by, created_at, LENGTH(data) FROM doc_versions \
             WHERE doc_id = $1 ORDER BY id",
        )
        .bind(doc.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(VersionInfo {
                    id: row.try_get(0)?,
                    label: row.try_get(1)?,
                    user: row.try_get(2)?,
                    created_at: row.try_get(3)?,
                    bytes: row.try_get::<i64, _>(4)?,
                })
            })
            .collect()
    }

    /// One named version's state.
    pub async fn version(&self, doc: &DocId, id: i64) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT data FROM doc_versions WHERE doc_id = $1 AND id = $2")
            .bind(doc.as_str())
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Removes one named version; true if it existed.
    pub async fn delete_version(&self, doc: &DocId, id: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM doc_versions WHERE doc_id = $1 AND id = $2")
            .bind(doc.as_str())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Writes this node's heartbeat row (see [`crate::strangers`]).
    pub async fn beat(
        &self,
        node: &str,
        cluster: &str,
        http_url: &str,
        peer_addr: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO node_heartbeats (node_id, cluster, http_url, peer_addr, beat_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (node_id) DO UPDATE SET cluster = excluded.cluster, \
             http_url = excluded.http_url, peer_addr = excluded.peer_addr, beat_at = excluded.beat_at",
        )
        .bind(node)
        .bind(cluster)
        .bind(http_url)
        .bind(peer_addr)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Heartbeat rows written since `since` (ms): (node, cluster, http url, peer address, time).
    #[allow(clippy::type_complexity)]
    pub async fn heartbeats(
        &self,
        since: i64,
    ) -> Result<Vec<(String, String, String, String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, cluster, http_url, peer_addr, beat_at FROM node_heartbeats \
             WHERE beat_at >= $1 ORDER BY node_id",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    r.try_get(2)?,
                    r.try_get(3)?,
                    r.try_get(4)?,
                ))
            })
            .collect()
    }

    /// Deletes heartbeat rows older than `before` (ms): engines long gone.
    pub async fn forget_stale_beats(&self, before: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM node_heartbeats WHERE beat_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Removes this node's heartbeat row (a clean stop).
    pub async fn forget_beat(&self, node: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM node_heartbeats WHERE node_id = $1")
            .bind(node)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records lock `id` over `docs` ([`crate::locks::ALL`] for every document), replacing what
    /// it held before.
    pub async fn put_lock(
        &self,
        id: &str,
        docs: &[String],
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM doc_locks WHERE lock_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        for chunk in docs.chunks(ROWS_PER_INSERT) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| format!("(${}, ${}, ${})", i * 3 + 1, i * 3 + 2, i * 3 + 3))
                .collect();
            // Two renewals of one lock at once both delete, then both insert: the second
            // waits for the first and updates its rows instead of failing on the key.
            let sql = format!(
                "INSERT INTO doc_locks (lock_id, doc_id, expires_at) VALUES {} \
                 ON CONFLICT (lock_id, doc_id) DO UPDATE SET expires_at = excluded.expires_at",
                values.join(",")
            );
            let mut query = sqlx::query(&sql);
            for doc in chunk {
                query = query.bind(id).bind(doc.as_str()).bind(expires_at);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes lock `id`; true if it was recorded (expired or not).
    pub async fn delete_lock(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM doc_locks WHERE lock_id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every lock row that has not expired: (lock id, document id, expiry in ms). Expired rows
    /// are deleted on the way.
    pub async fn live_locks(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let now = now_millis();
        let rows = sqlx::query("SELECT lock_id, doc_id, expires_at FROM doc_locks")
            .fetch_all(&self.pool)
            .await?;
        let mut live = Vec::with_capacity(rows.len());
        let mut expired = false;
        for row in rows {
            let expires_at: i64 = row.try_get(2)?;
            if expires_at <= now {
                expired = true;
            } else {
                live.push((row.try_get(0)?, row.try_get(1)?, expires_at));
            }
        }
        if expired {
            sqlx::query("DELETE FROM doc_locks WHERE expires_at <= $1")
                .bind(now)
                .execute(&self.pool)
                .await?;
        }
        Ok(live)
    }

    /// Documents whose id starts with `prefix`, after `after` in id order, at most `limit`.
    pub async fn list_docs(
        &self,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<DocSummary>, StoreError> {
        // Ids never contain '%' or '\', so only '_' needs escaping for LIKE.
        let pattern = format!("{}%", prefix.replace('_', "\\_"));
        let rows = sqlx::query(
            "SELECT doc_id, SUM(bytes), MAX(changed) FROM ( \
               SELECT doc_id, LENGTH(data) AS bytes, created_at AS changed FROM doc_updates \
               UNION ALL SELECT doc_id, LENGTH(data) AS bytes, updated_at AS changed FROM doc_snapshots \
             ) docs WHERE doc_id LIKE $1 ESCAPE '\\' AND doc_id > $2 \
             GROUP BY doc_id ORDER BY doc_id LIMIT $3",
        )
        .bind(pattern)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(DocSummary {
                    id: row.try_get(0)?,
                    stored_bytes: row.try_get::<i64, _>(1)?.max(0) as u64,
                    changed_at_ms: row.try_get(2)?,
                })
            })
            .collect()
    }

    /// Registers an app or rotates its secret.
    pub async fn put_app_secret(&self, app_id: &str, secret: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO app_secrets (app_id, secret, created_at, updated_at) VALUES ($1, $2, $3, $3) \
             ON CONFLICT (app_id) DO UPDATE SET secret = excluded.secret, updated_at = excluded.updated_at",
        )
        .bind(app_id)
        .bind(secret)
        .bind(now_millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn app_secret(&self, app_id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT secret FROM app_secrets WHERE app_id = $1")
            .bind(app_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Every registered app and its secret.
    pub async fn app_secrets(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query("SELECT app_id, secret FROM app_secrets")
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    pub async fn app_count(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM app_secrets")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)?.max(0) as u64)
    }

    /// Number of log rows a document has.
    pub async fn log_len(&self, doc: &DocId) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM doc_updates WHERE doc_id = $1")
            .bind(doc.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }
}

/// A document's snapshot and log as read for a compaction, merged.
struct MergedLog {
    /// The snapshot's count of merged rows; None when there was no snapshot.
    merged_before: Option<i64>,
    /// Log rows read, and the highest id among them.
    rows: i64,
    head: i64,
    state: Vec<u8>,
}

impl MergedLog {
    fn outcome(&self) -> Compaction {
        Compaction {
            merged_rows: self.rows as u64,
            snapshot_bytes: self.state.len() as u64,
        }
    }
}

/// Reads a document's snapshot and log on `conn` and merges them; None when the log is empty.
async fn read_and_merge(
    conn: &mut sqlx::AnyConnection,
    doc: &DocId,
) -> Result<Option<MergedLog>, StoreError> {
    let snapshot = sqlx::query("SELECT data, merged FROM doc_snapshots WHERE doc_id = $1")
        .bind(doc.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    let (snapshot, merged_before) = match snapshot {
        Some(row) => (
            Some(row.try_get::<Vec<u8>, _>(0)?),
            Some(row.try_get::<i64, _>(1)?),
        ),
        None => (None, None),
    };
    let rows = sqlx::query("SELECT id, data FROM doc_updates WHERE doc_id = $1 ORDER BY id")
        .bind(doc.as_str())
        .fetch_all(&mut *conn)
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut head = i64::MIN;
    let mut updates = Vec::with_capacity(rows.len());
    for row in &rows {
        head = head.max(row.try_get::<i64, _>(0)?);
        updates.push(row.try_get::<Vec<u8>, _>(1)?);
    }
    let rows = rows.len() as i64;
    // Merging a thousand updates into a large document takes milliseconds of CPU: on a runtime
    // worker it would stall every connection scheduled there.
    let doc_id = doc.clone();
    let state = tokio::task::spawn_blocking(move || merge(&doc_id, snapshot.as_deref(), &updates))
        .await
        .map_err(|e| StoreError::Corrupt {
            doc: doc.to_string(),
            reason: format!("the merge did not finish: {e}"),
        })??;
    Ok(Some(MergedLog {
        merged_before,
        rows,
        head,
        state,
    }))
}

/// Builds one Yjs update equivalent to `snapshot` followed by `updates`.
///
/// Integrating into a document lets yrs drop deleted content, which keeps snapshots small. If
/// some structs cannot be integrated yet (their predecessors were never stored), the lossless
/// `merge_updates_v1` is used instead so that nothing accepted is lost.
pub fn merge(
    doc: &DocId,
    snapshot: Option<&[u8]>,
    updates: &[Vec<u8>],
) -> Result<Vec<u8>, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        doc: doc.to_string(),
        reason,
    };
    let ydoc = yrs::Doc::new();
    let mut txn = ydoc.transact_mut();
    // Rows passed the nesting check when they were accepted; rows stored before it existed (or
    // under a higher limit) must not make yrs recurse past its stack here either.
    let mut nesting =
        crate::nesting::NestingIndex::new(synchrony_protocol::nesting::MAX_NESTING_CEILING);
    for bytes in snapshot
        .into_iter()
        .chain(updates.iter().map(Vec::as_slice))
    {
        nesting
            .admit(bytes, &txn.state_vector())
            .map_err(|e| corrupt(e.to_string()))?;
        let update = Update::decode_v1(bytes).map_err(|e| corrupt(e.to_string()))?;
        txn.apply_update(update)
            .map_err(|e| corrupt(e.to_string()))?;
    }
    let missing = txn.has_missing_updates();
    // Commit first: yrs garbage-collects deleted content on commit, and only then does the
    // encoding leave overwritten values out.
    drop(txn);
    if !missing {
        return Ok(ydoc
            .transact()
            .encode_state_as_update_v1(&StateVector::default()));
    }
    let all = snapshot
        .into_iter()
        .chain(updates.iter().map(Vec::as_slice));
    yrs::merge_updates_v1(all).map_err(|e| corrupt(e.to_string()))
}

/// A migrated SQLite store in a fresh temporary directory, which lives as long as the guard.
#[cfg(test)]
pub(crate) async fn temp_sqlite() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/store.db?mode=rwc", dir.path().display());
    let store = Store::connect(&url).await.expect("connect");
    store.migrate().await.expect("migrate");
    (dir, store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::{GetString, Text};

    /// During a rolling upgrade an old node may restart on a database a newer one migrated
    /// further: it still opens.
    #[tokio::test]
    async fn a_database_migrated_by_a_newer_release_still_opens() {
        let (_dir, store) = temp_sqlite().await;
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (9999, 'from a newer release', TRUE, X'00', 0)",
        )
        .execute(&store.pool)
        .await
        .expect("record a newer migration");
        store
            .migrate()
            .await
            .expect("an older release still migrates");
    }

    #[tokio::test]
    async fn a_lock_is_renewed_in_place_and_expired_rows_go() {
        let (_dir, store) = temp_sqlite().await;
        let later = now_millis() + 60_000;
        let docs = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        store
            .put_lock("l", &docs(&["a", "b"]), later)
            .await
            .expect("lock");
        // Renewed with another scope: only the new rows remain.
        store
            .put_lock("l", &docs(&["b", "c"]), later + 1)
            .await
            .expect("renew");
        let mut rows = store.live_locks().await.expect("read");
        rows.sort();
        assert_eq!(
            rows,
            vec![
                ("l".to_owned(), "b".to_owned(), later + 1),
                ("l".to_owned(), "c".to_owned(), later + 1)
            ]
        );
        store
            .put_lock("old", &docs(&["x"]), now_millis() - 1)
            .await
            .expect("lock");
        assert_eq!(
            store.live_locks().await.expect("read").len(),
            2,
            "expired rows are not live"
        );
        assert!(
            !store.delete_lock("old").await.expect("delete"),
            "and were deleted on the way"
        );
        assert!(store.delete_lock("l").await.expect("delete"));
        assert!(store.live_locks().await.expect("read").is_empty());
    }

    fn update_inserting(client: u64, prefix: &[u8], text: &str) -> Vec<u8> {
        let doc = yrs::Doc::with_client_id(client);
        let t = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        if !prefix.is_empty() {
            txn.apply_update(Update::decode_v1(prefix).expect("decode"))
                .expect("apply");
        }
        let before = txn.state_vector();
        t.push(&mut txn, text);
        txn.encode_diff_v1(&before)
    }

    fn text_of(updates: &[&[u8]]) -> String {
        let doc = yrs::Doc::new();
        let t = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        for u in updates {
            txn.apply_update(Update::decode_v1(u).expect("decode"))
                .expect("apply");
        }
        t.get_string(&txn)
    }

    #[test]
    fn merge_keeps_content_and_pending_structs() {
        let doc = DocId::parse("d").expect("id");
        let a = update_inserting(1, &[], "hello");
        let b = update_inserting(1, &a, " world");
        let merged = merge(&doc, None, &[a.clone(), b.clone()]).expect("merge");
        assert_eq!(text_of(&[&merged]), "hello world");
        // `b` without `a` cannot be integrated: the merge must still carry it.
        let pending_only = merge(&doc, None, std::slice::from_ref(&b)).expect("merge");
        assert_eq!(text_of(&[&a, &pending_only]), "hello world");
        assert!(merge(&doc, None, &[vec![1, 2, 3]]).is_err());
    }

    #[test]
    fn merge_drops_overwritten_content() {
        use yrs::Map;
        let doc = DocId::parse("d").expect("id");
        let writer = yrs::Doc::new();
        let map = writer.get_or_insert_map("m");
        let updates: Vec<Vec<u8>> = (0..50)
            .map(|i| {
                let mut txn = writer.transact_mut();
                map.insert(&mut txn, "k", format!("{i}{}", "x".repeat(10_000)));
                txn.encode_update_v1()
            })
            .collect();
        let merged = merge(&doc, None, &updates).expect("merge");
        assert!(
            merged.len() < 20_000,
            "merged snapshot kept overwritten values: {} bytes",
            merged.len()
        );
    }

    #[tokio::test]
    async fn append_load_compact_on_sqlite() {
        let (_dir, store) = temp_sqlite().await;
        store.migrate().await.expect("migrations are idempotent");
        let doc = DocId::parse("app/doc-1").expect("id");
        let other = DocId::parse("app/doc-2").expect("id");
        let a = update_inserting(1, &[], "abc");
        let b = update_inserting(1, &a, "def");
        let entry = |d: &DocId, u: &[u8]| LogEntry {
            doc: d.clone(),
            data: bytes::Bytes::copy_from_slice(u),
        };
        store
            .append(&[entry(&doc, &a), entry(&other, &a), entry(&doc, &b)])
            .await
            .expect("append");
        let stored = store.load(&doc).await.expect("load");
        assert_eq!(stored.updates, vec![a.clone(), b.clone()]);
        assert!(stored.snapshot.is_none());

        let c = store.compact(&doc).await.expect("compact");
        assert_eq!(c.merged_rows, 2);
        assert_eq!(store.log_len(&doc).await.expect("len"), 0);
        assert_eq!(
            store.log_len(&other).await.expect("len"),
            1,
            "other documents untouched"
        );
        let stored = store.load(&doc).await.expect("load");
        let snap = stored.snapshot.expect("snapshot");
        assert_eq!(text_of(&[&snap]), "abcdef");
        assert_eq!(
            store.compact(&doc).await.expect("noop"),
            Compaction::default()
        );

        // The head survives compaction and only grows.
        let head = store.head(&doc).await.expect("head");
        assert!(head >= 3, "head {head}");
        store.append(&[entry(&doc, &b)]).await.expect("append");
        assert!(store.head(&doc).await.expect("head") > head);
        assert_eq!(
            store
                .head(&DocId::parse("none").expect("id"))
                .await
                .expect("head"),
            0
        );

        let list = store.list_docs("app/", "", 10).await.expect("list");
        let ids: Vec<_> = list.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["app/doc-1", "app/doc-2"]);
        assert_eq!(
            store
                .list_docs("app/", "app/doc-1", 10)
                .await
                .expect("list")
                .len(),
            1
        );
        assert!(
            store
                .list_docs("app_", "", 10)
                .await
                .expect("list")
                .is_empty(),
            "_ is literal"
        );
        assert!(store.delete_doc(&doc, true).await.expect("delete"));
        assert!(store.load(&doc).await.expect("load").is_empty());
        assert!(!store.delete_doc(&doc, true).await.expect("delete"));

        assert_eq!(store.app_count().await.expect("count"), 0);
        store
            .put_app_secret("confluence", "one")
            .await
            .expect("put");
        store
            .put_app_secret("confluence", "two")
            .await
            .expect("rotate");
        let secret = store.app_secret("confluence").await.expect("get");
        assert_eq!(secret.as_deref(), Some("two"));
        assert_eq!(store.app_count().await.expect("count"), 1);
        assert_eq!(store.app_secret("other").await.expect("get"), None);
    }
}
