//! The enrichment sink: commits finished jobs, several at a time, each in the same transaction as its
//! effects.
//!
//! For every job it first checks, under the job's row lock, that this worker still holds the lease it ran
//! under (owner and `lease_seq`, see `queue`). A job whose lease was lost (the worker stalled past
//! `ENRICH_LEASE` and another took it) commits nothing here. For the jobs still held:
//! - **done** (ok or degraded, or a final failure): one history row (`company_enrichment_runs`, keyed by
//!   job and lease), the companies fields, the contacts, and the job's removal; if a newer change arrived
//!   while it ran (`version` moved), the job is released to run again instead of removed;
//! - **a transient failure** (timeouts, refused connections, HTTP 429/5xx) with attempts left: the job
//!   waits `ENRICH_RETRY_BACKOFF × 2^attempts` and runs again at retry priority; nothing else is written;
//! - **a transient failure with no attempts left**: parked, with its error and a `failed` history row;
//!   `acraflow refresh --failed` re-queues it.
//!
//! No value may stop the worker. Text is cleaned before it is sent (NUL and other control characters
//! removed, lengths capped so no index entry overflows), contacts are deduplicated with the database's own
//! `lower()`, and when a batch is still refused for its data (not its connection), its jobs are committed
//! one by one: the one refused alone is dead-lettered (`dead_letters`, stage `enrich`) and parked, and the
//! rest commit. Without this, the same job would be leased, crawled and refused again after every restart.

use std::time::Duration;

use tokio_postgres::Client;

use crate::enrichment::enrich::{Enrichment, Status};
use crate::enrichment::queue::{Job, PRIORITY_RETRY};
use crate::error::{Error, ErrorKind, Result};
use crate::telemetry::metrics::{metrics, StatusLabel};

/// How failed jobs are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// `ENRICH_MAX_ATTEMPTS`: attempts in all before a job is parked.
    pub max_attempts: u32,
    /// `ENRICH_RETRY_BACKOFF`: the wait after the first failure; it doubles with each further one.
    pub backoff: Duration,
}

impl RetryPolicy {
    pub fn delay(&self, failures: u32) -> Duration {
        self.backoff.saturating_mul(1u32 << failures.saturating_sub(1).min(20))
    }
}

/// A job and what its enrichment found.
pub struct Done {
    pub job: Job,
    pub enrichment: Enrichment,
}

/// What a commit did, counted per job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcomes {
    pub ok: u64,
    pub degraded: u64,
    /// Final failures: not retryable, or parked after the last attempt.
    pub failed: u64,
    pub retried: u64,
    pub parked: u64,
    /// Released to run again because a newer change arrived while they ran.
    pub rerun: u64,
    /// Leases lost before the commit (nothing written).
    pub lost: u64,
    /// Jobs whose results the database refused: dead-lettered and parked.
    pub dead_lettered: u64,
    /// Enqueue-to-commit seconds of each job removed.
    pub latencies: Vec<f64>,
}

impl Outcomes {
    pub fn add(&mut self, o: &Outcomes) {
        self.ok += o.ok;
        self.degraded += o.degraded;
        self.failed += o.failed;
        self.retried += o.retried;
        self.parked += o.parked;
        self.rerun += o.rerun;
        self.lost += o.lost;
        self.dead_lettered += o.dead_lettered;
    }

    /// Enrichments finished (a history row written).
    pub fn finished(&self) -> u64 {
        self.ok + self.degraded + self.failed
    }
}

pub struct EnrichmentSink {
    client: Client,
    owner: String,
    run_id: i64,
    retry: RetryPolicy,
    /// `SCORE_MIN_EXPORT` when the export step is on: a score at or above it enqueues an Odoo export.
    export_min: Option<f64>,
}

/// What to do with one held job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Write its effects, then remove it (or release it when its version moved).
    Commit {
        remove: bool,
    },
    Retry,
    Park,
    /// A transient failure of an outdated version: release it to run the newer change.
    Rerun,
}

/// The pure decision for a job still held: `version` and `attempts` as the row has them now.
fn decide(done: &Done, version: i64, attempts: i32, retry: &RetryPolicy) -> Verdict {
    let current = version == done.job.version;
    let x = &done.enrichment;
    if x.status == Status::Failed && x.transient {
        if !current {
            return Verdict::Rerun;
        }
        return if (attempts as u32 + 1) < retry.max_attempts { Verdict::Retry } else { Verdict::Park };
    }
    Verdict::Commit { remove: current }
}

