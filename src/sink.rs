//! The Postgres sink: one transaction per batch with its history rows, dead letters and the new checkpoint.
//!
//! History rows (`company_enrichment_runs`) and dead letters are keyed by source position, so a batch
//! replayed after a crash adds nothing that is already there: dead letters with `ON CONFLICT DO NOTHING`;
//! history rows plainly first, and, when a row already holds one of the positions, again with
//! `ON CONFLICT DO NOTHING` (see [`PostgresSink::write`]). The checkpoint is committed in the same
//! transaction, so it never runs ahead of the rows it covers.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::change::{lsn_to_text, Batch, Fate};
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::source::replication::Progress;
use crate::telemetry::metrics::{metrics, FateLabel, StageLabel};

/// Counts of what the pipeline did, per run (also the `enrichment_runs` header's counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Changes read from the source.
    pub rows_in: u64,
    /// Changes processed: their company upserted and a history row written.
    pub processed: u64,
    /// Excluded by the filter (status or age).
    pub filtered: u64,
    /// Not processed again: recent history (dedupe) or repeated later in the same batch.
    pub skipped: u64,
    /// Enrichments committed (ok, degraded or failed for good), by the run's worker.
    pub enriched: u64,
    /// Enrichments that failed for good (not retryable, or parked after the last attempt); the history row
    /// says why.
    pub failed: u64,
    pub dead_lettered: u64,
    /// Deletes and truncates on staging (never applied to companies).
    pub ignored: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.rows_in += other.rows_in;
        self.processed += other.processed;
        self.filtered += other.filtered;
        self.skipped += other.skipped;
        self.enriched += other.enriched;
        self.failed += other.failed;
        self.dead_lettered += other.dead_lettered;
        self.ignored += other.ignored;
    }

    pub fn of(batch: &Batch) -> Counters {
        let mut c = Counters { rows_in: batch.events.len() as u64, ..Default::default() };
        for e in &batch.events {
            match e.fate {
                Fate::Process => c.processed += 1,
                Fate::Filtered { .. } => c.filtered += 1,
                Fate::Skipped | Fate::Superseded => c.skipped += 1,
                Fate::Ignored => c.ignored += 1,
                Fate::DeadLetter { .. } => c.dead_lettered += 1,
            }
        }
        c
    }
}

pub struct PostgresSink {
    client: Client,
    checkpoint_key: String,
    run_id: i64,
    progress: Arc<Progress>,
    /// In an enriching pipeline: enqueue processed changes' jobs, for this tenant.
    enqueue: Option<Option<String>>,
}

impl PostgresSink {
    /// `progress` learns of every committed streamed batch, so the source can acknowledge its LSN.
    pub fn new(client: Client, checkpoint_key: String, run_id: i64, progress: Arc<Progress>) -> Self {
        PostgresSink { client, checkpoint_key, run_id, progress, enqueue: None }
    }

    /// Enqueue an enrichment job for every processed change (tagged with `tenant`), in the batch's transaction.
    pub fn enqueueing(mut self, tenant: Option<String>) -> Self {
        self.enqueue = Some(tenant);
        self
    }

