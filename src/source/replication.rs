//! The replication source: changes to `staging_acra_companies` from a logical replication slot (pgoutput).
//!
//! Invariants (DESIGN.md, "Effectively-once" and "WAL safety"):
//! - A streamed change's position is `(commit LSN, ordinal within its transaction)`. pgoutput v1 sends a
//!   transaction after it commits, so the commit LSN is known at `Begin`.
//! - Batches are cut by size or age, also inside a transaction: a transaction of millions of rows streams
//!   through in batches and is never collected. Each batch's checkpoint is the position of its last
//!   change; the sink commits it with the batch's writes.
//! - The server is told an LSN is flushed only after the sink committed every change up to it, and only at
//!   transaction ends: a transaction's end LSN is acknowledged once the batch holding its last change has
//!   committed. The slot's `confirmed_flush_lsn` therefore never passes what is durable, and a restart
//!   receives again every transaction not wholly committed. Changes at or before the checkpoint position
//!   are skipped, so a crash inside a large transaction resumes inside it without re-applying anything.
//! - When nothing is in flight and no transaction is open, a keepalive's `wal_end` is acknowledged, so an
//!   idle slot does not pin WAL while other tables are busy.
//! - On shutdown the last batch is flushed, the source waits for the sink to commit it, and for the final
//!   acknowledgement to reach the server (the client sends no status update of its own on shutdown).
//! - Relations are cached per session and columns mapped by name: a Relation message may arrive at any
//!   time (`ALTER TABLE ... ADD COLUMN` on staging) and is sent again on every new session.
//! - An UPDATE that leaves a TOASTed column unchanged does not send it ('u'); such values are read from
//!   staging, never taken as NULL.
//! - Deletes and truncates are passed on as [`Op::Delete`] / [`Op::Truncate`] and never touch companies.
//!
//! Losing the connection ends the source with a retryable error; `acraflow run` restarts the whole
//! pipeline from the checkpoint (see `pipeline::supervise`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_replication::{Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

use crate::change::{lsn_to_text, Batch, Change, Event, Op, Position, StagingRow};
use crate::checkpoint::{Checkpoint, Cursor};
use crate::error::{Error, ErrorKind, Result};
use crate::ops::BatchStream;
use crate::source::pgoutput::{self, Message, Value};

/// What the sink has made durable, shared with the source so it knows what it may acknowledge.
#[derive(Debug, Default)]
pub struct Progress {
    /// Streamed batches committed by the sink.
    pub committed: AtomicU64,
    /// The highest transaction end LSN whose changes are all committed.
    pub durable_lsn: AtomicU64,
}

impl Progress {
    /// Called by the sink after committing a batch that carries an acknowledgement.
    pub fn record(&self, ack_lsn: u64) {
        self.durable_lsn.fetch_max(ack_lsn, Ordering::SeqCst);
        self.committed.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone)]
pub struct ReplicationOptions {
    pub dsn: String,
    pub slot: String,
    pub publication: String,
    /// Unquoted schema and table names, to recognise the staging table's Relation messages.
    pub schema: String,
    pub table: String,
    /// Quoted table name, for reading unchanged TOASTed values.
    pub quoted_table: String,
    pub batch_size: usize,
    pub batch_deadline: Duration,
    pub status_interval: Duration,
    /// Changes at or before this position are already committed: skip them.
    pub resume_after: Position,
}

