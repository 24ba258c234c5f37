//! A run's header (`enrichment_runs`) and summary: what `backfill`, `run` and `worker` print at exit,
//! log on SIGUSR1 and store with their counters.

use std::time::Duration;

use crate::sink::Counters;

/// What a run did, printed at exit and stored in its `enrichment_runs` header.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    pub run_id: i64,
    pub pipeline: String,
    pub status: &'static str,
    #[serde(flatten)]
    pub counters: Counters,
    pub seconds: f64,
    pub rows_per_second: f64,
    /// Selection-to-persistence latency of the processed changes.
    pub latency: LatencySummary,
    pub checkpoint: Option<String>,
    /// What the run's enrichment worker did (pipelines with an `enrich` operator).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrichment: Option<EnrichmentSummary>,
}

/// The enrichment side of a run (`acraflow run`/`backfill` with an enriching pipeline, `acraflow worker`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EnrichmentSummary {
    pub ok: u64,
    pub degraded: u64,
    /// Final failures (not retryable, or parked after the last attempt).
    pub failed: u64,
    /// Failed attempts that will be tried again.
    pub retried: u64,
    pub parked: u64,
    /// Enqueue-to-commit latency of the jobs completed.
    pub queue_latency: LatencySummary,
    /// Jobs left waiting for a retry's backoff (a draining run).
    pub backing_off: i64,
    /// Leasing stopped at ACRA_DIRECT_DAILY_CAP.
    pub capped: bool,
}

/// Percentiles of the per-change latency, in milliseconds (hdrhistogram, 3 significant figures).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: u64,
    pub p95_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

/// A run's latencies; memory is fixed by the histogram's range, not by the number of changes.
pub struct Latencies(hdrhistogram::Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        // 1 ms to 7 days at 3 significant figures.
        Latencies(hdrhistogram::Histogram::new_with_bounds(1, 7 * 24 * 3_600_000, 3).expect("valid bounds"))
    }
}

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        self.0.saturating_record((latency.as_millis() as u64).max(1));
    }

    pub fn summary(&self) -> LatencySummary {
        let h = &self.0;
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            p50_ms: h.value_at_quantile(0.50),
            p95_ms: h.value_at_quantile(0.95),
            p99_ms: h.value_at_quantile(0.99),
            max_ms: h.max(),
        }
    }
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.counters;
        writeln!(f, "run {} ({}) {}", self.run_id, self.pipeline, self.status)?;
        // A worker reads no staging rows: its summary is its enrichments.
        if c.rows_in > 0 || self.enrichment.is_none() {
            self.fmt_registry(f)?;
        }
        if let Some(x) = &self.enrichment {
            x.fmt_lines(f)?;
        }
        write!(f, "  checkpoint      {}", self.checkpoint.as_deref().unwrap_or("unchanged"))
    }
}

/// One latency line of a summary (nothing when nothing was measured).
fn latency_line(f: &mut std::fmt::Formatter<'_>, label: &str, l: &LatencySummary, what: &str) -> std::fmt::Result {
    if l.count == 0 {
        return Ok(());
    }
    writeln!(
        f,
        "  {label:<15} p50 {} ms  p95 {} ms  p99 {} ms  max {} ms  ({what}, {} of them)",
        l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms, l.count
    )
}

impl RunSummary {
    fn fmt_registry(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.counters;
        writeln!(f, "  rows read       {:>10}", c.rows_in)?;
        writeln!(f, "  processed       {:>10}", c.processed)?;
        writeln!(f, "  filtered        {:>10}", c.filtered)?;
        writeln!(f, "  skipped         {:>10}", c.skipped)?;
        writeln!(f, "  dead-lettered   {:>10}", c.dead_lettered)?;
        if c.ignored > 0 {
            writeln!(f, "  ignored         {:>10}  (deletes/truncates on staging)", c.ignored)?;
        }
        writeln!(f, "  duration        {:>9.2}s  ({:.0} rows/s)", self.seconds, self.rows_per_second)?;
        latency_line(f, "latency", &self.latency, "selection to commit of processed changes")
    }
}

