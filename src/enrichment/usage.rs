//! Spend per UTC day, counted in the database (`enrichment_usage`), so that a daily cap holds across runs,
//! restarts and any number of workers on any number of machines.
//!
//! - Enrichments are counted when a job is leased, in the lease's transaction (see `queue::lease`), under
//!   the day's row lock: two workers can never lease past `ACRA_DIRECT_DAILY_CAP` between them. A lease given
//!   back unworked (shutdown) is given back to the count; one lost with its worker (a crash) stays counted,
//!   so the cap errs on the side of spending less.
//! - LLM tokens are reserved before a call (an estimate) with a conditional update that fails past the cap,
//!   then corrected to what the provider reports.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::error::{Error, Result};

/// The kinds of spend counted.
pub const ENRICHMENTS: &str = "enrichments";
pub const LLM_TOKENS: &str = "llm_tokens";

/// Today's UTC day, as SQL.
pub const TODAY: &str = "(now() at time zone 'utc')::date";

/// A kind of spend with an optional cap.
#[derive(Clone)]
pub struct Usage {
    client: Arc<Client>,
    kind: &'static str,
    cap: Option<u64>,
}

impl Usage {
    pub fn new(client: Arc<Client>, kind: &'static str, cap: Option<u64>) -> Self {
        Usage { client, kind, cap }
    }

    /// The connection it counts on.
    pub fn client(&self) -> Arc<Client> {
        Arc::clone(&self.client)
    }

    /// Takes `n` if that keeps today's count within the cap.
    pub async fn try_take(&self, n: u64) -> Result<bool> {
        let cap = self.cap.map(|c| c.min(i64::MAX as u64) as i64);
        if cap.is_some_and(|c| n as i64 > c) {
            return Ok(false);
        }
        let row = self
            .client
            .query_opt(
                &format!(
                    "insert into enrichment_usage as u (day, kind, used) values ({TODAY}, $1, $2) \
                     on conflict (day, kind) do update set used = u.used + excluded.used \
                       where $3::int8 is null or u.used + excluded.used <= $3 \
                     returning used"
                ),
                &[&self.kind, &(n as i64), &cap],
            )
            .await
            .map_err(|e| Error::db(format!("counting today's {}", self.kind), e))?;
        Ok(row.is_some())
    }

    /// Corrects today's count by `delta` (what a call really used against its reservation). Best effort: a
    /// failed correction is logged, never fatal.
    pub async fn adjust(&self, delta: i64) {
        if delta == 0 {
            return;
        }
        let done = self
            .client
            .execute(
                &format!(
                    "insert into enrichment_usage as u (day, kind, used) values ({TODAY}, $1, greatest($2::int8, 0)) \
                     on conflict (day, kind) do update set used = greatest(u.used + $2::int8, 0)"
                ),
                &[&self.kind, &delta],
            )
            .await;
        if let Err(e) = done {
            tracing::warn!(kind = self.kind, delta, error = %e, "could not correct today's usage");
        }
    }
}

/// Today's spend of every kind.
#[derive(Debug, Default, Clone, Copy)]
pub struct Today {
    pub enrichments: i64,
    pub llm_tokens: i64,
    pub email_verifications: i64,
    pub contact_lookups: i64,
}

pub async fn today(client: &Client) -> Result<Today> {
    let rows = client
        .query(&format!("select kind, used from enrichment_usage where day = {TODAY}"), &[])
        .await
        .map_err(|e| Error::db("reading today's usage (enrichment_usage)", e))?;
    let mut t = Today::default();
    for r in rows {
        let used: i64 = r.get(1);
        match r.get::<_, &str>(0) {
            ENRICHMENTS => t.enrichments = used,
            LLM_TOKENS => t.llm_tokens = used,
            crate::enrichment::leads::VERIFICATIONS => t.email_verifications = used,
            crate::enrichment::enrich::contacts::LOOKUPS => t.contact_lookups = used,
            _ => {}
        }
    }
    Ok(t)
}

/// Calls to a provider whose limit is per account, spaced `interval` apart across every worker on every
/// machine (`provider_pacing`): each call takes the next free slot with one upsert, then waits for it.
/// Slots are not given back, so a worker that dies holding one only wastes it.
pub struct Pacing {
    provider: &'static str,
    interval: std::time::Duration,
    /// This worker's callers queue here, in order, for [`Pacing::wait_turn`].
    line: tokio::sync::Mutex<()>,
}

impl Pacing {
    pub fn new(provider: &'static str, interval: std::time::Duration) -> Self {
        Pacing { provider, interval, line: tokio::sync::Mutex::new(()) }
    }

    /// Waits for a turn, in order with this worker's other callers: a worker holds one slot at a time, so
    /// one that dies wastes a slot at most. Returns the time waited.
    pub async fn wait_turn(&self, client: &Client) -> Result<std::time::Duration> {
        let started = std::time::Instant::now();
        let _line = self.line.lock().await;
        tokio::time::sleep(self.take(client).await?).await;
        Ok(started.elapsed())
    }

    /// Takes the next free slot; returns how long to wait for it.
    pub async fn take(&self, client: &Client) -> Result<std::time::Duration> {
        let row = client
            .query_one(
                "insert into provider_pacing as p (provider, next_at) \
                   values ($1, clock_timestamp() + make_interval(secs => $2)) \
                 on conflict (provider) do update \
                   set next_at = greatest(p.next_at, clock_timestamp()) + make_interval(secs => $2) \
                 returning extract(epoch from p.next_at - make_interval(secs => $2) - clock_timestamp())::float8",
                &[&self.provider, &self.interval.as_secs_f64()],
            )
            .await
            .map_err(|e| Error::db(format!("taking a turn for {} (provider_pacing)", self.provider), e))?;
        Ok(std::time::Duration::try_from_secs_f64(row.get::<_, f64>(0)).unwrap_or_default())
    }
}
