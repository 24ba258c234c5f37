//! Upsert: writes the registry fields of a batch into `companies` in one round trip per key kind.
//!
//! Rules (PRD 20): the key is the UEN, else `(lower(name), incorporation_year)`; the latest change per key
//! in the batch wins; eligible changes may create a company, filtered ones only refresh an existing one;
//! `industry_norm` is the `ssic_ref` title of the code, else the row's own description (`ssic_ref` is read
//! once, when the operator starts: a join per batch cost a sixth of the statement). Duplicate keys
//! are collapsed before the statement ([`collapse`]), so they can never make it fail.
//!
//! Unchanged rows are not rewritten: a row identical to the stored company is removed from the insert
//! before `ON CONFLICT` sees it, so it costs no new tuple, no row lock and no WAL. The statement commits on
//! its own, in source order; replaying it is harmless (see `checkpoint`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, Statement};

use crate::change::{Batch, Fate};
use crate::db::SchemaFacts;
use crate::error::{Error, Result};
use crate::ops::{per_batch, BatchStream, Operator};
use crate::registry::CompanyKey;

/// The write for one company key, collapsed from every change to it in the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyWrite {
    /// Index (in the batch) of the latest change to this key; its fields win.
    pub latest: usize,
    /// The latest non-missing name (a change without a name keeps the stored one).
    pub name: Option<String>,
    /// Some eligible change had a name, so the company may be created.
    pub insertable: bool,
    /// The processed change that needs the company's id (for its history row).
    pub processed: Option<usize>,
}

/// Collapses a batch to one write per company key, in first-seen order.
pub fn collapse(batch: &Batch) -> Vec<(CompanyKey, KeyWrite)> {
    let mut index: foldhash::HashMap<&CompanyKey, usize> = foldhash::HashMap::default();
    let mut writes: Vec<(CompanyKey, KeyWrite)> = Vec::new();
    for (i, e) in batch.events.iter().enumerate() {
        let Some(record) = &e.record else { continue };
        let eligible = match e.fate {
            Fate::Process | Fate::Skipped | Fate::Superseded => true,
            Fate::Filtered { .. } => false,
            Fate::Ignored | Fate::DeadLetter { .. } => continue,
        };
        let slot = *index.entry(&record.key).or_insert_with(|| {
            writes.push((record.key.clone(), KeyWrite { latest: i, name: None, insertable: false, processed: None }));
            writes.len() - 1
        });
        let w = &mut writes[slot].1;
        w.latest = i;
        if record.name.is_some() {
            w.name.clone_from(&record.name);
        }
        w.insertable |= eligible && record.name.is_some();
        if e.fate == Fate::Process {
            w.processed = Some(i);
        }
    }
    writes
}

pub struct Upsert {
    client: Arc<Client>,
    sql: Statements,
    prepared: Mutex<Prepared>,
    /// Companies this operator has created so far (rows its inserts returned; on the rare `ON CONFLICT`
    /// path a key another writer inserted first counts too).
    created: AtomicU64,
    /// `ssic_ref`: SSIC code to title.
    ssic: foldhash::HashMap<String, String>,
}

/// How often the statements are prepared again. Postgres keeps a prepared statement's generic plan until
/// the tables' statistics change; one planned while `companies` was nearly empty (a fresh database, the
/// start of a backfill) joins by scanning the whole table, and would keep doing so as the table grows.
const REPLAN_EVERY: Duration = Duration::from_secs(10);

/// The statements are also prepared again each time the companies this operator created have doubled,
/// from this many on: a load into an empty table grows it far faster than [`REPLAN_EVERY`] (in `bench
/// stream`, the first plan scanned the whole table on every batch for seven seconds, to 100k rows).
/// Doubling keeps it to a handful of plans, about twenty for the whole registry.
const REPLAN_FROM_CREATED: u64 = 1_000;

