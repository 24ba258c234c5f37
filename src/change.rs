//! The one event type every operator sees.
//!
//! A backfilled row and a streamed row are the same [`Change`]: the staging row plus its source
//! [`Position`]. Operators annotate a change as it passes ([`Event`]: its [`Fate`], the mapped registry
//! record, the company it touched) but never reorder or drop it: every change reaches the sink, which is
//! what lets the sink count it and advance the checkpoint past it.

use std::fmt;
use std::time::Instant;

use crate::checkpoint::Checkpoint;
use crate::registry::CompanyRecord;

/// Something an operator holds for as long as an event lives (dedupe's claim on a company key), dropped
/// after the sink's commit. Opaque here, so the event type depends on no operator.
pub type Hold = Box<dyn std::any::Any + Send + Sync>;

/// Where a change came from, totally ordered.
///
/// Streamed: `(commit LSN, ordinal within the transaction)`. Backfilled: `(snapshot LSN, staging id)`.
/// A stream starts at or after the backfill's snapshot LSN, so the two never interleave out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub lsn: u64,
    pub seq: i64,
}

impl Position {
    /// The LSN in Postgres' `X/Y` text form (what `pg_lsn` columns accept).
    pub fn lsn_text(&self) -> String {
        lsn_to_text(self.lsn)
    }
}

pub fn lsn_to_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parses Postgres' `X/Y` LSN text form.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u32::MAX as u64 && lo <= u32::MAX as u64).then_some((hi << 32) | lo)
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.lsn_text(), self.seq)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A row as it is now: a backfilled row, or a streamed INSERT.
    Insert,
    Update,
    /// Deletes and truncates on staging never delete companies; they are counted and passed through.
    Delete,
    Truncate,
}

/// The staging columns the registry rules read, as published (text, `na` for missing).
///
/// Only these travel through the pipeline: carrying all 53 ACRA columns would multiply the memory each
/// batch holds for fields no operator reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StagingRow {
    pub id: i64,
    pub uen: Option<String>,
    pub entity_name: Option<String>,
    pub entity_status_description: Option<String>,
    pub registration_incorporation_date: Option<String>,
    pub primary_ssic_code: Option<String>,
    pub primary_ssic_description: Option<String>,
}

impl StagingRow {
    /// The column list a source selects, in the order of [`StagingRow`]'s fields.
    pub const COLUMNS: &'static str = "id, uen, entity_name, entity_status_description, \
         registration_incorporation_date, primary_ssic_code, primary_ssic_description";

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "uen": self.uen,
            "entity_name": self.entity_name,
            "entity_status_description": self.entity_status_description,
            "registration_incorporation_date": self.registration_incorporation_date,
            "primary_ssic_code": self.primary_ssic_code,
            "primary_ssic_description": self.primary_ssic_description,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub pos: Position,
    pub op: Op,
    pub row: StagingRow,
}

/// What the pipeline decided for one change. Starts as [`Fate::Process`]; operators narrow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Eligible: its company is upserted and it gets a history row (and, in an enriching pipeline, an
    /// enrichment job).
    Process,
    /// Excluded by the filter (dissolved, too young, ...): refreshes an existing company's registry fields,
    /// never creates one, never enriched.
    Filtered { reason: String },
    /// Its company was enriched recently (dedupe anti-join): registry fields refreshed, not enriched again.
    Skipped,
    /// A later change in the same batch has the same company key; that one is processed instead.
    Superseded,
    /// A delete or truncate on staging: counted, never applied to companies.
    Ignored,
    /// Could not be processed; written to `dead_letters` with the stage and a reason naming the field.
    DeadLetter { stage: &'static str, reason: String },
}

/// A change on its way through the operators.
#[derive(Debug)]
pub struct Event {
    pub change: Change,
    pub fate: Fate,
    /// The registry fields mapped from the staging row (set by the filter, which needs them to decide).
    pub record: Option<CompanyRecord>,
    /// The `companies` row this change resolved to (set by upsert for processed changes).
    pub company_id: Option<i64>,
    /// Held from dedupe until the event is dropped after the sink's commit: no other change to the same
    /// company is processed meanwhile.
    pub claim: Option<Hold>,
    /// When the source read the change: the start of its selection-to-persistence latency.
    pub selected_at: Instant,
}

impl Event {
    pub fn new(change: Change) -> Self {
        Event { change, fate: Fate::Process, record: None, company_id: None, claim: None, selected_at: Instant::now() }
    }

    pub fn dead_letter(&mut self, stage: &'static str, reason: impl Into<String>) {
        self.fate = Fate::DeadLetter { stage, reason: reason.into() };
    }
}

/// A run of consecutive changes and the checkpoint that is safe to commit once all of them are done.
#[derive(Debug)]
pub struct Batch {
    pub events: Vec<Event>,
    pub checkpoint: Checkpoint,
    /// For streamed batches: the transaction end LSN the server may be told is flushed once this batch
    /// has committed (see `source::replication`). `None` for backfill batches.
    pub ack_lsn: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trips() {
        for lsn in [0u64, 1, 0x16_B374_D848, u64::from(u32::MAX) << 32 | 0xABCD] {
            assert_eq!(parse_lsn(&lsn_to_text(lsn)), Some(lsn));
        }
        assert_eq!(lsn_to_text(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("garbage"), None);
        assert_eq!(parse_lsn("1/"), None);
        assert_eq!(parse_lsn("100000000/0"), None);
    }

    #[test]
    fn positions_order_by_lsn_then_seq() {
        let a = Position { lsn: 10, seq: 99 };
        let b = Position { lsn: 11, seq: 0 };
        assert!(a < b);
        assert!(Position { lsn: 11, seq: 1 } > b);
    }
}
