//! Pipeline assembly: a pipeline file becomes the registry dataflow (and, when it has an `enrich`
//! operator, the enrichment worker beside it), which runs until its source ends, a shutdown is requested,
//! or a fatal error.
//!
//! ```text
//! source task --(1 batch)--> filter, dedupe task --(1 batch)--> upsert task --(1 batch)--> sink (this task)
//!                                                                        enqueue, same txn -->  enrichment_jobs --> worker
//! ```
//! Stages run concurrently (a page is read while the one before is probed for history, the one before
//! that is upserted, and the one before that is committed), each on its own connection. The channels are
//! bounded, so a slow sink slows the source and memory holds at most a handful of batches, whatever the
//! table size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::checkpoint::{self, Checkpoint};
use crate::config::{OperatorSpec, PipelineSpec, SourceKind};
use crate::db;
use crate::enrichment::enrich::EnrichSettings;
use crate::enrichment::sink::Outcomes;
use crate::enrichment::worker::{self, Until, WorkerSettings, WorkerSummary};
use crate::error::{Error, Result};
use crate::ops::dedupe::{Dedupe, DedupePolicy};
use crate::ops::filter::Filter;
use crate::ops::upsert::Upsert;
use crate::ops::{BatchStream, Operator};
pub use crate::run::{error_chain, RunSummary};
use crate::run::{write_header, Latencies};
use crate::sink::{Counters, PostgresSink};
use crate::source::plan::{backfill_start, build_source, plan_stream, rows_after, SourcePlan};
use crate::source::quote_table;
use crate::source::replication::Progress;
use crate::telemetry::alerts::Monitor;
use crate::telemetry::metrics::{metrics, OperatorLabel, Running};
use crate::telemetry::progress;

/// Batches buffered between two stages.
const STAGE_DEPTH: usize = 1;
/// How often a running run's header gets its counters.
const HEADER_EVERY: Duration = Duration::from_secs(5);

/// Which source a run reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Replay the table (from the checkpoint or a start setting) and stop.
    Backfill,
    /// Stream from the replication slot; on first start, backfill in the slot's snapshot first.
    Stream,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Backfill => "backfill",
            Mode::Stream => "run",
        }
    }
}

/// Runs `spec` against the database at `dsn` until the source ends or `stop` turns true.
pub async fn run(dsn: &str, spec: &PipelineSpec, mode: Mode, stop: watch::Receiver<bool>) -> Result<RunSummary> {
    spec.validate()?;
    let control = db::connect_as(dsn, spec.ops.tenant_id.as_deref(), "acraflow").await?;
    let facts = db::schema_facts(&control).await?;
    checkpoint::lock(&control, &spec.checkpoint_key).await?;
    let table = quote_table(&spec.source.table);
    let plan = match (mode, spec.source.kind) {
        (Mode::Stream, SourceKind::Replication) => plan_stream(&control, dsn, spec, &table).await?,
        _ => {
            let (start, lsn, late_since) = backfill_start(&control, spec).await?;
            SourcePlan::Backfill { start, lsn, late_since }
        }
    };
    let total = match &plan {
        // `run`'s first start backfills before it streams: its bar covers that phase.
        SourcePlan::Backfill { start, .. } | SourcePlan::Handover { start, .. } => {
            rows_after(&control, &table, start, spec.source.batch_limit).await
        }
        _ => None,
    };
    let mode_label = mode.label();
    let run_id =
        crate::run::start(&control, spec.ops.tenant_id.as_deref(), mode_label, &spec.name, &spec.checkpoint_key)
            .await?;
    tracing::info!(run_id, pipeline = %spec.name, mode = mode_label, "run started");

    let started = Instant::now();
    let (monitor, notifier) = Monitor::new(spec.ops.alert.clone(), &spec.name, Arc::default());
    // The enrichment worker beside the registry dataflow: a backfill drains the queue once the registry
    // side is done; a stream keeps it going until the shutdown.
    let (registry_done, registry_done_rx) = watch::channel(false);
    let enriched: Arc<std::sync::Mutex<Outcomes>> = Arc::default();
    let worker = match spec.enrich() {
        Some(e) => {
            let settings = EnrichSettings::from_spec(e)?;
            let ws = WorkerSettings::from_spec(e, &spec.ops, &spec.source.table);
            let until = match mode {
                Mode::Backfill => Until::Drained(registry_done_rx),
                Mode::Stream => Until::Stopped,
            };
            let ctx = worker::RunContext { run_id, monitor: Arc::clone(&monitor), live: Arc::clone(&enriched) };
            Some(worker::run(dsn, settings, ws, ctx, until, stop.clone()))
        }
        None => None,
    };
    let run = Run {
        dsn,
        spec,
        run_id,
        control: &control,
        monitor: &monitor,
        total,
        started,
        latest: std::sync::Mutex::default(),
        latencies: std::sync::Mutex::default(),
        enriched,
    };
    let registry = async {
        let result = drive(&run, &table, facts, plan, stop.clone()).await;
        let _ = registry_done.send(true);
        result
    };
    let enrichment = async {
        match worker {
            Some(w) => w.await.map(Some),
            None => Ok(None),
        }
    };
    // Ends a pause after its cool-down while either dataflow runs (a draining backfill's worker too).
    let _ticker = AbortOnDrop(monitor.spawn_ticker());
    // Either side failing ends both (the worker's leases are given back by the next attempt, or expire).
    let result = tokio::select! {
        r = futures::future::try_join(registry, enrichment) => r,
        _ = run.keep_reporting() => unreachable!("reporting never ends"),
    };
    let seconds = started.elapsed().as_secs_f64();
    // Both dataflows' counters, as they stood after their last commits.
    let counters = run.counters();
    let latencies = run.latencies.lock().unwrap_or_else(|p| p.into_inner()).summary();
    drop(run);
    drop(_ticker);
    drop(monitor);
    if let Some(n) = notifier {
        n.flush(Duration::from_secs(10)).await;
    }
    let (status, last, error, enrichment) = match &result {
        Ok((last, w)) => {
            let enrichment = w.as_ref().map(WorkerSummary::summary);
            (if *stop.borrow() { "interrupted" } else { "completed" }, last.clone(), None, enrichment)
        }
        Err(e) => ("failed", None, Some(error_chain(e)), None),
    };
    let header = write_header(&control, run_id, Some(status), &counters, error.as_deref()).await;
    if let Err(e) = header {
        // The run's own error (often the same lost connection) matters more than its header.
        tracing::warn!(run_id, error = %e, "could not write the run's counters");
        if result.is_ok() {
            return Err(Error::db("writing the run's counters", e));
        }
    }
    match result {
        Err(e) => Err(e),
        Ok(_) => Ok(RunSummary {
            run_id,
            pipeline: spec.name.clone(),
            status,
            counters,
            seconds,
            rows_per_second: counters.rows_in as f64 / seconds.max(1e-9),
            latency: latencies,
            checkpoint: last.map(|c| c.cursor.to_string()),
            enrichment,
        }),
    }
}