impl EnrichmentSink {
    pub fn new(client: Client, owner: String, run_id: i64, retry: RetryPolicy) -> Self {
        EnrichmentSink { client, owner, run_id, retry, export_min: None }
    }

    /// Turns on the export step's enqueue (see `export`).
    pub fn with_exports(mut self, min_score: Option<f64>) -> Self {
        self.export_min = min_score;
        self
    }

    /// Commits `done` (jobs this worker leased) in one transaction; when the database refuses the batch for
    /// a value in it, job by job, dead-lettering the job it refuses (see the module doc).
    pub async fn write(&mut self, done: &[Done]) -> Result<Outcomes> {
        match self.write_batch(done).await {
            Err(e) if refused_for_data(&e) => {
                tracing::warn!(jobs = done.len(), error = %crate::run::error_chain(&e),
                    "the database refused a value in this batch; committing its jobs one by one");
                let mut out = Outcomes::default();
                for d in done {
                    let one = match self.write_batch(std::slice::from_ref(d)).await {
                        Err(e) if refused_for_data(&e) => self.dead_letter(d, &e).await?,
                        other => other?,
                    };
                    out.add(&one);
                    out.latencies.extend(one.latencies);
                }
                Ok(out)
            }
            other => other,
        }
    }

    /// Dead-letters a job whose result the database refuses, and parks it (its lease still held).
    async fn dead_letter(&mut self, d: &Done, e: &Error) -> Result<Outcomes> {
        let q = |e| Error::db("enrichment sink: dead-lettering a refused job", e);
        let reason = format!(
            "the database refused this company's enrichment: {}; the job is parked (`acraflow refresh --failed` \
             re-queues it)",
            crate::run::error_chain(e)
        );
        tracing::error!(job_id = d.job.id, company_id = d.job.company.id, reason = %reason, "dead-lettered");
        let row = serde_json::json!({
            "job_id": d.job.id, "company_id": d.job.company.id, "uen": d.job.company.uen, "name": clean(&d.job.company.name, 500),
            "status": d.enrichment.status.as_str(), "website_domain": d.enrichment.website_domain.as_deref().map(|t| clean(t, 253)),
        });
        let tx = self.client.transaction().await.map_err(q)?;
        let parked = tx
            .execute(
                "update enrichment_jobs set lease_owner = null, lease_expires_at = null, state = 'parked', \
                   attempts = attempts + 1, last_error = $4, updated_at = now() \
                 where job_id = $1 and lease_owner = $2 and lease_seq = $3",
                &[&d.job.id, &self.owner, &d.job.lease_seq, &clean(&reason, 2000)],
            )
            .await
            .map_err(q)?;
        if parked == 0 {
            return Ok(Outcomes { lost: 1, ..Default::default() });
        }
        tx.execute(
            "insert into dead_letters (run_id, source_lsn, source_seq, uen, stage, reason, row) \
             values ($1, '0/0', $2, $3, 'enrich', $4, $5) on conflict (source_lsn, source_seq, stage) do nothing",
            &[&self.run_id, &d.job.id, &d.job.company.uen, &reason, &row],
        )
        .await
        .map_err(q)?;
        tx.commit().await.map_err(q)?;
        metrics().dead_letters.get_or_create(&crate::telemetry::metrics::StageLabel { stage: "enrich" }).inc();
        Ok(Outcomes { failed: 1, parked: 1, dead_lettered: 1, ..Default::default() })
    }

