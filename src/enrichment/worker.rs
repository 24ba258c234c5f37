//! The enrichment worker: leases jobs, runs the enrich stage on them concurrently, and commits each
//! finished job through the enrichment sink.
//!
//! ```text
//! enrichment_jobs --lease (SKIP LOCKED, up to the free slots)--> enrich (concurrency) --> sink (fields + history + job removal)
//!        ^  renew leases while in flight; give them up on shutdown
//! ```
//! - Backpressure: a worker leases only as many jobs as it has free slots, so the queue's backlog stays
//!   on disk and memory holds at most `concurrency` jobs, whatever the queue's depth.
//! - Leases are renewed every third of `ENRICH_LEASE` while the work is in flight; on SIGINT/SIGTERM the
//!   worker stops leasing, lets in-flight jobs finish for up to `ACRA_DIRECT_DRAIN_TIMEOUT`, then gives
//!   back the leases it still holds so other workers take those jobs at once. A killed worker's leases
//!   expire instead.
//! - Completed jobs commit out of order (each job is its own unit: no watermark is needed, unlike a
//!   stream position). Whatever finished while a commit ran is committed together in the next one.
//! - Caps are counted in the database at lease time (`usage`), so they hold across workers.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{EnrichSpec, OpsSpec};
use crate::db;
use crate::enrichment::enrich::{EnrichSettings, Enricher, Enrichment, Status};
use crate::enrichment::queue::{self, Job};
use crate::enrichment::sink::{Done, EnrichmentSink, Outcomes, RetryPolicy};
use crate::enrichment::usage::{self, Usage};
use crate::error::Result;
use crate::run::{EnrichmentSummary, Latencies, LatencySummary};
use crate::telemetry::alerts::Monitor;
use crate::telemetry::metrics::{metrics, ReasonLabel};

/// The worker's settings (the enrich operator's section of the pipeline file, and the operations settings).
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// `ACRA_DIRECT_CONCURRENCY`: jobs enriched at once by this worker.
    pub concurrency: usize,
    /// `ENRICH_LEASE`: how long a lease lasts unless renewed.
    pub lease: Duration,
    /// `ENRICH_POLL_INTERVAL`: how often an idle worker looks for new jobs.
    pub poll: Duration,
    pub retry: RetryPolicy,
    /// `ACRA_DIRECT_DAILY_CAP`
    pub daily_cap: Option<u64>,
    /// `ENRICH_REFRESH_AFTER_DAYS`: re-enrich companies whose last success is older (None: off).
    pub refresh_after_days: Option<u32>,
    /// `ENRICH_REFRESH_BATCH`: companies the stale sweeper enqueues per sweep at most.
    pub refresh_batch: u64,
    /// `ENRICH_REFRESH_EVERY`: how often the sweeper runs.
    pub refresh_every: Duration,
    pub tenant: Option<String>,
    pub drain_timeout: Duration,
    /// The staging table (quoted), read for the registry facts a website is verified against.
    pub staging_table: String,
}

impl WorkerSettings {
    pub fn from_spec(e: &EnrichSpec, ops: &OpsSpec, staging_table: &str) -> Self {
        WorkerSettings {
            concurrency: e.concurrency.max(1),
            lease: e.lease,
            poll: e.poll_interval,
            retry: RetryPolicy { max_attempts: e.max_attempts.max(1), backoff: e.retry_backoff },
            daily_cap: e.daily_cap,
            refresh_after_days: e.refresh_after_days,
            refresh_batch: e.refresh_batch,
            refresh_every: e.refresh_every,
            tenant: ops.tenant_id.clone(),
            drain_timeout: ops.drain_timeout,
            staging_table: crate::source::quote_table(staging_table),
        }
    }
}

/// When a worker ends.
pub enum Until {
    /// At SIGINT/SIGTERM (`acraflow run`, `acraflow worker`).
    Stopped,
    /// Once the receiver turns true (the registry side is done) and no job is due, or the daily cap is
    /// reached (`acraflow backfill`, `acraflow worker --exit-when-idle`).
    Drained(watch::Receiver<bool>),
}

/// What a worker did.
#[derive(Debug, Clone, Default)]
pub struct WorkerSummary {
    pub outcomes: Outcomes,
    /// Enqueue-to-commit latency of the jobs it completed.
    pub latency: LatencySummary,
    /// Jobs left waiting for a retry's backoff when a draining worker ended.
    pub backing_off: i64,
    /// It stopped leasing at the daily cap.
    pub capped: bool,
}