/// Streams the slot's changes as batches, until `stop` turns true or the connection fails.
///
/// The session runs on a thread of its own (`acraflow-repl`), with a single-threaded runtime. It handles
/// every message the server sends, and when it keeps up with the server it is woken for each one; on the
/// shared runtime each of those wake-ups also moved work between worker threads. In some `bench stream`
/// runs that cost the engine 9-13 ms of CPU per 1,000 rows instead of 5, CPU the walsender it waited on
/// then lacked. The pipeline gets whole batches from it, one hand-over each.
pub fn stream(opts: ReplicationOptions, progress: Arc<Progress>, stop: watch::Receiver<bool>) -> BatchStream {
    on_own_thread("acraflow-repl", move |tx| async move {
        if let Err(e) = Session::run(opts, progress, stop, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    })
}

/// Runs `session` on a thread named `name` with a single-threaded runtime, handing its batches over as a
/// stream. A panic there is an error of the stream (the run fails), never its end.
fn on_own_thread<F, Fut>(name: &str, session: F) -> BatchStream
where
    F: FnOnce(mpsc::Sender<Result<Batch>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, mut rx) = mpsc::channel(2);
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = tx.blocking_send(Err(Error::io("replication: starting its runtime", e)));
                return;
            }
        };
        runtime.block_on(session(tx));
    });
    Box::pin(async_stream::stream! {
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                yield Err(Error::io("replication: starting its thread", e));
                return;
            }
        };
        while let Some(item) = rx.recv().await {
            yield item;
        }
        // The channel closed: the session ended, cleanly or by a panic. A panic is a failure of the run,
        // never the end of the stream.
        if let Ok(Err(panic)) = tokio::task::spawn_blocking(move || thread.join()).await {
            yield Err(crate::error::Error::new(
                crate::ErrorKind::Io,
                format!("replication: its thread panicked ({})", panic_message(panic.as_ref())),
            ));
        }
    })
}

/// The message of a panic payload (a `&str` or `String`, as `panic!` makes them).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// How long the session sleeps when it caught up with the server inside a transaction, so that changes
/// arrive in bursts rather than one wake-up each. A wake-up per change cost the engine as much CPU as
/// decoding and mapping it, and took it from the walsender: in `bench stream`, runs that fell into that
/// pattern spent 9 ms of engine CPU per 1,000 rows instead of 5-6. It adds at most this to latency.
const COALESCE: Duration = Duration::from_millis(1);

/// What woke the session loop.
enum Next<T> {
    Event(T),
    Stop,
    Tick,
}

/// Positions of the staging columns the engine reads, by name, in one Relation.
#[derive(Debug, Clone, Default)]
struct ColumnMap {
    id: Option<usize>,
    fields: [Option<usize>; 6],
}

const FIELDS: [&str; 6] = [
    "uen",
    "entity_name",
    "entity_status_description",
    "registration_incorporation_date",
    "primary_ssic_code",
    "primary_ssic_description",
];

fn field_mut(row: &mut StagingRow, i: usize) -> &mut Option<String> {
    match i {
        0 => &mut row.uen,
        1 => &mut row.entity_name,
        2 => &mut row.entity_status_description,
        3 => &mut row.registration_incorporation_date,
        4 => &mut row.primary_ssic_code,
        _ => &mut row.primary_ssic_description,
    }
}

struct Session<'a> {
    opts: ReplicationOptions,
    progress: Arc<Progress>,
    tx: &'a mpsc::Sender<Result<Batch>>,
    client: ReplicationClient,
    data: Client,
    relations: HashMap<u32, Option<ColumnMap>>,
    /// The open transaction: (commit LSN, ordinal of its last change).
    txn: Option<(u64, i64)>,
    batch: Vec<Event>,
    /// Per event of `batch`: the fields (bit i = FIELDS[i]) that arrived as unchanged TOAST values.
    unchanged: Vec<u8>,
    batch_started: Option<Instant>,
    /// Highest transaction end LSN seen whose changes are all in emitted batches or `batch`.
    last_commit_end: u64,
    last_emitted: Position,
    sent: u64,
    acked: u64,
}

