//! History eviction: Synchrony's soft and hard jobs, with its keys.
//!
//! A document's history is its update log (`doc_updates`): every accepted update, kept until a
//! compaction folds it into the document's snapshot. Compaction runs as documents are edited
//! (every `synchrony.compact.after.updates` rows) and when they unload, so the log of a live
//! document stays short; what it misses is the log of a document that was never unloaded
//! cleanly (the engine was killed) and not opened since. Eviction finds those:
//!
//! - the **soft job** (`synchrony.eviction.soft.job.*`, on by default) takes documents nobody has
//!   changed for `threshold.hours` (72) and nobody holds open on this node;
//! - the **hard job** (`synchrony.eviction.hard.job.*`, off by default) takes documents with log
//!   rows older than its threshold (360 hours), open or not; when deleting, documents nobody
//!   has changed for that long, open or not.
//!
//! Unlike Synchrony, eviction keeps each document's current state: its log is merged into a
//! compacted snapshot (deleted content dropped), so editors never lose content and a client
//! connected meanwhile notices nothing. With `synchrony.eviction.delete.content` it does what
//! Synchrony does and deletes the documents it takes (state and log; named versions stay): a
//! client still connected is closed with 4404 ("document evicted"). Each run handles at most the
//! batch count of documents; in a cluster each node evicts the documents it owns.
//!
//! `POST {ctx}/v1/history/evict/soft` and `…/hard` (admin) run a job now, on every node, with
//! optional `threshold-hours` (fractional, 0 and up), `delete` and `limit` overrides;
//! `GET {ctx}/v1/history/count?doc=` counts a document's stored rows.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use synchrony_protocol::DocId;

use crate::doc::DocCommand;
use crate::placement::Owner;
use crate::store::StoreError;
use crate::Engine;

/// When history is evicted.
#[derive(Debug, Clone, Args)]
pub struct EvictionConfig {
    /// Run the soft eviction job on schedule.
    #[arg(
        long = "eviction-soft-job-enabled",
        env = "SYNCHRONY_EVICTION_SOFT_JOB_ENABLED",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub soft_enabled: bool,

    /// The soft job takes documents nobody has changed for this many hours.
    #[arg(
        long = "eviction-soft-job-threshold-hours",
        env = "SYNCHRONY_EVICTION_SOFT_JOB_THRESHOLD_HOURS",
        default_value_t = 72
    )]
    pub soft_threshold_hours: u64,

    /// Documents the soft job handles per run.
    #[arg(
        long = "eviction-soft-job-content-batch-count",
        env = "SYNCHRONY_EVICTION_SOFT_JOB_CONTENT_BATCH_COUNT",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub soft_batch: u32,

    /// Run the hard eviction job on schedule.
    #[arg(
        long = "eviction-hard-job-enabled",
        env = "SYNCHRONY_EVICTION_HARD_JOB_ENABLED",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub hard_enabled: bool,

    /// The hard job takes documents with history older than this many hours, open or not.
    #[arg(
        long = "eviction-hard-job-threshold-hours",
        env = "SYNCHRONY_EVICTION_HARD_JOB_THRESHOLD_HOURS",
        default_value_t = 360
    )]
    pub hard_threshold_hours: u64,

    /// Documents the hard job handles per run.
    #[arg(
        long = "eviction-hard-job-content-batch-count",
        env = "SYNCHRONY_EVICTION_HARD_JOB_CONTENT_BATCH_COUNT",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub hard_batch: u32,

    /// Minutes between scheduled runs of the enabled jobs.
    #[arg(
        long = "eviction-job-interval-minutes",
        env = "SYNCHRONY_EVICTION_JOB_INTERVAL_MINUTES",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub interval_minutes: u64,

    /// Delete the documents eviction takes (Synchrony's behaviour) instead of keeping their
    /// current state as a compacted snapshot.
    #[arg(
        long = "eviction-delete-content",
        env = "SYNCHRONY_EVICTION_DELETE_CONTENT",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub delete_content: bool,
}

/// Which job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Job {
    Soft,
    Hard,
}

/// How a run goes.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub job: Job,
    /// Documents (soft) or history (hard) older than this count.
    pub threshold: Duration,
    pub delete: bool,
    pub limit: u32,
}