impl WorkerSummary {
    /// What a run's summary shows of it.
    pub fn summary(&self) -> EnrichmentSummary {
        let o = &self.outcomes;
        EnrichmentSummary {
            ok: o.ok,
            degraded: o.degraded,
            failed: o.failed,
            retried: o.retried,
            parked: o.parked,
            queue_latency: self.latency,
            backing_off: self.backing_off,
            capped: self.capped,
        }
    }
}

/// This process's worker name, as leases record it: host, pid and a random tag (pids repeat across
/// machines and restarts). The same for every attempt in one process, so a restarted attempt can give
/// back what the one before held.
pub fn owner_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        format!("{host}:{}:{:04x}", std::process::id(), rand::random::<u16>())
    })
}

type InFlight = FuturesUnordered<BoxFuture<'static, Done>>;

/// Companies past their crawl and in the steps after it (waiting for the email verifier's next batch,
/// scored) at most. They hold no crawl slot (`ACRA_DIRECT_CONCURRENCY` bounds crawls), so a verifier paced
/// at a few batches a minute gathers many companies per batch instead of stalling the crawls.
const FINISHING_MAX: usize = crate::enrichment::leads::BATCH_MAX;

/// The run a worker reports to.
pub struct RunContext {
    /// The `enrichment_runs` header its history rows point to.
    pub run_id: i64,
    /// Fed with every commit's outcomes; its pause gate stops leasing.
    pub monitor: Arc<Monitor>,
    /// Updated after every commit with the outcomes so far (the run's header and summaries read it).
    pub live: Arc<std::sync::Mutex<Outcomes>>,
}

