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
use crate::ops::enrich::{Enrichment, Status};
use crate::source::replication::Progress;
use crate::telemetry::metrics::{metrics, FateLabel, StageLabel, StatusLabel};

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
                Fate::Process => {
                    c.processed += 1;
                    if e.enrichment.as_ref().is_some_and(|x| x.status == Status::Failed) {
                        c.failed += 1;
                    }
                }
                Fate::Filtered { .. } => c.filtered += 1,
                Fate::Skipped | Fate::Superseded | Fate::Deferred { .. } => c.skipped += 1,
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
        let mut enriched = EnrichedRows::default();
        let (mut d_lsn, mut d_seq, mut d_staging, mut d_uen, mut d_stage, mut d_reason, mut d_row) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for e in &batch.events {
            let pos = e.change.pos;
            match (&e.fate, e.company_id, e.enrichment.as_deref()) {
                (Fate::Process, Some(company_id), Some(enrichment)) => {
                    enriched.push(company_id, pos, e.change.row.id, enrichment);
                }
                (Fate::Process, Some(company_id), None) => {
                    h_company.push(company_id);
                    h_lsn.push(pos.lsn);
                    h_seq.push(pos.seq);
                    h_staging.push(e.change.row.id);
                }
                (Fate::DeadLetter { stage, reason }, _, _) => {
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
        futures::try_join!(history, dead, cp, enriched.write(&tx, self.run_id, on_conflict))?;
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

/// After the commit: the metrics of what the batch did, and each enriched company's `persist` and `summary`
/// stages, logged in its `company` span.
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
        match &e.fate {
            Fate::Process => {
                if let (Some(x), Some(company_id)) = (e.enrichment.as_deref(), e.company_id) {
                    m.enrichments.get_or_create(&StatusLabel { status: x.status.as_str() }).inc();
                    let uen = e.change.row.uen.as_deref().unwrap_or("");
                    let _span = tracing::info_span!("company", company_id, uen).entered();
                    tracing::info!(stage = "persist", position = %e.change.pos, "history row and companies fields committed");
                    tracing::info!(
                        stage = "summary",
                        status = x.status.as_str(),
                        domain = x.website_domain.as_deref().unwrap_or(""),
                        pages = x.pages_fetched,
                        emails = x.public_emails.len(),
                        phones = x.phones.len(),
                        llm_tokens = x.llm_tokens,
                        error = x.error.as_deref().unwrap_or(""),
                        enrich_ms = x.duration.as_millis() as u64,
                        latency_ms = e.selected_at.elapsed().as_millis() as u64,
                        "enriched"
                    );
                }
            }
            Fate::DeadLetter { stage, .. } => {
                m.dead_letters.get_or_create(&StageLabel { stage }).inc();
            }
            _ => {}
        }
    }
}

/// Enriched history rows, the companies fields they update, and their contacts, column by column.
#[derive(Default)]
struct EnrichedRows {
    company: Vec<i64>,
    lsn: Vec<String>,
    seq: Vec<i64>,
    staging: Vec<i64>,
    status: Vec<&'static str>,
    error: Vec<Option<String>>,
    domain: Vec<Option<String>>,
    about: Vec<Option<String>>,
    emails: Vec<serde_json::Value>,
    phones: Vec<serde_json::Value>,
    tech: Vec<serde_json::Value>,
    jobs: Vec<Option<i32>>,
    linkedin: Vec<Option<String>>,
    pages: Vec<i32>,
    duration_ms: Vec<i32>,
    tokens: Vec<i64>,
    employees: Vec<Option<i32>>,
    revenue: Vec<Option<String>>,
    corpus: Vec<Option<String>>,
    hq_city: Vec<Option<String>>,
    hq_country: Vec<Option<String>>,
    seen: Vec<bool>,
    contacts: Contacts,
}

#[derive(Default)]
struct Contacts {
    company: Vec<i64>,
    name: Vec<String>,
    title: Vec<Option<String>>,
    linkedin: Vec<Option<String>>,
    email: Vec<Option<String>>,
}

impl EnrichedRows {
    fn push(&mut self, company_id: i64, pos: crate::change::Position, staging_id: i64, x: &Enrichment) {
        self.company.push(company_id);
        self.lsn.push(pos.lsn_text());
        self.seq.push(pos.seq);
        self.staging.push(staging_id);
        self.status.push(x.status.as_str());
        self.error.push(x.error.clone());
        self.domain.push(x.website_domain.clone());
        self.about.push(x.about_text.clone());
        self.emails.push(serde_json::json!(x.public_emails));
        self.phones.push(serde_json::json!(x.phones));
        self.tech.push(serde_json::json!(x.tech_stack));
        self.jobs.push(x.jobs_count);
        self.linkedin.push(x.linkedin_url.clone());
        self.pages.push(x.pages_fetched);
        self.duration_ms.push(x.duration.as_millis().min(i32::MAX as u128) as i32);
        self.tokens.push(x.llm_tokens);
        self.employees.push(x.employees_est);
        self.revenue.push(x.revenue_bucket.clone());
        self.corpus.push(x.corpus.clone());
        self.hq_city.push(x.hq_city.clone());
        self.hq_country.push(x.hq_country.clone());
        self.seen.push(x.pages_fetched > 0);
        let mut seen = std::collections::HashSet::new();
        for c in &x.contacts {
            // One row per (company, name, title): the upsert below may not touch a row twice.
            if seen.insert((c.name.to_lowercase(), c.title.clone().unwrap_or_default())) {
                self.contacts.company.push(company_id);
                self.contacts.name.push(c.name.clone());
                self.contacts.title.push(c.title.clone());
                self.contacts.linkedin.push(c.linkedin_url.clone());
                self.contacts.email.push(c.email.clone());
            }
        }
    }

    async fn write(&self, tx: &tokio_postgres::Transaction<'_>, run_id: i64, on_conflict: &str) -> Result<()> {
        if self.company.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "insert into company_enrichment_runs (run_id, company_id, source_lsn, source_seq, staging_id, status, \
               error, enriched, website_domain, about_text, public_emails, phones, tech_stack, jobs_count, \
               linkedin_url, pages_fetched, duration_ms, llm_tokens, employees_est, revenue_bucket, corpus) \
             select $1, c, l::pg_lsn, s, i, st, er, true, d, a, pe, ph, ts, j, li, pf, du, lt, ee, rb, co \
             from unnest($2::int8[], $3::text[], $4::int8[], $5::int8[], $6::text[], $7::text[], $8::text[], \
               $9::text[], $10::jsonb[], $11::jsonb[], $12::jsonb[], $13::int4[], $14::text[], $15::int4[], \
               $16::int4[], $17::int8[], $18::int4[], $19::text[], $20::text[]) \
               as t(c, l, s, i, st, er, d, a, pe, ph, ts, j, li, pf, du, lt, ee, rb, co){on_conflict}"
        );
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 20] = [
            &run_id,
            &self.company,
            &self.lsn,
            &self.seq,
            &self.staging,
            &self.status,
            &self.error,
            &self.domain,
            &self.about,
            &self.emails,
            &self.phones,
            &self.tech,
            &self.jobs,
            &self.linkedin,
            &self.pages,
            &self.duration_ms,
            &self.tokens,
            &self.employees,
            &self.revenue,
            &self.corpus,
        ];
        let history = tx.execute(&sql, &params);
        // Fields found replace what was there; fields not found leave it.
        let companies = async {
            tx.execute(
                "update companies c set website_domain = coalesce(t.d, c.website_domain), \
               about_text = coalesce(t.a, c.about_text), employees_est = coalesce(t.ee, c.employees_est), \
               revenue_bucket = coalesce(t.rb, c.revenue_bucket), linkedin_url = coalesce(t.li, c.linkedin_url), \
               hq_city = coalesce(t.hc, c.hq_city), hq_country = coalesce(t.hn, c.hq_country), \
               last_seen = case when t.seen then now() else c.last_seen end, updated_at = now() \
             from unnest($1::int8[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::text[], $7::text[], \
               $8::text[], $9::bool[]) as t(id, d, a, ee, rb, li, hc, hn, seen) \
             where c.company_id = t.id",
                &[
                    &self.company,
                    &self.domain,
                    &self.about,
                    &self.employees,
                    &self.revenue,
                    &self.linkedin,
                    &self.hq_city,
                    &self.hq_country,
                    &self.seen,
                ],
            )
            .await
        };
        let c = &self.contacts;
        let contacts = async {
            if c.company.is_empty() {
                return Ok(0);
            }
            tx.execute(
                "insert into contacts (company_id, name, title, linkedin_url, email) \
                 select * from unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[]) \
                 on conflict (company_id, lower(name), coalesce(title, '')) do update \
                   set linkedin_url = coalesce(excluded.linkedin_url, contacts.linkedin_url), \
                       email = coalesce(excluded.email, contacts.email), updated_at = now()",
                &[&c.company, &c.name, &c.title, &c.linkedin, &c.email],
            )
            .await
        };
        futures::try_join!(history, companies, contacts).map_err(|e| Error::db("sink: writing enrichments", e))?;
        Ok(())
    }
}
