//! Where the engine's position lives and how it advances.
//!
//! Invariants (DESIGN.md, "Effectively-once"):
//! - The checkpoint is a row in `service_progress`, keyed by the pipeline's checkpoint key. The sink writes
//!   it in the same transaction as the batch's history rows and dead letters, so those and the checkpoint
//!   are committed together or not at all.
//! - `companies` upserts are committed by the upsert operator, in source order, before the sink's
//!   transaction: registry freshness must not wait for enrichment. They are idempotent (the latest row per
//!   key wins and unchanged rows are not rewritten), so a crash between the upsert and the sink only means
//!   the changes after the checkpoint are replayed and re-applied to the same result.
//! - A history row is keyed by its source position (`ON CONFLICT DO NOTHING`), so a replayed change never
//!   produces a second history row.
//! - The checkpoint only moves forward over changes that have all reached the sink: each [`Batch`] carries
//!   the cursor that is safe once every change in it is done, and batches reach the sink in source order.
//!
//! A source owns the meaning of its cursor (an id or uen walk for the backfill, an LSN for the stream);
//! the sink only stores it.
//!
//! [`Batch`]: crate::change::Batch

use tokio_postgres::{Client, GenericClient};

use crate::change::{lsn_to_text, parse_lsn};
use crate::error::{Error, Result};

/// How a source resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// A backfill walking staging in `id` order; resume after `last_id`.
    Id { last_id: i64 },
    /// A backfill walking in `uen` order (`ACRA_DIRECT_START_FROM_UEN`); resume after `(last_uen, last_id)`.
    Uen { last_uen: String, last_id: i64 },
    /// The same walk past the last uen: the rows whose uen is NULL, in `id` order; resume after `last_id`.
    UenNull { last_id: i64 },
    /// The replication stream; resume after change `seq` of the transaction that committed at `lsn`.
    Lsn { lsn: u64, seq: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub cursor: Cursor,
    /// For a backfill, the snapshot LSN its positions carry; kept so a resumed backfill gives a replayed
    /// row the same position (and so the same history key) as before.
    pub lsn: u64,
    /// With an id cursor left at the end of a backfill: that backfill's snapshot (`pg_snapshot` text). The
    /// next backfill also reads the rows at or below the cursor that the snapshot could not see (their
    /// transactions were still running), so a row that commits late with a low id is not skipped.
    pub snapshot: Option<String>,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cursor::Id { last_id } => write!(f, "after staging id {last_id}"),
            // i64::MAX: "after every row of this uen" (a start given by uen alone).
            Cursor::Uen { last_uen, last_id: i64::MAX } => write!(f, "after uen {last_uen}"),
            Cursor::Uen { last_uen, last_id } => write!(f, "after uen {last_uen} (staging id {last_id})"),
            Cursor::UenNull { last_id } => write!(f, "after the rows with no uen up to staging id {last_id}"),
            Cursor::Lsn { lsn, seq } => write!(f, "after change {seq} of the transaction at {}", lsn_to_text(*lsn)),
        }
    }
}

impl Checkpoint {
    /// The checkpoint of the same walk cut just after `change`: what an operator that completes a batch's
    /// changes one by one (enrich) commits for a prefix of it.
    pub fn after(&self, change: &crate::change::Change) -> Checkpoint {
        let cursor = match &self.cursor {
            Cursor::Id { .. } => Cursor::Id { last_id: change.row.id },
            Cursor::Uen { .. } | Cursor::UenNull { .. } => match &change.row.uen {
                Some(uen) => Cursor::Uen { last_uen: uen.clone(), last_id: change.row.id },
                None => Cursor::UenNull { last_id: change.row.id },
            },
            Cursor::Lsn { .. } => {
                return Checkpoint {
                    cursor: Cursor::Lsn { lsn: change.pos.lsn, seq: change.pos.seq },
                    lsn: change.pos.lsn,
                    snapshot: None,
                }
            }
        };
        Checkpoint { cursor, lsn: self.lsn, snapshot: self.snapshot.clone() }
    }

