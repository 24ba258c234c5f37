//! The job table `enrichment_jobs`: the durable edge between the registry dataflow and the enrichment
//! dataflow. PostgreSQL is the coordinator, as in River, Oban, graphile-worker or solid_queue: any number
//! of workers on any machines share the queue through row locks and leases, with no protocol of their own.
//!
//! Invariants:
//! - **One job per company** (a unique index). The registry sink enqueues a processed change's job in the
//!   transaction that commits the change and its checkpoint, so a change acknowledged to the slot always
//!   has its job, and a change replayed after a crash finds its job already there. A newer change, a
//!   refresh or a sweep *coalesces* into the existing job: the best priority wins and `version` is bumped.
//! - **A lease is a fencing token.** Leasing sets `lease_owner`, `lease_expires_at` and bumps `lease_seq`,
//!   under `for update skip locked` (workers never wait on each other's rows). A worker commits a job's
//!   effects only while the job still carries its owner and `lease_seq` (`sink::EnrichmentSink`): a worker
//!   that stalled past its lease and lost the job to another commits nothing.
//! - **Removal.** A job is deleted in the transaction that commits its effects (history row, companies
//!   fields), so its effects happen once even when its crawl ran twice. If its `version` moved while it was
//!   leased (a newer change arrived), the result is still committed and the job is released to run again.
//! - **At-least-once crawls.** A worker that dies holds its jobs until `lease_expires_at` (`ENRICH_LEASE`,
//!   renewed while the work is in flight); then another worker leases them. Crawling is at-least-once, its
//!   effects exactly-once.
//! - **Lock order.** Every statement that locks several jobs (the registry's enqueue, a refresh, the
//!   sink's fence, renewals, releases) takes them in `company_id` order, so two of them never deadlock.
//! - **Priority**: express refreshes, then new and changed companies, then retries, then stale companies;
//!   within a priority, the oldest first.

use std::time::Duration;

use tokio_postgres::{Client, GenericClient};

use crate::enrichment::enrich::{Company, JobOptions};
use crate::enrichment::usage::{ENRICHMENTS, TODAY};
use crate::error::{Error, Result};

pub const PRIORITY_EXPRESS: i32 = 0;
pub const PRIORITY_CHANGE: i32 = 100;
pub const PRIORITY_RETRY: i32 = 200;
pub const PRIORITY_STALE: i32 = 300;

/// A leased job.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub company: Company,
    pub reason: String,
    pub priority: i32,
    /// The fencing token of this lease.
    pub lease_seq: i64,
    /// The job's version when leased.
    pub version: i64,
    /// Failed attempts before this one.
    pub attempts: i32,
    pub options: JobOptions,
}

/// What a lease returned.
#[derive(Debug, Default)]
pub struct Leased {
    pub jobs: Vec<Job>,
    /// Fewer jobs than asked for because of the daily cap.
    pub capped: bool,
}

/// The registry sink's enqueue: one job per processed change's company, in the sink's transaction. A job
/// already there (waiting, leased or parked) takes the change in: it becomes pending again, with the better
/// of the two priorities, and its version moves so a worker holding it runs it again.
pub async fn enqueue_changes(
    tx: &impl GenericClient,
    tenant: Option<&str>,
    company: &[i64],
    lsn: &[u64],
    seq: &[i64],
    staging: &[i64],
) -> Result<u64> {
    if company.is_empty() {
        return Ok(0);
    }
    let lsn: Vec<String> = lsn.iter().map(|l| crate::change::lsn_to_text(*l)).collect();
    tx.execute(
        "insert into enrichment_jobs as j (company_id, tenant_id, reason, priority, source_lsn, source_seq, staging_id) \
         select t.c, $1, case when c.enriched_at is null then 'new' else 'changed' end, $6, t.l::pg_lsn, t.s, t.i \
         from unnest($2::int8[], $3::text[], $4::int8[], $5::int8[]) as t(c, l, s, i) \
           left join companies c on c.company_id = t.c \
         order by t.c \
         on conflict (company_id) do update set \
           version = j.version + 1, \
           reason = case when excluded.priority < j.priority then excluded.reason else j.reason end, \
           priority = least(j.priority, excluded.priority), \
           not_before = case when j.state = 'parked' then now() else j.not_before end, \
           attempts = case when j.state = 'parked' then 0 else j.attempts end, \
           state = 'pending', source_lsn = excluded.source_lsn, source_seq = excluded.source_seq, \
           staging_id = excluded.staging_id, updated_at = now()",
        &[&tenant, &company, &lsn, &seq, &staging, &PRIORITY_CHANGE],
    )
    .await
    .map_err(|e| Error::db("sink: enqueueing enrichment jobs", e))
}