impl<'a> Session<'a> {
    async fn run(
        opts: ReplicationOptions,
        progress: Arc<Progress>,
        mut stop: watch::Receiver<bool>,
        tx: &'a mpsc::Sender<Result<Batch>>,
    ) -> Result<()> {
        let mut client = ReplicationClient::connect(replication_config(&opts)?).await.map_err(wire("connecting"))?;
        client.wait_started().await.map_err(wire("starting replication"))?;
        let data = crate::db::connect(&opts.dsn).await?;
        tracing::info!(slot = %opts.slot, resume_after = %opts.resume_after, "replication stream started");
        let sent = progress.committed.load(Ordering::SeqCst);
        let batch = Vec::with_capacity(opts.batch_size);
        let mut s = Session {
            last_emitted: opts.resume_after,
            opts,
            progress,
            tx,
            client,
            data,
            relations: HashMap::new(),
            txn: None,
            batch,
            unchanged: Vec::new(),
            batch_started: None,
            last_commit_end: 0,
            sent,
            acked: 0,
        };
        let mut tick = tokio::time::interval(
            (s.opts.batch_deadline.min(Duration::from_millis(50)) / 2).max(Duration::from_micros(500)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            s.acknowledge_durable();
            // Whether the event had to be waited for: the session had caught up with the server.
            let waited = std::cell::Cell::new(false);
            let next = {
                let recv = s.client.recv();
                tokio::pin!(recv);
                let recv = std::future::poll_fn(|cx| {
                    let poll = std::future::Future::poll(recv.as_mut(), cx);
                    waited.set(waited.get() || poll.is_pending());
                    poll
                });
                tokio::select! {
                    // Events first: while they flow the other branches are not even polled (registering
                    // their wakers cost more than handling the event); the stop flag and the deadline are
                    // checked after each event instead.
                    biased;
                    ev = recv => Next::Event(ev),
                    changed = stop.changed() => match changed.is_err() || *stop.borrow() {
                        true => Next::Stop,
                        false => continue,
                    },
                    // The pipeline is gone (it failed or finished): release the slot now.
                    _ = s.tx.closed() => return Ok(()),
                    _ = tick.tick() => Next::Tick,
                }
            };
            let event = match next {
                Next::Event(event) => event,
                Next::Stop => break,
                Next::Tick => {
                    if s.due() && !s.flush(None).await? {
                        return Ok(());
                    }
                    continue;
                }
            };
            match event.map_err(wire("receiving"))? {
                Some(ev) => {
                    if !s.handle(ev).await? {
                        return Ok(()); // the pipeline went away
                    }
                }
                None => return Err(Error::new(ErrorKind::Connect, "the replication stream ended")),
            }
            if waited.get() && s.txn.is_some() {
                // Caught up inside a transaction: the rest of it is on its way. The server sends each
                // change as its own packet, and a session that keeps up is woken for every one; this
                // blocks the session's own thread (no other work runs on it) so the next read finds
                // a buffer of them instead. See COALESCE.
                std::thread::sleep(COALESCE);
            }
            if *stop.borrow() {
                break;
            }
            if (s.batch.len() >= s.opts.batch_size || s.due()) && !s.flush(None).await? {
                return Ok(());
            }
        }
        s.shutdown().await
    }

    /// Handles one event; false when the pipeline is gone.
    async fn handle(&mut self, ev: ReplicationEvent) -> Result<bool> {
        match ev {
            ReplicationEvent::Begin { final_lsn, .. } => self.txn = Some((final_lsn.as_u64(), 0)),
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.txn = None;
                self.last_commit_end = end_lsn.as_u64();
                if self.batch.is_empty() {
                    // Nothing of this transaction is waiting here: acknowledge it now if nothing is in flight,
                    // else with an empty batch behind the ones in flight.
                    if self.in_flight() == 0 {
                        self.ack(self.last_commit_end);
                    } else {
                        return self.flush(Some(self.last_commit_end)).await;
                    }
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if self.txn.is_none() && self.batch.is_empty() && self.in_flight() == 0 {
                    self.ack(wal_end.as_u64());
                }
            }
            ReplicationEvent::XLogData { data, .. } => {
                let msg = pgoutput::decode(&data)
                    .map_err(|e| Error::with_source(ErrorKind::Data, "replication: decoding a pgoutput message", e))?;
                self.apply(msg)?;
            }
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { .. } => {
                return Err(Error::new(ErrorKind::Connect, "the replication stream stopped"));
            }
        }
        Ok(true)
    }

    fn apply(&mut self, msg: Message) -> Result<()> {
        match msg {
            Message::Relation(rel) => {
                let ours = rel.namespace == self.opts.schema && rel.name == self.opts.table;
                let map = ours.then(|| {
                    let find = |name: &str| rel.columns.iter().position(|c| c.name == name);
                    ColumnMap { id: find("id"), fields: FIELDS.map(find) }
                });
                if let Some(m) = &map {
                    if m.id.is_none() {
                        return Err(Error::new(
                            ErrorKind::Schema,
                            format!("{}.{} has no `id` column; acraflow needs it", rel.namespace, rel.name),
                        ));
                    }
                }
                self.relations.insert(rel.id, map);
            }
            Message::Insert { relation, new } => self.push(Op::Insert, relation, &new)?,
            Message::Update { relation, new, .. } => self.push(Op::Update, relation, &new)?,
            Message::Delete { relation, old } => self.push(Op::Delete, relation, &old)?,
            Message::Truncate { relations, .. }
                if relations.iter().any(|r| matches!(self.relations.get(r), Some(Some(_)))) =>
            {
                self.push_row(Op::Truncate, StagingRow::default(), 0);
            }
            _ => {}
        }
        Ok(())
    }

    fn push(&mut self, op: Op, relation: u32, values: &[Value]) -> Result<()> {
        let map = match self.relations.get(&relation) {
            Some(Some(m)) => m,
            Some(None) => return Ok(()), // another table in the publication
            None => {
                return Err(Error::new(
                    ErrorKind::Data,
                    format!("change for relation {relation} before its Relation message"),
                ))
            }
        };
        let text = |i: Option<usize>| match i.and_then(|i| values.get(i)) {
            Some(Value::Text(s)) => Some(*s),
            _ => None,
        };
        let mut row = StagingRow { id: text(map.id).and_then(|s| s.parse().ok()).unwrap_or(0), ..Default::default() };
        let mut unchanged = 0u8;
        for (i, idx) in map.fields.iter().enumerate() {
            match idx.and_then(|i| values.get(i)) {
                Some(Value::Unchanged) => unchanged |= 1 << i,
                _ => *field_mut(&mut row, i) = text(*idx).map(str::to_owned),
            }
        }
        self.push_row(op, row, unchanged);
        Ok(())
    }

    fn push_row(&mut self, op: Op, row: StagingRow, unchanged: u8) {
        let Some((lsn, ordinal)) = self.txn.as_mut() else { return };
        *ordinal += 1;
        let pos = Position { lsn: *lsn, seq: *ordinal };
        if pos <= self.opts.resume_after {
            return; // committed before a restart
        }
        self.batch_started.get_or_insert_with(Instant::now);
        self.batch.push(Event::new(Change { pos, op, row }));
        self.unchanged.push(unchanged);
    }

    /// Whether the pending batch is past its deadline. (Holding it back while the pipeline is busy, to
    /// grow it, measured slower in `bench stream`: smaller batches keep more stages busy at once.)
    fn due(&self) -> bool {
        self.batch_started.is_some_and(|t| t.elapsed() >= self.opts.batch_deadline)
    }

    fn in_flight(&self) -> u64 {
        self.sent.saturating_sub(self.progress.committed.load(Ordering::SeqCst))
    }

    fn ack(&mut self, lsn: u64) {
        if lsn > self.acked {
            self.client.update_applied_lsn(Lsn::from_u64(lsn));
            self.acked = lsn;
        }
    }

    fn acknowledge_durable(&mut self) {
        let durable = self.progress.durable_lsn.load(Ordering::SeqCst);
        self.ack(durable);
    }

    /// Sends the pending batch (or an empty one carrying `ack`); false when the pipeline is gone.
    async fn flush(&mut self, ack: Option<u64>) -> Result<bool> {
        // The next batch gets its full capacity at once: growing by doubling copies it several times and
        // leaves freed buffers of every size behind, which fragments the heap (`bench stream` peak RSS
        // 81-95 MB before, 60-74 MB after).
        let mut events = match self.batch.is_empty() {
            true => Vec::new(),
            false => std::mem::replace(&mut self.batch, Vec::with_capacity(self.opts.batch_size)),
        };
        let unchanged = std::mem::take(&mut self.unchanged);
        self.batch_started = None;
        if events.is_empty() && ack.is_none() {
            return Ok(true);
        }
        self.resolve_unchanged(&mut events, &unchanged).await?;
        if let Some(last) = events.last() {
            self.last_emitted = last.change.pos;
        }
        // The transaction ends this batch covers: all of them when none is open, else those before it.
        let ack_lsn = ack.unwrap_or(self.last_commit_end);
        let pos = self.last_emitted;
        let batch = Batch {
            events,
            checkpoint: Checkpoint { cursor: Cursor::Lsn { lsn: pos.lsn, seq: pos.seq }, lsn: pos.lsn, snapshot: None },
            ack_lsn: Some(ack_lsn),
        };
        if self.tx.send(Ok(batch)).await.is_err() {
            return Ok(false);
        }
        self.sent += 1;
        Ok(true)
    }

    /// Fills fields that arrived as unchanged TOAST values from staging (one query, only when needed).
    async fn resolve_unchanged(&self, events: &mut [Event], unchanged: &[u8]) -> Result<()> {
        let ids: Vec<i64> =
            events.iter().zip(unchanged).filter(|(_, u)| **u != 0).map(|(e, _)| e.change.row.id).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let rows = self
            .data
            .query(
                &*format!("select {} from {} where id = any($1)", StagingRow::COLUMNS, self.opts.quoted_table),
                &[&ids],
            )
            .await
            .map_err(|e| Error::db("replication: reading unchanged TOAST values from staging", e))?;
        let current: HashMap<i64, &tokio_postgres::Row> = rows.iter().map(|r| (r.get(0), r)).collect();
        for (e, mask) in events.iter_mut().zip(unchanged) {
            if *mask == 0 {
                continue;
            }
            match current.get(&e.change.row.id) {
                Some(r) => {
                    for i in 0..FIELDS.len() {
                        if mask & (1 << i) != 0 {
                            *field_mut(&mut e.change.row, i) = r.get(i + 1);
                        }
                    }
                }
                None => e.dead_letter(
                    "source",
                    "an unchanged TOASTed column could not be read: the row is no longer in staging; \
                     the update was not applied",
                ),
            }
        }
        Ok(())
    }

    /// Flushes, waits for the sink to commit, and makes sure the final acknowledgement reached the server.
    async fn shutdown(mut self) -> Result<()> {
        if !self.flush(None).await? {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.in_flight() > 0 && Instant::now() < deadline && !self.tx.is_closed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.acknowledge_durable();
        let metrics = self.client.metrics();
        let deadline = Instant::now() + self.opts.status_interval * 3;
        while metrics.last_applied_lsn().as_u64() < self.acked && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(acknowledged = %lsn_to_text(self.acked), "replication stream stopped");
        let _ = self.client.shutdown().await;
        Ok(())
    }
}

fn replication_config(opts: &ReplicationOptions) -> Result<ReplicationConfig> {
    connection_config(&opts.dsn, &opts.slot, &opts.publication, opts.status_interval)
}

/// Connection settings for the replication protocol, from the same DSN the engine uses.
pub fn connection_config(
    dsn: &str,
    slot: &str,
    publication: &str,
    status_interval: Duration,
) -> Result<ReplicationConfig> {
    let (c, tls) = crate::pgtls::parse(dsn)?;
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let host_for_tls = host.clone();
    let user = c.get_user().unwrap_or("postgres").to_owned();
    let password = c.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    let database = c.get_dbname().unwrap_or(&user).to_owned();
    Ok(ReplicationConfig::new(host, user, password, database, slot.to_owned(), publication.to_owned())
        .with_port(c.get_ports().first().copied().unwrap_or(5432))
        .with_status_interval(status_interval)
        .with_wakeup_interval(status_interval)
        .with_buffer_size(4096)
        .with_max_message_size(64 * 1024 * 1024)
        .with_application_name("acraflow-replication")
        .with_tls(crate::pgtls::replication_tls(&tls, &host_for_tls)))
}

/// Maps a replication client error. I/O and server errors while streaming (a restart, a terminated
/// backend) are connection losses and retryable; slot problems are found before streaming starts.
fn wire(what: &'static str) -> impl Fn(PgWireError) -> Error {
    move |e| {
        let kind = match &e {
            PgWireError::Io(_) | PgWireError::Server(_) | PgWireError::Task(_) => ErrorKind::Connect,
            PgWireError::Auth(_) | PgWireError::Tls(_) => ErrorKind::Config,
            _ => ErrorKind::Data,
        };
        Error::with_source(kind, format!("replication: {what}"), e)
    }
}

/// The state of a replication slot, as `pg_replication_slots` reports it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub active_pid: Option<i32>,
    pub wal_status: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    pub lag_bytes: Option<i64>,
}

pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>> {
    let row = client
        .query_opt(
            "select plugin::text, active_pid, wal_status, confirmed_flush_lsn::text, \
               pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
             from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| Error::db("reading pg_replication_slots", e))?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        active_pid: r.get(1),
        wal_status: r.get(2),
        confirmed_flush_lsn: r.get(3),
        lag_bytes: r.get(4),
    }))
}