    async fn write_batch(&mut self, done: &[Done]) -> Result<Outcomes> {
        let q = |e| Error::db("enrichment sink: committing finished jobs", e);
        let mut out = Outcomes::default();
        let tx = self.client.transaction().await.map_err(q)?;
        let ids: Vec<i64> = done.iter().map(|d| d.job.id).collect();
        let seqs: Vec<i64> = done.iter().map(|d| d.job.lease_seq).collect();
        let held = tx
            .query(
                "select j.job_id, j.version, j.attempts, j.enqueued_at from enrichment_jobs j \
                 join unnest($1::int8[], $2::int8[]) as t(id, ls) on j.job_id = t.id and j.lease_seq = t.ls \
                 where j.lease_owner = $3 order by j.company_id for update of j",
                &[&ids, &seqs, &self.owner],
            )
            .await
            .map_err(q)?;
        let held: foldhash::HashMap<i64, (i64, i32, std::time::SystemTime)> =
            held.iter().map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3)))).collect();
        let mut rows = EnrichedRows::default();
        let (mut remove, mut release) = (Vec::new(), Vec::new());
        let (mut retry_ids, mut retry_errors, mut retry_secs) = (Vec::new(), Vec::new(), Vec::new());
        let (mut park_ids, mut park_errors) = (Vec::new(), Vec::new());
        for d in done {
            let Some(&(version, attempts, enqueued_at)) = held.get(&d.job.id) else {
                tracing::warn!(job_id = d.job.id, company_id = d.job.company.id,
                    "lost the job's lease before committing it (ENRICH_LEASE too short for this work?); another worker runs it");
                out.lost += 1;
                continue;
            };
            let error = d.enrichment.error.clone().unwrap_or_default();
            match decide(d, version, attempts, &self.retry) {
                Verdict::Commit { remove: r } => {
                    rows.push(d, enqueued_at, false);
                    match d.enrichment.status {
                        Status::Ok => out.ok += 1,
                        Status::Degraded => out.degraded += 1,
                        Status::Failed => out.failed += 1,
                    }
                    if r {
                        remove.push(d.job.id);
                        out.latencies.push(enqueued_at.elapsed().map(|e| e.as_secs_f64()).unwrap_or(0.0));
                    } else {
                        release.push(d.job.id);
                        out.rerun += 1;
                    }
                }
                Verdict::Rerun => {
                    release.push(d.job.id);
                    out.rerun += 1;
                }
                Verdict::Retry => {
                    retry_ids.push(d.job.id);
                    retry_errors.push(error);
                    retry_secs.push(self.retry.delay(attempts as u32 + 1).as_secs_f64());
                    out.retried += 1;
                }
                Verdict::Park => {
                    rows.push(d, enqueued_at, true);
                    park_ids.push(d.job.id);
                    park_errors.push(error);
                    out.failed += 1;
                    out.parked += 1;
                }
            }
        }
        let effects = rows.write(&tx, self.run_id, self.export_min);
        let removed = async {
            if remove.is_empty() {
                return Ok(0);
            }
            tx.execute("delete from enrichment_jobs where job_id = any($1)", &[&remove]).await
        };
        let released = async {
            if release.is_empty() {
                return Ok(0);
            }
            tx.execute(
                "update enrichment_jobs set lease_owner = null, lease_expires_at = null, attempts = 0, \
                   updated_at = now() where job_id = any($1)",
                &[&release],
            )
            .await
        };
        let retried = async {
            if retry_ids.is_empty() {
                return Ok(0);
            }
            tx.execute(
                "update enrichment_jobs j set lease_owner = null, lease_expires_at = null, attempts = j.attempts + 1, \
                   last_error = t.e, reason = 'retry', priority = greatest(j.priority, $4), \
                   not_before = now() + make_interval(secs => t.s), updated_at = now() \
                 from unnest($1::int8[], $2::text[], $3::float8[]) as t(id, e, s) where j.job_id = t.id",
                &[&retry_ids, &retry_errors, &retry_secs, &PRIORITY_RETRY],
            )
            .await
        };
        let parked = async {
            if park_ids.is_empty() {
                return Ok(0);
            }
            tx.execute(
                "update enrichment_jobs j set lease_owner = null, lease_expires_at = null, attempts = j.attempts + 1, \
                   last_error = t.e, state = 'parked', updated_at = now() \
                 from unnest($1::int8[], $2::text[]) as t(id, e) where j.job_id = t.id",
                &[&park_ids, &park_errors],
            )
            .await
        };
        // Issued together: tokio-postgres pipelines them on the one connection.
        let (effects, removed, released, retried, parked) = futures::join!(effects, removed, released, retried, parked);
        effects?;
        for r in [removed, released, retried, parked] {
            r.map_err(q)?;
        }
        tx.commit().await.map_err(q)?;
        record_committed(done, &held);
        let m = metrics();
        m.failures.inc_by(out.failed);
        for l in &out.latencies {
            m.queue_latency.observe(*l);
        }
        Ok(out)
    }
}