/// Leases up to `n` waiting jobs for `owner` (express first, then by priority and age), counting them
/// against today's enrichments under the day's row lock so `cap` holds across workers.
pub async fn lease(
    client: &mut Client,
    owner: &str,
    tenant: Option<&str>,
    n: usize,
    lease: Duration,
    cap: Option<u64>,
    staging_table: &str,
) -> Result<Leased> {
    let q = |e| Error::db("leasing enrichment jobs", e);
    let tx = client.transaction().await.map_err(q)?;
    let mut want = n as i64;
    let mut capped = false;
    tx.execute(
        &format!("insert into enrichment_usage (day, kind) values ({TODAY}, $1) on conflict do nothing"),
        &[&ENRICHMENTS],
    )
    .await
    .map_err(q)?;
    let used: i64 = tx
        .query_one(
            &format!("select used from enrichment_usage where day = {TODAY} and kind = $1 for update"),
            &[&ENRICHMENTS],
        )
        .await
        .map_err(q)?
        .get(0);
    if let Some(cap) = cap {
        let left = (cap.min(i64::MAX as u64) as i64 - used).max(0);
        if left < want {
            capped = true;
            want = left;
        }
    }
    if want == 0 {
        tx.commit().await.map_err(q)?;
        return Ok(Leased { jobs: Vec::new(), capped });
    }
    let rows = tx
        .query(
            &format!(
                "with picked as ( \
               select job_id from enrichment_jobs \
               where state = 'pending' and not_before <= now() \
                 and (lease_expires_at is null or lease_expires_at < now()) \
                 and tenant_id is not distinct from $4 \
               order by priority, enqueued_at, job_id \
               limit $1 for update skip locked), \
             leased as ( \
               update enrichment_jobs j set lease_owner = $2, lease_seq = j.lease_seq + 1, updated_at = now(), \
                 lease_expires_at = now() + make_interval(secs => $3) \
               from picked where j.job_id = picked.job_id \
               returning j.job_id, j.company_id, j.reason, j.priority, j.lease_seq, j.version, j.attempts, \
                 j.overrides, j.enqueued_at, j.staging_id) \
             select l.job_id, l.company_id, l.reason, l.priority, l.lease_seq, l.version, l.attempts, l.overrides, \
               c.name, c.uen, c.website_domain, r.postal_code, r.street_name, r.building_name, r.former_names, \
               c.incorporation_year, c.industry_code \
             from leased l left join companies c on c.company_id = l.company_id \
             left join lateral ( \
               select nullif(btrim(s.postal_code), 'na') as postal_code, \
                 nullif(btrim(s.street_name), 'na') as street_name, \
                 nullif(btrim(s.building_name), 'na') as building_name, \
                 array_remove(array[nullif(btrim(s.former_entity_name1), 'na'), \
                   nullif(btrim(s.former_entity_name2), 'na'), nullif(btrim(s.former_entity_name3), 'na')], null) \
                   as former_names \
               from {staging_table} s \
               where s.id = coalesce(l.staging_id, (select h.staging_id from company_enrichment_runs h \
                   where h.company_id = l.company_id and h.staging_id is not null \
                   order by h.updated_at desc limit 1)) \
                 and upper(btrim(s.uen)) is not distinct from c.uen) r on true \
             order by l.priority, l.enqueued_at, l.job_id"
            ),
            &[&want, &owner, &lease.as_secs_f64(), &tenant],
        )
        .await
        .map_err(q)?;
    let mut jobs = Vec::with_capacity(rows.len());
    let mut orphans = Vec::new();
    for r in &rows {
        let id: i64 = r.get(0);
        let Some(name) = r.get::<_, Option<String>>(8) else {
            orphans.push(id); // its company is gone (never by acraflow): nothing to enrich
            continue;
        };
        let options: serde_json::Value = r.get(7);
        let options = serde_json::from_value(options).unwrap_or_else(|e| {
            tracing::warn!(job_id = id, error = %e, "ignoring the job's unreadable overrides");
            JobOptions::default()
        });
        jobs.push(Job {
            id,
            company: Company {
                id: r.get(1),
                name,
                uen: r.get(9),
                known_domain: r.get(10),
                postal_code: r.get(11),
                street: r.get(12),
                building: r.get(13),
                former_names: r.get::<_, Option<Vec<String>>>(14).unwrap_or_default(),
                incorporation_year: r.get(15),
                industry_code: r.get(16),
            },
            reason: r.get(2),
            priority: r.get(3),
            lease_seq: r.get(4),
            version: r.get(5),
            attempts: r.get(6),
            options,
        });
    }
    if !orphans.is_empty() {
        tx.execute("delete from enrichment_jobs where job_id = any($1)", &[&orphans]).await.map_err(q)?;
    }
    tx.execute(
        &format!("update enrichment_usage set used = used + $2 where day = {TODAY} and kind = $1"),
        &[&ENRICHMENTS, &(jobs.len() as i64)],
    )
    .await
    .map_err(q)?;
    tx.commit().await.map_err(q)?;
    Ok(Leased { jobs, capped })
}

