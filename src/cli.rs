//! The command line. Every flag that PRD 20 names an environment variable for reads that variable too.

use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::Overrides;
use crate::telemetry::progress::ProgressMode;

#[derive(Debug, Parser)]
#[command(
    name = "acraflow",
    version,
    about = "Keeps an enriched `companies` table fresh from Singapore's ACRA registry, as a streaming dataflow \
             over PostgreSQL",
    long_about = "Keeps an enriched `companies` table fresh from Singapore's ACRA registry.\n\n\
        Rows the ACRA ingester loads into staging_acra_companies flow through filter -> dedupe -> upsert -> sink, \
        with the writes and the checkpoint committed together. With --pipeline acra_direct the sink also \
        enqueues an enrichment job per company (table enrichment_jobs), and enrichment workers (inside run and \
        backfill, and `acraflow worker` on any machine) crawl each company's website and commit what they find.\n\n\
        Without POSTGRES_DSN every command uses a private PostgreSQL that acraflow starts itself \
        (data kept in ACRAFLOW_HOME)."
)]
pub struct Cli {
    /// PostgreSQL connection string (libpq key=value or URL). Unset: use the private embedded cluster.
    #[arg(long, env = "POSTGRES_DSN", global = true, hide_env_values = true)]
    pub dsn: Option<String>,

    /// Where the embedded cluster keeps its data [default: /var/lib/acraflow as root, else ~/.local/share/acraflow]
    #[arg(long, env = "ACRAFLOW_HOME", global = true)]
    pub home: Option<PathBuf>,

    /// Log format: human-readable text or JSON lines.
    #[arg(long, env = "ACRA_DIRECT_LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// Seconds as a bare number (`10`, `2.5`) or a duration with a unit (`10s`, `1500ms`, `1m`).
fn parse_seconds(text: &str) -> std::result::Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(s) => Ok(s),
        Err(_) => crate::config::parse_duration(text)
            .map(|d| d.as_secs_f64())
            .map_err(|e| format!("{e} (give seconds, e.g. 10, or a duration, e.g. 10s or 1500ms)")),
    }
}

