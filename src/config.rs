//! Pipeline files (`pipelines/*.toml`) and the environment overlay named in PRD 20.
//!
//! A pipeline file names its source, its operators in order, and its sink. Settings from the environment
//! (or the matching command-line flags) override the file; [`PipelineSpec::validate`] then checks the whole
//! and names the bad setting.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};
use crate::ops::filter::DEFAULT_EXCLUDED_STATUSES;

pub const DEFAULT_CHECKPOINT_KEY: &str = "acra_direct";
pub const DEFAULT_TABLE: &str = "staging_acra_companies";
pub const DEFAULT_BATCH_SIZE: usize = 5_000;
pub const MAX_BATCH_SIZE: usize = 100_000;
pub const DEFAULT_RECHECK_DAYS: u32 = 30;
pub const DEFAULT_SLOT: &str = "acraflow";
pub const DEFAULT_PUBLICATION: &str = "acraflow_pub";
/// A streamed batch is cut at this age even when not full: the bound on commit-to-visible latency added
/// by batching.
pub const DEFAULT_BATCH_DEADLINE: Duration = Duration::from_millis(20);
/// How often acknowledged positions are sent to the server.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// How long `acraflow run` keeps reconnecting after losing the database before it gives up.
pub const DEFAULT_RECONNECT_BUDGET: Duration = Duration::from_secs(300);

/// The pipeline `backfill`, `run` and `demo` use when no `--pipeline` is given.
pub const REGISTRY_SYNC: &str = include_str!("../pipelines/registry_sync.toml");
/// The full job: registry sync plus web enrichment (`--pipeline acra_direct`).
pub const ACRA_DIRECT: &str = include_str!("../pipelines/acra_direct.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub name: String,
    /// The `service_progress` key the checkpoint is stored under.
    #[serde(default = "default_checkpoint_key")]
    pub checkpoint_key: String,
    #[serde(default)]
    pub source: SourceSpec,
    #[serde(default, rename = "operator")]
    pub operators: Vec<OperatorSpec>,
    #[serde(default)]
    pub sink: SinkSpec,
    /// How the run is operated (tenant, alerts, progress, summaries, shutdown): from the environment or
    /// flags, never from the pipeline file.
    #[serde(skip)]
    pub ops: OpsSpec,
}

/// A credential or a URL holding one (a Slack webhook): never printed, not even by `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

pub const DEFAULT_ALERT_THRESHOLD_PCT: f64 = 50.0;
pub const DEFAULT_ALERT_WINDOW: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_ALERT_MIN_EVENTS: u64 = 20;
pub const DEFAULT_PAUSE_COOLDOWN: Duration = Duration::from_secs(10 * 60);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_PROGRESS_EVERY: Duration = Duration::from_secs(5);
pub const DEFAULT_SUMMARY_EVERY: Duration = Duration::from_secs(10 * 60);

/// Failure alerts and the automatic pause of enrichment (see `telemetry::alerts`).
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSpec {
    /// `SLACK_WEBHOOK_URL`: where alerts are posted (Slack incoming-webhook JSON). Unset: logged only.
    pub webhook: Option<Secret>,
    /// `ACRA_DIRECT_ERROR_ALERT_THRESHOLD`: failures as a percentage of outcomes over the window.
    pub threshold_pct: f64,
    /// `ACRA_DIRECT_ALERT_WINDOW`: the sliding window; also the least time between two alerts.
    pub window: Duration,
    /// `ACRA_DIRECT_ALERT_MIN_EVENTS`: outcomes the window must hold before its ratio counts; also how many
    /// more outcomes the ratio must stay above the threshold for before enrichment pauses.
    pub min_events: u64,
    /// `ACRA_DIRECT_AUTO_PAUSE`: pause enrichment when the ratio stays above the threshold.
    pub auto_pause: bool,
    /// `ACRA_DIRECT_PAUSE_COOLDOWN`: how long a pause lasts before enrichment resumes by itself.
    pub cooldown: Duration,
}