/// Extends every lease `owner` holds (called while its work is in flight).
pub async fn renew(client: &Client, owner: &str, lease: Duration) -> Result<u64> {
    client
        .execute(
            "update enrichment_jobs set lease_expires_at = now() + make_interval(secs => $2) where job_id in \
               (select job_id from enrichment_jobs where lease_owner = $1 order by company_id for update)",
            &[&owner, &lease.as_secs_f64()],
        )
        .await
        .map_err(|e| Error::db("renewing enrichment leases", e))
}

/// Gives up every lease `owner` holds (a shutdown with work left, or a restart of the same process): the
/// jobs are waiting again at once, and today's count gets back what they were counted for.
pub async fn release(client: &Client, owner: &str) -> Result<u64> {
    let n = client
        .execute(
            "update enrichment_jobs set lease_owner = null, lease_expires_at = null, updated_at = now() \
             where lease_owner = $1 and job_id in \
               (select job_id from enrichment_jobs where lease_owner = $1 order by company_id for update)",
            &[&owner],
        )
        .await
        .map_err(|e| Error::db("giving up enrichment leases", e))?;
    if n > 0 {
        client
            .execute(
                &format!("update enrichment_usage set used = greatest(used - $2, 0) where day = {TODAY} and kind = $1"),
                &[&ENRICHMENTS, &(n as i64)],
            )
            .await
            .map_err(|e| Error::db("giving back today's enrichment count", e))?;
    }
    Ok(n)
}

/// Jobs a worker could lease now or once a lease expires: waiting and due, leased or not. Zero means a
/// draining worker (`acraflow backfill`) is done.
pub async fn due(client: &Client, tenant: Option<&str>) -> Result<(i64, i64)> {
    let row = client
        .query_one(
            "select count(*) filter (where not_before <= now()), count(*) filter (where not_before > now()) \
             from enrichment_jobs where state = 'pending' and tenant_id is not distinct from $1",
            &[&tenant],
        )
        .await
        .map_err(|e| Error::db("counting due enrichment jobs", e))?;
    Ok((row.get(0), row.get(1)))
}

/// Which companies a refresh enqueues.
#[derive(Debug, Clone)]
pub enum Selection {
    Uens(Vec<String>),
    /// A predicate on `companies` (SQL, trusted: it comes from the operator's own command line).
    Where(String),
    /// Parked jobs.
    Failed,
}