/// The environment variable that gave a flag the value clap refused (clap's message names the flag): set,
/// and the flag not on the command line.
pub fn env_behind(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    use clap::CommandFactory;
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else { return None };
    let long = arg.split_whitespace().next()?.strip_prefix("--")?.split('=').next()?.to_owned();
    let on_command_line = std::env::args().any(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")));
    if on_command_line {
        return None;
    }
    let cmd = Cli::command();
    let mut stack = vec![&cmd];
    while let Some(c) = stack.pop() {
        for a in c.get_arguments() {
            if a.get_long() == Some(long.as_str()) {
                if let Some(env) = a.get_env().filter(|env| std::env::var_os(env).is_some()) {
                    return Some(env.to_string_lossy().into_owned());
                }
            }
        }
        stack.extend(c.get_subcommands());
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update acraflow's tables (idempotent; never drops anything) and load the SSIC 2020 reference.
    Migrate,
    /// Fill staging_acra_companies with ACRA-shaped sample rows (real UENs, years, SSIC codes, postal codes).
    Seed(SeedArgs),
    /// Replay staging_acra_companies through the pipeline to the end (or the batch limit), then exit.
    Backfill(RunArgs),
    /// Keep companies in step with staging: stream changes from a logical replication slot (on first start,
    /// create the slot and backfill in its snapshot), until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Run only the enrichment dataflow: lease jobs from the queue, enrich, commit. Runs on any machine
    /// that reaches the database; any number of workers share the queue. Until SIGINT/SIGTERM.
    Worker(WorkerArgs),
    /// Enqueue express enrichment jobs, leased before every other waiting job: chosen companies
    /// (--uen, --file, --where) or the parked ones (--failed); or send parked Odoo exports again (--exports).
    Refresh(RefreshArgs),
    /// The whole job on the embedded default: seed sample rows into a database of its own, run the registry
    /// pipeline and enrichment against a local web, and report what was found.
    Demo(DemoArgs),
    /// Open psql on the database (the private cluster's while psql runs, or POSTGRES_DSN's). Arguments after
    /// `--` go to psql.
    Psql(PsqlArgs),
    /// Load ACRA's published "Information on Corporate Entities" CSV files (data.gov.sg) into
    /// staging_acra_companies, checking each file's header.
    Import(ImportArgs),
    /// Show checkpoints, recent runs, dead letters and table counts.
    Status(StatusArgs),
    /// List the server's logical replication slots (idle ones keep WAL), or drop one.
    Slots {
        #[command(subcommand)]
        cmd: Option<SlotsCommand>,
    },
    /// List the checkpoints (where each pipeline's runs resume), or reset one so the next run replays.
    Checkpoints {
        #[command(subcommand)]
        cmd: Option<CheckpointsCommand>,
    },
    /// Check that a run would start: the settings and where each came from, misspelled or ignored variables,
    /// the database (reachable, migrated, wal_level, replication privilege, slot, publication). Exits non-zero
    /// when something would stop a run. Takes the same flags as `run`.
    Check(RunArgs),
    /// Benchmarks (throughput with a reference measured in the same run).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Args)]
pub struct SeedArgs {
    /// How many rows to add.
    #[arg(long, default_value_t = 10_000)]
    pub rows: u64,
    /// Random seed: the same seed gives the same rows.
    #[arg(long, default_value_t = 20)]
    pub seed: u64,
    /// Write the rows to this CSV file in ACRA's published format (for `acraflow import`) instead of the
    /// database.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Pipeline: a built-in name (registry_sync, acra_direct) or a pipeline file [default: registry_sync]
    #[arg(long, env = "ACRA_DIRECT_PIPELINE")]
    pub pipeline: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: OverrideArgs,
    #[command(flatten)]
    pub ops: OpsArgs,
}

/// Operating the run: metrics, alerts, tenant, progress, summaries, shutdown.
#[derive(Debug, Args)]
#[command(next_help_heading = "Operations")]
pub struct OpsArgs {
    /// Serve Prometheus /metrics, /healthz and /readyz [default: false]
    #[arg(long = "metrics", env = "METRICS_PROMETHEUS_ENABLE", value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub metrics_enable: Option<bool>,
    /// Port of the metrics endpoint (0: any free port, logged at start)
    #[arg(long, env = "METRICS_PORT", default_value_t = 9464, value_name = "PORT")]
    pub metrics_port: u16,
    /// Address the metrics endpoint listens on
    #[arg(long, env = "METRICS_BIND", default_value = "0.0.0.0", value_name = "IP")]
    pub metrics_bind: std::net::IpAddr,
    /// Tenant set as request.tenant_id on every session (for RLS) and stored in the run header
    /// [env: ACRA_DIRECT_TENANT_ID, else DEFAULT_TENANT_ID]
    #[arg(long, env = "ACRA_DIRECT_TENANT_ID", value_name = "ID")]
    pub tenant_id: Option<String>,
    /// Slack incoming-webhook URL for failure alerts and pause/resume notices [default: alerts are only logged]
    #[arg(long, env = "SLACK_WEBHOOK_URL", value_name = "URL", hide_env_values = true)]
    pub slack_webhook_url: Option<String>,
    /// Alert when failures exceed this percentage of outcomes over the window
    #[arg(long, env = "ACRA_DIRECT_ERROR_ALERT_THRESHOLD", value_name = "PERCENT", default_value_t = crate::config::DEFAULT_ALERT_THRESHOLD_PCT)]
    pub error_alert_threshold: f64,
    /// The sliding window of the failure ratio, and the least time between two alerts
    #[arg(long, env = "ACRA_DIRECT_ALERT_WINDOW", value_name = "DURATION", default_value = "30m", value_parser = crate::config::parse_duration)]
    pub alert_window: std::time::Duration,
    /// Outcomes the window must hold before its ratio counts (and how many more before a pause)
    #[arg(long, env = "ACRA_DIRECT_ALERT_MIN_EVENTS", value_name = "N", default_value_t = crate::config::DEFAULT_ALERT_MIN_EVENTS)]
    pub alert_min_events: u64,
    /// Pause enrichment while the failure ratio stays above the threshold
    #[arg(long, env = "ACRA_DIRECT_AUTO_PAUSE", value_parser = BoolishValueParser::new(), num_args = 0..=1, default_value = "true", default_missing_value = "true", value_name = "BOOL")]
    pub auto_pause: bool,
    /// How long a pause lasts before enrichment resumes by itself
    #[arg(long, env = "ACRA_DIRECT_PAUSE_COOLDOWN", value_name = "DURATION", default_value = "10m", value_parser = crate::config::parse_duration)]
    pub pause_cooldown: std::time::Duration,
    /// Log the run summary (and update the run header) this often; 0 turns it off (exit and SIGUSR1 only)
    #[arg(long, env = "ACRA_DIRECT_SUMMARY_EVERY", value_name = "DURATION", default_value = "10m", value_parser = crate::config::parse_duration)]
    pub summary_every: std::time::Duration,
    /// After SIGINT/SIGTERM, how long in-flight work may take to finish before it is left for the next run
    #[arg(long, env = "ACRA_DIRECT_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = crate::config::parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// Progress: a bar on a terminal, log lines otherwise (auto), or force one
    #[arg(long, env = "ACRA_DIRECT_PROGRESS", value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// Interval of progress log lines
    #[arg(long, env = "ACRA_DIRECT_PROGRESS_EVERY", value_name = "DURATION", default_value = "5s", value_parser = crate::config::parse_duration)]
    pub progress_every: std::time::Duration,
}

impl OpsArgs {
    pub fn to_spec(&self) -> crate::config::OpsSpec {
        let tenant_id = self.tenant_id.clone().or_else(|| std::env::var("DEFAULT_TENANT_ID").ok());
        crate::config::OpsSpec {
            tenant_id,
            alert: crate::config::AlertSpec {
                webhook: self
                    .slack_webhook_url
                    .clone()
                    .filter(|u| !u.trim().is_empty())
                    .map(crate::config::Secret::new),
                threshold_pct: self.error_alert_threshold,
                window: self.alert_window,
                min_events: self.alert_min_events,
                auto_pause: self.auto_pause,
                cooldown: self.pause_cooldown,
            },
            summary_every: Some(self.summary_every).filter(|d| !d.is_zero()),
            drain_timeout: self.drain_timeout,
            progress: self.progress,
            progress_every: self.progress_every,
        }
    }

    /// The metrics endpoint's address, when turned on.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_enable.unwrap_or(false).then(|| std::net::SocketAddr::new(self.metrics_bind, self.metrics_port))
    }
}

#[derive(Debug, Args, Default)]
pub struct OverrideArgs {
    /// Start after this staging id (exclusive); wins over --start-from-uen and the checkpoint.
    #[arg(long, env = "ACRA_DIRECT_START_AFTER_ID", value_name = "ID")]
    pub start_after_id: Option<i64>,
    /// Start after this uen (exclusive), walking in uen order; wins over the checkpoint.
    #[arg(long, env = "ACRA_DIRECT_START_FROM_UEN", value_name = "UEN")]
    pub start_from_uen: Option<String>,
    /// Stop after this many staging rows.
    #[arg(long, env = "ACRA_DIRECT_BATCH_LIMIT", value_name = "ROWS")]
    pub batch_limit: Option<u64>,
    /// Rows per batch (page, statement and transaction) [pipeline default: 5000]
    #[arg(long, env = "ACRA_DIRECT_BATCH_SIZE", value_name = "ROWS")]
    pub batch_size: Option<usize>,
    /// Comma-separated status prefixes to exclude (case-insensitive); replaces the default list.
    #[arg(long, env = "ACRA_DIRECT_EXCLUDE_STATUS", value_name = "LIST")]
    pub exclude_status: Option<String>,
    /// Exclude entities incorporated fewer than this many days ago [default: 0, off]
    #[arg(long, env = "ACRA_DIRECT_MIN_AGE_DAYS", value_name = "DAYS")]
    pub min_age_days: Option<u32>,
    /// Do not process a company again within this many days of its last history row [default: 30]
    #[arg(long, env = "ENRICH_RECHECK_DAYS", value_name = "DAYS")]
    pub recheck_days: Option<u32>,
    /// Never process a company again once it has any history row.
    #[arg(long, env = "ENRICH_SKIP_IF_ANY_HISTORY", value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub skip_if_any_history: Option<bool>,
    /// Process every eligible company, whatever its history.
    #[arg(long, env = "ACRA_DIRECT_FORCE", value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub force: Option<bool>,
    /// The service_progress key of the checkpoint [default: acra_direct]
    #[arg(long, env = "ACRA_DIRECT_CHECKPOINT_KEY", value_name = "KEY")]
    pub checkpoint_key: Option<String>,
    /// Logical replication slot for `run` [default: acraflow]
    #[arg(long, env = "ACRA_DIRECT_SLOT", value_name = "NAME")]
    pub slot: Option<String>,
    /// Publication on the staging table for `run` [default: acraflow_pub]
    #[arg(long, env = "ACRA_DIRECT_PUBLICATION", value_name = "NAME")]
    pub publication: Option<String>,
    /// Create the slot as a failover slot, kept on physical standbys (PostgreSQL 17+) [default: false]
    #[arg(long, env = "ACRA_DIRECT_SLOT_FAILOVER", value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub slot_failover: Option<bool>,
    /// Cut a streamed batch at this age even when not full [default: 20ms]
    #[arg(long, env = "ACRA_DIRECT_BATCH_DEADLINE", value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub batch_deadline: Option<std::time::Duration>,
    /// Keep reconnecting this long after losing the database, then exit non-zero [default: 5m]
    #[arg(long, env = "ACRA_DIRECT_RECONNECT_BUDGET", value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub reconnect_budget: Option<std::time::Duration>,
    #[command(flatten)]
    pub enrich: EnrichArgs,
}

/// The enrich operator's settings (pipelines with an `enrich` operator, e.g. `--pipeline acra_direct`).
/// Credentials come from the environment only: LLM_API_KEY (or OPENAI_API_KEY), APIFY_TOKEN.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Enrichment")]
pub struct EnrichArgs {
    /// Companies enriched at once [pipeline default: 1]
    #[arg(long, env = "ACRA_DIRECT_CONCURRENCY", value_name = "N")]
    pub concurrency: Option<usize>,
    /// Enrichments per UTC day, counted across runs and restarts [default: no cap]
    #[arg(long, env = "ACRA_DIRECT_DAILY_CAP", value_name = "N")]
    pub daily_cap: Option<u64>,
    /// Pages fetched per company, the homepage included [default: 4]
    #[arg(long, env = "CRAWL_MAX_PAGES", value_name = "N")]
    pub crawl_max_pages: Option<usize>,
    /// Per-request timeout, body included: seconds (`10`, the PRD's form) or a duration (`10s`, `1500ms`)
    /// [default: 10]
    #[arg(long, env = "CRAWLER_TIMEOUT_S", value_name = "SECONDS", value_parser = parse_seconds)]
    pub crawler_timeout_s: Option<f64>,
    /// User-Agent sent to websites (its first word is matched against robots.txt)
    #[arg(long, env = "CRAWLER_USER_AGENT", value_name = "TEXT")]
    pub crawler_user_agent: Option<String>,
    /// At most one request per host this often [default: 500ms]
    #[arg(long, env = "ENRICH_HOST_SPACING", value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub host_spacing: Option<std::time::Duration>,
    /// Search URL with {query}, answering in DuckDuckGo's HTML format
    #[arg(long, env = "ENRICH_SEARCH_URL", value_name = "URL", hide_env_values = true)]
    pub search_url: Option<String>,
    /// Reader URL with {url} (r.jina.ai style), used when a site answers 401/403
    #[arg(long, env = "ENRICH_READER_URL", value_name = "URL", hide_env_values = true)]
    pub reader_url: Option<String>,
    /// Let crawled URLs reach private, loopback and link-local addresses [default: false]
    #[arg(long, env = "ENRICH_ALLOW_PRIVATE", value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub allow_private: Option<bool>,
    /// Send every enrichment request through this HTTP proxy
    #[arg(long, env = "ENRICH_HTTP_PROXY", value_name = "URL", hide_env_values = true)]
    pub http_proxy: Option<String>,
    /// Keep the merged page text in the history row [default: false]
    #[arg(long, env = "PERSIST_CRAWL_CORPUS", value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub persist_crawl_corpus: Option<bool>,
    /// Characters of page text sent to the LLM at most [default: 12000]
    #[arg(long, env = "EXTRACT_CORPUS_CHAR_LIMIT", value_name = "CHARS")]
    pub corpus_char_limit: Option<usize>,
    /// OpenAI-compatible base URL; turns llm_extract on
    #[arg(long, env = "LLM_BASE_URL", value_name = "URL", hide_env_values = true)]
    pub llm_base_url: Option<String>,
    /// Model name sent to the LLM [default: gpt-4o-mini]
    #[arg(long, env = "LLM_MODEL", value_name = "NAME")]
    pub llm_model: Option<String>,
    /// Chunks of page text per LLM call at most [default: 4]
    #[arg(long, env = "LLM_MAX_CHUNKS", value_name = "N")]
    pub llm_max_chunks: Option<usize>,
    /// LLM tokens per UTC day, counted across runs [default: no cap]
    #[arg(long, env = "OPENAI_DAILY_TOKENS_CAP", value_name = "TOKENS")]
    pub openai_daily_tokens_cap: Option<u64>,
    /// Look up people at each company through APIFY_LINKEDIN_URL [default: false]
    #[arg(long, env = "ENABLE_APIFY_LINKEDIN", value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub enable_apify_linkedin: Option<bool>,
    /// The contacts endpoint (POST, JSON in, a JSON array of people out)
    #[arg(long, env = "APIFY_LINKEDIN_URL", value_name = "URL", hide_env_values = true)]
    pub apify_linkedin_url: Option<String>,
    /// Contacts lookups across every worker, e.g. 60/min, or off [default: 60/min]
    #[arg(long, env = "APIFY_LINKEDIN_RATE", value_name = "RATE", value_parser = crate::config::parse_rate_setting)]
    pub apify_linkedin_rate: Option<crate::config::RateSetting>,
    /// Contacts lookups per UTC day at most, across runs and workers; past it companies get no contacts
    #[arg(long, env = "APIFY_MAX_LOOKUPS", value_name = "N")]
    pub apify_max_lookups: Option<u64>,
    /// How long a worker's lease on a job lasts unless renewed; a dead worker's jobs return to the queue after it [default: 60s]
    #[arg(long, env = "ENRICH_LEASE", value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub lease: Option<std::time::Duration>,
    /// How often an idle worker looks for new jobs [default: 500ms]
    #[arg(long, env = "ENRICH_POLL_INTERVAL", value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub poll_interval: Option<std::time::Duration>,
    /// Attempts in all before a job that keeps failing (timeouts, HTTP 5xx) is parked [default: 3]
    #[arg(long, env = "ENRICH_MAX_ATTEMPTS", value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Wait after a job's first failure; doubles with each further one [default: 1m]
    #[arg(long, env = "ENRICH_RETRY_BACKOFF", value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub retry_backoff: Option<std::time::Duration>,
    /// Re-enrich companies whose last successful enrichment is older than this many days [default: off]
    #[arg(long, env = "ENRICH_REFRESH_AFTER_DAYS", value_name = "DAYS")]
    pub refresh_after_days: Option<u32>,
    /// Companies the stale sweeper enqueues per sweep at most [default: 1000]
    #[arg(long, env = "ENRICH_REFRESH_BATCH", value_name = "N")]
    pub refresh_batch: Option<u64>,
    /// How often the stale sweeper runs [default: 10m]
    #[arg(long, env = "ENRICH_REFRESH_EVERY", value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub refresh_every: Option<std::time::Duration>,
    /// The search provider's budget across every worker, e.g. 200/hour, 10/s, or off [default: 200/hour]
    #[arg(long, env = "ENRICH_SEARCH_RATE", value_name = "RATE", value_parser = crate::config::parse_rate_setting)]
    pub search_rate: Option<crate::config::RateSetting>,
    /// The reader provider's budget across every worker [default: 120/hour]
    #[arg(long, env = "ENRICH_READER_RATE", value_name = "RATE", value_parser = crate::config::parse_rate_setting)]
    pub reader_rate: Option<crate::config::RateSetting>,
    /// Store a website only when its verification confidence reaches this, 0 to 1 [default: 0.5]
    #[arg(long, env = "ENRICH_MIN_CONFIDENCE", value_name = "0..1")]
    pub min_confidence: Option<f64>,
    /// Deadline for one company's whole enrichment (provider waits excluded) [default: 3m]
    #[arg(long, env = "ENRICH_COMPANY_TIMEOUT", value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub company_timeout: Option<std::time::Duration>,
    /// Search results fetched and verified per company at most [default: 3]
    #[arg(long, env = "ENRICH_MAX_CANDIDATES", value_name = "N")]
    pub max_candidates: Option<usize>,
    /// Email verification provider, ZeroBounce v2 or compatible; verification is on when ZEROBOUNCE_API_KEY
    /// (environment only) is set [default: https://bulkapi.zerobounce.net/v2]
    #[arg(long, env = "ZEROBOUNCE_URL", value_name = "URL", hide_env_values = true)]
    pub zerobounce_url: Option<String>,
    /// Emails verified per UTC day at most, across runs and workers; past it emails stay unverified
    #[arg(long, env = "ZEROBOUNCE_MAX_VERIFICATIONS", value_name = "N")]
    pub zerobounce_max_verifications: Option<u64>,
    /// A verification is reused (not paid again) for this many days [default: 90]
    #[arg(long, env = "ZEROBOUNCE_RECHECK_DAYS", value_name = "DAYS")]
    pub zerobounce_recheck_days: Option<u32>,
    /// validatebatch calls across every worker; ZeroBounce allows 5 a minute and blocks a key past it for
    /// 10 minutes [default: 5/min]
    #[arg(long, env = "ZEROBOUNCE_BATCH_RATE", value_name = "RATE", value_parser = crate::config::parse_rate_setting)]
    pub zerobounce_batch_rate: Option<crate::config::RateSetting>,
    /// Odoo's base URL: companies scored at or above SCORE_MIN_EXPORT are exported to it (with ODOO_DB,
    /// ODOO_USERNAME, and ODOO_API_KEY in the environment)
    #[arg(long, env = "ODOO_URL", value_name = "URL", hide_env_values = true)]
    pub odoo_url: Option<String>,
    /// The Odoo database
    #[arg(long, env = "ODOO_DB", value_name = "NAME")]
    pub odoo_db: Option<String>,
    /// The Odoo user the API key belongs to
    #[arg(long, env = "ODOO_USERNAME", value_name = "LOGIN")]
    pub odoo_username: Option<String>,
    /// Export companies scored at or above this, 0 to 1 [default: 0.66]
    #[arg(long, env = "SCORE_MIN_EXPORT", value_name = "0..1")]
    pub score_min_export: Option<f64>,
    /// Create a crm.lead per exported company, once [default: true]
    #[arg(long, env = "ODOO_CREATE_LEADS", value_name = "BOOL", value_parser = BoolishValueParser::new())]
    pub odoo_create_leads: Option<bool>,
    /// Wait after a failed export; doubles with each further one, at most 1h [default: 30s]
    #[arg(long, env = "ODOO_RETRY_BACKOFF", value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub odoo_retry_backoff: Option<std::time::Duration>,
    /// Attempts of an export before it is parked [default: 10]
    #[arg(long, env = "ODOO_MAX_ATTEMPTS", value_name = "N")]
    pub odoo_max_attempts: Option<u32>,
    /// Calls to Odoo's external API across every worker, e.g. 10/s, or off [default: 10/s]
    #[arg(long, env = "ODOO_RATE", value_name = "RATE", value_parser = crate::config::parse_rate_setting)]
    pub odoo_rate: Option<crate::config::RateSetting>,
}

impl EnrichArgs {
    pub fn to_overrides(&self) -> crate::config::EnrichOverrides {
        crate::config::EnrichOverrides {
            concurrency: self.concurrency,
            daily_cap: self.daily_cap,
            max_pages: self.crawl_max_pages,
            timeout_s: self.crawler_timeout_s,
            user_agent: self.crawler_user_agent.clone(),
            host_spacing: self.host_spacing,
            search_url: self.search_url.clone(),
            reader_url: self.reader_url.clone(),
            allow_private: self.allow_private,
            proxy: self.http_proxy.clone(),
            persist_corpus: self.persist_crawl_corpus,
            corpus_chars: self.corpus_char_limit,
            llm_base_url: self.llm_base_url.clone(),
            llm_model: self.llm_model.clone(),
            llm_max_chunks: self.llm_max_chunks,
            llm_daily_tokens: self.openai_daily_tokens_cap,
            contacts: self.enable_apify_linkedin,
            contacts_url: self.apify_linkedin_url.clone(),
            contacts_rate: self.apify_linkedin_rate.map(|r| r.0),
            contacts_daily_cap: self.apify_max_lookups,
            lease: self.lease,
            poll_interval: self.poll_interval,
            max_attempts: self.max_attempts,
            retry_backoff: self.retry_backoff,
            refresh_after_days: self.refresh_after_days,
            refresh_batch: self.refresh_batch,
            search_rate: self.search_rate.map(|r| r.0),
            reader_rate: self.reader_rate.map(|r| r.0),
            min_confidence: self.min_confidence,
            company_timeout: self.company_timeout,
            max_candidates: self.max_candidates,
            refresh_every: self.refresh_every,
            zerobounce_url: self.zerobounce_url.clone(),
            zerobounce_max_verifications: self.zerobounce_max_verifications,
            zerobounce_recheck_days: self.zerobounce_recheck_days,
            zerobounce_batch_rate: self.zerobounce_batch_rate.map(|r| r.0),
            odoo_rate: self.odoo_rate.map(|r| r.0),
            odoo_url: self.odoo_url.clone(),
            odoo_db: self.odoo_db.clone(),
            odoo_username: self.odoo_username.clone(),
            odoo_api_key: None,
            zerobounce_api_key: None,
            score_min_export: self.score_min_export,
            odoo_create_leads: self.odoo_create_leads,
            odoo_retry_backoff: self.odoo_retry_backoff,
            odoo_max_attempts: self.odoo_max_attempts,
        }
    }
}

impl OverrideArgs {
    pub fn to_overrides(&self) -> Overrides {
        Overrides {
            start_after_id: self.start_after_id,
            start_from_uen: self.start_from_uen.clone(),
            batch_limit: self.batch_limit,
            batch_size: self.batch_size,
            exclude_status: self.exclude_status.clone(),
            min_age_days: self.min_age_days,
            recheck_days: self.recheck_days,
            skip_if_any_history: self.skip_if_any_history,
            force: self.force,
            checkpoint_key: self.checkpoint_key.clone(),
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            slot_failover: self.slot_failover,
            batch_deadline: self.batch_deadline,
            reconnect_budget: self.reconnect_budget,
            enrich: self.enrich.to_overrides(),
        }
    }
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Exit once no job is due (and at the daily cap) instead of waiting for new ones.
    #[arg(long)]
    pub exit_when_idle: bool,
    /// Pipeline whose `enrich` settings the worker uses [default: acra_direct]
    #[arg(long, env = "ACRA_DIRECT_PIPELINE")]
    pub pipeline: Option<PathBuf>,
    /// Keep reconnecting this long after losing the database, then exit non-zero [default: 5m]
    #[arg(long, env = "ACRA_DIRECT_RECONNECT_BUDGET", value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub reconnect_budget: Option<std::time::Duration>,
    #[command(flatten)]
    pub enrich: EnrichArgs,
    #[command(flatten)]
    pub ops: OpsArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["uen", "file", "where_", "failed", "exports"])))]