/// The server refused a value (an encoding error, a constraint, a trigger): the same statement fails the
/// same way every time, unlike a lost connection or a deadlock.
fn refused_for_data(e: &Error) -> bool {
    e.kind() == ErrorKind::Database && !e.is_retryable() && e.sql_state().is_some()
}

/// Text as the database takes it: no NUL or other control characters (newlines and tabs kept), at most
/// `max` characters.
pub fn clean(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control() || matches!(c, '\n' | '\t')).take(max).collect()
}

fn clean_opt(text: &Option<String>, max: usize) -> Option<String> {
    text.as_deref().map(|t| clean(t, max)).filter(|t| !t.trim().is_empty())
}

fn clean_list(items: &[String], max: usize) -> serde_json::Value {
    serde_json::json!(items.iter().map(|t| clean(t, max)).filter(|t| !t.is_empty()).take(50).collect::<Vec<_>>())
}

/// After the commit: the metrics and each committed company's `persist` and `summary` stages, in its span.
fn record_committed(done: &[Done], held: &foldhash::HashMap<i64, (i64, i32, std::time::SystemTime)>) {
    let m = metrics();
    for d in done {
        let Some((_, _, enqueued_at)) = held.get(&d.job.id) else { continue };
        let x = &d.enrichment;
        let company = &d.job.company;
        let _span = tracing::info_span!("company", company_id = company.id, uen = company.uen.as_deref().unwrap_or(""))
            .entered();
        if x.status == Status::Failed && x.transient {
            tracing::warn!(
                target: crate::telemetry::COMPANY,
                stage = "persist",
                job_id = d.job.id,
                attempt = d.job.attempts + 1,
                error = x.error.as_deref().unwrap_or(""),
                "failed; the job is retried later or parked"
            );
            m.enrichments.get_or_create(&StatusLabel { status: "retried" }).inc();
            continue;
        }
        m.enrichments.get_or_create(&StatusLabel { status: x.status.as_str() }).inc();
        tracing::info!(target: crate::telemetry::COMPANY, stage = "persist", job_id = d.job.id, "history row and companies fields committed");
        if x.status == Status::Failed {
            tracing::warn!(
                target: crate::telemetry::COMPANY,
                stage = "summary",
                job_id = d.job.id,
                domain = x.website_domain.as_deref().unwrap_or(""),
                error = x.error.as_deref().unwrap_or(""),
                "enrichment failed for good"
            );
        }
        tracing::info!(
            target: crate::telemetry::COMPANY,
            stage = "summary",
            status = x.status.as_str(),
            domain = x.website_domain.as_deref().unwrap_or(""),
            pages = x.pages_fetched,
            emails = x.public_emails.len(),
            phones = x.phones.len(),
            llm_tokens = x.llm_tokens,
            error = x.error.as_deref().unwrap_or(""),
            enrich_ms = x.duration.as_millis() as u64,
            reason = %d.job.reason,
            latency_ms = enqueued_at.elapsed().map(|e| e.as_millis() as u64).unwrap_or(0),
            "enriched"
        );
    }
}

/// Enriched history rows, the companies fields they update, and their contacts, column by column.
#[derive(Default)]
struct EnrichedRows {
    company: Vec<i64>,
    job: Vec<i64>,
    lease: Vec<i64>,
    reason: Vec<String>,
    enqueued: Vec<std::time::SystemTime>,
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
    hq_postal: Vec<Option<String>>,
    confidence: Vec<Option<f32>>,
    evidence: Vec<Option<serde_json::Value>>,
    source: Vec<Option<&'static str>>,
    notes: Vec<Option<serde_json::Value>>,
    seen: Vec<bool>,
    /// A success: `companies.enriched_at` moves (what the stale sweeper reads).
    success: Vec<bool>,
    email_status: Vec<Option<serde_json::Value>>,
    contacts: Contacts,
    leads: Leads,
}

