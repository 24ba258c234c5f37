//! The backfill source: replays `staging_acra_companies` in bounded memory inside one consistent snapshot.
//!
//! Invariants:
//! - Every page is read in the same `REPEATABLE READ` transaction (optionally the slot's exported snapshot,
//!   `SET TRANSACTION SNAPSHOT`), so the backfill sees the table as of one instant, whatever the ingester
//!   writes meanwhile.
//! - Pages are keyset queries (`id > $last order by id limit $page`), never OFFSET: each page costs the same
//!   and memory holds one page per pipeline stage.
//! - A change's position is `(snapshot LSN, staging id)`. A resumed backfill reuses the LSN stored in the
//!   checkpoint, so a replayed row keeps its position and its history key.
//! - The uen-ordered walk (`ACRA_DIRECT_START_FROM_UEN`) reads the rows whose uen is NULL last, in id order
//!   (a row comparison with NULL is never true, so `(uen, id) > (...)` alone would skip them for good).
//! - Rows are not skipped by a late commit: a row whose transaction was still running when a walk took its
//!   snapshot may have a lower id than rows the walk saw. Every id checkpoint carries the walk's snapshot,
//!   and the next backfill from it first reads the rows at or below its id that the snapshot could not see.
//! - Each batch carries the cursor to resume after it. When the walk reaches the end of the table, the last
//!   batch's cursor is `Id { last_id: max(id) in the snapshot }`, so later runs pick up only newer rows; a
//!   walk stopped by the batch limit or a shutdown resumes exactly where it stopped.

use async_stream::try_stream;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::change::{parse_lsn, Batch, Change, Event, Op, Position, StagingRow};
use crate::checkpoint::{Checkpoint, Cursor};
use crate::error::Error;
use crate::ops::BatchStream;

#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// Quoted table name.
    pub table: String,
    pub page_size: usize,
    /// Where to start (exclusive).
    pub start: Cursor,
    /// The LSN positions carry; `None` takes the snapshot's current WAL position.
    pub lsn: Option<u64>,
    /// Stop after this many rows.
    pub limit: Option<u64>,
    /// An exported snapshot to read in (the replication slot's), instead of a fresh one.
    pub snapshot: Option<String>,
    /// The snapshot of the walk that left `start` (an id cursor): rows at or below it that this snapshot
    /// could not see are read first.
    pub late_since: Option<String>,
}

/// A row's creating transaction (its 32-bit `xmin`) as an `xid8`, in the epoch of the snapshot's `xmax`
/// (the most recent 2^32 transactions; an older row is visible to any snapshot we compare it with).
const ROW_XID8: &str = "(pg_snapshot_xmax(pg_current_snapshot())::text::bigint - \
    ((pg_snapshot_xmax(pg_current_snapshot())::text::bigint % 4294967296 - xmin::text::bigint + 4294967296) \
     % 4294967296))::text::xid8";