/// What `drive` needs of its run.
struct Run<'a> {
    dsn: &'a str,
    spec: &'a PipelineSpec,
    run_id: i64,
    control: &'a tokio_postgres::Client,
    monitor: &'a Arc<Monitor>,
    /// Rows a backfill expects to read.
    total: Option<u64>,
    started: Instant,
    /// The registry's counters so far.
    latest: std::sync::Mutex<Counters>,
    /// The registry's latencies so far.
    latencies: std::sync::Mutex<Latencies>,
    /// What the enrichment worker has committed so far.
    enriched: Arc<std::sync::Mutex<Outcomes>>,
}

impl Run<'_> {
    /// Both dataflows' counters so far.
    fn counters(&self) -> Counters {
        let mut c = *self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let o = self.enriched.lock().unwrap_or_else(|p| p.into_inner());
        c.enriched = o.finished();
        c.failed = o.failed;
        c
    }

    /// The summary so far, logged (SIGUSR1, ACRA_DIRECT_SUMMARY_EVERY), and the header's counters updated.
    async fn report(&self) {
        let c = self.counters();
        let seconds = self.started.elapsed().as_secs_f64();
        let l = self.latencies.lock().unwrap_or_else(|p| p.into_inner()).summary();
        tracing::info!(
            run_id = self.run_id, pipeline = %self.spec.name, rows_in = c.rows_in, processed = c.processed,
            filtered = c.filtered, skipped = c.skipped, enriched = c.enriched, failed = c.failed,
            dead_lettered = c.dead_lettered, seconds = seconds as u64,
            rows_per_second = (c.rows_in as f64 / seconds.max(1e-9)) as u64, p50_ms = l.p50_ms, p95_ms = l.p95_ms,
            p99_ms = l.p99_ms, "run summary"
        );
        self.update_header().await;
    }

    async fn update_header(&self) {
        if let Err(e) = write_header(self.control, self.run_id, None, &self.counters(), None).await {
            tracing::warn!(run_id = self.run_id, error = %e, "could not update the run's counters");
        }
    }

    /// Until dropped: the summary on SIGUSR1 and every ACRA_DIRECT_SUMMARY_EVERY, and the header's counters
    /// every few seconds, so `acraflow status` shows a live run's progress.
    async fn keep_reporting(&self) {
        let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok();
        let every = |d: Duration| {
            let mut i = tokio::time::interval(d);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i.reset();
            i
        };
        let mut summary_every = every(self.spec.ops.summary_every.unwrap_or(Duration::from_secs(86_400 * 365)));
        let mut header_every = every(HEADER_EVERY);
        loop {
            let usr1_recv = async {
                match usr1.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(()) = usr1_recv => self.report().await,
                _ = summary_every.tick() => self.report().await,
                _ = header_every.tick() => self.update_header().await,
            }
        }
    }
}