/// Whether statements prepared `age` ago, when this operator had created `then` companies, should be
/// prepared again now that it has created `now`.
fn replan_due(age: Duration, then: u64, now: u64) -> bool {
    age >= REPLAN_EVERY || (now >= REPLAN_FROM_CREATED && now >= then.saturating_mul(2))
}

#[derive(Clone)]
struct Prepared {
    at: Instant,
    /// [`Upsert::created`] when these were prepared.
    created: u64,
    /// Plain INSERT of the keys the probe found absent: no speculative insertion.
    by_uen_fast: Statement,
    /// The same with `ON CONFLICT`: run when another writer inserted one of the keys meanwhile.
    by_uen: Statement,
    by_name: Statement,
    refresh_by_uen: Statement,
}

impl Upsert {
    pub async fn new(client: Arc<Client>, facts: SchemaFacts) -> Result<Self> {
        let sql = statements(facts.companies_has_industry);
        let ssic = client
            .query("select code, title from ssic_ref where title is not null", &[])
            .await
            .map_err(|e| Error::db("upsert: reading ssic_ref", e))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let prepared = Mutex::new(prepare(&client, &sql, 0).await?);
        Ok(Upsert { client, sql, prepared, created: AtomicU64::new(0), ssic })
    }

    /// The statements, prepared again when [`REPLAN_EVERY`] has passed or the companies created since
    /// doubled (see [`REPLAN_FROM_CREATED`]).
    async fn prepared(&self) -> Result<Prepared> {
        let current = self.prepared.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let created = self.created.load(Ordering::Relaxed);
        if !replan_due(current.at.elapsed(), current.created, created) {
            return Ok(current);
        }
        let fresh = prepare(&self.client, &self.sql, created).await?;
        *self.prepared.lock().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        Ok(fresh)
    }

    async fn process(&self, mut batch: Batch) -> Result<Batch> {
        let writes = collapse(&batch);
        let (uen_writes, name_writes): (Vec<_>, Vec<_>) =
            writes.iter().partition(|(k, _)| matches!(k, CompanyKey::Uen(_)));
        // Keys that may not create a company and need no id (filtered changes, mostly) only refresh a
        // company that exists: a plain UPDATE, without the probe-and-insert statement's materialized CTE
        // (a third of the statement's time at a registry's share of filtered rows).
        let (uen_writes, refresh_writes): (Vec<_>, Vec<_>) =
            uen_writes.into_iter().partition(|(_, w)| w.insertable || w.processed.is_some());
        let st = self.prepared().await?;
        let ((a, bad_a), (b, bad_b), (_, bad_r)) = futures::try_join!(
            self.bisected(Step::Upsert(&st.by_uen_fast, Some(&st.by_uen)), &batch, &uen_writes),
            self.bisected(Step::Upsert(&st.by_name, None), &batch, &name_writes),
            self.bisected(Step::Refresh(&st.refresh_by_uen), &batch, &refresh_writes)
        )?;
        let mut ids: Vec<Option<i64>> = vec![None; batch.events.len()];
        for (i, id) in a.into_iter().chain(b) {
            if let Some(slot) = ids.get_mut(i) {
                *slot = Some(id);
            }
        }
        // A value the database refuses (a user's constraint, a column too narrow, an index entry too large):
        // its changes are dead-lettered with the reason, and the rest of the batch goes on.
        let mut refused = foldhash::HashSet::default();
        for (w, why) in bad_a.into_iter().chain(bad_b).chain(bad_r) {
            for i in [Some(w.latest), w.processed].into_iter().flatten() {
                if refused.insert(i) && !matches!(batch.events[i].fate, Fate::DeadLetter { .. }) {
                    batch.events[i].dead_letter("upsert", why.clone());
                }
            }
        }
        for (_, w) in &writes {
            let Some(i) = w.processed else { continue };
            if refused.contains(&i) {
                continue;
            }
            match ids[i] {
                Some(id) => batch.events[i].company_id = Some(id),
                None => batch.events[i].dead_letter(
                    "upsert",
                    "entity_name: missing ('na' or empty) and no company with this key exists yet, \
                     so there is no name to create it with",
                ),
            }
        }
        Ok(batch)
    }