/// Streams the table's rows as batches of changes. Stops early (without error) when `stop` turns true.
pub fn stream(client: Client, opts: BackfillOptions, mut stop: watch::Receiver<bool>) -> BatchStream {
    Box::pin(try_stream! {
        let db = |what: &'static str| move |e| Error::db(format!("backfill: {what}"), e);
        client.batch_execute("begin isolation level repeatable read read only").await.map_err(db("starting the snapshot"))?;
        if let Some(snapshot) = &opts.snapshot {
            client.batch_execute(&format!("set transaction snapshot '{}'", snapshot.replace('\'', "''")))
                .await.map_err(db("importing the exported snapshot"))?;
        }
        let lsn = match opts.lsn {
            Some(lsn) => lsn,
            None => {
                let row = client.query_one("select pg_current_wal_lsn()::text", &[]).await.map_err(db("reading the WAL position"))?;
                parse_lsn(row.get(0)).unwrap_or(0)
            }
        };
        let cols = StagingRow::COLUMNS;
        let table = &opts.table;
        let by_id = client
            .prepare(&format!("select {cols} from {table} where id > $1 order by id limit $2"))
            .await.map_err(db("preparing the page query"))?;
        let by_uen = client
            .prepare(&format!("select {cols} from {table} where (uen, id) > ($1, $2) order by uen, id limit $3"))
            .await.map_err(db("preparing the page query"))?;
        // A row comparison with a NULL uen is never true: the uen walk reads those rows last, by id.
        let null_uen = client
            .prepare(&format!("select {cols} from {table} where uen is null and id > $1 order by id limit $2"))
            .await.map_err(db("preparing the page query"))?;
        // This walk's own snapshot, carried by its id checkpoints (see `late_since`).
        let own_snapshot: String = client.query_one("select pg_current_snapshot()::text", &[])
            .await.map_err(db("reading the snapshot"))?.get(0);
        let mut cursor = opts.start.clone();
        let mut remaining = opts.limit.unwrap_or(u64::MAX);
        // Late rows: at or below the start, committed after the walk that reached it had taken its snapshot.
        // Their batches keep the start's checkpoint, so an interrupted run reads them again (dedupe makes
        // that harmless).
        if let (Cursor::Id { last_id: high }, Some(since)) = (&opts.start, &opts.late_since) {
            let late = client
                .prepare(&format!(
                    "select {cols} from {table} where id <= $1 and id > $2 \
                     and not pg_visible_in_snapshot({ROW_XID8}, $3::text::pg_snapshot) order by id limit $4"
                ))
                .await.map_err(db("preparing the late rows query"))?;
            let keep = Checkpoint { cursor: opts.start.clone(), lsn, snapshot: Some(since.clone()) };
            let mut after = 0i64;
            let mut found = 0u64;
            loop {
                let take = remaining.min(opts.page_size as u64) as i64;
                if take == 0 {
                    break;
                }
                let rows = client.query(&late, &[high, &after, since, &take]).await.map_err(db("reading late rows"))?;
                let n = rows.len() as u64;
                let events: Vec<Event> = rows.iter().map(|r| {
                    let row = staging_row(r);
                    after = row.id;
                    Event::new(Change { pos: Position { lsn, seq: row.id }, op: Op::Insert, row })
                }).collect();
                remaining -= n;
                found += n;
                if n > 0 {
                    yield Batch { events, checkpoint: keep.clone(), ack_lsn: None };
                }
                if (n as i64) < take {
                    break;
                }
            }
            if found > 0 {
                tracing::info!(rows = found, up_to = high, "backfill read rows that committed after the previous backfill's snapshot");
            }
        }
        tracing::info!(start = %cursor, snapshot_lsn = %crate::change::lsn_to_text(lsn), limit = opts.limit, "backfill started");
        loop {
            if *stop.borrow_and_update() {
                tracing::info!(cursor = %cursor, "backfill stopping on request");
                break;
            }
            let take = remaining.min(opts.page_size as u64) as i64;
            let rows = match &cursor {
                Cursor::Id { last_id } => client.query(&by_id, &[last_id, &take]).await,
                Cursor::Uen { last_uen, last_id } => client.query(&by_uen, &[last_uen, last_id, &take]).await,
                Cursor::UenNull { last_id } => client.query(&null_uen, &[last_id, &take]).await,
                Cursor::Lsn { .. } => Err(Error::config("a backfill cannot start from a stream (LSN) checkpoint"))?,
            }
            .map_err(db("reading a page"))?;
            let n = rows.len() as u64;
            let mut events = Vec::with_capacity(rows.len());
            for r in &rows {
                let row = staging_row(r);
                cursor = match (&cursor, &row.uen) {
                    (Cursor::Uen { .. }, Some(uen)) => Cursor::Uen { last_uen: uen.clone(), last_id: row.id },
                    (Cursor::UenNull { .. }, _) => Cursor::UenNull { last_id: row.id },
                    _ => Cursor::Id { last_id: row.id },
                };
                events.push(Event::new(Change { pos: Position { lsn, seq: row.id }, op: Op::Insert, row }));
            }
            drop(rows);
            remaining -= n;
            let exhausted = (n as i64) < take;
            if exhausted && matches!(cursor, Cursor::Uen { .. }) {
                // The last uen read: the rows without one follow.
                if n > 0 {
                    yield Batch { events: std::mem::take(&mut events), checkpoint: Checkpoint { cursor: cursor.clone(), lsn, snapshot: None }, ack_lsn: None };
                }
                cursor = Cursor::UenNull { last_id: 0 };
                if remaining == 0 {
                    break;
                }
                continue;
            }
            if exhausted {
                // The end of the table: hand over to an id cursor at the snapshot's last row.
                let max: i64 = client
                    .query_one(&*format!("select coalesce(max(id), 0) from {table}"), &[])
                    .await.map_err(db("reading the last id"))?
                    .get(0);
                cursor = Cursor::Id { last_id: max.max(match cursor { Cursor::Id { last_id } => last_id, _ => 0 }) };
            }
            if n > 0 || exhausted {
                let snapshot = matches!(cursor, Cursor::Id { .. }).then(|| own_snapshot.clone());
                yield Batch { events, checkpoint: Checkpoint { cursor: cursor.clone(), lsn, snapshot }, ack_lsn: None };
            }
            if exhausted || remaining == 0 {
                break;
            }
        }
        client.batch_execute("commit").await.map_err(db("closing the snapshot"))?;
        tracing::info!(cursor = %cursor, "backfill finished");
    })
}

fn staging_row(r: &tokio_postgres::Row) -> StagingRow {
    StagingRow {
        id: r.get(0),
        uen: r.get(1),
        entity_name: r.get(2),
        entity_status_description: r.get(3),
        registration_incorporation_date: r.get(4),
        primary_ssic_code: r.get(5),
        primary_ssic_description: r.get(6),
    }
}