pub struct RefreshArgs {
    /// Companies by UEN (several may follow one flag)
    #[arg(long, num_args = 1.., value_name = "UEN")]
    pub uen: Vec<String>,
    /// A file of UENs, one per line (blank lines and lines starting with # are skipped)
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// An SQL predicate on `companies`, e.g. "website_domain is null and industry_code like '62%'"
    #[arg(long = "where", value_name = "PREDICATE")]
    pub where_: Option<String>,
    /// Re-queue every parked job (those that failed ENRICH_MAX_ATTEMPTS times)
    #[arg(long)]
    pub failed: bool,
    /// Re-queue every parked export to Odoo (those that failed ODOO_MAX_ATTEMPTS times)
    #[arg(long, conflicts_with_all = ["force", "max_pages", "no_llm"])]
    pub exports: bool,
    /// Find the website again, ignoring the domain the company has
    #[arg(long)]
    pub force: bool,
    /// Pages to fetch for these jobs, the homepage included (instead of CRAWL_MAX_PAGES)
    #[arg(long, value_name = "N")]
    pub max_pages: Option<usize>,
    /// No LLM call for these jobs
    #[arg(long)]
    pub no_llm: bool,
    /// Tenant of the jobs (as the workers that should take them run with)
    #[arg(long, env = "ACRA_DIRECT_TENANT_ID", value_name = "ID")]
    pub tenant_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Sample rows to seed when staging is empty.
    #[arg(long, default_value_t = 5_000)]
    pub rows: u64,
    /// Run on the database POSTGRES_DSN/--dsn names, seeding and enriching its staging table. Without it the
    /// demo runs only on the private cluster, in a database of its own (acraflow_demo).
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub ops: OpsArgs,
}