impl Default for AlertSpec {
    fn default() -> Self {
        AlertSpec {
            webhook: None,
            threshold_pct: DEFAULT_ALERT_THRESHOLD_PCT,
            window: DEFAULT_ALERT_WINDOW,
            min_events: DEFAULT_ALERT_MIN_EVENTS,
            auto_pause: true,
            cooldown: DEFAULT_PAUSE_COOLDOWN,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OpsSpec {
    /// `ACRA_DIRECT_TENANT_ID` (or `DEFAULT_TENANT_ID`): set as `request.tenant_id` on every session and
    /// stored in the run header, for row level security policies.
    pub tenant_id: Option<String>,
    pub alert: AlertSpec,
    /// `ACRA_DIRECT_SUMMARY_EVERY`: log the run summary (and update the run header) this often; `None`: only
    /// at exit and on SIGUSR1.
    pub summary_every: Option<Duration>,
    /// `ACRA_DIRECT_DRAIN_TIMEOUT`: after SIGINT/SIGTERM, how long in-flight work may take to finish.
    pub drain_timeout: Duration,
    /// `ACRA_DIRECT_PROGRESS`.
    pub progress: crate::telemetry::progress::ProgressMode,
    /// `ACRA_DIRECT_PROGRESS_EVERY`: the interval of progress log lines.
    pub progress_every: Duration,
}

impl Default for OpsSpec {
    fn default() -> Self {
        OpsSpec {
            tenant_id: None,
            alert: AlertSpec::default(),
            summary_every: Some(DEFAULT_SUMMARY_EVERY),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            progress: Default::default(),
            progress_every: DEFAULT_PROGRESS_EVERY,
        }
    }
}

impl OpsSpec {
    pub fn validate(&self) -> Result<()> {
        let a = &self.alert;
        if !(a.threshold_pct > 0.0 && a.threshold_pct <= 100.0) {
            return Err(Error::config(format!(
                "ACRA_DIRECT_ERROR_ALERT_THRESHOLD is {}; it is a percentage above 0 and at most 100",
                a.threshold_pct
            )));
        }
        if a.window.is_zero() {
            return Err(Error::config("ACRA_DIRECT_ALERT_WINDOW must be longer than 0s"));
        }
        if a.min_events == 0 {
            return Err(Error::config("ACRA_DIRECT_ALERT_MIN_EVENTS must be at least 1"));
        }
        if let Some(w) = &a.webhook {
            let ok = url::Url::parse(w.expose()).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
            if !ok {
                return Err(Error::config("SLACK_WEBHOOK_URL is not an http(s) URL"));
            }
        }
        if self.tenant_id.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(Error::config("ACRA_DIRECT_TENANT_ID is set but empty"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    #[serde(default)]
    pub kind: SourceKind,
    #[serde(default = "default_table")]
    pub table: String,
    /// Rows per batch (one page, one upsert statement, one sink transaction).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    pub start_after_id: Option<i64>,
    pub start_from_uen: Option<String>,
    pub batch_limit: Option<u64>,
    /// Logical replication slot (`acraflow run`).
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Publication on the staging table (`acraflow run`).
    #[serde(default = "default_publication")]
    pub publication: String,
    /// Create the slot as a failover slot (PostgreSQL 17+), synchronised to physical standbys so the
    /// stream survives a promotion.
    #[serde(default)]
    pub slot_failover: bool,
    #[serde(default = "default_batch_deadline", deserialize_with = "duration")]
    pub batch_deadline: Duration,
    #[serde(default = "default_status_interval", deserialize_with = "duration")]
    pub status_interval: Duration,
    #[serde(default = "default_reconnect_budget", deserialize_with = "duration")]
    pub reconnect_budget: Duration,
}

impl Default for SourceSpec {
    fn default() -> Self {
        SourceSpec {
            kind: SourceKind::Replication,
            table: default_table(),
            batch_size: DEFAULT_BATCH_SIZE,
            start_after_id: None,
            start_from_uen: None,
            batch_limit: None,
            slot: default_slot(),
            publication: default_publication(),
            slot_failover: false,
            batch_deadline: DEFAULT_BATCH_DEADLINE,
            status_interval: DEFAULT_STATUS_INTERVAL,
            reconnect_budget: DEFAULT_RECONNECT_BUDGET,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// `acraflow run` replays the table and stops.
    Backfill,
    /// `acraflow run` replays the table in the slot's snapshot, then streams changes from the slot.
    #[default]
    Replication,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OperatorSpec {
    Filter(FilterSpec),
    Dedupe(DedupeSpec),
    Upsert(UpsertSpec),
    Enrich(Box<EnrichSpec>),
}

impl OperatorSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            OperatorSpec::Filter(_) => "filter",
            OperatorSpec::Dedupe(_) => "dedupe",
            OperatorSpec::Upsert(_) => "upsert",
            OperatorSpec::Enrich(_) => "enrich",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    /// Status prefixes to exclude; replaces the default list.
    #[serde(default = "default_excluded")]
    pub exclude_status: Vec<String>,
    /// Exclude entities incorporated fewer than this many days ago (0: off).
    #[serde(default)]
    pub min_age_days: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeSpec {
    #[serde(default = "default_recheck_days")]
    pub recheck_days: u32,
    #[serde(default)]
    pub skip_if_any_history: bool,
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsertSpec {}

/// The enrich operator's settings (pipelines/acra_direct.toml documents each with its env name).
/// Credentials are never read from a pipeline file: `LLM_API_KEY`/`OPENAI_API_KEY` and `APIFY_TOKEN` come
/// from the environment only.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichSpec {
    #[serde(default = "one")]
    pub concurrency: usize,
    pub daily_cap: Option<u64>,
    #[serde(default = "default_max_pages")]
    pub max_pages: usize,
    #[serde(default = "default_crawl_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(default = "default_user_agent")]
    pub user_agent: String,
    #[serde(default = "default_host_spacing", deserialize_with = "duration")]
    pub host_spacing: Duration,
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    #[serde(default = "default_max_redirects")]
    pub max_redirects: usize,
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    #[serde(default = "default_max_retry_after", deserialize_with = "duration")]
    pub max_retry_after: Duration,
    #[serde(default = "yes")]
    pub probe: bool,
    pub search_url: Option<String>,
    pub reader_url: Option<String>,
    #[serde(default)]
    pub allow_private: bool,
    pub proxy: Option<String>,
    #[serde(default)]
    pub persist_corpus: bool,
    #[serde(default = "default_corpus_chars")]
    pub corpus_chars: usize,
    pub llm_base_url: Option<String>,
    #[serde(default = "default_llm_model")]
    pub llm_model: String,
    #[serde(default = "default_llm_chunks")]
    pub llm_max_chunks: usize,
    pub llm_daily_tokens: Option<u64>,
    #[serde(default)]
    pub contacts: bool,
    pub contacts_url: Option<String>,
    /// The queue (see `enrichment::queue`): how long a lease lasts unless renewed.
    #[serde(default = "default_lease", deserialize_with = "duration")]
    pub lease: Duration,
    /// How often an idle worker looks for new jobs.
    #[serde(default = "default_poll_interval", deserialize_with = "duration")]
    pub poll_interval: Duration,
    /// Attempts in all before a job that keeps failing is parked.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The wait after a job's first failure; it doubles with each further one.
    #[serde(default = "default_retry_backoff", deserialize_with = "duration")]
    pub retry_backoff: Duration,
    /// Re-enrich companies whose last successful enrichment is older than this many days (unset: never).
    pub refresh_after_days: Option<u32>,
    /// Companies the stale sweeper enqueues per sweep at most.
    #[serde(default = "default_refresh_batch")]
    pub refresh_batch: u64,
    /// How often the stale sweeper runs.
    #[serde(default = "default_refresh_every", deserialize_with = "duration")]
    pub refresh_every: Duration,
    /// The search provider's budget, shared by every company of every worker.
    #[serde(default = "default_search_rate", deserialize_with = "rate")]
    pub search_rate: Option<Rate>,
    /// The reader provider's budget.
    #[serde(default = "default_reader_rate", deserialize_with = "rate")]
    pub reader_rate: Option<Rate>,
    /// A website is stored only when its verification confidence reaches this (0 to 1).
    #[serde(default = "default_min_confidence")]
    pub min_confidence: f64,
    /// One company's enrichment, all its requests included (waits for a provider's budget excluded).
    #[serde(default = "default_company_timeout", deserialize_with = "duration")]
    pub company_timeout: Duration,
    /// Search results verified per company at most.
    #[serde(default = "default_max_candidates")]
    pub max_candidates: usize,
    /// The `verify` step's provider, ZeroBounce v2 or compatible (on when `ZEROBOUNCE_API_KEY` is set).
    #[serde(default = "default_zerobounce_url")]
    pub zerobounce_url: String,
    /// Emails verified per UTC day at most, across runs and workers (unset: no cap).
    pub zerobounce_max_verifications: Option<u64>,
    /// A cached verification younger than this many days is used instead of a new one.
    #[serde(default = "default_zerobounce_recheck_days")]
    pub zerobounce_recheck_days: u32,
    /// Contacts lookups (`APIFY_LINKEDIN_URL`) across every worker.
    #[serde(default = "default_contacts_rate", deserialize_with = "rate")]
    pub contacts_rate: Option<Rate>,
    /// Contacts lookups per UTC day at most, across runs and workers (unset: no cap).
    pub contacts_daily_cap: Option<u64>,
    /// `validatebatch` calls across every worker (ZeroBounce allows 5 a minute per account and blocks a key
    /// past it for 10 minutes); a company's emails wait for the next batch.
    #[serde(default = "default_zerobounce_batch_rate", deserialize_with = "rate")]
    pub zerobounce_batch_rate: Option<Rate>,
    /// The `score` step (`[operator.score]` under this operator; absent: no scores).
    pub score: Option<crate::enrichment::leads::ScoreSpec>,
    /// The `export` step: Odoo's base URL (on with it and `ODOO_API_KEY`).
    pub odoo_url: Option<String>,
    pub odoo_db: Option<String>,
    pub odoo_username: Option<String>,
    /// Companies scored at or above this are exported.
    #[serde(default = "default_score_min_export")]
    pub score_min_export: f64,
    /// A `crm.lead` per exported company, once.
    #[serde(default = "yes")]
    pub odoo_create_leads: bool,
    #[serde(default = "default_odoo_retry_backoff", deserialize_with = "duration")]
    pub odoo_retry_backoff: Duration,
    #[serde(default = "default_odoo_max_attempts")]
    pub odoo_max_attempts: u32,
    /// Calls to Odoo's external API across every worker.
    #[serde(default = "default_odoo_rate", deserialize_with = "rate")]
    pub odoo_rate: Option<Rate>,
    /// Set by code only (the demo); otherwise `ODOO_API_KEY` from the environment.
    #[serde(skip)]
    pub odoo_api_key: Option<Secret>,
    /// Set by code only (the demo); otherwise `ZEROBOUNCE_API_KEY` from the environment.
    #[serde(skip)]
    pub zerobounce_api_key: Option<Secret>,
}

fn default_score_min_export() -> f64 {
    0.66
}

fn default_odoo_retry_backoff() -> Duration {
    Duration::from_secs(30)
}

fn default_odoo_max_attempts() -> u32 {
    10
}

fn default_zerobounce_url() -> String {
    "https://bulkapi.zerobounce.net/v2".into()
}

/// ZeroBounce's documented limit for `validatebatch`.
pub const DEFAULT_ZEROBOUNCE_BATCH_RATE: Rate = Rate { calls: 5, per: Duration::from_secs(60) };
pub const DEFAULT_ODOO_RATE: Rate = Rate { calls: 10, per: Duration::from_secs(1) };

/// An Apify actor run per lookup: a pace that keeps a misconfigured run from starting thousands at once.
pub const DEFAULT_CONTACTS_RATE: Rate = Rate { calls: 60, per: Duration::from_secs(60) };

fn default_contacts_rate() -> Option<Rate> {
    Some(DEFAULT_CONTACTS_RATE)
}

fn default_zerobounce_batch_rate() -> Option<Rate> {
    Some(DEFAULT_ZEROBOUNCE_BATCH_RATE)
}

fn default_odoo_rate() -> Option<Rate> {
    Some(DEFAULT_ODOO_RATE)
}

fn default_zerobounce_recheck_days() -> u32 {
    90
}

/// A provider's budget: `calls` per `per`, spread evenly (no bursts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub calls: u32,
    pub per: Duration,
}

impl Rate {
    /// The spacing between two calls.
    pub fn interval(&self) -> Duration {
        (self.per / self.calls.max(1)).max(Duration::from_micros(1))
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.calls, humantime::format_duration(self.per))
    }
}

/// `200/hour`, `120/h`, `10/s`, `5/min`, `3/10s`; `off` (or `unlimited`) for no budget.
pub fn parse_rate(text: &str) -> std::result::Result<Option<Rate>, String> {
    let t = text.trim().to_ascii_lowercase();
    if t == "off" || t == "unlimited" || t == "none" {
        return Ok(None);
    }
    let bad = || format!("'{text}' is not a rate like 200/hour, 10/s or 5/min (or off)");
    let (calls, per) = t.split_once('/').ok_or_else(bad)?;
    let calls: u32 = calls.trim().parse().map_err(|_| bad())?;
    let per = match per.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        other => humantime::parse_duration(other).map_err(|_| bad())?,
    };
    if calls == 0 || per.is_zero() {
        return Err(bad());
    }
    Ok(Some(Rate { calls, per }))
}

/// A rate setting as given on the command line: a budget or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSetting(pub Option<Rate>);

pub fn parse_rate_setting(text: &str) -> std::result::Result<RateSetting, String> {
    parse_rate(text).map(RateSetting)
}

fn rate<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Rate>, D::Error> {
    let text = String::deserialize(d)?;
    parse_rate(&text).map_err(serde::de::Error::custom)
}

/// PRD 02: "DuckDuckGo's 200 requests/hour envelope".
pub const DEFAULT_SEARCH_RATE: Rate = Rate { calls: 200, per: Duration::from_secs(3600) };
/// PRD 02: the reader's 120 calls/hour.
pub const DEFAULT_READER_RATE: Rate = Rate { calls: 120, per: Duration::from_secs(3600) };
pub const DEFAULT_MIN_CONFIDENCE: f64 = 0.5;
pub const DEFAULT_COMPANY_TIMEOUT: Duration = Duration::from_secs(180);
pub const DEFAULT_MAX_CANDIDATES: usize = 3;

fn default_search_rate() -> Option<Rate> {
    Some(DEFAULT_SEARCH_RATE)
}
fn default_reader_rate() -> Option<Rate> {
    Some(DEFAULT_READER_RATE)
}
fn default_min_confidence() -> f64 {
    DEFAULT_MIN_CONFIDENCE
}
fn default_company_timeout() -> Duration {
    DEFAULT_COMPANY_TIMEOUT
}
fn default_max_candidates() -> usize {
    DEFAULT_MAX_CANDIDATES
}

impl Default for EnrichSpec {
    fn default() -> Self {
        toml::from_str("").expect("every enrich setting has a default")
    }
}

pub const DEFAULT_MAX_PAGES: usize = 4;
pub const DEFAULT_CRAWL_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_USER_AGENT: &str =
    concat!("acraflow/", env!("CARGO_PKG_VERSION"), " (company enrichment; polite crawler)");
pub const DEFAULT_HOST_SPACING: Duration = Duration::from_millis(500);
pub const DEFAULT_MAX_BYTES: usize = 2 * 1024 * 1024;
pub const DEFAULT_MAX_REDIRECTS: usize = 5;
pub const DEFAULT_ATTEMPTS: u32 = 3;
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
pub const DEFAULT_CORPUS_CHARS: usize = 12_000;
pub const DEFAULT_LLM_MODEL: &str = "gpt-4o-mini";
pub const DEFAULT_LLM_CHUNKS: usize = 4;
pub const MAX_CONCURRENCY: usize = 1_024;
/// The longest request timeout accepted (`CRAWLER_TIMEOUT_S`): a longer one is a mistake, not a setting.
pub const MAX_TIMEOUT_S: f64 = 3_600.0;
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(60);
pub const DEFAULT_REFRESH_BATCH: u64 = 1_000;
pub const DEFAULT_REFRESH_EVERY: Duration = Duration::from_secs(600);

fn default_lease() -> Duration {
    DEFAULT_LEASE
}
fn default_poll_interval() -> Duration {
    DEFAULT_POLL_INTERVAL
}
fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}
fn default_retry_backoff() -> Duration {
    DEFAULT_RETRY_BACKOFF
}
fn default_refresh_batch() -> u64 {
    DEFAULT_REFRESH_BATCH
}
fn default_refresh_every() -> Duration {
    DEFAULT_REFRESH_EVERY
}

/// The enrich settings from the environment (or flags), over the pipeline file's.
#[derive(Debug, Clone, Default)]
pub struct EnrichOverrides {
    pub concurrency: Option<usize>,
    pub daily_cap: Option<u64>,
    pub max_pages: Option<usize>,
    pub timeout_s: Option<f64>,
    pub user_agent: Option<String>,
    pub host_spacing: Option<Duration>,
    pub search_url: Option<String>,
    pub reader_url: Option<String>,
    pub allow_private: Option<bool>,
    pub proxy: Option<String>,
    pub persist_corpus: Option<bool>,
    pub corpus_chars: Option<usize>,
    pub llm_base_url: Option<String>,
    pub llm_model: Option<String>,
    pub llm_max_chunks: Option<usize>,
    pub llm_daily_tokens: Option<u64>,
    pub contacts: Option<bool>,
    pub contacts_url: Option<String>,
    pub lease: Option<Duration>,
    pub poll_interval: Option<Duration>,
    pub max_attempts: Option<u32>,
    pub retry_backoff: Option<Duration>,
    pub refresh_after_days: Option<u32>,
    pub refresh_batch: Option<u64>,
    pub refresh_every: Option<Duration>,
    /// `Some(None)`: no budget.
    pub search_rate: Option<Option<Rate>>,
    pub reader_rate: Option<Option<Rate>>,
    pub min_confidence: Option<f64>,
    pub company_timeout: Option<Duration>,
    pub max_candidates: Option<usize>,
    pub zerobounce_url: Option<String>,
    pub zerobounce_max_verifications: Option<u64>,
    pub zerobounce_recheck_days: Option<u32>,
    pub zerobounce_batch_rate: Option<Option<Rate>>,
    pub odoo_rate: Option<Option<Rate>>,
    pub contacts_rate: Option<Option<Rate>>,
    pub contacts_daily_cap: Option<u64>,
    pub odoo_url: Option<String>,
    pub odoo_db: Option<String>,
    pub odoo_username: Option<String>,
    pub odoo_api_key: Option<Secret>,
    pub zerobounce_api_key: Option<Secret>,
    pub score_min_export: Option<f64>,
    pub odoo_create_leads: Option<bool>,
    pub odoo_retry_backoff: Option<Duration>,
    pub odoo_max_attempts: Option<u32>,
}

impl EnrichSpec {
    fn apply(&mut self, o: &EnrichOverrides) {
        fn set<T: Clone>(dst: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *dst = v.clone();
            }
        }
        fn set_opt<T: Clone>(dst: &mut Option<T>, v: &Option<T>) {
            if v.is_some() {
                dst.clone_from(v);
            }
        }
        set(&mut self.concurrency, &o.concurrency);
        set_opt(&mut self.daily_cap, &o.daily_cap);
        set(&mut self.max_pages, &o.max_pages);
        if let Some(s) = o.timeout_s.filter(|s| s.is_finite() && *s > 0.0 && *s <= MAX_TIMEOUT_S) {
            self.timeout = Duration::from_secs_f64(s);
        } else if o.timeout_s.is_some() {
            self.timeout = Duration::ZERO; // rejected by validate(), which names the setting
        }
        set(&mut self.user_agent, &o.user_agent);
        set(&mut self.host_spacing, &o.host_spacing);
        set_opt(&mut self.search_url, &o.search_url);
        set_opt(&mut self.reader_url, &o.reader_url);
        set(&mut self.allow_private, &o.allow_private);
        set_opt(&mut self.proxy, &o.proxy);
        set(&mut self.persist_corpus, &o.persist_corpus);
        set(&mut self.corpus_chars, &o.corpus_chars);
        set_opt(&mut self.llm_base_url, &o.llm_base_url);
        set(&mut self.llm_model, &o.llm_model);
        set(&mut self.llm_max_chunks, &o.llm_max_chunks);
        set_opt(&mut self.llm_daily_tokens, &o.llm_daily_tokens);
        set(&mut self.contacts, &o.contacts);
        set_opt(&mut self.contacts_url, &o.contacts_url);
        set(&mut self.lease, &o.lease);
        set(&mut self.poll_interval, &o.poll_interval);
        set(&mut self.max_attempts, &o.max_attempts);
        set(&mut self.retry_backoff, &o.retry_backoff);
        // 0 turns the sweeper off, as leaving it unset does.
        if let Some(d) = o.refresh_after_days {
            self.refresh_after_days = (d > 0).then_some(d);
        }
        set(&mut self.refresh_batch, &o.refresh_batch);
        set(&mut self.refresh_every, &o.refresh_every);
        set(&mut self.search_rate, &o.search_rate);
        set(&mut self.reader_rate, &o.reader_rate);
        set(&mut self.min_confidence, &o.min_confidence);
        set(&mut self.company_timeout, &o.company_timeout);
        set(&mut self.max_candidates, &o.max_candidates);
        set(&mut self.zerobounce_url, &o.zerobounce_url);
        set_opt(&mut self.zerobounce_max_verifications, &o.zerobounce_max_verifications);
        set(&mut self.zerobounce_recheck_days, &o.zerobounce_recheck_days);
        set(&mut self.zerobounce_batch_rate, &o.zerobounce_batch_rate);
        set(&mut self.odoo_rate, &o.odoo_rate);
        set(&mut self.contacts_rate, &o.contacts_rate);
        set_opt(&mut self.contacts_daily_cap, &o.contacts_daily_cap);
        set_opt(&mut self.odoo_url, &o.odoo_url);
        set_opt(&mut self.odoo_db, &o.odoo_db);
        set_opt(&mut self.odoo_username, &o.odoo_username);
        set_opt(&mut self.odoo_api_key, &o.odoo_api_key);
        set_opt(&mut self.zerobounce_api_key, &o.zerobounce_api_key);
        set(&mut self.score_min_export, &o.score_min_export);
        set(&mut self.odoo_create_leads, &o.odoo_create_leads);
        set(&mut self.odoo_retry_backoff, &o.odoo_retry_backoff);
        set(&mut self.odoo_max_attempts, &o.odoo_max_attempts);
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::config(what.to_owned()));
        if let Some(score) = &self.score {
            score.validate()?;
        }
        if url::Url::parse(&self.zerobounce_url).is_err() {
            return bad("ZEROBOUNCE_URL is not a URL (e.g. https://bulkapi.zerobounce.net/v2)");
        }
        if !(1..=3650).contains(&self.zerobounce_recheck_days) {
            return bad("ZEROBOUNCE_RECHECK_DAYS: use 1 to 3650");
        }
        if !(0.0..=1.0).contains(&self.score_min_export) {
            return bad("SCORE_MIN_EXPORT: use a score from 0 to 1");
        }
        if let Some(u) = &self.odoo_url {
            if url::Url::parse(u).is_err() {
                return bad("ODOO_URL is not a URL (e.g. https://mycompany.odoo.com)");
            }
            if self.odoo_db.is_none() || self.odoo_username.is_none() {
                return bad("ODOO_URL is set: set ODOO_DB and ODOO_USERNAME too (and ODOO_API_KEY in the environment)");
            }
            if self.score.is_none() {
                return bad(
                    "ODOO_URL is set but the pipeline has no score step ([operator.score]): exports follow scores",
                );
            }
            if self.odoo_max_attempts == 0 || self.odoo_retry_backoff.is_zero() {
                return bad("ODOO_MAX_ATTEMPTS and ODOO_RETRY_BACKOFF must be above 0");
            }
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return bad(&format!("ACRA_DIRECT_CONCURRENCY is {}; use 1 to {MAX_CONCURRENCY}", self.concurrency));
        }
        if self.max_pages == 0 || self.max_pages > 50 {
            return bad(&format!("CRAWL_MAX_PAGES is {}; use 1 to 50", self.max_pages));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs_f64(MAX_TIMEOUT_S) {
            return bad(&format!("CRAWLER_TIMEOUT_S must be a number of seconds above 0 and at most {MAX_TIMEOUT_S}"));
        }
        if self.daily_cap == Some(0) {
            return bad("ACRA_DIRECT_DAILY_CAP is 0; leave it unset for no cap");
        }
        if self.lease < Duration::from_secs(1) {
            return bad(&format!(
                "ENRICH_LEASE is {:?}; use at least 1s (it is renewed every third of it)",
                self.lease
            ));
        }
        if self.lease < self.timeout * 2 {
            tracing::warn!(lease_ms = self.lease.as_millis() as u64, timeout_ms = self.timeout.as_millis() as u64,
                "ENRICH_LEASE is shorter than two request timeouts: a worker cut off from the database for that long loses its jobs to others");
        }
        if self.poll_interval.is_zero() || self.refresh_every.is_zero() {
            return bad("ENRICH_POLL_INTERVAL and ENRICH_REFRESH_EVERY must be longer than 0s");
        }
        if self.max_attempts == 0 {
            return bad("ENRICH_MAX_ATTEMPTS is 0; use 1 (no retry) or more");
        }
        if self.refresh_batch == 0 {
            return bad(
                "ENRICH_REFRESH_BATCH is 0; use 1 or more (ENRICH_REFRESH_AFTER_DAYS unset turns the sweeper off)",
            );
        }
        if self.attempts == 0 || self.max_bytes < 1024 || self.corpus_chars == 0 || self.llm_max_chunks == 0 {
            return bad("enrich: attempts, llm_max_chunks and corpus_chars (EXTRACT_CORPUS_CHAR_LIMIT) must be above 0, max_bytes at least 1024");
        }
        for (env, template, needle) in
            [("ENRICH_SEARCH_URL", &self.search_url, "{query}"), ("ENRICH_READER_URL", &self.reader_url, "{url}")]
        {
            if let Some(t) = template {
                if !t.contains(needle) || url::Url::parse(&t.replace(needle, "x")).is_err() {
                    return bad(&format!("{env} must be an http(s) URL containing {needle}"));
                }
            }
        }
        for (env, value) in [
            ("LLM_BASE_URL", &self.llm_base_url),
            ("ENRICH_HTTP_PROXY", &self.proxy),
            ("APIFY_LINKEDIN_URL", &self.contacts_url),
        ] {
            if let Some(v) = value {
                if url::Url::parse(v).is_err() {
                    return bad(&format!("{env} is not a URL"));
                }
            }
        }
        if !(0.0..=1.0).contains(&self.min_confidence) {
            return bad(&format!("ENRICH_MIN_CONFIDENCE is {}; use a number from 0 to 1", self.min_confidence));
        }
        if self.company_timeout < self.timeout {
            return bad(&format!(
                "ENRICH_COMPANY_TIMEOUT ({:?}) is shorter than one request's timeout (CRAWLER_TIMEOUT_S, {:?})",
                self.company_timeout, self.timeout
            ));
        }
        if !(1..=10).contains(&self.max_candidates) {
            return bad(&format!("ENRICH_MAX_CANDIDATES is {}; use 1 to 10", self.max_candidates));
        }
        if self.contacts && self.contacts_url.is_none() {
            return bad(
                "ENABLE_APIFY_LINKEDIN is on but APIFY_LINKEDIN_URL (the endpoint returning people) is not set",
            );
        }
        Ok(())
    }
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_max_pages() -> usize {
    DEFAULT_MAX_PAGES
}
fn default_crawl_timeout() -> Duration {
    DEFAULT_CRAWL_TIMEOUT
}
fn default_user_agent() -> String {
    DEFAULT_USER_AGENT.into()
}
fn default_host_spacing() -> Duration {
    DEFAULT_HOST_SPACING
}
fn default_max_bytes() -> usize {
    DEFAULT_MAX_BYTES
}
fn default_max_redirects() -> usize {
    DEFAULT_MAX_REDIRECTS
}
fn default_attempts() -> u32 {
    DEFAULT_ATTEMPTS
}
fn default_max_retry_after() -> Duration {
    DEFAULT_MAX_RETRY_AFTER
}
fn default_corpus_chars() -> usize {
    DEFAULT_CORPUS_CHARS
}
fn default_llm_model() -> String {
    DEFAULT_LLM_MODEL.into()
}
fn default_llm_chunks() -> usize {
    DEFAULT_LLM_CHUNKS
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSpec {
    #[serde(default)]
    pub kind: SinkKind,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    #[default]
    Postgres,
}

/// Settings from the environment or command line that override the pipeline file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub start_after_id: Option<i64>,
    pub start_from_uen: Option<String>,
    pub batch_limit: Option<u64>,
    pub batch_size: Option<usize>,
    pub exclude_status: Option<String>,
    pub min_age_days: Option<u32>,
    pub recheck_days: Option<u32>,
    pub skip_if_any_history: Option<bool>,
    pub force: Option<bool>,
    pub checkpoint_key: Option<String>,
    pub slot: Option<String>,
    pub publication: Option<String>,
    pub slot_failover: Option<bool>,
    pub batch_deadline: Option<Duration>,
    pub reconnect_budget: Option<Duration>,
    pub enrich: EnrichOverrides,
}

impl PipelineSpec {
    /// Parses a pipeline file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::config(format!("pipeline {origin}: {}", e.to_string().trim())))
    }

    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading pipeline file {}", path.display()), e))?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn registry_sync() -> Self {
        Self::parse(REGISTRY_SYNC, "registry_sync.toml (built in)").expect("the built-in pipeline parses")
    }

    pub fn acra_direct() -> Self {
        Self::parse(ACRA_DIRECT, "acra_direct.toml (built in)").expect("the built-in pipeline parses")
    }

    /// A built-in pipeline by name (`registry_sync`, `acra_direct`), or a pipeline file by path.
    pub fn named_or_file(name: &std::path::Path) -> Result<Self> {
        match name.to_str() {
            Some("registry_sync") => Ok(Self::registry_sync()),
            Some("acra_direct") => Ok(Self::acra_direct()),
            _ if !name.exists() => Err(Error::config(format!(
                "pipeline {}: neither a built-in pipeline (registry_sync, acra_direct) nor a file that exists",
                name.display()
            ))),
            _ => Self::load(name),
        }
    }

    pub fn enrich(&self) -> Option<&EnrichSpec> {
        self.operators.iter().find_map(|o| match o {
            OperatorSpec::Enrich(e) => Some(&**e),
            _ => None,
        })
    }

    pub fn apply(&mut self, o: &Overrides) {
        let s = &mut self.source;
        if o.start_after_id.is_some() {
            s.start_after_id = o.start_after_id;
        }
        if o.start_from_uen.is_some() {
            s.start_from_uen.clone_from(&o.start_from_uen);
        }
        if o.batch_limit.is_some() {
            s.batch_limit = o.batch_limit;
        }
        if let Some(n) = o.batch_size {
            s.batch_size = n;
        }
        if let Some(k) = &o.checkpoint_key {
            self.checkpoint_key.clone_from(k);
        }
        if let Some(v) = &o.slot {
            s.slot.clone_from(v);
        }
        if let Some(v) = &o.publication {
            s.publication.clone_from(v);
        }
        if let Some(v) = o.slot_failover {
            s.slot_failover = v;
        }
        if let Some(v) = o.batch_deadline {
            s.batch_deadline = v;
        }
        if let Some(v) = o.reconnect_budget {
            s.reconnect_budget = v;
        }
        for op in &mut self.operators {
            match op {
                OperatorSpec::Filter(f) => {
                    if let Some(list) = &o.exclude_status {
                        f.exclude_status =
                            list.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
                    }
                    if let Some(d) = o.min_age_days {
                        f.min_age_days = d;
                    }
                }
                OperatorSpec::Dedupe(d) => {
                    if let Some(r) = o.recheck_days {
                        d.recheck_days = r;
                    }
                    if let Some(b) = o.skip_if_any_history {
                        d.skip_if_any_history = b;
                    }
                    if let Some(b) = o.force {
                        d.force = b;
                    }
                }
                OperatorSpec::Upsert(_) => {}
                OperatorSpec::Enrich(e) => e.apply(&o.enrich),
            }
        }
    }

    /// Checks the pipeline as a whole; the error names the setting to fix.
    pub fn validate(&self) -> Result<()> {
        if self.name.trim().is_empty() {
            return Err(Error::config("pipeline: `name` must not be empty"));
        }
        if self.checkpoint_key.trim().is_empty() {
            return Err(Error::config("pipeline: `checkpoint_key` (ACRA_DIRECT_CHECKPOINT_KEY) must not be empty"));
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.source.batch_size) {
            return Err(Error::config(format!(
                "source.batch_size (ACRA_DIRECT_BATCH_SIZE) is {}; it must be between 1 and {MAX_BATCH_SIZE}",
                self.source.batch_size
            )));
        }
        if self.source.table.trim().is_empty() {
            return Err(Error::config("source.table must not be empty"));
        }
        self.ops.validate()?;
        // Slot and publication names reach replication commands; PostgreSQL allows only these characters
        // in slot names, and holding publications to the same keeps every name safe to send.
        for (what, env, name) in [
            ("source.slot", "ACRA_DIRECT_SLOT", &self.source.slot),
            ("source.publication", "ACRA_DIRECT_PUBLICATION", &self.source.publication),
        ] {
            let ok = !name.is_empty()
                && name.len() <= 63
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(Error::config(format!(
                    "{what} ({env}) is '{name}'; use 1 to 63 lowercase letters, digits and underscores"
                )));
            }
        }
        if self.source.batch_deadline < Duration::from_millis(1) {
            return Err(Error::config(format!(
                "source.batch_deadline (ACRA_DIRECT_BATCH_DEADLINE) is {:?}; use 1ms or more",
                self.source.batch_deadline
            )));
        }
        if self.source.status_interval < Duration::from_millis(10) {
            return Err(Error::config("source.status_interval must be 10ms or more"));
        }
        if self.source.batch_limit == Some(0) {
            return Err(Error::config("ACRA_DIRECT_BATCH_LIMIT is 0; leave it unset for no limit"));
        }
        if matches!(self.source.start_after_id, Some(id) if id < 0) {
            return Err(Error::config("ACRA_DIRECT_START_AFTER_ID must be 0 or more"));
        }
        let position = |kind: &str| self.operators.iter().position(|o| o.kind() == kind);
        for kind in ["filter", "dedupe", "upsert"] {
            if self.operators.iter().filter(|o| o.kind() == kind).count() > 1 {
                return Err(Error::config(format!("pipeline {}: operator '{kind}' appears more than once", self.name)));
            }
        }
        if self.operators.iter().filter(|o| o.kind() == "enrich").count() > 1 {
            return Err(Error::config(format!("pipeline {}: operator 'enrich' appears more than once", self.name)));
        }
        let (filter, dedupe, upsert) = (position("filter"), position("dedupe"), position("upsert"));
        if let Some(enrich) = position("enrich") {
            if upsert.is_some_and(|u| enrich < u) {
                return Err(Error::config(format!("pipeline {}: 'enrich' must come after 'upsert'", self.name)));
            }
            for op in &self.operators {
                if let OperatorSpec::Enrich(e) = op {
                    e.validate()?;
                }
            }
        }
        let Some(filter) = filter else {
            return Err(Error::config(format!(
                "pipeline {}: the first operator must be 'filter' (it maps staging rows to company records); \
                 to keep every status, give it exclude_status = []",
                self.name
            )));
        };
        if filter != 0 {
            return Err(Error::config(format!("pipeline {}: 'filter' must be the first operator", self.name)));
        }
        if upsert.is_none() {
            return Err(Error::config(format!("pipeline {}: an 'upsert' operator is required", self.name)));
        }
        if let (Some(d), Some(u)) = (dedupe, upsert) {
            if d > u {
                return Err(Error::config(format!("pipeline {}: 'dedupe' must come before 'upsert'", self.name)));
            }
        }
        Ok(())
    }
}

fn default_slot() -> String {
    DEFAULT_SLOT.into()
}
fn default_publication() -> String {
    DEFAULT_PUBLICATION.into()
}
fn default_batch_deadline() -> Duration {
    DEFAULT_BATCH_DEADLINE
}
fn default_status_interval() -> Duration {
    DEFAULT_STATUS_INTERVAL
}
fn default_reconnect_budget() -> Duration {
    DEFAULT_RECONNECT_BUDGET
}

/// A duration written as text: "500ms", "10s", "5m".
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("'{text}' is not a duration like 500ms, 10s or 5m ({e})"))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn default_checkpoint_key() -> String {
    DEFAULT_CHECKPOINT_KEY.into()
}
fn default_table() -> String {
    DEFAULT_TABLE.into()
}
fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}
fn default_recheck_days() -> u32 {
    DEFAULT_RECHECK_DAYS
}
fn default_excluded() -> Vec<String> {
    DEFAULT_EXCLUDED_STATUSES.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_pipeline_is_valid() {
        let p = PipelineSpec::registry_sync();
        p.validate().unwrap();
        let kinds: Vec<&str> = p.operators.iter().map(|o| o.kind()).collect();
        assert_eq!(kinds, ["filter", "dedupe", "upsert"]);
        assert_eq!(p.checkpoint_key, "acra_direct");
    }

    #[test]
    fn acra_direct_enriches_after_upsert_and_names_bad_enrich_settings() {
        let p = PipelineSpec::acra_direct();
        p.validate().unwrap();
        let kinds: Vec<&str> = p.operators.iter().map(|o| o.kind()).collect();
        assert_eq!(kinds, ["filter", "dedupe", "upsert", "enrich"]);
        assert_eq!(p.enrich().unwrap().concurrency, 1, "the PRD's default");
        for (o, named) in [
            (EnrichOverrides { concurrency: Some(0), ..Default::default() }, "ACRA_DIRECT_CONCURRENCY"),
            (EnrichOverrides { search_url: Some("http://x/?q=".into()), ..Default::default() }, "ENRICH_SEARCH_URL"),
            (EnrichOverrides { timeout_s: Some(-1.0), ..Default::default() }, "CRAWLER_TIMEOUT_S"),
            (EnrichOverrides { timeout_s: Some(1e20), ..Default::default() }, "CRAWLER_TIMEOUT_S"),
            (EnrichOverrides { contacts: Some(true), ..Default::default() }, "APIFY_LINKEDIN_URL"),
        ] {
            let mut p = PipelineSpec::acra_direct();
            p.apply(&Overrides { enrich: o, ..Default::default() });
            assert!(p.validate().unwrap_err().to_string().contains(named), "{named}");
        }
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = PipelineSpec::parse("name = 'x'\n[source]\nbatch_sise = 5\n", "test.toml").unwrap_err();
        assert!(err.to_string().contains("batch_sise"), "{err}");
        let err = PipelineSpec::parse("name = 'x'\n[[operator]]\nkind = 'filter'\nmin_age = 3\n", "t").unwrap_err();
        assert!(err.to_string().contains("min_age"), "{err}");
        let err = PipelineSpec::parse("name = 'x'\n[[operator]]\nkind = 'enrichh'\n", "t").unwrap_err();
        assert!(err.to_string().contains("enrichh"), "{err}");
    }

    #[test]
    fn overrides_replace_file_settings() {
        let mut p = PipelineSpec::registry_sync();
        p.apply(&Overrides {
            exclude_status: Some("live, registered ,".into()),
            recheck_days: Some(7),
            force: Some(true),
            batch_size: Some(10),
            ..Default::default()
        });
        assert_eq!(p.source.batch_size, 10);
        let OperatorSpec::Filter(f) = &p.operators[0] else { panic!() };
        assert_eq!(f.exclude_status, ["live", "registered"]);
        let OperatorSpec::Dedupe(d) = &p.operators[1] else { panic!() };
        assert_eq!((d.recheck_days, d.force), (7, true));
    }

    #[test]
    fn durations_are_text_and_names_are_checked() {
        let p = PipelineSpec::parse("name = 'x'\n[source]\nbatch_deadline = '250ms'\nreconnect_budget = '2m'\n", "t")
            .unwrap();
        assert_eq!(p.source.batch_deadline, Duration::from_millis(250));
        assert_eq!(p.source.reconnect_budget, Duration::from_secs(120));
        let err = PipelineSpec::parse("name = 'x'\n[source]\nbatch_deadline = 'soon'\n", "t").unwrap_err();
        assert!(err.to_string().contains("'soon' is not a duration"), "{err}");
        let mut p = PipelineSpec::registry_sync();
        p.source.slot = "acraflow'; drop".into();
        assert!(p.validate().unwrap_err().to_string().contains("ACRA_DIRECT_SLOT"));
    }

    #[test]
    fn validation_names_the_setting() {
        let mut p = PipelineSpec::registry_sync();
        p.source.batch_size = 0;
        assert!(p.validate().unwrap_err().to_string().contains("ACRA_DIRECT_BATCH_SIZE"));
        let mut p = PipelineSpec::registry_sync();
        p.apply(&Overrides { batch_deadline: Some(Duration::from_nanos(1)), ..Default::default() });
        assert!(
            p.validate().unwrap_err().to_string().contains("ACRA_DIRECT_BATCH_DEADLINE"),
            "a deadline that would panic"
        );
        let mut p = PipelineSpec::registry_sync();
        p.operators.swap(1, 2);
        assert!(p.validate().unwrap_err().to_string().contains("'dedupe' must come before 'upsert'"));
    }
}
