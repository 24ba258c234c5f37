//! Pipeline assembly: a pipeline file becomes a stream graph, which runs until its source ends, a shutdown
//! is requested, or a fatal error.
//!
//! ```text
//! source task --(channel: 2 batches)--> operators task --(channel: 2 batches)--> sink (this task)
//! ```
//! Stages run concurrently (a page is read while the previous one is upserted and the one before is
//! committed), each on its own connection. The channels are bounded, so a slow sink slows the source and
//! memory holds at most a handful of batches, whatever the table size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::checkpoint::{self, Checkpoint, Cursor};
use crate::config::{OperatorSpec, PipelineSpec};
use crate::db;
use crate::error::{Error, Result};
use crate::ops::dedupe::{Dedupe, DedupePolicy};
use crate::ops::filter::Filter;
use crate::ops::upsert::Upsert;
use crate::ops::{BatchStream, Operator};
use crate::sink::{Counters, PostgresSink};
use crate::source::{backfill, quote_table};

/// Batches buffered between two stages.
const STAGE_DEPTH: usize = 2;
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

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
    pub checkpoint: Option<String>,
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.counters;
        writeln!(f, "run {} ({}) {}", self.run_id, self.pipeline, self.status)?;
        writeln!(f, "  rows read       {:>10}", c.rows_in)?;
        writeln!(f, "  processed       {:>10}", c.processed)?;
        writeln!(f, "  filtered        {:>10}", c.filtered)?;
        writeln!(f, "  skipped         {:>10}", c.skipped)?;
        writeln!(f, "  failed          {:>10}", c.failed)?;
        writeln!(f, "  dead-lettered   {:>10}", c.dead_lettered)?;
        if c.ignored > 0 {
            writeln!(
                f,
                "  ignored         {:>10}  (deletes/truncates on staging)",
                c.ignored
            )?;
        }
        writeln!(
            f,
            "  duration        {:>9.2}s  ({:.0} rows/s)",
            self.seconds, self.rows_per_second
        )?;
        write!(
            f,
            "  checkpoint      {}",
            self.checkpoint.as_deref().unwrap_or("unchanged")
        )
    }
}

