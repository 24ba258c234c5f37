//! Dedupe: an anti-join that keeps a company from being enriched again too soon.
//!
//! Two rules, in this order:
//! 1. Within a batch, repeated keys close together are processed once: the latest eligible change per
//!    company key wins, earlier ones become [`Fate::Superseded`] (pure, [`supersede_repeats`]).
//! 2. A change whose company has a `company_enrichment_runs` row newer than `recheck_days` (any row when
//!    `skip_if_any_history`) becomes [`Fate::Skipped`]; `force` turns this rule off. One query per batch.
//!
//! Skipped and superseded changes still refresh registry fields in upsert; they only get no history row
//! and no enrichment.

use std::collections::HashMap;
use std::sync::Arc;

use futures::TryStreamExt;
use tokio_postgres::Client;

use crate::change::{Batch, Fate};
use crate::error::{Error, Result};
use crate::ops::{BatchStream, Operator};
use crate::registry::CompanyKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupePolicy {
    pub recheck_days: u32,
    pub skip_if_any_history: bool,
    pub force: bool,
}

/// Marks every eligible change that a later eligible change in the batch repeats as superseded.
pub fn supersede_repeats(batch: &mut Batch) {
    let mut latest: HashMap<&CompanyKey, usize> = HashMap::new();
    let mut superseded = Vec::new();
    for (i, e) in batch.events.iter().enumerate() {
        if e.fate != Fate::Process {
            continue;
        }
        if let Some(record) = &e.record {
            if let Some(prev) = latest.insert(&record.key, i) {
                superseded.push(prev);
            }
        }
    }
    for i in superseded {
        batch.events[i].fate = Fate::Superseded;
    }
}

pub struct Dedupe {
    client: Arc<Client>,
    policy: DedupePolicy,
}

impl Dedupe {
    pub fn new(client: Arc<Client>, policy: DedupePolicy) -> Self {
        Dedupe { client, policy }
    }

    async fn process(&self, mut batch: Batch) -> Result<Batch> {
        supersede_repeats(&mut batch);
        if self.policy.force {
            return Ok(batch);
        }
        let mut ords = Vec::new();
        let mut uens = Vec::new();
        let mut names = Vec::new();
        let mut years = Vec::new();
        for (i, e) in batch.events.iter().enumerate() {
            if let (Fate::Process, Some(r)) = (&e.fate, &e.record) {
                ords.push(i as i32);
                uens.push(r.uen.as_deref());
                names.push(r.name.as_deref());
                years.push(r.incorporation_year);
            }
        }
        if ords.is_empty() {
            return Ok(batch);
        }
        let recheck_days = i32::try_from(self.policy.recheck_days).unwrap_or(i32::MAX);
        let rows = self
            .client
            .query(
                "select k.ord from unnest($1::int4[], $2::text[], $3::text[], $4::int4[]) as k(ord, uen, name, year) \
                 where case when k.uen is not null then exists ( \
                     select 1 from companies c join company_enrichment_runs r on r.company_id = c.company_id \
                     where c.uen = k.uen and ($5 or r.updated_at > now() - make_interval(days => $6))) \
                   else exists ( \
                     select 1 from companies c join company_enrichment_runs r on r.company_id = c.company_id \
                     where c.uen is null and md5(lower(c.name)) = md5(lower(k.name)) \
                       and coalesce(c.incorporation_year, 0) = coalesce(k.year, 0) \
                       and ($5 or r.updated_at > now() - make_interval(days => $6))) \
                   end",
                &[&ords, &uens, &names, &years, &self.policy.skip_if_any_history, &recheck_days],
            )
            .await
            .map_err(|e| Error::db("dedupe: looking up recent enrichment history", e))?;
        for row in rows {
            let ord: i32 = row.get(0);
            batch.events[ord as usize].fate = Fate::Skipped;
        }
        Ok(batch)
    }
}

impl Operator for Dedupe {
    fn apply(self: Box<Self>, input: BatchStream) -> BatchStream {
        let this = Arc::new(*self);
        Box::pin(input.and_then(move |batch| {
            let this = Arc::clone(&this);
            async move { this.process(batch).await }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, Event, Op, Position, StagingRow};
    use crate::checkpoint::{Checkpoint, Cursor};

    fn event(id: i64, uen: &str, status: &str) -> Event {
        let row = StagingRow {
            id,
            uen: Some(uen.into()),
            entity_name: Some(format!("Company {uen}")),
            entity_status_description: Some(status.into()),
            ..Default::default()
        };
        let mut e = Event::new(Change { pos: Position { lsn: 1, seq: id }, op: Op::Insert, row });
        e.record = Some(crate::registry::map(&e.change.row, 2026).unwrap());
        e
    }

    #[test]
    fn latest_eligible_change_per_key_wins() {
        let mut batch = Batch {
            events: vec![event(1, "A1", "Live"), event(2, "B2", "Live"), event(3, "A1", "Live"), event(4, "A1", "x")],
            checkpoint: Checkpoint { cursor: Cursor::Id { last_id: 4 }, lsn: 1 },
        };
        batch.events[3].fate = Fate::Filtered { reason: "test".into() };
        supersede_repeats(&mut batch);
        let fates: Vec<&Fate> = batch.events.iter().map(|e| &e.fate).collect();
        assert_eq!(fates[0], &Fate::Superseded);
        assert_eq!(fates[1], &Fate::Process);
        assert_eq!(fates[2], &Fate::Process, "the latest eligible repeat is the one processed");
        assert!(matches!(fates[3], Fate::Filtered { .. }), "filtered changes are left alone");
    }
}
