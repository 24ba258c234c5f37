//! The `export` step: leads at or above `SCORE_MIN_EXPORT` into Odoo CRM, through its external JSON-RPC API
//! (`/jsonrpc`, `execute_kw`, authenticated with an API key).
//!
//! Exports are side effects outside the database, so they are **at-least-once, made idempotent**:
//! - **Durable jobs.** The enrichment sink upserts an `odoo_exports` row (state `pending`, `version` + 1) in
//!   the transaction that commits the company's score. An exporter task beside each worker leases due rows
//!   with `SKIP LOCKED` (owner, expiry, `lease_seq`), so any number of workers share them and a killed
//!   worker's rows return after the lease.
//! - **Upserts keyed by the UEN.** The company is the `res.partner` whose `ref` is its UEN: found by that
//!   before anything is created, so an export that created a partner and died before recording its id
//!   finds it again instead of making a second. Contacts are child partners found by parent and name; the
//!   `crm.lead` is created once, found by its partner.
//! - **What Odoo returned is stored** (`partner_id`, `lead_id`): a later export updates.
//! - **Failures** (Odoo down, slow, refusing) retry with backoff (`ODOO_RETRY_BACKOFF`, doubling, at most
//!   an hour) and park after `ODOO_MAX_ATTEMPTS`; they are visible in `acraflow status` and the metrics.
//!   Odoo never stops enrichment: the exporter is a task of its own.
//! - The API key goes in the request body only; it is never logged, stored or put in an error.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::Secret;
use crate::error::{Error, Result};
use crate::telemetry::metrics::{metrics, ProviderLabel, ProviderNameLabel};

/// `ODOO_*`: on when `ODOO_URL` and `ODOO_API_KEY` are set.
#[derive(Debug, Clone)]
pub struct OdooSettings {
    pub url: url::Url,
    pub db: String,
    pub username: String,
    pub api_key: Secret,
    /// `SCORE_MIN_EXPORT`: companies scored at or above this are exported.
    pub min_score: f64,
    /// `ODOO_CREATE_LEADS`: a `crm.lead` per exported company (once).
    pub create_leads: bool,
    pub backoff: Duration,
    pub max_attempts: u32,
    pub timeout: Duration,
    pub poll: Duration,
    /// `ENRICH_LEASE`: an exporter's hold on an export; a killed exporter's rows return after it.
    pub lease: Duration,
    /// `ODOO_RATE`: calls across every worker (`None`: unpaced).
    pub rate: Option<crate::config::Rate>,
}

/// Rows an exporter leases at once.
const BATCH: i64 = 10;
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// An `odoo_exports` row leased by this exporter.
struct Leased {
    company_id: i64,
    lead_id: Option<i64>,
    lease_seq: i64,
    version: i64,
    attempts: i32,
}

/// What Odoo gets for one company.
struct Partner {
    uen: String,
    name: String,
    website: Option<String>,
    email: Option<String>,
    phone: Option<String>,
    about: Option<String>,
    rationale: Option<String>,
    contacts: Vec<(String, Option<String>, Option<String>)>,
}

/// The fields of `vals` with a value (nulls dropped).
fn known(mut vals: Value) -> Value {
    if let Some(map) = vals.as_object_mut() {
        map.retain(|_, v| !v.is_null());
    }
    vals
}

/// `acraflow refresh --exports`: parked exports (past `ODOO_MAX_ATTEMPTS`) due again, with fresh attempts.
pub async fn requeue_parked(client: &Client) -> Result<u64> {
    client
        .execute(
            "update odoo_exports set state = 'pending', attempts = 0, not_before = now(), updated_at = now() \
             where state = 'parked'",
            &[],
        )
        .await
        .map_err(|e| Error::db("re-queuing parked exports (odoo_exports)", e))
}

pub struct Exporter {
    settings: OdooSettings,
    http: reqwest::Client,
    client: Client,
    owner: String,
    uid: Option<i64>,
    next_id: u64,
    pacing: Option<crate::enrichment::usage::Pacing>,
}

