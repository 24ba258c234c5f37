//! Where a run's changes come from: decided from the replication slot and the checkpoint (stream from the
//! checkpoint, finish a backfill then stream, or create the slot with an exported snapshot and backfill in
//! it so the hand-over has no gap and no overlap), and the source stream built from that decision.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::watch;

use crate::change::Position;
use crate::checkpoint::{self, Checkpoint, Cursor};
use crate::config::PipelineSpec;
use crate::db;
use crate::error::{Error, Result};
use crate::ops::BatchStream;
use crate::source::backfill;
use crate::source::replication::{self, NewSlot, Progress};

/// Where a run's changes come from, decided from the slot and the checkpoint.
pub enum SourcePlan {
    Backfill {
        start: Cursor,
        lsn: Option<u64>,
        /// The snapshot of the walk that left `start` (see `backfill::BackfillOptions::late_since`).
        late_since: Option<String>,
    },
    /// Backfill (in `new_slot`'s exported snapshot when the slot was just created), then stream.
    Handover {
        start: Cursor,
        lsn: Option<u64>,
        new_slot: Option<NewSlot>,
        stream: StreamFrom,
    },
    Stream(StreamFrom),
}

/// Where a stream starts, and the staging table's unquoted (schema, name) to recognise its Relation messages.
pub struct StreamFrom {
    resume_after: Position,
    relation: (String, String),
}

/// The rows a backfill from `start` will read (for its progress bar); `None` if counting fails.
pub async fn rows_after(
    control: &tokio_postgres::Client,
    table: &str,
    start: &Cursor,
    limit: Option<u64>,
) -> Option<u64> {
    let n: i64 = match start {
        Cursor::Id { last_id } => {
            control.query_one(&format!("select count(*) from {table} where id > $1"), &[last_id]).await
        }
        Cursor::Uen { last_uen, last_id } => {
            control
                .query_one(
                    &format!("select count(*) from {table} where (uen, id) > ($1, $2) or uen is null"),
                    &[last_uen, last_id],
                )
                .await
        }
        Cursor::UenNull { last_id } => {
            control.query_one(&format!("select count(*) from {table} where uen is null and id > $1"), &[last_id]).await
        }
        Cursor::Lsn { .. } => return None,
    }
    .ok()?
    .get(0);
    Some(limit.map_or(n as u64, |l| l.min(n as u64)))
}

/// The backfill's start: an explicit setting, else the checkpoint, else the beginning.
/// Also the snapshot of the walk that left a checkpoint's id cursor, when there is one.
pub async fn backfill_start(
    control: &tokio_postgres::Client,
    spec: &PipelineSpec,
) -> Result<(Cursor, Option<u64>, Option<String>)> {
    Ok(match (&spec.source.start_after_id, &spec.source.start_from_uen) {
        (Some(id), _) => (Cursor::Id { last_id: *id }, None, None),
        (None, Some(uen)) => (Cursor::Uen { last_uen: uen.clone(), last_id: i64::MAX }, None, None),
        (None, None) => match checkpoint::load(control, &spec.checkpoint_key).await? {
            Some(Checkpoint { cursor: Cursor::Lsn { .. }, .. }) => {
                return Err(Error::config(format!(
                    "checkpoint '{}' belongs to the replication stream; a backfill needs ACRA_DIRECT_START_AFTER_ID \
                     (e.g. 0) or another ACRA_DIRECT_CHECKPOINT_KEY",
                    spec.checkpoint_key
                )))
            }
            Some(cp) => (cp.cursor, Some(cp.lsn).filter(|l| *l != 0), cp.snapshot),
            None => (Cursor::Id { last_id: 0 }, None, None),
        },
    })
}

