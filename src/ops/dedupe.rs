//! Dedupe: an anti-join that keeps a company from being enriched again too soon.
//!
//! Three rules, applied in this order:
//! 1. Within a batch, repeated keys close together are processed once: the latest eligible change per
//!    company key wins, earlier ones become [`Fate::Superseded`] (pure, [`supersede_repeats`]).
//! 2. A change whose company is already in flight (processed by an earlier batch whose history row is not
//!    committed yet) is skipped: each processed change holds a [`Claim`] on its key until the sink has
//!    committed it. Stages run concurrently, so without this a company repeated in consecutive batches
//!    would get two history rows. Claims are bounded by the events in flight.
//! 3. A change whose company has a `company_enrichment_runs` row newer than `recheck_days` (any row when
//!    `skip_if_any_history`) becomes [`Fate::Skipped`]; `force` turns this rule off. One query per key kind
//!    (uen; name and year) present in the batch, issued together. It runs after the claim: a claim is
//!    released only after its history row committed, so the query sees that row; querying first would
//!    leave a window between the two.
//!
//! Skipped and superseded changes still refresh registry fields in upsert; they only get no history row
//! and no enrichment.

use std::sync::{Arc, Mutex};

use tokio_postgres::Client;

use crate::change::{Batch, Fate};
use crate::error::{Error, Result};
use crate::ops::{per_batch, BatchStream, Operator};
use crate::registry::CompanyKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupePolicy {
    pub recheck_days: u32,
    pub skip_if_any_history: bool,
    pub force: bool,
    /// In an enriching pipeline only enrichments count as history: a company the registry pipeline
    /// processed (a history row without enrichment) is still enriched.
    pub only_enrichments: bool,
}