/// Runs one worker until `until` says so or a fatal (database) error.
pub async fn run(
    dsn: &str,
    settings: EnrichSettings,
    ws: WorkerSettings,
    ctx: RunContext,
    until: Until,
    mut stop: watch::Receiver<bool>,
) -> Result<WorkerSummary> {
    let RunContext { run_id, monitor, live } = ctx;
    let owner = owner_id();
    let tenant = ws.tenant.as_deref();
    let mut lease_client = db::connect_as(dsn, tenant, "acraflow-worker").await?;
    let control = Arc::new(db::connect_as(dsn, tenant, "acraflow-worker-control").await?);
    let sink_client = db::connect_as(dsn, tenant, "acraflow-worker-sink").await?;
    let export = settings.export.clone();
    let mut sink = EnrichmentSink::new(sink_client, owner.to_owned(), run_id, ws.retry)
        .with_exports(export.as_ref().map(|e| e.min_score));
    // The export step: a task of its own, so a slow or down Odoo never holds enrichment back.
    let (export_stop, export_stop_rx) = watch::channel(false);
    let (export_drain, export_drain_rx) = watch::channel(false);
    // Aborted if this worker returns early (a lost database): a restart spawns a new one.
    let exporter = match export {
        Some(e) => Some(AbortOnDrop(crate::enrichment::export::spawn(
            e,
            db::connect_as(dsn, tenant, "acraflow-export").await?,
            owner.to_owned(),
            export_stop_rx,
            export_drain_rx,
        ))),
        None => None,
    };
    // An earlier attempt of this process (before a reconnect) may still hold leases.
    let released = queue::release(&control, owner).await?;
    if released > 0 {
        tracing::info!(released, "gave back the leases of this process's previous attempt");
    }
    let tokens = Usage::new(Arc::clone(&control), usage::LLM_TOKENS, settings.llm_daily_tokens);
    let enricher = Enricher::new(settings, tokens)?;
    let enriched_today = usage::today(&control).await?.enrichments;
    tracing::info!(
        worker = owner,
        concurrency = ws.concurrency,
        enriched_today,
        daily_cap = ws.daily_cap,
        lease_ms = ws.lease.as_millis() as u64,
        "enrichment worker ready"
    );

    let mut summary = WorkerSummary::default();
    let mut latencies = Latencies::default();
    let mut in_flight: InFlight = FuturesUnordered::new();
    let mut finishing: InFlight = FuturesUnordered::new();
    let every = |d: Duration| {
        let mut i = tokio::time::interval(d.max(Duration::from_millis(50)));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i.reset();
        i
    };
    let mut renew = every(ws.lease / 3);
    let mut sweep = every(ws.refresh_every);
    let mut gauges = every(Duration::from_secs(5));
    let (mut done_rx, mut registry_done) = match until {
        Until::Stopped => (None, false),
        Until::Drained(rx) => {
            let done = *rx.borrow();
            (Some(rx), done)
        }
    };
    let draining = done_rx.is_some();
    let mut stopping = *stop.borrow();
    let mut drain_deadline = stopping.then(|| Instant::now() + ws.drain_timeout);
    let mut next_lease = Instant::now();
    if ws.refresh_after_days.is_some() {
        sweep_stale(&control, &ws).await;
    }
    update_gauges(&control).await;
    loop {
        let room = if finishing.len() >= FINISHING_MAX { 0 } else { ws.concurrency.saturating_sub(in_flight.len()) };
        if !stopping && room > 0 && Instant::now() >= next_lease {
            if monitor.gate().is_paused() {
                next_lease = Instant::now() + ws.poll;
            } else {
                let leased =
                    queue::lease(&mut lease_client, owner, tenant, room, ws.lease, ws.daily_cap, &ws.staging_table)
                        .await?;
                let got = leased.jobs.len();
                metrics().worker_leases.inc_by(got as i64);
                for job in leased.jobs {
                    in_flight.push(start(&enricher, job));
                }
                if leased.capped && !summary.capped {
                    summary.capped = true;
                    tracing::warn!(
                        daily_cap = ws.daily_cap,
                        "ACRA_DIRECT_DAILY_CAP reached: no more jobs are leased today; they wait in the queue"
                    );
                }
                if got == 0 && draining && registry_done && in_flight.is_empty() && finishing.is_empty() {
                    if leased.capped {
                        break;
                    }
                    let (due, later) = queue::due(&control, tenant).await?;
                    if due == 0 {
                        summary.backing_off = later;
                        break;
                    }
                }
                if got < room {
                    // The queue (or today's budget) has nothing more now: look again after the poll interval.
                    next_lease = Instant::now() + ws.poll;
                }
            }
        }
        if stopping && in_flight.is_empty() && finishing.is_empty() {
            break;
        }
        let full = stopping || in_flight.len() >= ws.concurrency || finishing.len() >= FINISHING_MAX;
        let lease_wait = async {
            if full {
                std::future::pending::<()>().await
            }
            tokio::time::sleep_until(next_lease).await
        };
        let deadline = async {
            match drain_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let registry = async {
            match done_rx.as_mut() {
                Some(rx) if !registry_done => rx.changed().await.is_ok(),
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = deadline => {
                tracing::warn!(in_flight = in_flight.len() + finishing.len(),
                    "ACRA_DIRECT_DRAIN_TIMEOUT passed: giving back the leases of the jobs still in flight");
                break;
            }
            changed = stop.changed(), if !stopping => {
                if changed.is_err() || *stop.borrow() {
                    stopping = true;
                    drain_deadline = Some(Instant::now() + ws.drain_timeout);
                }
            }
            alive = registry => {
                registry_done = !alive || done_rx.as_ref().is_some_and(|rx| *rx.borrow());
                next_lease = Instant::now();
            }
            Some(crawled) = in_flight.next() => {
                finishing.push(finish(&enricher, crawled));
                while let Some(Some(d)) = in_flight.next().now_or_never() {
                    finishing.push(finish(&enricher, d));
                }
            }
            Some(first) = finishing.next() => {
                let mut batch = vec![first];
                while let Some(Some(d)) = finishing.next().now_or_never() {
                    batch.push(d);
                }
                let o = sink.write(&batch).await?;
                metrics().worker_leases.dec_by(batch.len() as i64);
                for l in &o.latencies {
                    latencies.record(Duration::from_secs_f64(*l));
                }
                monitor.observe(o.finished() + o.retried, o.failed + o.retried);
                summary.outcomes.add(&o);
                live.lock().unwrap_or_else(|p| p.into_inner()).add(&o);
                next_lease = next_lease.min(Instant::now());
            }
            _ = renew.tick() => {
                if !in_flight.is_empty() || !finishing.is_empty() {
                    if let Err(e) = queue::renew(&control, owner, ws.lease).await {
                        tracing::warn!(error = %e, "could not renew leases; retrying at the next tick");
                    }
                }
            }
            _ = sweep.tick(), if ws.refresh_after_days.is_some() => sweep_stale(&control, &ws).await,
            _ = gauges.tick() => update_gauges(&control).await,
            _ = lease_wait => {}
        }
    }
    let abandoned = (in_flight.len() + finishing.len()) as i64;
    drop(in_flight); // aborts the jobs still running
    drop(finishing);
    if let Some(mut task) = exporter {
        // Drained: the exports this worker's enrichments asked for go out before it exits. Stopped: the
        // exporter finishes the company in hand within ACRA_DIRECT_DRAIN_TIMEOUT, or is cut off (its
        // leases expire; a partner it created is found by its UEN next time).
        if stopping {
            let _ = export_stop.send(true);
            if tokio::time::timeout(ws.drain_timeout, &mut task).await.is_err() {
                drop(task); // aborts it
                tracing::warn!("ACRA_DIRECT_DRAIN_TIMEOUT passed with an Odoo export in flight; it is retried later");
            }
        } else {
            let _ = export_drain.send(true);
            let _ = task.await;
        }
    }
    metrics().worker_leases.dec_by(abandoned);
    match queue::release(&control, owner).await {
        Ok(n) if n > 0 => tracing::info!(released = n, "gave back unfinished leases; other workers take them now"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not give back leases; they expire after ENRICH_LEASE"),
    }
    update_gauges(&control).await;
    summary.latency = latencies.summary();
    Ok(summary)
}

/// A leased job on its way: its `select` stage logged, its enrichment on a task of its own (aborted if
/// the worker drops it).
fn start(enricher: &Arc<Enricher>, job: Job) -> BoxFuture<'static, Done> {
    {
        let c = &job.company;
        let _span = tracing::info_span!("company", company_id = c.id, uen = c.uen.as_deref().unwrap_or("")).entered();
        tracing::info!(target: crate::telemetry::COMPANY, stage = "select", job_id = job.id, reason = %job.reason, attempt = job.attempts + 1,
            name = %c.name, "leased");
    }
    let task = tokio::spawn(Arc::clone(enricher).enrich(job.company.clone(), job.options));
    done_when(task, job, "the enrichment task")
}

/// The job with what `task` returns, or a failure naming `what` when the task panicked.
fn done_when(task: tokio::task::JoinHandle<Enrichment>, job: Job, what: &'static str) -> BoxFuture<'static, Done> {
    let task = AbortOnDrop(task);
    async move {
        let enrichment = task.await.unwrap_or_else(|_| Enrichment {
            status: Status::Failed,
            error: Some(format!("internal error: {what} ended abnormally")),
            ..Default::default()
        });
        Done { job, enrichment }
    }
    .boxed()
}

/// The steps after a company's crawl: verify (on a task of its own: it waits for a batch) and score.
fn finish(enricher: &Arc<Enricher>, crawled: Done) -> BoxFuture<'static, Done> {
    let Done { job, mut enrichment } = crawled;
    if !enricher.verifies() {
        let c = &job.company;
        let _span = tracing::info_span!("company", company_id = c.id, uen = c.uen.as_deref().unwrap_or("")).entered();
        enricher.score(c, &mut enrichment);
        return futures::future::ready(Done { job, enrichment }).boxed();
    }
    let task = tokio::spawn(Arc::clone(enricher).leads(job.company.clone(), enrichment));
    done_when(task, job, "the steps after the crawl")
}

async fn sweep_stale(control: &tokio_postgres::Client, ws: &WorkerSettings) {
    let Some(days) = ws.refresh_after_days else { return };
    match queue::sweep_stale(control, days, ws.refresh_batch, ws.tenant.as_deref()).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(enqueued = n, older_than_days = days, "stale companies enqueued for re-enrichment"),
        Err(e) => tracing::warn!(error = %e, "the stale sweep failed; it runs again at the next interval"),
    }
}

/// The queue gauges (`acra_direct_queue_*`), read from the table.
async fn update_gauges(control: &tokio_postgres::Client) {
    let Ok(s) = queue::depth(control).await else { return };
    let m = metrics();
    for reason in ["new", "changed", "express", "retry", "stale"] {
        let n = s.waiting.get(reason).copied().unwrap_or(0);
        m.queue_waiting.get_or_create(&ReasonLabel { reason }).set(n);
    }
    m.queue_leased.set(s.leased.values().sum());
    m.queue_parked.set(s.parked);
    m.queue_oldest_seconds.set(s.oldest_waiting_seconds as i64);
}

/// Aborts a job's task if the worker drops it (shutdown, a fatal error) before it finishes.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}