/// The `score` step's rows: `lead_features` and `lead_scores`, one per company.
#[derive(Default)]
struct Leads {
    company: Vec<i64>,
    features: Vec<serde_json::Value>,
    score: Vec<f64>,
    bucket: Vec<&'static str>,
    rationale: Vec<String>,
    reasons: Vec<serde_json::Value>,
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
    fn push(&mut self, d: &Done, enqueued_at: std::time::SystemTime, parked: bool) {
        let x = &d.enrichment;
        let company_id = d.job.company.id;
        self.company.push(company_id);
        self.job.push(d.job.id);
        self.lease.push(d.job.lease_seq);
        self.reason.push(d.job.reason.clone());
        self.enqueued.push(enqueued_at);
        self.status.push(x.status.as_str());
        self.error.push(clean_opt(
            &match (&x.error, parked) {
                (Some(e), true) => Some(format!("{e} (parked after {} attempts)", d.job.attempts + 1)),
                (e, _) => e.clone(),
            },
            2_000,
        ));
        self.domain.push(clean_opt(&x.website_domain, 253));
        self.about.push(clean_opt(&x.about_text, 10_000));
        self.emails.push(clean_list(&x.public_emails, 320));
        self.phones.push(clean_list(&x.phones, 64));
        self.tech.push(clean_list(&x.tech_stack, 100));
        self.jobs.push(x.jobs_count);
        self.linkedin.push(clean_opt(&x.linkedin_url, 500));
        self.pages.push(x.pages_fetched);
        self.duration_ms.push(x.duration.as_millis().min(i32::MAX as u128) as i32);
        self.tokens.push(x.llm_tokens);
        self.employees.push(x.employees_est);
        self.revenue.push(clean_opt(&x.revenue_bucket, 50));
        self.corpus.push(clean_opt(&x.corpus, 200_000));
        self.hq_city.push(clean_opt(&x.hq_city, 200));
        self.hq_country.push(clean_opt(&x.hq_country, 100));
        self.hq_postal.push(clean_opt(&x.hq_postal, 12));
        self.confidence.push(x.domain_confidence.map(|c| c as f32));
        self.evidence.push(x.domain_confidence.map(|_| serde_json::json!(x.domain_evidence)));
        self.source.push(x.domain_source);
        self.notes.push((!x.notes.is_empty()).then(|| clean_list(&x.notes[..x.notes.len().min(20)], 500)));
        self.seen.push(x.pages_fetched > 0);
        self.success.push(x.status != Status::Failed);
        self.email_status.push((!x.email_status.is_empty()).then(|| {
            serde_json::json!(x.email_status.iter().map(|(e, s)| [clean(e, 320), clean(s, 40)]).collect::<Vec<_>>())
        }));
        // A company's score once per commit (a batch never holds two jobs of one company: one job each).
        if let Some(lead) = &x.lead {
            if !self.leads.company.contains(&company_id) {
                self.leads.company.push(company_id);
                self.leads.features.push(serde_json::json!(lead.features));
                self.leads.score.push(lead.score);
                self.leads.bucket.push(lead.bucket);
                self.leads.rationale.push(clean(&lead.rationale, 1_000));
                self.leads.reasons.push(serde_json::json!(lead
                    .contributions
                    .iter()
                    .map(|(n, c)| serde_json::json!({"feature": n, "contribution": (c * 1e4).round() / 1e4}))
                    .collect::<Vec<_>>()));
            }
        }
        // Name and title capped so the unique index entry on (company, lower(name), title) always fits.
        for c in &x.contacts {
            let name = clean(&c.name, 200);
            if name.trim().is_empty() {
                continue;
            }
            self.contacts.company.push(company_id);
            self.contacts.name.push(name);
            self.contacts.title.push(clean_opt(&c.title, 300));
            self.contacts.linkedin.push(clean_opt(&c.linkedin_url, 500));
            self.contacts.email.push(clean_opt(&c.email, 320));
        }
    }