    fn columns(&self) -> (&'static str, Option<i64>, Option<&str>, i64) {
        match &self.cursor {
            Cursor::Id { last_id } => ("id", Some(*last_id), None, 0),
            Cursor::Uen { last_uen, last_id } => ("uen", Some(*last_id), Some(last_uen.as_str()), 0),
            Cursor::UenNull { last_id } => ("uen_null", Some(*last_id), None, 0),
            Cursor::Lsn { seq, .. } => ("lsn", None, None, *seq),
        }
    }

    fn lsn(&self) -> u64 {
        match self.cursor {
            Cursor::Lsn { lsn, .. } => lsn,
            _ => self.lsn,
        }
    }
}

/// Reads the checkpoint stored under `key`, if any.
pub async fn load(client: &Client, key: &str) -> Result<Option<Checkpoint>> {
    let row = client
        .query_opt(
            "select cursor, last_id, last_lsn::text, coalesce(last_seq, 0), last_uen, snapshot \
             from service_progress where key = $1",
            &[&key],
        )
        .await
        .map_err(|e| Error::db(format!("reading checkpoint '{key}' from service_progress"), e))?;
    let Some(row) = row else { return Ok(None) };
    let cursor_kind: Option<String> = row.get(0);
    let last_id: Option<i64> = row.get(1);
    let lsn = row.get::<_, Option<String>>(2).as_deref().and_then(parse_lsn).unwrap_or(0);
    let seq: i64 = row.get(3);
    let last_uen: Option<String> = row.get(4);
    let cursor = match (cursor_kind.as_deref(), last_id, last_uen) {
        (Some("lsn"), _, _) => Cursor::Lsn { lsn, seq },
        (Some("uen"), Some(last_id), Some(last_uen)) => Cursor::Uen { last_uen, last_id },
        (Some("uen_null"), Some(last_id), _) => Cursor::UenNull { last_id },
        // A row written by the PRD's Python service (or by hand) has only last_id.
        (_, Some(last_id), _) => Cursor::Id { last_id },
        _ => {
            return Err(Error::config(format!(
                "service_progress row '{key}' has neither a usable cursor nor last_id; \
                 delete it or set ACRA_DIRECT_START_AFTER_ID to choose where to start"
            )))
        }
    };
    let snapshot = match cursor {
        Cursor::Id { .. } => row.get(5),
        _ => None,
    };
    Ok(Some(Checkpoint { cursor, lsn, snapshot }))
}

/// Stores `checkpoint` under `key`; called inside the sink's transaction.
pub async fn save(client: &impl GenericClient, key: &str, checkpoint: &Checkpoint) -> Result<()> {
    let (kind, last_id, last_uen, seq) = checkpoint.columns();
    client
        .execute(
            "insert into service_progress as p (key, cursor, last_id, last_uen, last_lsn, last_seq, snapshot, \
               updated_at) \
             values ($1, $2, $3, $4, $5::text::pg_lsn, $6, $7, now()) \
             on conflict (key) do update set cursor = excluded.cursor, last_id = excluded.last_id, \
               last_uen = excluded.last_uen, last_lsn = excluded.last_lsn, last_seq = excluded.last_seq, \
               snapshot = excluded.snapshot, updated_at = excluded.updated_at",
            &[&key, &kind, &last_id, &last_uen, &lsn_to_text(checkpoint.lsn()), &seq, &checkpoint.snapshot],
        )
        .await
        .map_err(|e| Error::db(format!("writing checkpoint '{key}'"), e))?;
    Ok(())
}

/// One engine per checkpoint: a session-level advisory lock, held by the run's control connection and
/// released by Postgres when that connection ends (also when the process is killed). A lock still held by
/// a connection that is closing (our own previous attempt) is waited for a few seconds.
pub async fn lock(control: &tokio_postgres::Client, key: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let locked: bool = control
            .query_one("select pg_try_advisory_lock(hashtextextended('acraflow.checkpoint.' || $1, 0))", &[&key])
            .await
            .map_err(|e| Error::db("taking the checkpoint lock", e))?
            .get(0);
        if locked {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::new(
                crate::ErrorKind::Schema,
                format!(
                    "another acraflow is running with checkpoint key '{key}' on this database; stop it, or give \
                     this one its own ACRA_DIRECT_CHECKPOINT_KEY (and ACRA_DIRECT_SLOT)"
                ),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