/// Runs an exporter until `stop`; with `drain` set, it returns once no export is due.
pub fn spawn(
    settings: OdooSettings,
    client: Client,
    owner: String,
    mut stop: watch::Receiver<bool>,
    mut drain: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = match reqwest::Client::builder().timeout(settings.timeout).build() {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "odoo export: could not build its HTTP client; exports wait in odoo_exports");
                return;
            }
        };
        let poll = settings.poll;
        let pacing = settings.rate.map(|r| crate::enrichment::usage::Pacing::new("odoo", r.interval()));
        let mut ex = Exporter { settings, http, client, owner, uid: None, next_id: 0, pacing };
        loop {
            if *stop.borrow() {
                break;
            }
            let done = match ex.round().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %crate::pipeline::error_chain(&e), "odoo export round failed; retrying");
                    0
                }
            };
            if done > 0 {
                continue;
            }
            if *drain.borrow() && ex.due().await.unwrap_or(0) == 0 {
                break;
            }
            tokio::select! {
                _ = stop.changed() => {}
                _ = drain.changed() => {}
                () = tokio::time::sleep(poll) => {}
            }
        }
        ex.release().await;
    })
}

impl Exporter {
    /// Exports due now, not leased by anyone (backing-off rows are not due).
    async fn due(&self) -> Result<i64> {
        let r = self
            .client
            .query_one(
                "select count(*) from odoo_exports where state = 'pending' and not_before <= now() \
                   and (lease_expires_at is null or lease_expires_at < now())",
                &[],
            )
            .await
            .map_err(|e| Error::db("counting due exports", e))?;
        Ok(r.get(0))
    }

    async fn release(&self) {
        let _ = self
            .client
            .execute(
                "update odoo_exports set lease_owner = null, lease_expires_at = null where lease_owner = $1",
                &[&self.owner],
            )
            .await;
    }

    /// Leases up to [`BATCH`] due exports and works them; returns how many it worked.
    async fn round(&mut self) -> Result<usize> {
        let lease_secs = self.settings.lease.as_secs_f64();
        let rows = self
            .client
            .query(
                "with picked as ( \
                   select company_id from odoo_exports \
                   where state = 'pending' and not_before <= now() \
                     and (lease_expires_at is null or lease_expires_at < now()) \
                   order by not_before, company_id limit $1 for update skip locked) \
                 update odoo_exports e set lease_owner = $2, lease_expires_at = now() + make_interval(secs => $3), \
                   lease_seq = e.lease_seq + 1 \
                 from picked where e.company_id = picked.company_id \
                 returning e.company_id, e.partner_id, e.lead_id, e.lease_seq, e.version, e.attempts",
                &[&BATCH, &self.owner, &lease_secs],
            )
            .await
            .map_err(|e| Error::db("leasing odoo exports", e))?;
        let leased: Vec<Leased> = rows
            .iter()
            .map(|r| Leased {
                company_id: r.get(0),
                lead_id: r.get(2),
                lease_seq: r.get(3),
                version: r.get(4),
                attempts: r.get(5),
            })
            .collect();
        for job in &leased {
            let outcome = match self.partner(job.company_id).await? {
                Some(p) => self.export(&p, job).await,
                None => Err("the company is no longer in companies".to_owned()),
            };
            self.record(job, outcome).await?;
        }
        Ok(leased.len())
    }

    async fn partner(&self, company_id: i64) -> Result<Option<Partner>> {
        let q = |e| Error::db("reading a company to export", e);
        let Some(r) = self
            .client
            .query_opt(
                "select c.uen, c.name, c.website_domain, c.about_text, h.public_emails->>0, h.phones->>0, s.rationale \
                 from companies c \
                 left join lateral (select public_emails, phones from company_enrichment_runs h \
                   where h.company_id = c.company_id and h.enriched and h.status <> 'failed' \
                   order by h.id desc limit 1) h on true \
                 left join lead_scores s on s.company_id = c.company_id \
                 where c.company_id = $1 and c.uen is not null",
                &[&company_id],
            )
            .await
            .map_err(q)?
        else {
            return Ok(None);
        };
        let contacts = self
            .client
            .query(
                "select name, title, email from contacts where company_id = $1 order by lower(name) limit 50",
                &[&company_id],
            )
            .await
            .map_err(q)?
            .iter()
            .map(|c| (c.get(0), c.get(1), c.get(2)))
            .collect();
        Ok(Some(Partner {
            uen: r.get(0),
            name: r.get(1),
            website: r.get::<_, Option<String>>(2).map(|d| format!("https://{d}")),
            about: r.get(3),
            email: r.get(4),
            phone: r.get(5),
            rationale: r.get(6),
            contacts,
        }))
    }