/// What a refresh did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refreshed {
    pub enqueued: u64,
    /// UENs given that match no company.
    pub unknown: u64,
}

/// Express jobs for the selected companies, leased before every other waiting job.
pub async fn refresh(
    client: &Client,
    selection: &Selection,
    options: &JobOptions,
    tenant: Option<&str>,
) -> Result<Refreshed> {
    let overrides = serde_json::to_value(options).unwrap_or_default();
    let q = |e| Error::db("enqueueing express refreshes", e);
    const UPSERT: &str = "on conflict (company_id) do update set version = j.version + 1, reason = 'express', \
           priority = $1, state = 'pending', not_before = now(), attempts = 0, overrides = excluded.overrides, \
           enqueued_at = least(j.enqueued_at, now()), updated_at = now()";
    match selection {
        Selection::Uens(uens) => {
            let uens: Vec<String> = uens.iter().map(|u| u.trim().to_uppercase()).filter(|u| !u.is_empty()).collect();
            let row = client
                .query_one(
                    &format!(
                        "with ins as (insert into enrichment_jobs as j (company_id, tenant_id, reason, priority, overrides) \
                           select company_id, $2, 'express', $1, $3 from companies where uen = any($4) order by company_id {UPSERT} \
                           returning 1) \
                         select (select count(*) from ins), \
                           (select count(*) from unnest($4::text[]) u where not exists \
                              (select 1 from companies c where c.uen = u))"
                    ),
                    &[&PRIORITY_EXPRESS, &tenant, &overrides, &uens],
                )
                .await
                .map_err(q)?;
            Ok(Refreshed { enqueued: row.get::<_, i64>(0) as u64, unknown: row.get::<_, i64>(1) as u64 })
        }
        Selection::Where(predicate) => {
            // One statement through the extended protocol: a predicate cannot smuggle a second one in.
            let n = client
                .execute(
                    &format!(
                        "insert into enrichment_jobs as j (company_id, tenant_id, reason, priority, overrides) \
                         select company_id, $2, 'express', $1, $3 from companies where ({predicate}) order by company_id {UPSERT}"
                    ),
                    &[&PRIORITY_EXPRESS, &tenant, &overrides],
                )
                .await
                .map_err(|e| Error::db("refresh --where: selecting companies", e))?;
            Ok(Refreshed { enqueued: n, unknown: 0 })
        }
        Selection::Failed => {
            let n = client
                .execute(
                    "update enrichment_jobs set state = 'pending', reason = 'express', priority = $1, attempts = 0, \
                       not_before = now(), version = version + 1, \
                       overrides = case when $2::jsonb = '{}'::jsonb then overrides else $2 end, updated_at = now() \
                     where state = 'parked' and tenant_id is not distinct from $3",
                    &[&PRIORITY_EXPRESS, &overrides, &tenant],
                )
                .await
                .map_err(q)?;
            Ok(Refreshed { enqueued: n, unknown: 0 })
        }
    }
}

/// The stale sweeper: enqueues at most `limit` companies whose last successful enrichment is older than
/// `days`, oldest first, at the lowest priority. Companies with a job already are left alone.
pub async fn sweep_stale(client: &Client, days: u32, limit: u64, tenant: Option<&str>) -> Result<u64> {
    client
        .execute(
            "insert into enrichment_jobs (company_id, tenant_id, reason, priority) \
             select c.company_id, $3, 'stale', $4 from companies c \
             where c.enriched_at < now() - make_interval(days => $1) \
               and not exists (select 1 from enrichment_jobs j where j.company_id = c.company_id) \
             order by c.enriched_at limit $2 \
             on conflict (company_id) do nothing",
            &[&(days.min(i32::MAX as u32) as i32), &(limit.min(i64::MAX as u64) as i64), &tenant, &PRIORITY_STALE],
        )
        .await
        .map_err(|e| Error::db("sweeping stale companies (ENRICH_REFRESH_AFTER_DAYS)", e))
}