/// Like [`slot_info`], but waits a few seconds for a slot that is still held by a session that is ending
/// (our own, after a restart) to be released.
pub async fn slot_info_when_free(client: &Client, slot: &str) -> Result<Option<SlotInfo>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let info = slot_info(client, slot).await?;
        match &info {
            Some(i) if i.active_pid.is_some() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => return Ok(info),
        }
    }
}

/// Checks an existing slot can be streamed from; the error says what to do.
pub fn check_slot(slot: &str, info: &SlotInfo) -> Result<()> {
    if info.wal_status.as_deref() == Some("lost") {
        return Err(Error::new(
            ErrorKind::Schema,
            format!(
                "replication slot '{slot}' was invalidated (wal_status = lost): the WAL it needed is gone, so changes \
                 were missed. Recover with: select pg_drop_replication_slot('{slot}'); then delete the checkpoint \
                 (delete from service_progress where key = '<checkpoint key>') and run `acraflow run` again: it \
                 recreates the slot and replays staging (dedupe keeps companies from being processed twice)"
            ),
        ));
    }
    if info.plugin.as_deref() != Some("pgoutput") {
        return Err(Error::new(
            ErrorKind::Schema,
            format!(
                "replication slot '{slot}' uses plugin {:?}, not pgoutput; set ACRA_DIRECT_SLOT to another name",
                info.plugin
            ),
        ));
    }
    if let Some(pid) = info.active_pid {
        return Err(Error::new(
            ErrorKind::Schema,
            format!(
                "replication slot '{slot}' is in use by server process {pid}: is another `acraflow run` running? \
                 Stop it, or give this one its own ACRA_DIRECT_SLOT and ACRA_DIRECT_CHECKPOINT_KEY"
            ),
        ));
    }
    Ok(())
}