/// Decides how `acraflow run` starts: stream from the checkpoint, or backfill first (creating the slot
/// with an exported snapshot when it does not exist yet, so the hand-over has no gap and no overlap).
pub async fn plan_stream(
    control: &tokio_postgres::Client,
    dsn: &str,
    spec: &PipelineSpec,
    table: &str,
) -> Result<SourcePlan> {
    let relation = split_table(control, &spec.source.table).await?;
    let src = &spec.source;
    replication::ensure_publication(control, &src.publication, table, &relation.0, &relation.1).await?;
    let slot = replication::slot_info_when_free(control, &src.slot).await?;
    let checkpoint = checkpoint::load(control, &spec.checkpoint_key).await?;
    Ok(match (slot, checkpoint) {
        (Some(info), Some(Checkpoint { cursor: Cursor::Lsn { lsn, seq }, .. })) => {
            replication::check_slot(&src.slot, &info)?;
            if src.start_after_id.is_some() || src.start_from_uen.is_some() {
                tracing::warn!("ACRA_DIRECT_START_AFTER_ID/START_FROM_UEN apply to backfills; the stream resumes from its checkpoint");
            }
            SourcePlan::Stream(StreamFrom { resume_after: Position { lsn, seq }, relation })
        }
        (Some(info), checkpoint) => {
            // The slot exists but the initial backfill did not finish: finish it (in a fresh snapshot), then
            // stream everything since the slot's consistent point. Overlap is harmless (idempotent upserts,
            // history keyed by position, dedupe).
            replication::check_slot(&src.slot, &info)?;
            // No late rows to look for: the stream carries every commit since the slot's consistent point.
            let (start, lsn) = match checkpoint {
                Some(cp) => (cp.cursor, Some(cp.lsn).filter(|l| *l != 0)),
                None => {
                    let (start, lsn, _) = backfill_start(control, spec).await?;
                    (start, lsn)
                }
            };
            SourcePlan::Handover {
                start,
                lsn,
                new_slot: None,
                stream: StreamFrom { resume_after: Position::default(), relation },
            }
        }
        (None, Some(Checkpoint { cursor: Cursor::Lsn { lsn, .. }, .. })) => {
            return Err(Error::new(
                crate::ErrorKind::Schema,
                format!(
                    "replication slot '{}' is missing, but checkpoint '{}' is at {} in its stream: changes since then \
                     cannot be replayed from the WAL. To rebuild, delete the checkpoint (delete from service_progress \
                     where key = '{}') and run `acraflow run` again: it recreates the slot and replays staging \
                     (dedupe keeps companies from being processed twice)",
                    src.slot,
                    spec.checkpoint_key,
                    crate::change::lsn_to_text(lsn),
                    spec.checkpoint_key
                ),
            ))
        }
        (None, checkpoint) => {
            let new_slot = replication::create_slot(dsn, &src.slot, &src.publication, src.slot_failover).await?;
            let start = match (&src.start_after_id, &src.start_from_uen, checkpoint) {
                (None, None, Some(cp)) => cp.cursor,
                _ => backfill_start(control, spec).await?.0,
            };
            let lsn = Some(new_slot.consistent_point);
            let resume_after = Position { lsn: new_slot.consistent_point, seq: 0 };
            SourcePlan::Handover { start, lsn, new_slot: Some(new_slot), stream: StreamFrom { resume_after, relation } }
        }
    })
}

/// The unquoted schema and name of the staging table (the schema defaults to the current one).
async fn split_table(control: &tokio_postgres::Client, table: &str) -> Result<(String, String)> {
    if let Some((schema, name)) = table.split_once('.') {
        return Ok((schema.to_owned(), name.to_owned()));
    }
    let schema: String = control
        .query_one("select current_schema()::text", &[])
        .await
        .map_err(|e| Error::db("reading the current schema", e))?
        .get(0);
    Ok((schema, table.to_owned()))
}

pub async fn build_source(
    dsn: &str,
    spec: &PipelineSpec,
    table: &str,
    plan: SourcePlan,
    progress: Arc<Progress>,
    stop: watch::Receiver<bool>,
) -> Result<BatchStream> {
    let tenant = spec.ops.tenant_id.as_deref();
    let backfill_opts = |start: Cursor, lsn: Option<u64>, snapshot: Option<String>| backfill::BackfillOptions {
        table: table.to_owned(),
        page_size: spec.source.batch_size,
        start,
        lsn,
        limit: spec.source.batch_limit,
        snapshot,
        late_since: None,
    };
    let stream_opts = |from: StreamFrom| replication::ReplicationOptions {
        dsn: dsn.to_owned(),
        slot: spec.source.slot.clone(),
        publication: spec.source.publication.clone(),
        schema: from.relation.0,
        table: from.relation.1,
        quoted_table: table.to_owned(),
        batch_size: spec.source.batch_size,
        batch_deadline: spec.source.batch_deadline,
        status_interval: spec.source.status_interval,
        resume_after: from.resume_after,
    };
    Ok(match plan {
        SourcePlan::Backfill { start, lsn, late_since } => backfill::stream(
            db::connect_as(dsn, tenant, "acraflow-backfill").await?,
            backfill::BackfillOptions { late_since, ..backfill_opts(start, lsn, None) },
            stop,
        ),
        SourcePlan::Stream(from) => replication::stream(stream_opts(from), progress, stop),
        SourcePlan::Handover { start, lsn, new_slot, stream } => {
            let snapshot = new_slot.as_ref().map(|s| s.snapshot.clone());
            let reader = db::connect_as(dsn, tenant, "acraflow-backfill").await?;
            let first = backfill::stream(reader, backfill_opts(start, lsn, snapshot), stop.clone());
            handover(first, new_slot, stream_opts(stream), progress, stop)
        }
    })
}

/// The backfill, then the stream. The new slot's session (whose exported snapshot the backfill reads in)
/// is kept until the backfill's first batch: by then the snapshot is imported.
fn handover(
    mut backfill: BatchStream,
    new_slot: Option<NewSlot>,
    stream_opts: replication::ReplicationOptions,
    progress: Arc<Progress>,
    stop: watch::Receiver<bool>,
) -> BatchStream {
    Box::pin(async_stream::stream! {
        let mut new_slot = new_slot;
        while let Some(item) = backfill.next().await {
            new_slot = None;
            let failed = item.is_err();
            yield item;
            if failed {
                return;
            }
        }
        drop(new_slot);
        if *stop.borrow() {
            return;
        }
        tracing::info!("backfill done; streaming from the replication slot");
        let mut stream = replication::stream(stream_opts, progress, stop);
        while let Some(item) = stream.next().await {
            yield item;
        }
    })
}
