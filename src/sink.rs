//! The Postgres sink: one transaction per batch with its history rows, dead letters and the new checkpoint.
//!
//! History rows (`company_enrichment_runs`) and dead letters are keyed by source position and inserted with
//! `ON CONFLICT DO NOTHING`, so a batch replayed after a crash adds nothing that is already there. The
//! checkpoint is committed in the same transaction, so it never runs ahead of the rows it covers.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::change::{Batch, Fate};
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::source::replication::Progress;

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
    /// Processing failed (enrichment); the history row says why.
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
}

impl PostgresSink {
    /// `progress` learns of every committed streamed batch, so the source can acknowledge its LSN.
    pub fn new(client: Client, checkpoint_key: String, run_id: i64, progress: Arc<Progress>) -> Self {
        PostgresSink { client, checkpoint_key, run_id, progress }
    }

    /// Commits the batch's effects and its checkpoint atomically; returns what the batch counted.
    pub async fn write(&mut self, batch: &Batch) -> Result<Counters> {
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
                    h_lsn.push(pos.lsn_text());
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
        let history = async {
            if h_company.is_empty() {
                return Ok(0);
            }
            tx.execute(
                "insert into company_enrichment_runs (run_id, company_id, source_lsn, source_seq, staging_id, status) \
                 select $1, c, l::pg_lsn, s, i, 'ok' from unnest($2::int8[], $3::text[], $4::int8[], $5::int8[]) \
                   as t(c, l, s, i) \
                 on conflict (source_lsn, source_seq) do nothing",
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
        futures::try_join!(history, dead, cp)?;
        tx.commit().await.map_err(|e| Error::db("sink: committing the batch and its checkpoint", e))?;
        if let Some(lsn) = batch.ack_lsn {
            self.progress.record(lsn);
        }
        Ok(counters)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}