    /// Runs one statement for `writes` (and `fallback` instead if it meets a key another writer inserted
    /// since its probe); returns (event index, company_id) for the processed changes.
    async fn execute(
        &self,
        stmt: &Statement,
        fallback: Option<&Statement>,
        batch: &Batch,
        writes: &[&(CompanyKey, KeyWrite)],
    ) -> Result<Vec<(usize, i64)>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let n = writes.len();
        let c = self.columns(batch, writes);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] =
            [&c.ords, &c.uens, &c.names, &c.codes, &c.norms, &c.years, &c.statuses, &c.insertable, &c.want];
        let rows = match (self.client.query(stmt, &params).await, fallback) {
            (Err(e), Some(fallback)) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                tracing::debug!(error = %e, "upsert: a key was inserted concurrently; upserting with ON CONFLICT");
                self.client.query(fallback, &params).await
            }
            (result, _) => result,
        }
        .map_err(|e| Error::db(format!("upsert: writing {n} companies"), e))?;
        // Rows are (ord, uen, company_id): ord is set for companies that existed before the statement;
        // a company the statement inserted comes back by uen (joining the insert's output to the input
        // inside the statement would be a nested loop over a CTE).
        let by_uen: foldhash::HashMap<&str, usize> = writes
            .iter()
            .filter_map(|(k, w)| match k {
                CompanyKey::Uen(u) => Some((u.as_str(), w.processed?)),
                CompanyKey::NameYear { .. } => None,
            })
            .collect();
        let mut created = 0;
        let ids = rows
            .iter()
            .filter_map(|r| {
                let id: Option<i64> = r.get(2);
                let ord = match r.get::<_, Option<i32>>(0) {
                    Some(ord) => ord as usize,
                    None => {
                        created += 1;
                        *by_uen.get(r.get::<_, Option<&str>>(1)?)?
                    }
                };
                Some((ord, id?))
            })
            .collect();
        self.created.fetch_add(created, Ordering::Relaxed);
        Ok(ids)
    }
}

/// Which statement [`Upsert::bisected`] runs.
#[derive(Clone, Copy)]
enum Step<'s> {
    Upsert(&'s Statement, Option<&'s Statement>),
    Refresh(&'s Statement),
}

/// The database refused the statement for a value in it: a data exception (class 22), an integrity
/// constraint (23) or a program limit such as an index entry too large (54). Trying again cannot help.
fn refused_for_its_data(e: &Error) -> bool {
    e.sql_state().is_some_and(|c| matches!(&c.code()[..2], "22" | "23" | "54"))
}

/// The statements' array parameters, one element per key write.
#[derive(Default)]
struct Columns<'a> {
    ords: Vec<i32>,
    uens: Vec<Option<&'a str>>,
    names: Vec<Option<&'a str>>,
    codes: Vec<Option<&'a str>>,
    norms: Vec<Option<&'a str>>,
    years: Vec<Option<i32>>,
    statuses: Vec<Option<&'a str>>,
    insertable: Vec<bool>,
    want: Vec<bool>,
}