/// Creates the publication on the staging table when missing (or adds the table to it).
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    quoted_table: &str,
    schema: &str,
    table: &str,
) -> Result<()> {
    let exists = client
        .query_opt("select 1 from pg_publication where pubname = $1", &[&publication])
        .await
        .map_err(|e| Error::db("reading pg_publication", e))?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("create publication \"{publication}\" for table {quoted_table}"))
            .await
            .map_err(|e| Error::db(format!("creating publication {publication}"), e))?;
        return Ok(());
    }
    let has_table = client
        .query_opt(
            "select 1 from pg_publication_tables where pubname = $1 and schemaname = $2 and tablename = $3",
            &[&publication, &schema, &table],
        )
        .await
        .map_err(|e| Error::db("reading pg_publication_tables", e))?
        .is_some();
    if !has_table {
        client
            .batch_execute(&format!("alter publication \"{publication}\" add table {quoted_table}"))
            .await
            .map_err(|e| Error::db(format!("adding {quoted_table} to publication {publication}"), e))?;
    }
    Ok(())
}

/// A new slot and the snapshot it was created at. Keep it alive until a backfill has imported the snapshot
/// (`SET TRANSACTION SNAPSHOT`): the export ends with the session.
pub struct NewSlot {
    pub consistent_point: u64,
    pub snapshot: String,
    _session: ReplicationClient,
}