impl EnrichmentSummary {
    fn fmt_lines(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let x = self;
        writeln!(
            f,
            "  enriched        {:>10}  (ok {}, degraded {}, failed {}; retried {}, parked {})",
            x.ok + x.degraded + x.failed,
            x.ok,
            x.degraded,
            x.failed,
            x.retried,
            x.parked
        )?;
        latency_line(f, "queue latency", &x.queue_latency, "enqueued to committed jobs")?;
        if x.backing_off > 0 {
            writeln!(f, "  retry later     {:>10}  jobs wait for their backoff (ENRICH_RETRY_BACKOFF)", x.backing_off)?;
        }
        if x.capped {
            writeln!(
                f,
                "  daily cap       reached: the jobs left wait in the queue for tomorrow (ACRA_DIRECT_DAILY_CAP)"
            )?;
        }
        Ok(())
    }
}

/// Writes the run's counters into its `enrichment_runs` header; with a status, the run has ended.
pub async fn write_header(
    control: &tokio_postgres::Client,
    run_id: i64,
    ended: Option<&str>,
    c: &Counters,
    error: Option<&str>,
) -> std::result::Result<u64, tokio_postgres::Error> {
    control
        .execute(
            "update enrichment_runs set ended_at = case when $2::text is null then null else now() end, \
               status = coalesce($2, status), rows_in = $3, processed = $4, filtered = $5, skipped = $6, failed = $7, \
               dead_lettered = $8, error = $9, enriched = $10 where run_id = $1",
            &[
                &run_id,
                &ended,
                &(c.rows_in as i64),
                &(c.processed as i64),
                &(c.filtered as i64),
                &(c.skipped as i64),
                &(c.failed as i64),
                &(c.dead_lettered as i64),
                &error,
                &(c.enriched as i64),
            ],
        )
        .await
}

/// An error and its causes on one line, for the run header (never contains a DSN password: connection
/// errors carry the redacted description).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The namespace of the advisory locks runs hold ("ACRF").
const RUN_LOCK_NAMESPACE: i32 = 0x4143_5246;

/// Writes a run's header and, in the same statement, takes a session-level advisory lock for it on
/// `control`, held for as long as that session lives: a run whose process is gone (killed, a second signal)
/// can be told from one that runs, and no other process sees the header before its lock exists. Then
/// marks the runs no process holds any more. Returns the run's id.
pub async fn start(
    control: &tokio_postgres::Client,
    tenant: Option<&str>,
    mode: &str,
    pipeline: &str,
    checkpoint_key: &str,
) -> crate::Result<i64> {
    let run_id: i64 = control
        .query_one(
            "with r as (insert into enrichment_runs (tenant_id, mode, pipeline, checkpoint_key) \
               values ($1, $2, $3, $4) returning run_id) \
             select run_id, pg_advisory_lock($5, (run_id & 2147483647)::int4) is not null from r",
            &[&tenant, &mode, &pipeline, &checkpoint_key, &RUN_LOCK_NAMESPACE],
        )
        .await
        .map_err(|e| crate::Error::db("writing the run header", e))?
        .get(0);
    mark_abandoned(control).await?;
    Ok(run_id)
}

/// Marks `abandoned` the runs still `running` whose process no longer holds their lock; returns how many.
pub async fn mark_abandoned(client: &tokio_postgres::Client) -> crate::Result<u64> {
    client
        .execute(
            "update enrichment_runs r set status = 'abandoned', ended_at = coalesce(r.ended_at, now()), \
               error = coalesce(r.error, 'the process ended without closing the run (killed, or stopped by a second signal)') \
             where r.status = 'running' and not exists (select 1 from pg_locks l where l.locktype = 'advisory' \
               and l.classid = $1::int8::oid and l.objid = (r.run_id & 2147483647)::oid and l.objsubid = 2)",
            &[&i64::from(RUN_LOCK_NAMESPACE)],
        )
        .await
        .map_err(|e| crate::Error::db("marking abandoned runs", e))
}