async fn drive(
    run: &Run<'_>,
    table: &str,
    facts: db::SchemaFacts,
    plan: SourcePlan,
    stop: watch::Receiver<bool>,
) -> Result<Option<Checkpoint>> {
    let (dsn, spec, tenant) = (run.dsn, run.spec, run.spec.ops.tenant_id.as_deref());
    let mut counters = Counters::default();
    let streaming = !matches!(plan, SourcePlan::Backfill { .. });
    let enriching = spec.enrich().is_some();
    let setup = async {
        let ops_client = Arc::new(db::connect_as(dsn, tenant, "acraflow-operators").await?);
        let progress = Arc::new(Progress::default());
        let mut sink = PostgresSink::new(
            db::connect_as(dsn, tenant, "acraflow-sink").await?,
            spec.checkpoint_key.clone(),
            run.run_id,
            Arc::clone(&progress),
        );
        if enriching {
            sink = sink.enqueueing(spec.ops.tenant_id.clone());
        }
        let source = build_source(dsn, spec, table, plan, progress, stop.clone()).await?;
        let mut stream = spawn_stage(source);
        let dedupe_client = Arc::new(db::connect_as(dsn, tenant, "acraflow-dedupe").await?);
        let ops = build_operators(spec, &ops_client, &dedupe_client, facts).await?;
        for (op, kind) in ops {
            stream = metered(kind, op, stream);
            if kind == "dedupe" {
                // Dedupe's probe (its own connection) runs while the batch before is upserted.
                stream = spawn_stage(stream);
            }
        }
        Ok::<_, Error>((spawn_stage(stream), sink))
    };
    let (mut stream, mut sink) = setup.await?;
    let _running = Running::start();
    let _lag = streaming.then(|| AbortOnDrop(spawn_lag_poller(dsn.to_owned(), spec.source.slot.clone())));
    let mut reporter = progress::Reporter::new(spec.ops.progress, run.total, spec.ops.progress_every);
    let mut stopping = stop.clone();
    let mut drain_deadline: Option<tokio::time::Instant> =
        stop.borrow().then(|| tokio::time::Instant::now() + spec.ops.drain_timeout);
    let mut watching_stop = drain_deadline.is_none();
    let mut last = None;
    loop {
        let deadline = async {
            match drain_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        // Biased, the rare events first: under load the stream is always ready, and a signal, a timer or the
        // drain deadline must still be seen between two batches.
        tokio::select! {
            biased;
            _ = deadline => {
                tracing::warn!(
                    in_flight = metrics().in_flight.get(),
                    "ACRA_DIRECT_DRAIN_TIMEOUT passed: leaving the work still in flight to the next run (it resumes \
                     from the checkpoint committed last)"
                );
                break;
            }
            changed = stopping.changed(), if watching_stop => match changed {
                Ok(()) if *stopping.borrow() => {
                    // The source stops reading; what is in flight drains, up to the timeout.
                    drain_deadline = Some(tokio::time::Instant::now() + spec.ops.drain_timeout);
                    watching_stop = false;
                }
                Ok(()) => {}
                Err(_) => watching_stop = false,
            },
            item = stream.next() => {
                let Some(batch) = item else { break };
                let batch = batch?;
                let c = sink.write(&batch).await?;
                counters.add(&c);
                *run.latest.lock().unwrap_or_else(|p| p.into_inner()) = counters;
                record_latencies(&run.latencies, &batch);
                // In an enriching pipeline a processed change is an outcome only once enriched (the
                // worker reports those); dead letters are failures either way.
                if enriching {
                    run.monitor.observe(c.dead_lettered, c.dead_lettered);
                } else {
                    run.monitor.observe(c.processed + c.dead_lettered, c.dead_lettered);
                }
                reporter.update(&counters);
                last = Some(batch.checkpoint);
            }
        }
    }
    Ok(last)
}

/// Polls the slot's lag (`acra_direct_slot_lag_bytes`) every 5 s on a connection of its own.
fn spawn_lag_poller(dsn: String, slot: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(client) = db::connect_named(&dsn, "acraflow-lag").await else { return };
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            let lag = client
                .query_opt(
                    "select coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8 \
                     from pg_replication_slots where slot_name = $1",
                    &[&slot],
                )
                .await;
            match lag {
                Ok(Some(row)) => {
                    metrics().slot_lag_bytes.set(row.get(0));
                }
                Ok(None) => {}
                Err(_) => return,
            }
        }
    })
}