impl Upsert {
    fn columns<'a>(&'a self, batch: &'a Batch, writes: &[&'a (CompanyKey, KeyWrite)]) -> Columns<'a> {
        let mut c = Columns::default();
        for (_, w) in writes {
            let r = batch.events[w.latest].record.as_ref().expect("collapse only keeps events with a record");
            c.ords.push(w.processed.unwrap_or(w.latest) as i32);
            c.uens.push(r.uen.as_deref());
            c.names.push(w.name.as_deref());
            c.codes.push(r.industry_code.as_deref());
            let title = r.industry_code.as_deref().and_then(|code| self.ssic.get(code));
            c.norms.push(title.map(String::as_str).or(r.ssic_description.as_deref()));
            c.years.push(r.incorporation_year);
            c.statuses.push(r.status.as_deref());
            c.insertable.push(w.insertable);
            c.want.push(w.processed.is_some());
        }
        c
    }

    /// Runs `step` for `writes`. When the database refuses it for a value (a data exception, a constraint,
    /// a program limit: not a failure that may pass), the writes are halved until the refused ones are
    /// alone: returns what succeeded and each refused write with the reason. Each statement commits on its
    /// own and replays harmlessly, so the halves that succeed stay written.
    async fn bisected<'w>(
        &self,
        step: Step<'_>,
        batch: &Batch,
        writes: &[&'w (CompanyKey, KeyWrite)],
    ) -> Result<(Vec<(usize, i64)>, Vec<(&'w KeyWrite, String)>)> {
        let mut done = Vec::new();
        let mut refused = Vec::new();
        let mut pending = vec![writes];
        while let Some(chunk) = pending.pop() {
            let result = match step {
                Step::Upsert(stmt, fallback) => self.execute(stmt, fallback, batch, chunk).await,
                Step::Refresh(stmt) => self.refresh(stmt, batch, chunk).await.map(|()| Vec::new()),
            };
            match result {
                Ok(ids) => done.extend(ids),
                Err(e) if refused_for_its_data(&e) => {
                    if let [(_, w)] = chunk {
                        tracing::warn!(error = %crate::run::error_chain(&e), "upsert: a value was refused");
                        refused.push((w, crate::run::error_chain(&e)));
                    } else {
                        let (left, right) = chunk.split_at(chunk.len() / 2);
                        pending.push(right);
                        pending.push(left);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok((done, refused))
    }

    /// Updates the companies of `writes` that exist and differ; creates none and returns no ids.
    async fn refresh(&self, stmt: &Statement, batch: &Batch, writes: &[&(CompanyKey, KeyWrite)]) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let c = self.columns(batch, writes);
        self.client
            .execute(stmt, &[&c.uens, &c.names, &c.codes, &c.norms, &c.years, &c.statuses])
            .await
            .map_err(|e| Error::db(format!("upsert: refreshing {} companies", writes.len()), e))?;
        Ok(())
    }
}

impl Operator for Upsert {
    fn apply(self: Box<Self>, input: BatchStream) -> BatchStream {
        per_batch(*self, input, |op, batch| async move { op.process(batch).await })
    }
}

struct Statements {
    by_uen_fast: String,
    by_uen: String,
    by_name: String,
    refresh_by_uen: String,
}

async fn prepare(client: &Client, sql: &Statements, created: u64) -> Result<Prepared> {
    let (by_uen_fast, by_uen, by_name, refresh_by_uen) = futures::try_join!(
        client.prepare(&sql.by_uen_fast),
        client.prepare(&sql.by_uen),
        client.prepare(&sql.by_name),
        client.prepare(&sql.refresh_by_uen)
    )
    .map_err(|e| Error::db("upsert: preparing its statements", e))?;
    Ok(Prepared { at: Instant::now(), created, by_uen_fast, by_uen, by_name, refresh_by_uen })
}

/// The upsert statements (by uen, by name and year, and the refresh-only update by uen), with or without
/// the optional `industry` column.
fn statements(with_industry: bool) -> Statements {
    let (ind_col, ind_val, ind_set) = if with_industry {
        (", industry", ", m.industry_norm", ", industry = excluded.industry")
    } else {
        ("", "", "")
    };
    let ind_cmp_e = if with_industry { ", e.industry" } else { "" };
    let ind_cmp_c = if with_industry { ", c.industry" } else { "" };
    let ind_upd = if with_industry { ", industry = m.industry_norm" } else { "" };
    let input = "mapped as ( \
           select * from unnest($1::int4[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int4[], \
                                $7::text[], $8::bool[], $9::bool[]) \
             as t(ord, uen, name, industry_code, industry_norm, incorporation_year, status, insertable, want) \
         )";
    let same = |alias: &str, ind: &str| {
        format!(
            "({alias}.name, {alias}.industry_code, {alias}.industry_norm{ind}, {alias}.incorporation_year, {alias}.status) \
             is not distinct from (coalesce(m.name, {alias}.name), m.industry_code, m.industry_norm{ind_val}, \
             m.incorporation_year, m.status)"
        )
    };
    // One probe of companies per key (`existing`) decides whether the row changes anything and gives the id
    // of a company the statement leaves alone: about a tenth faster than probing again for the ids.
    let existing = format!(
        "existing as ( \
           select m.*, e.company_id as existing_id, coalesce({same_e}, false) as unchanged \
           from mapped m left join companies e on e.uen = m.uen \
         )",
        same_e = same("e", ind_cmp_e),
    );
    // The registry fields of a changed company, from input row `m` (a missing name keeps the stored one).
    let set_fields = format!(
        "name = coalesce(m.name, c.name), industry_code = m.industry_code, industry_norm = m.industry_norm{ind_upd}, \
         incorporation_year = m.incorporation_year, status = m.status, updated_at = now()"
    );
    // Changed companies updated by id; `which` says which of them this statement leaves to its insert.
    let update_by_id = |which: &str| {
        format!(
            "upd as ( \
               update companies c set {set_fields} \
               from existing m \
               where {which} and not m.unchanged and c.company_id = m.existing_id \
             )"
        )
    };
    let by_uen = format!(
        "with {input}, {existing}, \
         ins as ( \
           insert into companies as c (uen, name, industry_code, industry_norm{ind_col}, incorporation_year, status) \
           select m.uen, m.name, m.industry_code, m.industry_norm{ind_val}, m.incorporation_year, m.status \
           from existing m \
           where m.insertable and not m.unchanged \
           on conflict (uen) do update set name = coalesce(excluded.name, c.name), \
             industry_code = excluded.industry_code, industry_norm = excluded.industry_norm{ind_set}, \
             incorporation_year = excluded.incorporation_year, status = excluded.status, updated_at = now() \
           returning c.company_id, c.uen \
         ), {upd} \
         select null::int4, ins.uen, ins.company_id from ins \
         union all \
         select m.ord, m.uen, m.existing_id from existing m \
         where m.want and m.existing_id is not null and not (m.insertable and not m.unchanged)",
        upd = update_by_id("not m.insertable"),
    );
    // The common case without `ON CONFLICT`: keys the probe found absent are inserted plainly (no speculative
    // insertion, a sixth faster per batch), keys it found are updated by id when something changed. A key
    // another writer inserts between the probe and the insert fails the statement, and `by_uen` runs instead.
    let by_uen_fast = format!(
        "with {input}, {existing}, \
         ins as ( \
           insert into companies (uen, name, industry_code, industry_norm{ind_col}, incorporation_year, status) \
           select m.uen, m.name, m.industry_code, m.industry_norm{ind_val}, m.incorporation_year, m.status \
           from existing m \
           where m.insertable and m.existing_id is null \
           returning company_id, uen \
         ), {upd} \
         select null::int4, ins.uen, ins.company_id from ins \
         union all \
         select m.ord, m.uen, m.existing_id from existing m where m.want and m.existing_id is not null",
        upd = update_by_id("m.existing_id is not null"),
    );
    // The name key hashes lower(name), matching the partial unique index companies_name_year_key. Rows are
    // collapsed again here because Postgres' lower() may fold names the engine kept apart.
    let key = |a: &str| format!("md5(lower({a}.name)), coalesce({a}.incorporation_year, 0)");
    let by_name = format!(
        "with {input}, \
         keyed as ( \
           select distinct on ({mk}) m.*, bool_or(m.insertable) over (partition by {mk}) as any_insertable \
           from mapped m order by {mk}, m.ord desc \
         ), \
         ins as ( \
           insert into companies as c (uen, name, industry_code, industry_norm{ind_col}, incorporation_year, status) \
           select null, m.name, m.industry_code, m.industry_norm{ind_val}, m.incorporation_year, m.status \
           from keyed m \
           where m.any_insertable and not exists ( \
             select 1 from companies e where e.uen is null and ({ek}) = ({mk}) and {same_e}) \
           on conflict (md5(lower(name)), coalesce(incorporation_year, 0)) where uen is null \
           do update set name = excluded.name, industry_code = excluded.industry_code, \
             industry_norm = excluded.industry_norm{ind_set}, status = excluded.status, updated_at = now() \
           returning c.company_id, c.name, c.incorporation_year \
         ), \
         upd as ( \
           update companies c set name = m.name, industry_code = m.industry_code, \
             industry_norm = m.industry_norm{ind_upd}, status = m.status, updated_at = now() \
           from keyed m \
           where not m.any_insertable and c.uen is null and ({ck}) = ({mk}) and not ({same_c}) \
         ) \
         select m.ord, null::text, coalesce(ins.company_id, c.company_id) \
         from mapped m \
         left join ins on ({ik}) = ({mk}) \
         left join companies c on c.uen is null and ({ck}) = ({mk}) \
         where m.want",
        mk = key("m"),
        ek = key("e"),
        ck = key("c"),
        ik = key("ins"),
        same_e = same("e", ind_cmp_e),
        same_c = same("c", ind_cmp_c),
    );
    let refresh_by_uen = format!(
        "update companies c set {set_fields} \
         from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::text[]) \
           as m(uen, name, industry_code, industry_norm, incorporation_year, status) \
         where c.uen = m.uen and not coalesce({same_c}, false)",
        same_c = same("c", ind_cmp_c),
    );
    Statements { by_uen_fast, by_uen, by_name, refresh_by_uen }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, Event, Op, Position, StagingRow};
    use crate::checkpoint::{Checkpoint, Cursor};

    fn event(id: i64, uen: &str, name: &str, fate: Fate) -> Event {
        let row = StagingRow { id, uen: Some(uen.into()), entity_name: Some(name.into()), ..Default::default() };
        let mut e = Event::new(Change { pos: Position { lsn: 1, seq: id }, op: Op::Insert, row });
        e.record = Some(crate::registry::map(&e.change.row, 2026).unwrap());
        e.fate = fate;
        e
    }

    #[test]
    fn statements_are_prepared_again_on_age_and_on_each_doubling_of_created_companies() {
        let young = Duration::from_secs(1);
        assert!(!replan_due(young, 0, 999), "too few companies to matter");
        assert!(replan_due(young, 0, 1_000));
        assert!(!replan_due(young, 1_000, 1_999));
        assert!(replan_due(young, 1_000, 2_000));
        assert!(!replan_due(young, 1_000_000, 1_500_000), "half as much again is not a doubling");
        assert!(replan_due(REPLAN_EVERY, 1_000_000, 1_000_000), "old statements are prepared again anyway");
    }

    #[test]
    fn collapse_keeps_latest_fields_and_any_eligibility() {
        let batch = Batch {
            events: vec![
                event(1, "A1", "Alpha", Fate::Process),
                event(2, "B2", "Beta", Fate::Filtered { reason: "x".into() }),
                event(3, "A1", "na", Fate::Filtered { reason: "x".into() }),
            ],
            checkpoint: Checkpoint { cursor: Cursor::Id { last_id: 3 }, lsn: 1, snapshot: None },
            ack_lsn: None,
        };
        let w = collapse(&batch);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].0, CompanyKey::Uen("A1".into()));
        assert_eq!(
            w[0].1,
            KeyWrite { latest: 2, name: Some("Alpha".into()), insertable: true, processed: Some(0) },
            "the struck-off repeat's fields win, its missing name keeps the earlier one, the company may be created"
        );
        assert_eq!(w[1].1, KeyWrite { latest: 1, name: Some("Beta".into()), insertable: false, processed: None });
    }
}