    /// Creates or updates the partner, its contacts and (once) its lead; returns (partner id, lead id).
    async fn export(&mut self, p: &Partner, job: &Leased) -> std::result::Result<(i64, Option<i64>), String> {
        let started = std::time::Instant::now();
        // Only what we know: a field we did not find is left as Odoo has it (a salesperson may have set it).
        let vals = known(json!({
            "name": p.name, "ref": p.uen, "is_company": true, "website": p.website, "email": p.email,
            "phone": p.phone, "comment": p.about,
        }));
        // The partner is the one whose ref is the UEN, whatever id was stored: Odoo is the truth.
        let found = self
            .execute_kw(
                "res.partner",
                "search",
                json!([[["ref", "=", p.uen], ["is_company", "=", true]]]),
                json!({"limit": 1}),
            )
            .await?;
        let partner_id = match found.as_array().and_then(|a| a.first()).and_then(Value::as_i64) {
            Some(id) => {
                self.execute_kw("res.partner", "write", json!([[id], vals]), json!({})).await?;
                id
            }
            None => self
                .execute_kw("res.partner", "create", json!([vals]), json!({}))
                .await?
                .as_i64()
                .ok_or("Odoo's create of res.partner did not answer an id")?,
        };
        for (name, title, email) in &p.contacts {
            let found = self
                .execute_kw(
                    "res.partner",
                    "search",
                    json!([[["parent_id", "=", partner_id], ["name", "=", name]]]),
                    json!({"limit": 1}),
                )
                .await?;
            let vals = known(
                json!({"name": name, "parent_id": partner_id, "function": title, "email": email, "type": "contact"}),
            );
            match found.as_array().and_then(|a| a.first()).and_then(Value::as_i64) {
                Some(id) => {
                    self.execute_kw("res.partner", "write", json!([[id], vals]), json!({})).await?;
                }
                None => {
                    self.execute_kw("res.partner", "create", json!([vals]), json!({})).await?;
                }
            }
        }
        let mut lead_id = job.lead_id;
        if self.settings.create_leads && lead_id.is_none() {
            let found = self
                .execute_kw("crm.lead", "search", json!([[["partner_id", "=", partner_id]]]), json!({"limit": 1}))
                .await?;
            lead_id = match found.as_array().and_then(|a| a.first()).and_then(Value::as_i64) {
                Some(id) => Some(id),
                None => self
                    .execute_kw(
                        "crm.lead",
                        "create",
                        json!([known(json!({"name": p.name, "partner_id": partner_id, "type": "lead",
                            "email_from": p.email, "phone": p.phone, "website": p.website,
                            "description": p.rationale}))]),
                        json!({}),
                    )
                    .await?
                    .as_i64(),
            };
        }
        tracing::info!(target: crate::telemetry::COMPANY, stage = "export", uen = %p.uen, partner_id,
            lead_id, ms = started.elapsed().as_millis() as u64, "exported to Odoo");
        Ok((partner_id, lead_id))
    }

    /// Writes an export's outcome, fenced by the lease it ran under. A newer enrichment that re-enqueued the
    /// company meanwhile (`version` moved) keeps it pending, with the ids just learned.
    async fn record(&self, job: &Leased, outcome: std::result::Result<(i64, Option<i64>), String>) -> Result<()> {
        let m = crate::telemetry::metrics::metrics();
        let q = |e| Error::db("recording an odoo export", e);
        match outcome {
            Ok((partner, lead)) => {
                m.odoo_exports.get_or_create(&crate::telemetry::metrics::OutcomeLabel { outcome: "ok" }).inc();
                self.client
                    .execute(
                        "update odoo_exports set partner_id = $3, lead_id = coalesce($4, lead_id), \
                           state = case when version = $5 then 'done' else 'pending' end, \
                           exported_at = now(), attempts = 0, last_error = null, \
                           lease_owner = null, lease_expires_at = null, updated_at = now() \
                         where company_id = $1 and lease_owner = $2 and lease_seq = $6",
                        &[&job.company_id, &self.owner, &partner, &lead, &job.version, &job.lease_seq],
                    )
                    .await
                    .map_err(q)?;
            }
            Err(why) => {
                m.odoo_exports.get_or_create(&crate::telemetry::metrics::OutcomeLabel { outcome: "failed" }).inc();
                let attempts = job.attempts + 1;
                let wait = self.settings.backoff.saturating_mul(1u32 << (attempts as u32 - 1).min(20)).min(MAX_BACKOFF);
                let parked = attempts as u32 >= self.settings.max_attempts;
                tracing::warn!(target: crate::telemetry::COMPANY, stage = "export", company_id = job.company_id,
                    attempt = attempts, parked, retry_in_ms = wait.as_millis() as u64, error = %why, "Odoo export failed");
                self.client
                    .execute(
                        "update odoo_exports set attempts = $3, last_error = $4, \
                           state = case when $6 then 'parked' else 'pending' end, \
                           not_before = now() + make_interval(secs => $5), \
                           lease_owner = null, lease_expires_at = null, updated_at = now() \
                         where company_id = $1 and lease_owner = $2 and lease_seq = $7",
                        &[&job.company_id, &self.owner, &attempts, &why, &wait.as_secs_f64(), &parked, &job.lease_seq],
                    )
                    .await
                    .map_err(q)?;
            }
        }
        Ok(())
    }