    async fn write(&self, tx: &tokio_postgres::Transaction<'_>, run_id: i64, export_min: Option<f64>) -> Result<()> {
        if self.company.is_empty() {
            return Ok(());
        }
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 27] = [
            &run_id,
            &self.company,
            &self.job,
            &self.lease,
            &self.reason,
            &self.enqueued,
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
            &self.confidence,
            &self.evidence,
            &self.source,
            &self.hq_postal,
            &self.notes,
            &self.email_status,
        ];
        let history = tx.execute(
            "insert into company_enrichment_runs (run_id, company_id, job_id, job_lease, job_reason, enqueued_at, \
               status, error, enriched, website_domain, about_text, public_emails, phones, tech_stack, jobs_count, \
               linkedin_url, pages_fetched, duration_ms, llm_tokens, employees_est, revenue_bucket, corpus, \
               domain_confidence, domain_evidence, domain_source, hq_postal_code, notes, email_status) \
             select $1, c, jb, ls, rs, eq, st, er, true, d, a, pe, ph, ts, j, li, pf, du, lt, ee, rb, co, dc, de, ds, \
               hp, nt, es \
             from unnest($2::int8[], $3::int8[], $4::int8[], $5::text[], $6::timestamptz[], $7::text[], $8::text[], \
               $9::text[], $10::text[], $11::jsonb[], $12::jsonb[], $13::jsonb[], $14::int4[], $15::text[], \
               $16::int4[], $17::int4[], $18::int8[], $19::int4[], $20::text[], $21::text[], $22::float4[], \
               $23::jsonb[], $24::text[], $25::text[], $26::jsonb[], $27::jsonb[]) \
               as t(c, jb, ls, rs, eq, st, er, d, a, pe, ph, ts, j, li, pf, du, lt, ee, rb, co, dc, de, ds, hp, nt, es)",
            &params,
        );
        // A successful enrichment replaces the website and its evidence with what it verified, none
        // included: "I don't know" replaces a guess. Without a website, nothing read from one stays (about,
        // LinkedIn, HQ, the LLM's estimates). With one, fields found replace what was there and fields not
        // found leave it. A failed enrichment changes no field (its history row keeps what it saw).
        let company_params: [&(dyn tokio_postgres::types::ToSql + Sync); 14] = [
            &self.company,
            &self.domain,
            &self.about,
            &self.employees,
            &self.revenue,
            &self.linkedin,
            &self.hq_city,
            &self.hq_country,
            &self.seen,
            &self.success,
            &self.confidence,
            &self.evidence,
            &self.source,
            &self.hq_postal,
        ];
        let companies = tx.execute(
            "update companies c set website_domain = t.d, domain_confidence = t.dc, domain_evidence = t.de, \
               domain_source = t.ds, \
               about_text = case when t.d is null then null else coalesce(t.a, c.about_text) end, \
               employees_est = case when t.d is null then null else coalesce(t.ee, c.employees_est) end, \
               revenue_bucket = case when t.d is null then null else coalesce(t.rb, c.revenue_bucket) end, \
               linkedin_url = case when t.d is null then null else coalesce(t.li, c.linkedin_url) end, \
               hq_city = case when t.d is null then null else coalesce(t.hc, c.hq_city) end, \
               hq_country = case when t.d is null then null else coalesce(t.hn, c.hq_country) end, \
               hq_postal_code = case when t.d is null then null else coalesce(t.hp, c.hq_postal_code) end, \
               last_seen = case when t.seen then now() else c.last_seen end, \
               enriched_at = case when t.ok then now() else c.enriched_at end, updated_at = now() \
             from unnest($1::int8[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::text[], $7::text[], \
               $8::text[], $9::bool[], $10::bool[], $11::float4[], $12::jsonb[], $13::text[], $14::text[]) \
               as t(id, d, a, ee, rb, li, hc, hn, seen, ok, dc, de, ds, hp) \
             where c.company_id = t.id and t.ok",
            &company_params,
        );
        let c = &self.contacts;
        let contacts = async {
            if c.company.is_empty() {
                return Ok(0);
            }
            tx.execute(
                // One row per key as the database compares names (its `lower()`, not Rust's): the upsert
                // may not touch a row twice.
                "insert into contacts (company_id, name, title, linkedin_url, email) \
                 select distinct on (c, lower(n), coalesce(t, '')) c, n, t, l, e \
                 from unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[]) as u(c, n, t, l, e) \
                 order by c, lower(n), coalesce(t, '') \
                 on conflict (company_id, lower(name), coalesce(title, '')) do update \
                   set linkedin_url = coalesce(excluded.linkedin_url, contacts.linkedin_url), \
                       email = coalesce(excluded.email, contacts.email), updated_at = now()",
                &[&c.company, &c.name, &c.title, &c.linkedin, &c.email],
            )
            .await
        };
        let l = &self.leads;
        let leads = async {
            if l.company.is_empty() {
                return Ok(0);
            }
            // Recomputed on every enrichment; the tenant is the session's (request.tenant_id), as for every
            // row acraflow writes, so row level security policies hold.
            tx.execute(
                "with f as ( \
                   insert into lead_features as lf (company_id, features, computed_at) \
                   select c, f, now() from unnest($1::int8[], $2::jsonb[]) as t(c, f) \
                   on conflict (company_id) do update set features = excluded.features, computed_at = now() \
                   returning company_id) \
                 insert into lead_scores as ls (company_id, score, bucket, rationale, reasons, updated_at) \
                 select c, s, b, r, rs, now() \
                 from unnest($1::int8[], $3::float8[], $4::text[], $5::text[], $6::jsonb[]) as t(c, s, b, r, rs) \
                 on conflict (company_id) do update set score = excluded.score, bucket = excluded.bucket, \
                   rationale = excluded.rationale, reasons = excluded.reasons, updated_at = now()",
                &[&l.company, &l.features, &l.score, &l.bucket, &l.rationale, &l.reasons],
            )
            .await
        };
        // Exports are side effects outside the database: a durable job per qualifying company, in this
        // transaction, worked by the exporter (see `export`). A new score re-asks (version + 1).
        let exports = async {
            let Some(min) = export_min else { return Ok(0) };
            let ids: Vec<i64> = l.company.iter().zip(&l.score).filter(|(_, s)| **s >= min).map(|(c, _)| *c).collect();
            if ids.is_empty() {
                return Ok(0);
            }
            tx.execute(
                "insert into odoo_exports as e (company_id) select unnest($1::int8[]) \
                 on conflict (company_id) do update set state = 'pending', version = e.version + 1, attempts = 0, \
                   not_before = now(), last_error = null, updated_at = now()",
                &[&ids],
            )
            .await
        };
        futures::try_join!(history, companies, contacts, leads, exports)
            .map_err(|e| Error::db("enrichment sink: writing enrichments", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrichment::enrich::{Company, JobOptions};

    fn done(status: Status, transient: bool, version: i64) -> Done {
        Done {
            job: Job {
                id: 1,
                company: Company { id: 1, name: "X".into(), ..Default::default() },
                reason: "new".into(),
                priority: 100,
                lease_seq: 1,
                version,
                attempts: 0,
                options: JobOptions::default(),
            },
            enrichment: Enrichment { status, transient, ..Default::default() },
        }
    }

    #[test]
    fn text_is_cleaned_of_control_characters_and_capped() {
        assert_eq!(clean("a\u{0}b\u{7}c\nd\te\r", 100), "abc\nd\te");
        assert_eq!(clean("İLKER", 3), "İLK");
        assert_eq!(clean_opt(&Some("\u{0}\u{1}".into()), 10), None, "nothing left is nothing");
        assert_eq!(clean_list(&["x\u{0}@y.sg".into(), "\u{0}".into()], 50), serde_json::json!(["x@y.sg"]));
    }

    #[test]
    fn transient_failures_retry_then_park_and_outdated_jobs_run_again() {
        let p = RetryPolicy { max_attempts: 3, backoff: Duration::from_secs(60) };
        assert_eq!(decide(&done(Status::Ok, false, 1), 1, 0, &p), Verdict::Commit { remove: true });
        assert_eq!(decide(&done(Status::Degraded, false, 1), 2, 0, &p), Verdict::Commit { remove: false });
        assert_eq!(decide(&done(Status::Failed, false, 1), 1, 0, &p), Verdict::Commit { remove: true }, "final");
        assert_eq!(decide(&done(Status::Failed, true, 1), 1, 0, &p), Verdict::Retry);
        assert_eq!(decide(&done(Status::Failed, true, 1), 1, 1, &p), Verdict::Retry);
        assert_eq!(decide(&done(Status::Failed, true, 1), 1, 2, &p), Verdict::Park, "the third attempt failed");
        assert_eq!(decide(&done(Status::Failed, true, 1), 2, 2, &p), Verdict::Rerun);
        let once = RetryPolicy { max_attempts: 1, ..p };
        assert_eq!(decide(&done(Status::Failed, true, 1), 1, 0, &once), Verdict::Park);
        assert_eq!(p.delay(1), Duration::from_secs(60));
        assert_eq!(p.delay(2), Duration::from_secs(120));
        assert_eq!(p.delay(3), Duration::from_secs(240));
    }
}