    /// Commits the batch's effects and its checkpoint atomically; returns what the batch counted.
    ///
    /// History rows are first written plainly, with `COPY`: a position after the checkpoint has no history
    /// row yet (both commit together). Skipping the `ON CONFLICT` check was a third faster than an insert
    /// with it; `COPY` writes a page of rows per WAL record instead of one record each, which the
    /// walsender then reads back, and costs the server less per row. Another engine over the same
    /// positions (a second checkpoint key) can still have written one; then the transaction fails on the
    /// position key and the batch is written again, with `INSERT ... ON CONFLICT DO NOTHING`.
    pub async fn write(&mut self, batch: &Batch) -> Result<Counters> {
        match self.write_as(batch, "").await {
            Err(e) if e.sql_state() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                tracing::debug!(error = %e, "sink: history rows exist for some positions; skipping them");
                self.write_as(batch, " on conflict (source_lsn, source_seq) do nothing").await
            }
            result => result,
        }
    }

    /// [`PostgresSink::write`], with `on_conflict` appended to the history inserts.
    async fn write_as(&mut self, batch: &Batch, on_conflict: &str) -> Result<Counters> {
        let counters = Counters::of(batch);
        let mut h_company = Vec::new();
        let mut h_lsn = Vec::new();
        let mut h_seq = Vec::new();
        let mut h_staging = Vec::new();
        let (mut d_lsn, mut d_seq, mut d_staging, mut d_uen, mut d_stage, mut d_reason, mut d_row) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for e in &batch.events {
            let pos = e.change.pos;
            match (&e.fate, e.company_id) {
                (Fate::Process, Some(company_id)) => {
                    h_company.push(company_id);
                    h_lsn.push(pos.lsn);
                    h_seq.push(pos.seq);
                    h_staging.push(e.change.row.id);
                }
                (Fate::DeadLetter { stage, reason }, _) => {
                    tracing::warn!(
                        staging_id = e.change.row.id, position = %pos, stage, reason = %reason,
                        "dead-lettered"
                    );
                    d_lsn.push(pos.lsn_text());
                    d_seq.push(pos.seq);
                    d_staging.push(e.change.row.id);
                    d_uen.push(e.change.row.uen.clone());
                    d_stage.push(*stage);
                    d_reason.push(reason.as_str());
                    d_row.push(e.change.row.to_json());
                }
                _ => {}
            }
        }
        let tx = self.client.transaction().await.map_err(|e| Error::db("sink: starting a transaction", e))?;
        let jobs = async {
            match &self.enqueue {
                Some(tenant) => {
                    crate::enrichment::queue::enqueue_changes(
                        &tx,
                        tenant.as_deref(),
                        &h_company,
                        &h_lsn,
                        &h_seq,
                        &h_staging,
                    )
                    .await
                }
                None => Ok(0),
            }
        };
        let history = async {
            if h_company.is_empty() {
                return Ok(0);
            }
            if on_conflict.is_empty() {
                return copy_history(&tx, self.run_id, &h_company, &h_lsn, &h_seq, &h_staging).await;
            }
            let h_lsn: Vec<String> = h_lsn.iter().map(|l| lsn_to_text(*l)).collect();
            tx.execute(
                &format!(
                    "insert into company_enrichment_runs (run_id, company_id, source_lsn, source_seq, staging_id, \
                       status) \
                     select $1, c, l::pg_lsn, s, i, 'ok' from unnest($2::int8[], $3::text[], $4::int8[], $5::int8[]) \
                       as t(c, l, s, i){on_conflict}"
                ),
                &[&self.run_id, &h_company, &h_lsn, &h_seq, &h_staging],
            )
            .await
            .map_err(|e| Error::db("sink: writing history rows", e))
        };
        let dead = async {
            if d_lsn.is_empty() {
                return Ok(0);
            }
            tx.execute(
                "insert into dead_letters (run_id, source_lsn, source_seq, staging_id, uen, stage, reason, row) \
                 select $1, l::pg_lsn, s, i, u, st, r, j \
                 from unnest($2::text[], $3::int8[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::jsonb[]) \
                   as t(l, s, i, u, st, r, j) \
                 on conflict (source_lsn, source_seq, stage) do nothing",
                &[&self.run_id, &d_lsn, &d_seq, &d_staging, &d_uen, &d_stage, &d_reason, &d_row],
            )
            .await
            .map_err(|e| Error::db("sink: writing dead letters", e))
        };
        let cp = checkpoint::save(&tx, &self.checkpoint_key, &batch.checkpoint);
        // Issued together: tokio-postgres pipelines them on the one connection.
        futures::try_join!(history, dead, cp, jobs)?;
        tx.commit().await.map_err(|e| Error::db("sink: committing the batch and its checkpoint", e))?;
        if let Some(lsn) = batch.ack_lsn {
            self.progress.record(lsn);
        }
        record_committed(batch, &counters);
        Ok(counters)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// Writes plain history rows (status `ok`, the column default) with binary `COPY`; returns the rows written.
async fn copy_history(
    tx: &tokio_postgres::Transaction<'_>,
    run_id: i64,
    company: &[i64],
    lsn: &[u64],
    seq: &[i64],
    staging: &[i64],
) -> Result<u64> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::{PgLsn, Type};
    let failed = |e| Error::db("sink: writing history rows", e);
    let sink = tx
        .copy_in(
            "copy company_enrichment_runs (run_id, company_id, source_lsn, source_seq, staging_id) from stdin binary",
        )
        .await
        .map_err(failed)?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::INT8, Type::PG_LSN, Type::INT8, Type::INT8]);
    futures::pin_mut!(writer);
    for (((company, lsn), seq), staging) in company.iter().zip(lsn).zip(seq).zip(staging) {
        let lsn = PgLsn::from(*lsn);
        writer.as_mut().write(&[&run_id, company, &lsn, seq, staging]).await.map_err(failed)?;
    }
    writer.finish().await.map_err(failed)
}

/// After the commit: the metrics of what the batch did.
fn record_committed(batch: &Batch, counters: &Counters) {
    let m = metrics();
    for (fate, n) in [
        ("processed", counters.processed),
        ("filtered", counters.filtered),
        ("skipped", counters.skipped),
        ("ignored", counters.ignored),
        ("dead_lettered", counters.dead_lettered),
    ] {
        if n > 0 {
            m.rows.get_or_create(&FateLabel { fate }).inc_by(n);
        }
    }
    m.processed.inc_by(counters.processed);
    m.failures.inc_by(counters.failed + counters.dead_lettered);
    m.checkpoint_lsn.set(batch.checkpoint.lsn.min(i64::MAX as u64) as i64);
    for e in &batch.events {
        if let Fate::DeadLetter { stage, .. } = &e.fate {
            m.dead_letters.get_or_create(&StageLabel { stage }).inc();
        }
    }
}
