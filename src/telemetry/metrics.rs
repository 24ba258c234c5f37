//! Prometheus metrics (`METRICS_PROMETHEUS_ENABLE`) and the `/metrics`, `/healthz`, `/readyz` endpoints.
//!
//! The metrics are process-wide, as Prometheus expects: a run that restarts after a lost connection keeps
//! adding to the same counters. They are always recorded (an atomic add per batch or company); the HTTP
//! endpoint is what the setting turns on. Names follow PRD 20 (`acra_direct_...`).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::error::{Error, ErrorKind, Result};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperatorLabel {
    pub operator: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FateLabel {
    pub fate: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: &'static str,
    /// ok, refused (rate limit, bot check, 429), error
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderNameLabel {
    pub provider: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// ok, failed
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// Companies processed (upserted, history row written), enriched or not.
    pub processed: Counter,
    /// Failed enrichments plus dead-lettered rows.
    pub failures: Counter,
    /// From the moment the source read a processed change to the sink's commit of it, in seconds.
    pub latency: Histogram,
    /// Every change the sink committed, by what happened to it.
    pub rows: Family<FateLabel, Counter>,
    /// Changes entering an operator still eligible (fate `process`).
    pub operator_in: Family<OperatorLabel, Counter>,
    /// Changes leaving an operator still eligible: in minus what it filtered, skipped or dead-lettered.
    pub operator_out: Family<OperatorLabel, Counter>,
    pub dead_letters: Family<StageLabel, Counter>,
    pub enrichments: Family<StatusLabel, Counter>,
    /// Companies whose enrichment has started and not yet finished.
    pub in_flight: Gauge,
    /// The last committed checkpoint's LSN (the stream's position, or the backfill's snapshot).
    pub checkpoint_lsn: Gauge,
    /// WAL bytes the slot holds back: `pg_current_wal_lsn() - confirmed_flush_lsn`.
    pub slot_lag_bytes: Gauge,
    /// 1 while enrichment is paused by the failure monitor.
    pub paused: Gauge,
    /// Runs connected to the database and working (`/readyz`).
    pub running: Gauge,
    /// Jobs waiting in `enrichment_jobs` (due or backing off, not leased), by reason; read from the table.
    pub queue_waiting: Family<ReasonLabel, Gauge>,
    /// Jobs leased by any worker; read from the table.
    pub queue_leased: Gauge,
    /// Jobs parked after their last attempt; read from the table.
    pub queue_parked: Gauge,
    /// Age of the oldest due job no worker holds, in seconds; read from the table.
    pub queue_oldest_seconds: Gauge,
    /// Jobs this process holds leases on.
    pub worker_leases: Gauge,
    /// From a job's enqueue to the commit of its enrichment, in seconds.
    pub queue_latency: Histogram,
    /// Calls to external providers (search, reader), by provider and outcome.
    pub provider_calls: Family<ProviderLabel, Counter>,
    /// Seconds spent waiting for a provider's rate budget, by provider.
    pub provider_wait: Family<ProviderNameLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Pages whose HTML was extracted, and the CPU seconds extraction took.
    pub extract_pages: Counter,
    pub extract_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Exports to Odoo attempted, by outcome.
    pub odoo_exports: Family<OutcomeLabel, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("acra_direct");
        let m = Metrics {
            processed: Counter::default(),
            failures: Counter::default(),
            // 1 ms .. about 2.3 h: a registry row takes milliseconds, an enrichment seconds to minutes.
            latency: Histogram::new(exponential_buckets(0.001, 2.0, 24)),
            rows: Family::default(),
            operator_in: Family::default(),
            operator_out: Family::default(),
            dead_letters: Family::default(),
            enrichments: Family::default(),
            in_flight: Gauge::default(),
            checkpoint_lsn: Gauge::default(),
            slot_lag_bytes: Gauge::default(),
            paused: Gauge::default(),
            running: Gauge::default(),
            queue_waiting: Family::default(),
            queue_leased: Gauge::default(),
            queue_parked: Gauge::default(),
            queue_oldest_seconds: Gauge::default(),
            worker_leases: Gauge::default(),
            // 100 ms .. about 9 days.
            queue_latency: Histogram::new(exponential_buckets(0.1, 2.0, 24)),
            provider_calls: Family::default(),
            provider_wait: Family::default(),
            extract_pages: Counter::default(),
            extract_seconds: Counter::default(),
            odoo_exports: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("companies_processed", "Companies processed (upserted with a history row)", m.processed.clone());
        r.register("failures", "Failed enrichments plus dead-lettered rows", m.failures.clone());
        r.register(
            "latency_seconds",
            "Seconds from reading a processed change to committing it (registry fields and the enrichment job)",
            m.latency.clone(),
        );
        r.register("rows", "Changes committed by the sink, by fate", m.rows.clone());
        r.register("operator_rows_in", "Eligible changes entering each operator", m.operator_in.clone());
        r.register("operator_rows_out", "Changes each operator passed on still eligible", m.operator_out.clone());
        r.register("dead_letters", "Rows written to dead_letters, by stage", m.dead_letters.clone());
        r.register("enrichments", "Finished enrichments, by status", m.enrichments.clone());
        r.register("enrichments_in_flight", "Enrichments started and not finished", m.in_flight.clone());
        r.register("checkpoint_lsn", "LSN of the last committed checkpoint", m.checkpoint_lsn.clone());
        r.register("slot_lag_bytes", "WAL bytes retained for the replication slot", m.slot_lag_bytes.clone());
        r.register("enrichment_paused", "1 while enrichment is paused by the failure monitor", m.paused.clone());
        r.register("runs_active", "Pipeline runs connected and working", m.running.clone());
        r.register("queue_jobs_waiting", "Enrichment jobs waiting (not leased), by reason", m.queue_waiting.clone());
        r.register("queue_jobs_leased", "Enrichment jobs leased by any worker", m.queue_leased.clone());
        r.register("queue_jobs_parked", "Enrichment jobs parked after their last attempt", m.queue_parked.clone());
        r.register(
            "queue_oldest_waiting_seconds",
            "Age of the oldest due enrichment job no worker holds",
            m.queue_oldest_seconds.clone(),
        );
        r.register("worker_leases", "Enrichment jobs this process holds leases on", m.worker_leases.clone());
        r.register(
            "queue_latency_seconds",
            "Seconds from a job's enqueue to the commit of its enrichment",
            m.queue_latency.clone(),
        );
        r.register(
            "provider_calls",
            "Calls to external providers (search, reader, contacts, zerobounce, odoo), by outcome",
            m.provider_calls.clone(),
        );
        r.register(
            "provider_wait_seconds",
            "Seconds spent waiting for a provider's rate budget",
            m.provider_wait.clone(),
        );
        r.register("extract_pages", "Pages whose HTML was extracted", m.extract_pages.clone());
        r.register("extract_seconds", "Seconds of CPU spent extracting pages", m.extract_seconds.clone());
        r.register("odoo_exports", "Exports of leads to Odoo attempted, by outcome", m.odoo_exports.clone());
        // Every labelled series exists from the start at zero, so a dashboard or an alert sees 0 rather
        // than no data before the first event (and `rate()` sees the first increment).
        for fate in ["processed", "filtered", "skipped", "ignored", "dead_lettered"] {
            drop(m.rows.get_or_create(&FateLabel { fate }));
        }
        for operator in ["filter", "dedupe", "upsert"] {
            drop(m.operator_in.get_or_create(&OperatorLabel { operator }));
            drop(m.operator_out.get_or_create(&OperatorLabel { operator }));
        }
        for stage in ["source", "filter", "upsert", "enrich"] {
            drop(m.dead_letters.get_or_create(&StageLabel { stage }));
        }
        for status in ["ok", "degraded", "failed", "retried"] {
            drop(m.enrichments.get_or_create(&StatusLabel { status }));
        }
        for reason in ["new", "changed", "express", "retry", "stale"] {
            drop(m.queue_waiting.get_or_create(&ReasonLabel { reason }));
        }
        for outcome in ["ok", "failed"] {
            drop(m.odoo_exports.get_or_create(&OutcomeLabel { outcome }));
        }
        for provider in ["search", "reader", "contacts", "zerobounce", "odoo"] {
            for outcome in ["ok", "refused", "error"] {
                drop(m.provider_calls.get_or_create(&ProviderLabel { provider, outcome }));
            }
            drop(m.provider_wait.get_or_create(&ProviderNameLabel { provider }));
        }
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The Prometheus text format (0.0.4), what scrapers read by default and `promtool check metrics`
    /// checks: OpenMetrics' counter families are named with `_total` in their HELP and TYPE lines, and
    /// the `# UNIT` and `# EOF` lines go.
    pub fn encode_prometheus(&self) -> String {
        to_prometheus_text(&self.encode())
    }

    /// Ready: at least one run is connected and enrichment is not paused.
    pub fn ready(&self) -> bool {
        self.running.get() > 0 && self.paused.get() == 0
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Counts a run as active (`/readyz`) while it lives.
pub struct Running;

impl Running {
    pub fn start() -> Self {
        metrics().running.inc();
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        metrics().running.dec();
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends. Binding happens before
/// this returns, so a port in use is an error at start-up, naming the setting.
pub async fn serve(addr: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("cannot serve metrics on {addr} (METRICS_PORT, METRICS_BIND): pick a free port"),
            e,
        )
    })?;
    let bound = listener.local_addr().map_err(|e| Error::io("reading the metrics address", e))?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            // At most MAX_CONNECTIONS at once: more wait in the listen backlog.
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most often: wait instead of spinning on the error.
                    tracing::warn!(error = %e, "metrics endpoint: accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let conn = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service_fn(respond));
                // A scraper that keeps its connection is cut after CONNECTION_LIFETIME; it reconnects.
                let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
                drop(slot);
            });
        }
    });
    Ok(bound)
}

/// Connections served at once; a scraper needs one.
const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send a request's headers (and, between requests, to send the next one).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection is kept, whatever it does.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// OpenMetrics text converted to the Prometheus text format (see [`Metrics::encode_prometheus`]).
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line.strip_prefix("# TYPE ").and_then(|r| r.strip_suffix(" counter")) {
            counters.insert(name.to_owned());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or(line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((tag, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{tag}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

async fn respond(req: Request<Incoming>) -> std::result::Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let m = metrics();
    // OpenMetrics only for a scraper that asks for it (Prometheus does, by Accept); the classic text
    // format otherwise (curl, promtool, other agents).
    let openmetrics = req
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")));
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" if openmetrics => {
            (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", m.encode())
        }
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", m.encode_prometheus()),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" if m.ready() => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        "/readyz" if m.paused.get() > 0 => {
            (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready: enrichment paused\n".to_owned())
        }
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready: no run connected\n".to_owned()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /healthz or /readyz\n".to_owned()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    Ok(resp)
}