    async fn login(&mut self) -> std::result::Result<i64, String> {
        if let Some(uid) = self.uid {
            return Ok(uid);
        }
        let s = &self.settings;
        let args = json!([s.db, s.username, s.api_key.expose()]);
        let uid = self.call("common", "login", args).await?;
        let s = &self.settings;
        match uid.as_i64() {
            Some(uid) => {
                self.uid = Some(uid);
                Ok(uid)
            }
            None => Err(format!(
                "Odoo refused the login of ODOO_USERNAME={} to ODOO_DB={} (check ODOO_API_KEY)",
                s.username, s.db
            )),
        }
    }

    async fn execute_kw(
        &mut self,
        model: &str,
        method: &str,
        args: Value,
        kwargs: Value,
    ) -> std::result::Result<Value, String> {
        let uid = self.login().await?;
        let s = &self.settings;
        let args = json!([s.db, uid, s.api_key.expose(), model, method, args, kwargs]);
        self.call("object", "execute_kw", args).await.map_err(|e| format!("{model}.{method}: {e}"))
    }

    /// One JSON-RPC call, in its turn (`ODOO_RATE`): `{"jsonrpc": "2.0", "method": "call", "params":
    /// {service, method, args}}`.
    async fn call(&mut self, service: &str, method: &str, args: Value) -> std::result::Result<Value, String> {
        if let Some(p) = &self.pacing {
            let waited = p.wait_turn(&self.client).await.map_err(|e| e.to_string())?;
            metrics().provider_wait.get_or_create(&ProviderNameLabel { provider: "odoo" }).inc_by(waited.as_secs_f64());
        }
        let answer = self.call_now(service, method, args).await;
        let outcome = match &answer {
            Ok(_) => "ok",
            Err(e) if e.starts_with("Odoo: ") => "refused",
            Err(_) => "error",
        };
        metrics().provider_calls.get_or_create(&ProviderLabel { provider: "odoo", outcome }).inc();
        answer
    }

    async fn call_now(&mut self, service: &str, method: &str, args: Value) -> std::result::Result<Value, String> {
        self.next_id += 1;
        let url = format!("{}/jsonrpc", self.settings.url.as_str().trim_end_matches('/'));
        let body = json!({"jsonrpc": "2.0", "method": "call", "id": self.next_id,
            "params": {"service": service, "method": method, "args": args}});
        let resp = self.http.post(&url).json(&body).send().await.map_err(|e| {
            if e.is_timeout() {
                "Odoo did not answer in time".to_owned()
            } else {
                "could not reach Odoo (ODOO_URL)".to_owned()
            }
        })?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(format!("Odoo answered HTTP {status}"));
        }
        let v: Value = resp.json().await.map_err(|_| "Odoo's answer is not JSON-RPC".to_owned())?;
        if let Some(err) = v.get("error") {
            let msg = err
                .pointer("/data/message")
                .or_else(|| err.get("message"))
                .and_then(Value::as_str)
                .unwrap_or("an error without a message");
            return Err(format!("Odoo: {}", msg.chars().take(300).collect::<String>()));
        }
        v.get("result").cloned().ok_or_else(|| "Odoo's answer has no result".to_owned())
    }
}