/// The queue as an operator sees it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QueueStats {
    /// Jobs waiting (pending, not leased), by reason.
    pub waiting: std::collections::BTreeMap<String, i64>,
    /// Of those, how many wait for a retry's backoff.
    pub backing_off: i64,
    /// Leased jobs by worker.
    pub leased: std::collections::BTreeMap<String, i64>,
    pub parked: i64,
    /// Age of the oldest job that is due and not leased, in seconds.
    pub oldest_waiting_seconds: f64,
    /// The last errors of parked jobs (at most 5), as (uen or company id, error).
    pub parked_errors: Vec<(String, String)>,
    /// Enqueue-to-done latency of the jobs done in the last hour: p50, p95, p99 in seconds, and the count.
    pub done_last_hour: i64,
    pub latency_p50_seconds: Option<f64>,
    pub latency_p95_seconds: Option<f64>,
    pub latency_p99_seconds: Option<f64>,
}

impl QueueStats {
    pub fn waiting_total(&self) -> i64 {
        self.waiting.values().sum()
    }
}

/// The queue's depth, leases and parked jobs (what the gauges show): one scan of the job table.
pub async fn depth(client: &Client) -> Result<QueueStats> {
    let q = |e| Error::db("reading the enrichment queue", e);
    let rows = client
        .query(
            "select reason, \
               count(*) filter (where state = 'pending' and (lease_expires_at is null or lease_expires_at < now())), \
               count(*) filter (where state = 'pending' and not_before > now() and lease_owner is null), \
               count(*) filter (where state = 'parked'), \
               coalesce(extract(epoch from now() - min(enqueued_at) filter (where state = 'pending' \
                 and not_before <= now() and (lease_expires_at is null or lease_expires_at < now()))), 0)::float8 \
             from enrichment_jobs group by reason",
            &[],
        )
        .await
        .map_err(q)?;
    let mut s = QueueStats::default();
    for r in &rows {
        let waiting: i64 = r.get(1);
        if waiting > 0 {
            s.waiting.insert(r.get(0), waiting);
        }
        s.backing_off += r.get::<_, i64>(2);
        s.parked += r.get::<_, i64>(3);
        s.oldest_waiting_seconds = s.oldest_waiting_seconds.max(r.get(4));
    }
    for r in client
        .query(
            "select lease_owner, count(*) from enrichment_jobs where lease_owner is not null \
               and lease_expires_at >= now() group by 1 order by 1",
            &[],
        )
        .await
        .map_err(q)?
    {
        s.leased.insert(r.get(0), r.get(1));
    }
    Ok(s)
}

/// [`depth`], and the parked jobs' last errors and the enqueue-to-done latency over the last hour (what
/// `acraflow status` shows).
pub async fn stats(client: &Client) -> Result<QueueStats> {
    let q = |e| Error::db("reading the enrichment queue", e);
    let mut s = depth(client).await?;
    for r in client
        .query(
            "select coalesce(c.uen, j.company_id::text), coalesce(j.last_error, '') from enrichment_jobs j \
               left join companies c using (company_id) where j.state = 'parked' order by j.updated_at desc limit 5",
            &[],
        )
        .await
        .map_err(q)?
    {
        s.parked_errors.push((r.get(0), r.get(1)));
    }
    let r = client
        .query_one(
            "select count(*), \
               percentile_cont(array[0.5, 0.95, 0.99]) within group (order by extract(epoch from updated_at - enqueued_at)) \
             from company_enrichment_runs \
             where enriched and enqueued_at is not null and updated_at > now() - interval '1 hour'",
            &[],
        )
        .await
        .map_err(q)?;
    s.done_last_hour = r.get(0);
    if let Some(p) = r.get::<_, Option<Vec<f64>>>(1) {
        s.latency_p50_seconds = p.first().copied();
        s.latency_p95_seconds = p.get(1).copied();
        s.latency_p99_seconds = p.get(2).copied();
    }
    Ok(s)
}