#[derive(Debug, Subcommand)]
pub enum SlotsCommand {
    /// Every logical slot on the server: active or idle, and the WAL it holds.
    List,
    /// Drop an idle slot of this database (asks first; --yes skips the question).
    Drop {
        name: String,
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CheckpointsCommand {
    /// Every checkpoint: its key, position and age.
    List,
    /// Delete a checkpoint: the next run under that key starts from the beginning (asks first).
    Reset {
        key: String,
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Args)]
pub struct PsqlArgs {
    /// The database in the private cluster (`acraflow_demo` holds the demo's data).
    #[arg(short = 'd', long, default_value = "acraflow")]
    pub database: String,
    /// Arguments for psql (after `--`), e.g. `-- -c "select count(*) from companies"`.
    #[arg(last = true)]
    pub psql_args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// CSV files in ACRA's published format (a header row of the staging table's column names).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Empty staging first and load the files in the same transaction: readers see the old rows or all new ones.
    #[arg(long)]
    pub replace: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    /// The daily enrichment cap to show usage against
    #[arg(long, env = "ACRA_DIRECT_DAILY_CAP", value_name = "N")]
    pub daily_cap: Option<u64>,
    /// The daily LLM token cap to show usage against
    #[arg(long, env = "OPENAI_DAILY_TOKENS_CAP", value_name = "TOKENS")]
    pub tokens_cap: Option<u64>,
    /// The daily email verification cap to show usage against
    #[arg(long, env = "ZEROBOUNCE_MAX_VERIFICATIONS", value_name = "N")]
    pub verifications_cap: Option<u64>,
    /// The daily contacts lookup cap to show usage against
    #[arg(long, env = "APIFY_MAX_LOOKUPS", value_name = "N")]
    pub lookups_cap: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Registry pipeline throughput vs. the set-based ceiling (one INSERT ... SELECT ... ON CONFLICT).
    Backfill(BenchBackfillArgs),
    /// `acraflow run` under concurrent writers: sustained rows/s, commit-to-visible latency, RSS through a
    /// large transaction, against the raw receive-and-decode rate of the same WAL.
    Stream(BenchStreamArgs),
    /// Enrichment against the fixture web: extraction CPU per page (against the parse alone), a 2 MB
    /// nested page, then companies/s, per-company p50/p95/p99 and peak RSS at each concurrency against
    /// the bound politeness allows, and a pathological page among healthy companies against a control.
    Enrich(BenchEnrichArgs),
}

#[derive(Debug, Args)]
pub struct BenchEnrichArgs {
    /// Worker processes, comma-separated: measure the queue's scaling with workers (each at
    /// --worker-concurrency) and the registry's latency while jobs wait, instead of the concurrency sweep.
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<usize>,
    /// Jobs each worker runs at once in the --workers bench.
    #[arg(long, default_value_t = 8)]
    pub worker_concurrency: usize,
    /// Jobs per worker at each worker count in the --workers bench.
    #[arg(long, default_value_t = 96)]
    pub jobs_per_worker: u64,
    /// Jobs waiting in the queue while the registry's commit-to-visible latency is measured.
    #[arg(long, default_value_t = 10_000)]
    pub waiting: u64,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub concurrency: Vec<usize>,
    /// Companies per concurrency slot at each level (the run is long enough for start-up and the last
    /// stragglers to matter little).
    #[arg(long, default_value_t = 16)]
    pub per_slot: u64,
    /// Latency of every fixture page.
    #[arg(long, default_value = "100ms", value_parser = crate::config::parse_duration)]
    pub latency: std::time::Duration,
    /// Politeness spacing per host (ENRICH_HOST_SPACING).
    #[arg(long, default_value = "500ms", value_parser = crate::config::parse_duration)]
    pub host_spacing: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct BenchStreamArgs {
    /// Rows written by the concurrent writers for the sustained-throughput phase.
    #[arg(long, default_value_t = 500_000)]
    pub rows: u64,
    /// Concurrent writer connections.
    #[arg(long, default_value_t = 2)]
    pub writers: u32,
    /// Rows per writer transaction in the throughput phase.
    #[arg(long, default_value_t = 1_000)]
    pub txn_rows: u64,
    /// Steady write rate for the latency phase (rows/s).
    #[arg(long, default_value_t = 2_000)]
    pub rate: u64,
    /// Length of the latency phase, in seconds.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Rows in the one large transaction (memory phase).
    #[arg(long, default_value_t = 1_000_000)]
    pub big_txn: u64,
}

#[derive(Debug, Args)]
pub struct BenchBackfillArgs {
    /// Seeded staging rows.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Rows per batch for the pipeline.
    #[arg(long, default_value_t = crate::config::DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Runs of each side, alternating (the best of each is compared).
    #[arg(long, default_value_t = 2)]
    pub repeat: u32,
}