/// Marks every eligible change that a later eligible change in the batch repeats as superseded.
pub fn supersede_repeats(batch: &mut Batch) {
    let mut latest: foldhash::HashMap<&CompanyKey, usize> = foldhash::HashMap::default();
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

/// The company keys being processed right now.
#[derive(Debug, Default)]
pub struct InFlight {
    keys: Mutex<foldhash::HashSet<CompanyKey>>,
}

impl InFlight {
    /// Claims `key`, or returns `None` when another change holds it.
    pub fn try_claim(self: &Arc<Self>, key: &CompanyKey) -> Option<Claim> {
        let fresh = self.keys.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone());
        fresh.then(|| Claim { owner: Arc::clone(self), key: key.clone() })
    }

    pub fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A processed change's hold on its company key; released when dropped.
#[derive(Debug)]
pub struct Claim {
    owner: Arc<InFlight>,
    key: CompanyKey,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.owner.keys.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

/// Claims the key of every change still to be processed; a change whose key is taken is skipped.
pub fn claim_keys(batch: &mut Batch, in_flight: &Arc<InFlight>) {
    for e in &mut batch.events {
        if e.fate != Fate::Process {
            continue;
        }
        let Some(record) = &e.record else { continue };
        match in_flight.try_claim(&record.key) {
            Some(claim) => e.claim = Some(Box::new(claim)),
            None => e.fate = Fate::Skipped,
        }
    }
}

pub struct Dedupe {
    client: Arc<Client>,
    policy: DedupePolicy,
    in_flight: Arc<InFlight>,
}

impl Dedupe {
    pub fn new(client: Arc<Client>, policy: DedupePolicy) -> Self {
        Dedupe { client, policy, in_flight: Arc::default() }
    }

    async fn process(&self, mut batch: Batch) -> Result<Batch> {
        supersede_repeats(&mut batch);
        // Claim before querying (see the module doc).
        claim_keys(&mut batch, &self.in_flight);
        if !self.policy.force {
            self.skip_recent(&mut batch).await?;
        }
        Ok(batch)
    }

    /// Rule 3: one probe per key kind present in the batch (by uen; by name and year), issued together.
    async fn skip_recent(&self, batch: &mut Batch) -> Result<()> {
        let (mut by_uen, mut by_name) = (Keys::default(), Keys::default());
        for (i, e) in batch.events.iter().enumerate() {
            if let (Fate::Process, Some(r)) = (&e.fate, &e.record) {
                let keys = if r.uen.is_some() { &mut by_uen } else { &mut by_name };
                keys.ords.push(i as i32);
                keys.uens.push(r.uen.as_deref());
                keys.names.push(r.name.as_deref());
                keys.years.push(r.incorporation_year);
            }
        }
        let (a, b) = futures::try_join!(self.probe(UEN_PROBE, &by_uen), self.probe(NAME_PROBE, &by_name))?;
        for ord in a.into_iter().chain(b) {
            if let Some(event) = batch.events.get_mut(ord as usize) {
                event.fate = Fate::Skipped;
                event.claim = None;
            }
        }
        Ok(())
    }

    /// The ords of `keys` whose company has recent history.
    async fn probe(&self, sql: &str, keys: &Keys<'_>) -> Result<Vec<i32>> {
        if keys.ords.is_empty() {
            return Ok(Vec::new());
        }
        let recheck_days = i32::try_from(self.policy.recheck_days).unwrap_or(i32::MAX);
        let rows = self
            .client
            .query(
                sql,
                &[
                    &keys.ords,
                    &keys.uens,
                    &keys.names,
                    &keys.years,
                    &self.policy.skip_if_any_history,
                    &recheck_days,
                    &self.policy.only_enrichments,
                ],
            )
            .await
            .map_err(|e| Error::db("dedupe: looking up recent enrichment history", e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// The keys of the changes still to process, column by column.
#[derive(Default)]
struct Keys<'a> {
    ords: Vec<i32>,
    uens: Vec<Option<&'a str>>,
    names: Vec<Option<&'a str>>,
    years: Vec<Option<i32>>,
}

// One index probe per key (LATERAL ... LIMIT 1), whatever the planner thinks of unnest's size: a hashed
// EXISTS would scan all of companies and the history on every batch.
const UEN_PROBE: &str =
    "select k.ord from unnest($1::int4[], $2::text[], $3::text[], $4::int4[]) as k(ord, uen, name, year) \
     cross join lateral ( \
       select 1 from companies c join company_enrichment_runs r on r.company_id = c.company_id \
       where c.uen = k.uen \
         and ($5 or r.updated_at > now() - make_interval(days => $6)) and (r.enriched or not $7) \
       limit 1) h";
const NAME_PROBE: &str =
    "select k.ord from unnest($1::int4[], $2::text[], $3::text[], $4::int4[]) as k(ord, uen, name, year) \
     cross join lateral ( \
       select 1 from companies c join company_enrichment_runs r on r.company_id = c.company_id \
       where c.uen is null and md5(lower(c.name)) = md5(lower(k.name)) \
         and coalesce(c.incorporation_year, 0) = coalesce(k.year, 0) \
         and ($5 or r.updated_at > now() - make_interval(days => $6)) and (r.enriched or not $7) \
       limit 1) h";

impl Operator for Dedupe {
    fn apply(self: Box<Self>, input: BatchStream) -> BatchStream {
        per_batch(*self, input, |op, batch| async move { op.process(batch).await })
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
            checkpoint: Checkpoint { cursor: Cursor::Id { last_id: 4 }, lsn: 1, snapshot: None },
            ack_lsn: None,
        };
        batch.events[3].fate = Fate::Filtered { reason: "test".into() };
        supersede_repeats(&mut batch);
        let fates: Vec<&Fate> = batch.events.iter().map(|e| &e.fate).collect();
        assert_eq!(fates[0], &Fate::Superseded);
        assert_eq!(fates[1], &Fate::Process);
        assert_eq!(fates[2], &Fate::Process, "the latest eligible repeat is the one processed");
        assert!(matches!(fates[3], Fate::Filtered { .. }), "filtered changes are left alone");
    }

    #[test]
    fn a_key_in_flight_is_skipped_until_its_event_is_dropped() {
        let in_flight = Arc::new(InFlight::default());
        let batch = |id| Batch {
            events: vec![event(id, "A1", "Live")],
            checkpoint: Checkpoint { cursor: Cursor::Id { last_id: id }, lsn: 1, snapshot: None },
            ack_lsn: None,
        };
        let mut first = batch(1);
        claim_keys(&mut first, &in_flight);
        assert_eq!(first.events[0].fate, Fate::Process);
        let mut second = batch(2);
        claim_keys(&mut second, &in_flight);
        assert_eq!(second.events[0].fate, Fate::Skipped, "A1 is still in flight");
        drop(first); // the sink committed it
        assert!(in_flight.is_empty());
        let mut third = batch(3);
        claim_keys(&mut third, &in_flight);
        assert_eq!(third.events[0].fate, Fate::Process);
    }
}