/// Creates the slot on a gated replication session, exporting its snapshot; as a failover slot when asked
/// (PostgreSQL 17+: its state is synchronised to standbys that have `sync_replication_slots` on).
pub async fn create_slot(dsn: &str, slot: &str, publication: &str, failover: bool) -> Result<NewSlot> {
    let opts = ReplicationOptions {
        dsn: dsn.to_owned(),
        slot: slot.to_owned(),
        publication: publication.to_owned(),
        schema: String::new(),
        table: String::new(),
        quoted_table: String::new(),
        batch_size: 1,
        batch_deadline: Duration::from_millis(1),
        status_interval: Duration::from_secs(1),
        resume_after: Position::default(),
    };
    let cfg = replication_config(&opts)?.with_application_name("acraflow-slot-setup");
    if failover {
        let client = crate::db::connect_named(dsn, "acraflow-slot-setup").await?;
        let version: i32 = client
            .query_one("select current_setting('server_version_num')::int", &[])
            .await
            .map_err(|e| Error::db("reading the server version", e))?
            .get(0);
        if version < 170_000 {
            return Err(Error::config(format!(
                "ACRA_DIRECT_SLOT_FAILOVER needs PostgreSQL 17 or later; this server is {}.{}",
                version / 10_000,
                version % 10_000 / 100
            )));
        }
    }
    let options = if failover { "SNAPSHOT 'export', FAILOVER true" } else { "SNAPSHOT 'export'" };
    let mut session = ReplicationClient::connect_gated(cfg).await.map_err(wire("opening a session"))?;
    let rows = session
        .simple_query(&format!("CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput ({options})"))
        .await
        .map_err(|e| Error::with_source(ErrorKind::Database, format!("creating replication slot '{slot}'"), e))?;
    let text = |i: usize| {
        rows.first().and_then(|r| r.get(i).cloned().flatten()).map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let consistent_point = text(1).as_deref().and_then(crate::change::parse_lsn);
    let snapshot = text(2);
    match (consistent_point, snapshot) {
        (Some(consistent_point), Some(snapshot)) => {
            tracing::info!(slot, consistent_point = %lsn_to_text(consistent_point), snapshot = %snapshot, "created replication slot");
            Ok(NewSlot { consistent_point, snapshot, _session: session })
        }
        _ => Err(Error::new(ErrorKind::Data, "CREATE_REPLICATION_SLOT returned no consistent point or snapshot")),
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    #[tokio::test]
    async fn a_panic_on_the_replication_thread_fails_the_stream_instead_of_ending_it() {
        let mut stream = super::on_own_thread("test-repl", |_tx| async { panic!("boom on the thread") });
        let item = stream.next().await.expect("an item, not the end of the stream");
        let err = item.expect_err("the panic is an error");
        assert!(err.to_string().contains("boom on the thread"), "{err}");
        assert!(stream.next().await.is_none());
    }
}