/// Counts the eligible changes entering and leaving an operator (`acra_direct_operator_rows_{in,out}`).
fn metered(operator: &'static str, op: Box<dyn Operator>, input: BatchStream) -> BatchStream {
    let label = OperatorLabel { operator };
    let eligible = |b: &Result<crate::change::Batch>| match b {
        Ok(b) => b.events.iter().filter(|e| e.fate == crate::change::Fate::Process).count() as u64,
        Err(_) => 0,
    };
    let (l_in, l_out) = (label.clone(), label);
    let input = Box::pin(input.inspect(move |b| {
        metrics().operator_in.get_or_create(&l_in).inc_by(eligible(b));
    }));
    Box::pin(op.apply(input).inspect(move |b| {
        metrics().operator_out.get_or_create(&l_out).inc_by(eligible(b));
    }))
}

/// Aborts a helper task when the run ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The registry operators in pipeline order, with their kinds. `enrich` is not one of them: it configures
/// the enrichment worker, which reads the queue the sink fills.
async fn build_operators(
    spec: &PipelineSpec,
    client: &Arc<tokio_postgres::Client>,
    dedupe_client: &Arc<tokio_postgres::Client>,
    facts: db::SchemaFacts,
) -> Result<Vec<(Box<dyn Operator>, &'static str)>> {
    let mut ops: Vec<(Box<dyn Operator>, &'static str)> = Vec::new();
    for op in &spec.operators {
        let built: Box<dyn Operator> = match op {
            OperatorSpec::Filter(f) => {
                Box::new(Filter::new(&f.exclude_status, f.min_age_days, Utc::now().date_naive()))
            }
            OperatorSpec::Dedupe(d) => Box::new(Dedupe::new(
                Arc::clone(dedupe_client),
                DedupePolicy {
                    recheck_days: d.recheck_days,
                    skip_if_any_history: d.skip_if_any_history,
                    force: d.force,
                    only_enrichments: spec.enrich().is_some(),
                },
            )),
            OperatorSpec::Upsert(_) => Box::new(Upsert::new(Arc::clone(client), facts).await?),
            OperatorSpec::Enrich(_) => continue,
        };
        ops.push((built, op.kind()));
    }
    Ok(ops)
}

/// After a batch's commit: each processed change's latency, in the run's histogram and in
/// `acra_direct_latency_seconds`.
fn record_latencies(latencies: &std::sync::Mutex<Latencies>, batch: &crate::change::Batch) {
    let histogram = &metrics().latency;
    let mut latencies = latencies.lock().unwrap_or_else(|p| p.into_inner());
    for e in batch.events.iter().filter(|e| e.fate == crate::change::Fate::Process) {
        let latency = e.selected_at.elapsed();
        histogram.observe(latency.as_secs_f64());
        latencies.record(latency);
    }
}

/// Runs `input` on its own task, handing batches over a bounded channel (backpressure: a full channel
/// stops the producer). The task ends after an error, or when the consumer goes away.
pub fn spawn_stage(mut input: BatchStream) -> BatchStream {
    let (tx, mut rx) = mpsc::channel(STAGE_DEPTH);
    let task = tokio::spawn(async move {
        while let Some(item) = input.next().await {
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    Box::pin(async_stream::stream! {
        while let Some(item) = rx.recv().await {
            yield item;
        }
        // The channel closed: the stage ended, or panicked. A panic fails the run; it is not the end of
        // the source.
        if let Err(e) = task.await {
            if e.is_panic() {
                let why = crate::source::replication::panic_message(e.into_panic().as_ref());
                yield Err(Error::new(crate::ErrorKind::Io, format!("a pipeline stage panicked ({why})")));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stage_that_panics_fails_the_stream_instead_of_ending_it() {
        let panicking: BatchStream =
            Box::pin(futures::stream::poll_fn(|_| -> std::task::Poll<Option<Result<_>>> { panic!("boom in a stage") }));
        let mut stage = spawn_stage(panicking);
        let item = stage.next().await.expect("an item, not the end of the stream");
        let err = item.expect_err("the panic is an error");
        assert!(err.to_string().contains("boom in a stage"), "{err}");
        assert!(stage.next().await.is_none());
    }
}