/// Runs `spec` against the database at `dsn` until the source ends or `stop` turns true.
pub async fn run(
    dsn: &str,
    spec: &PipelineSpec,
    mode: &str,
    stop: watch::Receiver<bool>,
) -> Result<RunSummary> {
    spec.validate()?;
    let control = db::connect(dsn).await?;
    let facts = db::schema_facts(&control).await?;
    let table = quote_table(&spec.source.table);

    let (start, lsn) = match (&spec.source.start_after_id, &spec.source.start_from_uen) {
        (Some(id), _) => (Cursor::Id { last_id: *id }, None),
        (None, Some(uen)) => (Cursor::Uen { last_uen: uen.clone(), last_id: i64::MAX }, None),
        (None, None) => match checkpoint::load(&control, &spec.checkpoint_key).await? {
            Some(Checkpoint { cursor: Cursor::Lsn { .. }, .. }) => {
                return Err(Error::config(format!(
                    "checkpoint '{}' belongs to a replication stream; a backfill needs ACRA_DIRECT_START_AFTER_ID \
                     or another ACRA_DIRECT_CHECKPOINT_KEY",
                    spec.checkpoint_key
                )))
            }
            Some(cp) => (cp.cursor, Some(cp.lsn).filter(|l| *l != 0)),
            None => (Cursor::Id { last_id: 0 }, None),
        },
    };

    let run_id: i64 = control
        .query_one(
            "insert into enrichment_runs (tenant_id, mode, pipeline, checkpoint_key) values ($1, $2, $3, $4) \
             returning run_id",
            &[&std::env::var("ACRA_DIRECT_TENANT_ID").ok(), &mode, &spec.name, &spec.checkpoint_key],
        )
        .await
        .map_err(|e| Error::db("writing the run header", e))?
        .get(0);
    tracing::info!(run_id, pipeline = %spec.name, mode, start = %start, "run started");

    let started = Instant::now();
    let result = drive(
        dsn,
        spec,
        &table,
        facts,
        start,
        lsn,
        run_id,
        stop.clone(),
        started,
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let (status, counters, last, error) = match &result {
        Ok((counters, last)) => (
            if *stop.borrow() {
                "interrupted"
            } else {
                "completed"
            },
            *counters,
            last.clone(),
            None,
        ),
        Err((counters, e)) => ("failed", *counters, None, Some(error_chain(e))),
    };
    control
        .execute(
            "update enrichment_runs set ended_at = now(), status = $2, rows_in = $3, processed = $4, filtered = $5, \
               skipped = $6, failed = $7, dead_lettered = $8, error = $9 where run_id = $1",
            &[
                &run_id,
                &status,
                &(counters.rows_in as i64),
                &(counters.processed as i64),
                &(counters.filtered as i64),
                &(counters.skipped as i64),
                &(counters.failed as i64),
                &(counters.dead_lettered as i64),
                &error,
            ],
        )
        .await
        .map_err(|e| Error::db("writing the run's counters", e))?;
    match result {
        Err((_, e)) => Err(e),
        Ok(_) => Ok(RunSummary {
            run_id,
            pipeline: spec.name.clone(),
            status,
            counters,
            seconds,
            rows_per_second: counters.rows_in as f64 / seconds.max(1e-9),
            checkpoint: last.map(|c| c.cursor.to_string()),
        }),
    }
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    dsn: &str,
    spec: &PipelineSpec,
    table: &str,
    facts: db::SchemaFacts,
    start: Cursor,
    lsn: Option<u64>,
    run_id: i64,
    stop: watch::Receiver<bool>,
    started: Instant,
) -> std::result::Result<(Counters, Option<Checkpoint>), (Counters, Error)> {
    let mut counters = Counters::default();
    let setup = async {
        let source_client = db::connect(dsn).await?;
        let ops_client = Arc::new(db::connect(dsn).await?);
        let sink = PostgresSink::new(db::connect(dsn).await?, spec.checkpoint_key.clone(), run_id);
        let source = backfill::stream(
            source_client,
            backfill::BackfillOptions {
                table: table.to_owned(),
                page_size: spec.source.batch_size,
                start,
                lsn,
                limit: spec.source.batch_limit,
                snapshot: None,
            },
            stop,
        );
        let mut stream = spawn_stage(source);
        for op in build_operators(spec, &ops_client, facts).await? {
            stream = op.apply(stream);
        }
        Ok::<_, Error>((spawn_stage(stream), sink))
    };
    let (mut stream, mut sink) = setup.await.map_err(|e| (counters, e))?;
    let mut last = None;
    let mut last_log = Instant::now();
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| (counters, e))?;
        let c = sink.write(&batch).await.map_err(|e| (counters, e))?;
        counters.add(&c);
        last = Some(batch.checkpoint);
        if last_log.elapsed() >= PROGRESS_EVERY {
            last_log = Instant::now();
            let rate = counters.rows_in as f64 / started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                rows_in = counters.rows_in,
                processed = counters.processed,
                filtered = counters.filtered,
                skipped = counters.skipped,
                dead_lettered = counters.dead_lettered,
                rows_per_second = rate as u64,
                "progress"
            );
        }
    }
    Ok((counters, last))
}

async fn build_operators(
    spec: &PipelineSpec,
    client: &Arc<tokio_postgres::Client>,
    facts: db::SchemaFacts,
) -> Result<Vec<Box<dyn Operator>>> {
    let mut ops: Vec<Box<dyn Operator>> = Vec::new();
    for op in &spec.operators {
        ops.push(match op {
            OperatorSpec::Filter(f) => Box::new(Filter::new(
                &f.exclude_status,
                f.min_age_days,
                Utc::now().date_naive(),
            )),
            OperatorSpec::Dedupe(d) => Box::new(Dedupe::new(
                Arc::clone(client),
                DedupePolicy {
                    recheck_days: d.recheck_days,
                    skip_if_any_history: d.skip_if_any_history,
                    force: d.force,
                },
            )),
            OperatorSpec::Upsert(_) => Box::new(Upsert::new(Arc::clone(client), facts).await?),
        });
    }
    Ok(ops)
}

/// Runs `input` on its own task, handing batches over a bounded channel (backpressure: a full channel
/// stops the producer). The task ends after an error, or when the consumer goes away.
pub fn spawn_stage(mut input: BatchStream) -> BatchStream {
    let (tx, mut rx) = mpsc::channel(STAGE_DEPTH);
    tokio::spawn(async move {
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
    })
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
