//! Search and reader as budgeted providers. Each has a rate (`ENRICH_SEARCH_RATE`, `ENRICH_READER_RATE`)
//! shared by every company of every worker, spread evenly: each call takes the next slot in
//! `provider_pacing` (see [`Pacing`]), so all workers together never send a provider more than its budget,
//! and a worker holds one slot at a time. A refusal (HTTP 202, 403 or 429, a bot-check page,
//! a result page without results markup) is retried with backoff, honouring Retry-After, and if it
//! persists it fails the company as transient ([`FetchError::Provider`]): the job is retried later. It is
//! never read as "no website".
//!
//! Calls, refusals and the time spent waiting for budget are metrics (`acra_direct_provider_calls`,
//! `acra_direct_provider_wait_seconds`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use tokio_postgres::Client;
use url::Url;

use super::discover::{self, SearchResult};
use super::http::{strip, FetchError, Http};
use crate::config::Rate;
use crate::enrichment::usage::Pacing;
use crate::telemetry::metrics::{metrics, ProviderLabel, ProviderNameLabel};

/// One provider's budget, paced in the database across every worker.
pub struct Provider {
    name: &'static str,
    pace: Option<Pacing>,
    client: std::sync::Arc<Client>,
}

/// Time one company spent waiting for providers' budgets: the company deadline does not count it.
#[derive(Default)]
pub struct Waited(AtomicU64);

impl Waited {
    pub fn get(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::Relaxed))
    }
    pub(crate) fn add(&self, d: Duration) {
        self.0.fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }
}

impl Provider {
    /// `client` is where the pace is kept (`provider_pacing`).
    pub fn new(name: &'static str, rate: Option<Rate>, client: std::sync::Arc<Client>) -> Self {
        Provider { name, pace: rate.map(|r| Pacing::new(name, r.interval())), client }
    }

    /// Waits for a call's slot in the budget. A budget that cannot be read is a refusal (retried later),
    /// never a call past it.
    async fn slot(&self, waited: &Waited) -> Result<(), FetchError> {
        if let Some(pace) = &self.pace {
            let started = Instant::now();
            let turn = pace.wait_turn(&self.client).await;
            let w = started.elapsed();
            waited.add(w);
            metrics().provider_wait.get_or_create(&ProviderNameLabel { provider: self.name }).inc_by(w.as_secs_f64());
            turn.map_err(|e| {
                FetchError::Provider(format!("{} provider: its budget could not be read ({e})", self.name))
            })?;
        }
        Ok(())
    }

    fn count(&self, outcome: &'static str) {
        metrics().provider_calls.get_or_create(&ProviderLabel { provider: self.name, outcome }).inc();
    }

    /// Calls the provider until it answers (or the attempts run out): `read` turns a 200 body into the
    /// answer or a refusal.
    async fn call<T>(
        &self,
        http: &Http,
        url: &Url,
        waited: &Waited,
        read: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, FetchError> {
        let settings = http.settings();
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(settings.backoff.max(Duration::from_millis(500)))
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(settings.attempts.saturating_sub(1) as usize)
            .with_jitter()
            .build();
        loop {
            self.slot(waited).await?;
            let (error, retry_after) = match http.get_once(url).await {
                Ok((200, _, body)) => match read(&body) {
                    Ok(answer) => {
                        self.count("ok");
                        return Ok(answer);
                    }
                    Err(why) => (FetchError::Provider(format!("{} provider: {why}", self.name)), None),
                },
                Ok((status @ (202 | 403 | 429), wait, _)) => (
                    FetchError::Provider(format!(
                        "{} provider refused with HTTP {status} (a rate limit or a bot check) at {}",
                        self.name,
                        strip(url)
                    )),
                    wait,
                ),
                Ok((status, _, _)) => (FetchError::Status { status, url: strip(url) }, None),
                Err(e) => (e, None),
            };
            self.count(if matches!(error, FetchError::Provider(_)) { "refused" } else { "error" });
            if !error.is_retryable() {
                return Err(error);
            }
            let Some(backoff) = delays.next() else { return Err(error) };
            let wait = match retry_after {
                Some(ra) if ra > settings.max_retry_after => return Err(error),
                Some(ra) => ra.max(backoff),
                None => backoff,
            };
            tracing::debug!(provider = self.name, error = %error, wait_ms = wait.as_millis() as u64, "retrying");
            tokio::time::sleep(wait).await;
            waited.add(wait);
        }
    }

    /// A search: results, or an empty list when the provider says there are none.
    pub async fn search(&self, http: &Http, url: &Url, waited: &Waited) -> Result<Vec<SearchResult>, FetchError> {
        self.call(http, url, waited, |body| discover::parse_search(body).map_err(|r| r.to_string())).await
    }

    /// A page's text through the reader.
    pub async fn read(&self, http: &Http, url: &Url, waited: &Waited) -> Result<String, FetchError> {
        self.call(http, url, waited, |body| Ok(body.to_owned())).await
    }
}