impl Run {
    /// A scheduled run of `job` as configured.
    pub fn configured(config: &EvictionConfig, job: Job) -> Self {
        let (hours, limit) = match job {
            Job::Soft => (config.soft_threshold_hours, config.soft_batch),
            Job::Hard => (config.hard_threshold_hours, config.hard_batch),
        };
        Self {
            job,
            threshold: Duration::from_secs(hours.saturating_mul(3600)),
            delete: config.delete_content,
            limit,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// Documents that qualified.
    pub documents: u64,
    /// Whose log was merged into their snapshot.
    pub compacted: u64,
    /// Log rows removed by those merges.
    pub rows_removed: u64,
    /// Documents deleted (`delete`).
    pub deleted: u64,
    /// Passed over: open here (soft job). Pages another node owns are left to it, uncounted.
    pub skipped: u64,
    /// Documents whose eviction failed (logged); tried again next run.
    pub failed: u64,
}

impl Report {
    pub fn add(&mut self, other: &Report) {
        self.documents += other.documents;
        self.compacted += other.compacted;
        self.rows_removed += other.rows_removed;
        self.deleted += other.deleted;
        self.skipped += other.skipped;
        self.failed += other.failed;
    }
}

/// Candidates are read in pages of this many.
const PAGE: u32 = 200;

/// Runs one eviction job on this node.
pub async fn run(engine: &Arc<Engine>, run: Run) -> Result<Report, StoreError> {
    // A huge threshold ("never") must not wrap into a cutoff in the future.
    let threshold = i64::try_from(run.threshold.as_millis()).unwrap_or(i64::MAX);
    let cutoff = crate::store::now_millis().saturating_sub(threshold);
    let mut report = Report::default();
    let mut after = String::new();
    'pages: loop {
        let page = match (run.job, run.delete) {
            // Idle documents; with content kept, only those that have history to remove.
            (Job::Soft, delete) | (Job::Hard, delete @ true) => {
                engine
                    .store
                    .idle_docs(cutoff, !delete, &after, PAGE)
                    .await?
            }
            (Job::Hard, false) => {
                engine
                    .store
                    .docs_with_log_before(cutoff, &after, PAGE)
                    .await?
            }
        };
        let Some(last) = page.last() else { break };
        after = last.clone();
        for id in page {
            let Ok(doc) = DocId::parse(&id) else {
                continue;
            };
            // Its owner runs the job on it and counts it; counted here too, a cluster's
            // summed report would count each page once per node.
            if !matches!(engine.placement().owner(&doc), Owner::Local) {
                continue;
            }
            if run.job == Job::Soft && engine.docs.is_loaded(&doc) {
                report.skipped += 1;
                continue;
            }
            report.documents += 1;
            evict_one(engine, &doc, run.delete, &mut report).await;
            if report.documents >= u64::from(run.limit) {
                break 'pages;
            }
        }
    }
    tracing::info!(job = ?run.job, ?report, "eviction ran");
    Ok(report)
}

async fn evict_one(engine: &Arc<Engine>, doc: &DocId, delete: bool, report: &mut Report) {
    if delete {
        // Through the document, so that a client connected meanwhile is closed (4404) and no
        // one is left editing a document whose stored state is gone.
        let deleted = engine
            .docs
            .request(doc, |reply| DocCommand::Delete {
                versions: false,
                reason: "document evicted",
                reply,
            })
            .await;
        match deleted {
            Ok(Ok(())) => report.deleted += 1,
            Ok(Err(error)) => {
                tracing::warn!(%doc, %error, "evicting a document failed");
                report.failed += 1;
            }
            Err(error) => {
                tracing::warn!(%doc, %error, "evicting a document failed");
                report.failed += 1;
            }
        }
        return;
    }
    // A compaction reads and rewrites storage in one transaction: safe beside a loaded
    // document and its clients, which keep their (identical) state.
    match engine.store.compact(doc).await {
        Ok(compaction) => {
            report.compacted += 1;
            report.rows_removed += compaction.merged_rows;
        }
        Err(error) => {
            tracing::warn!(%doc, %error, "evicting a document's history failed");
            report.failed += 1;
        }
    }
}

/// Runs the enabled jobs every `synchrony.eviction.job.interval.minutes` until shutdown.
pub fn schedule(engine: &Arc<Engine>) {
    let config = engine.config.eviction.clone();
    if !config.soft_enabled && !config.hard_enabled {
        return;
    }
    let (weak, cancel) = (Arc::downgrade(engine), engine.cancel.clone());
    engine.tracker.spawn(async move {
        let every = Duration::from_secs(config.interval_minutes.saturating_mul(60));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = cancel.cancelled() => return,
            }
            let Some(engine) = weak.upgrade() else { return };
            for (enabled, job) in [
                (config.soft_enabled, Job::Soft),
                (config.hard_enabled, Job::Hard),
            ] {
                if !enabled {
                    continue;
                }
                if let Err(error) = run(&engine, Run::configured(&config, job)).await {
                    tracing::warn!(?job, %error, "eviction failed; it runs again next time");
                }
            }
        }
    });
}
