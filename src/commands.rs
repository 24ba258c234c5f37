//! What each CLI command does. `main` only parses flags and calls [`execute`].

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::cli::{
    BenchCommand, CheckpointsCommand, Cli, Command, RefreshArgs, RunArgs, SlotsCommand, StatusArgs, WorkerArgs,
};
use crate::config::{Overrides, PipelineSpec, DEFAULT_TABLE};
use crate::db;
use crate::embedded::{Cluster, ClusterOptions};
use crate::error::{Error, Result};
use crate::pipeline::{self, Mode};
use crate::seed;
use crate::source::quote_table;

/// The database a command works on: the user's (`POSTGRES_DSN`) or the private embedded cluster.
pub struct Database {
    pub dsn: String,
    pub embedded: bool,
    cluster: Option<Cluster>,
}

impl Database {
    pub async fn open(cli: &Cli) -> Result<Database> {
        if let Some(dsn) = cli.dsn.as_deref().filter(|d| !d.trim().is_empty()) {
            return Ok(Database { dsn: dsn.to_owned(), embedded: false, cluster: None });
        }
        let opts = ClusterOptions {
            home: cli.home.clone().unwrap_or_else(ClusterOptions::default_home),
            durable: true,
            port: None,
        };
        let cluster = tokio::task::spawn_blocking(move || Cluster::start(&opts))
            .await
            .map_err(|e| Error::new(crate::ErrorKind::Embedded, format!("starting the private PostgreSQL: {e}")))??;
        let dsn = cluster.ensure_database().await?;
        tracing::info!(database = %db::describe(&dsn), "using the private PostgreSQL (POSTGRES_DSN is unset)");
        Ok(Database { dsn, embedded: true, cluster: Some(cluster) })
    }

    /// Stops the embedded cluster (if we started it) off the async threads.
    pub async fn close(mut self) {
        if let Some(c) = self.cluster.take() {
            let _ = tokio::task::spawn_blocking(move || drop(c)).await;
        }
    }
}

pub async fn execute(cli: Cli) -> Result<()> {
    // A sample file needs no database.
    if let Command::Seed(crate::cli::SeedArgs { csv: Some(path), rows, seed }) = &cli.command {
        let n = seed::seed_csv(path, *rows, *seed)?;
        println!(
            "wrote {n} ACRA-shaped sample rows to {} (load them with: acraflow import {})",
            path.display(),
            path.display()
        );
        return Ok(());
    }
    let database = Database::open(&cli).await?;
    let result = dispatch(&cli, &database).await;
    database.close().await;
    result
}

/// Where the demo writes its log (`main` opens it before any log line).
pub fn demo_log(cli: &Cli) -> std::path::PathBuf {
    cli.home.clone().unwrap_or_else(ClusterOptions::default_home).join("demo.log")
}

async fn dispatch(cli: &Cli, database: &Database) -> Result<()> {
    let dsn = database.dsn.as_str();
    match &cli.command {
        Command::Migrate => {
            let mut client = db::connect(dsn).await?;
            db::migrate(&mut client).await?;
            println!("migrated {}", db::describe(dsn));
            Ok(())
        }
        Command::Seed(args) => {
            let mut client = db::connect(dsn).await?;
            db::migrate(&mut client).await?;
            let n = seed::seed(&client, &quote_table(DEFAULT_TABLE), args.rows, args.seed).await?;
            println!("seeded {n} rows into {DEFAULT_TABLE}");
            Ok(())
        }
        Command::Backfill(args) => run_pipeline(database, args, Mode::Backfill).await,
        Command::Run(args) => run_pipeline(database, args, Mode::Stream).await,
        Command::Worker(args) => worker(database, args).await,
        Command::Refresh(args) => refresh(dsn, args).await,
        Command::Demo(args) => crate::demo::demo(database, args, &demo_log(cli)).await,
        Command::Psql(args) => psql(database, args).await,
        Command::Slots { cmd } => crate::admin::slots(dsn, cmd.as_ref().unwrap_or(&SlotsCommand::List)).await,
        Command::Checkpoints { cmd } => {
            crate::admin::checkpoints(dsn, cmd.as_ref().unwrap_or(&CheckpointsCommand::List)).await
        }
        Command::Check(args) => crate::check::check(cli, dsn, database.embedded, args).await,
        Command::Import(args) => {
            let mut client = db::connect(dsn).await?;
            db::migrate(&mut client).await?;
            let t = Instant::now();
            let done = crate::import::import(&mut client, &args.files, args.replace).await?;
            println!(
                "imported {} rows from {} file(s) into {DEFAULT_TABLE} in {:.1}s{}; `acraflow run` (or backfill) takes them from here",
                done.rows,
                done.files,
                t.elapsed().as_secs_f64(),
                if args.replace { ", replacing what it held" } else { "" }
            );
            Ok(())
        }
        Command::Status(args) => status(dsn, args).await,
        Command::Bench(BenchCommand::Backfill(args)) => crate::bench::backfill(dsn, args).await,
        Command::Bench(BenchCommand::Stream(args)) => crate::bench::stream(dsn, args).await,
        Command::Bench(BenchCommand::Enrich(args)) if !args.workers.is_empty() => {
            crate::bench::workers(dsn, args).await
        }
        Command::Bench(BenchCommand::Enrich(args)) => crate::bench::enrich(dsn, args).await,
    }
}

pub(crate) fn pipeline_spec(args: &RunArgs, overrides: &Overrides) -> Result<PipelineSpec> {
    let mut spec = match &args.pipeline {
        Some(path) => PipelineSpec::named_or_file(path)?,
        None => PipelineSpec::registry_sync(),
    };
    spec.apply(overrides);
    spec.ops = args.ops.to_spec();
    spec.validate()?;
    Ok(spec)
}

/// `acraflow worker`: the enrichment dataflow alone, with its own run header (mode `worker`). A lost
/// database is ridden out like `run` does, within ACRA_DIRECT_RECONNECT_BUDGET.
async fn worker(database: &Database, args: &WorkerArgs) -> Result<()> {
    use crate::enrichment::worker::{self, Until, WorkerSettings};
    let mut spec = match &args.pipeline {
        Some(path) => PipelineSpec::named_or_file(path)?,
        None => PipelineSpec::acra_direct(),
    };
    spec.apply(&Overrides { enrich: args.enrich.to_overrides(), ..Default::default() });
    spec.ops = args.ops.to_spec();
    spec.validate()?;
    let Some(e) = spec.enrich() else {
        return Err(Error::config(format!(
            "pipeline {} has no `enrich` operator, so there is nothing for a worker to do; use --pipeline acra_direct",
            spec.name
        )));
    };
    let settings = crate::enrichment::enrich::EnrichSettings::from_spec(e)?;
    let ws = WorkerSettings::from_spec(e, &spec.ops, &spec.source.table);
    serve_metrics(&args.ops).await?;
    if database.embedded {
        db::migrate(&mut db::connect(&database.dsn).await?).await?;
    }
    let dsn = database.dsn.as_str();
    let tenant = spec.ops.tenant_id.as_deref();
    let control = std::sync::Arc::new(db::connect_as(dsn, tenant, "acraflow").await?);
    db::schema_facts(&control).await?;
    let run_id = crate::run::start(&control, tenant, "worker", &spec.name, worker::owner_id()).await?;
    tracing::info!(run_id, worker = worker::owner_id(), "worker started");
    let stop = shutdown_signal();
    let (monitor, notifier) =
        crate::telemetry::alerts::Monitor::new(spec.ops.alert.clone(), &spec.name, std::sync::Arc::default());
    let _running = crate::telemetry::metrics::Running::start();
    // Ends a pause after its cool-down even while no job finishes.
    let ticker = monitor.spawn_ticker();
    let started = Instant::now();
    let budget = args.reconnect_budget.unwrap_or(spec.source.reconnect_budget);
    let mut total = crate::enrichment::worker::WorkerSummary::default();
    let live: std::sync::Arc<std::sync::Mutex<crate::enrichment::sink::Outcomes>> = Default::default();
    let header_counters = |o: &crate::enrichment::sink::Outcomes| crate::sink::Counters {
        processed: o.finished(),
        enriched: o.finished(),
        failed: o.failed,
        ..Default::default()
    };
    // The header follows the worker, so `acraflow status` shows its progress.
    let header = {
        let (control, live) = (std::sync::Arc::clone(&control), std::sync::Arc::clone(&live));
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                let c = header_counters(&live.lock().unwrap_or_else(|p| p.into_inner()));
                let _ = crate::run::write_header(&control, run_id, None, &c, None).await;
            }
        })
    };
    let result = with_reconnects(budget, &stop, "the worker starts again", || {
        let (done_tx, done_rx) = watch::channel(true);
        let until = if args.exit_when_idle { Until::Drained(done_rx) } else { Until::Stopped };
        let ctx = worker::RunContext { run_id, monitor: monitor.clone(), live: std::sync::Arc::clone(&live) };
        let run = worker::run(dsn, settings.clone(), ws.clone(), ctx, until, stop.clone());
        async move {
            let _done_tx = done_tx;
            run.await
        }
    })
    .await
    .map(|s| {
        total.latency = s.latency;
        total.backing_off = s.backing_off;
        total.capped = s.capped;
    });
    header.abort();
    ticker.abort();
    drop(monitor);
    if let Some(n) = notifier {
        n.flush(Duration::from_secs(10)).await;
    }
    total.outcomes = live.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let enrichment = total.summary();
    let counters = header_counters(&total.outcomes);
    let status = match (&result, *stop.borrow()) {
        (Err(_), _) => "failed",
        (Ok(()), true) => "interrupted",
        (Ok(()), false) => "completed",
    };
    let error = result.as_ref().err().map(|e| pipeline::error_chain(e));
    if let Err(e) = crate::run::write_header(&control, run_id, Some(status), &counters, error.as_deref()).await {
        tracing::warn!(run_id, error = %e, "could not write the worker's counters");
    }
    result?;
    let seconds = started.elapsed().as_secs_f64();
    let summary = crate::run::RunSummary {
        run_id,
        pipeline: spec.name.clone(),
        status,
        counters,
        seconds,
        rows_per_second: counters.processed as f64 / seconds.max(1e-9),
        latency: Default::default(),
        checkpoint: None,
        enrichment: Some(enrichment),
    };
    crate::telemetry::summary(&summary);
    Ok(())
}

/// `acraflow refresh`: express jobs for chosen companies, or the parked ones again.
async fn refresh(dsn: &str, args: &RefreshArgs) -> Result<()> {
    use crate::enrichment::queue::{self, Selection};
    let client = db::connect_as(dsn, args.tenant_id.as_deref(), "acraflow").await?;
    db::schema_facts(&client).await?;
    if args.exports {
        let n = crate::enrichment::export::requeue_parked(&client).await?;
        println!("re-queued {n} parked exports to Odoo; a running worker with ODOO_URL set sends them");
        return Ok(());
    }
    let selection = if args.failed {
        Selection::Failed
    } else if let Some(predicate) = &args.where_ {
        Selection::Where(predicate.clone())
    } else {
        let mut uens = args.uen.clone();
        if let Some(path) = &args.file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::io(format!("reading the UEN file {}", path.display()), e))?;
            uens.extend(
                text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned),
            );
        }
        if uens.is_empty() {
            return Err(Error::config("refresh: no UEN given (--uen, or a --file with one UEN per line)"));
        }
        Selection::Uens(uens)
    };
    if args.max_pages.is_some_and(|n| n == 0 || n > 50) {
        return Err(Error::config("refresh --max-pages: use 1 to 50"));
    }
    let options = crate::enrichment::enrich::JobOptions {
        force: args.force,
        max_pages: args.max_pages,
        llm: args.no_llm.then_some(false),
    };
    let done = queue::refresh(&client, &selection, &options, args.tenant_id.as_deref()).await?;
    match selection {
        Selection::Failed => println!("re-queued {} parked jobs as express refreshes", done.enqueued),
        _ => println!(
            "enqueued {} express refreshes (leased before every other waiting job by a running `acraflow worker`, \
             or `acraflow run --pipeline acra_direct`)",
            done.enqueued
        ),
    }
    if done.unknown > 0 {
        println!(
            "{} of the UENs given match no company (a company exists once the registry pipeline has seen it)",
            done.unknown
        );
    }
    Ok(())
}

/// Starts the metrics endpoint when `METRICS_PROMETHEUS_ENABLE` is on.
async fn serve_metrics(ops: &crate::cli::OpsArgs) -> Result<()> {
    if let Some(addr) = ops.metrics_addr() {
        crate::telemetry::metrics::serve(addr).await?;
    }
    Ok(())
}

async fn run_pipeline(database: &Database, args: &RunArgs, mode: Mode) -> Result<()> {
    let spec = pipeline_spec(args, &args.overrides.to_overrides())?;
    crate::check::warn_at_start(&spec);
    serve_metrics(&args.ops).await?;
    if database.embedded {
        db::migrate(&mut db::connect(&database.dsn).await?).await?;
    }
    // A backfill fails fast (the connection itself retries briefly); the long-running stream rides out
    // outages within its reconnect budget.
    let summary = match mode {
        Mode::Backfill => pipeline::run(&database.dsn, &spec, mode, shutdown_signal()).await?,
        Mode::Stream => supervise(&database.dsn, &spec, mode, shutdown_signal()).await?,
    };
    crate::telemetry::summary(&summary);
    Ok(())
}

/// Runs the pipeline; after a lost connection (a database restart, a network cut) starts it again from
/// the checkpoint (see [`with_reconnects`]).
pub async fn supervise(
    dsn: &str,
    spec: &PipelineSpec,
    mode: Mode,
    stop: watch::Receiver<bool>,
) -> Result<pipeline::RunSummary> {
    with_reconnects(spec.source.reconnect_budget, &stop, "restarting from the checkpoint", || {
        pipeline::run(dsn, spec, mode, stop.clone())
    })
    .await
}

/// How long a process that has never reached its database keeps trying: a wrong address or a server that
/// is down should fail a fresh start in seconds, not after the budget meant for an outage.
const FIRST_CONNECT_BUDGET: Duration = Duration::from_secs(30);

/// Runs `attempt` again after a lost connection, with exponential backoff and jitter, until it succeeds,
/// fails for another reason, a stop is requested (SIGINT/SIGTERM end the waits too), or `budget` passes
/// without a start that lasted. Until this process has reached the database once, the budget is at most
/// [`FIRST_CONNECT_BUDGET`].
pub async fn with_reconnects<T, F, Fut>(
    budget: Duration,
    stop: &watch::Receiver<bool>,
    what: &str,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    use rand::Rng;
    let mut failing_since: Option<Instant> = None;
    let mut delay = Duration::from_millis(200);
    let mut stop = stop.clone();
    loop {
        let started = Instant::now();
        let e = match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && !*stop.borrow() => e,
            Err(e) => return Err(e),
        };
        if started.elapsed() > Duration::from_secs(30) {
            // It ran for a while: this is a new outage, not the same one.
            failing_since = None;
            delay = Duration::from_millis(200);
        }
        let since = *failing_since.get_or_insert(started);
        let (budget, setting) = if db::ever_connected() {
            (budget, "ACRA_DIRECT_RECONNECT_BUDGET")
        } else {
            (budget.min(FIRST_CONNECT_BUDGET), "never reached the database; a first start tries for at most 30s")
        };
        if since.elapsed() >= budget {
            return Err(Error::with_source(
                crate::ErrorKind::Connect,
                format!("gave up after {}s of reconnecting ({setting})", budget.as_secs()),
                e,
            ));
        }
        let wait = delay + delay.mul_f64(rand::thread_rng().gen_range(0.0..0.5));
        tracing::warn!(error = %pipeline::error_chain(&e), retry_in_ms = wait.as_millis() as u64,
            "lost the database; {what}");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => {
                return Err(Error::with_source(crate::ErrorKind::Connect, "stopped while waiting to reconnect", e));
            }
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Turns true on the first SIGINT/SIGTERM (finish the batch in flight, commit, exit 0); a second signal
/// exits at once, which is safe because every batch commits atomically.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return;
        };
        for n in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n == 0 {
                tracing::warn!("shutdown requested: finishing the batch in flight (signal again to exit at once)");
                let _ = tx.send(true);
            } else {
                tracing::warn!("second signal: exiting now; work after the last checkpoint is replayed next run");
                std::process::exit(130);
            }
        }
    });
    rx
}

/// `acraflow psql`: psql on the database, the private cluster kept running until psql exits. The password
/// goes to psql in its environment (PGPASSWORD), never on its command line.
async fn psql(database: &Database, args: &crate::cli::PsqlArgs) -> Result<()> {
    let bin = crate::embedded::find_bin_dir().ok().map(|d| d.join("psql")).filter(|p| p.is_file());
    let mut cmd = tokio::process::Command::new(bin.unwrap_or_else(|| "psql".into()));
    match &database.cluster {
        Some(c) => {
            cmd.arg(format!(
                "host=127.0.0.1 port={} user={} dbname={}",
                c.port(),
                crate::embedded::ROLE,
                args.database
            ))
            .env("PGPASSWORD", c.password());
        }
        None if args.database != crate::embedded::DATABASE => {
            cmd.arg(db::with_dbname(&database.dsn, &args.database));
        }
        None => {
            cmd.arg(&database.dsn);
        }
    }
    cmd.args(&args.psql_args);
    // Ctrl-C belongs to psql (it cancels a query); acraflow stays to stop the server when psql exits.
    tokio::spawn(async { while tokio::signal::ctrl_c().await.is_ok() {} });
    let status = cmd
        .status()
        .await
        .map_err(|e| Error::io("starting psql (install the postgresql-client package, or set ACRAFLOW_PG_BIN)", e))?;
    if !status.success() {
        return Err(Error::new(crate::ErrorKind::Io, format!("psql exited with {status}")));
    }
    Ok(())
}

async fn status(dsn: &str, args: &StatusArgs) -> Result<()> {
    let client = db::connect(dsn).await?;
    db::schema_facts(&client).await?;
    // Status may run as a read-only role: marking abandoned runs is a courtesy, not a requirement.
    if let Err(e) = crate::run::mark_abandoned(&client).await {
        tracing::debug!(error = %e, "could not mark abandoned runs");
    }
    let q = |sql: &'static str| {
        let client = &client;
        async move { client.query(sql, &[]).await.map_err(|e| Error::db("reading status", e)) }
    };
    let checkpoints = q("select key, coalesce(cursor, 'id'), last_id, last_uen, last_lsn::text, last_seq, \
                         updated_at::text from service_progress order by key")
    .await?;
    let runs = q("select run_id, pipeline, mode, status, started_at::text, ended_at::text, rows_in, processed, \
                  filtered, skipped, failed, dead_lettered, error, tenant_id from enrichment_runs order by run_id desc limit 5")
    .await?;
    let dead = q("select stage, count(*) from dead_letters group by stage order by stage").await?;
    let slots =
        q("select slot_name::text, active, coalesce(wal_status, ''), coalesce(confirmed_flush_lsn::text, ''), \
                     coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, 0), \
                     coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, 0) \
                   from pg_replication_slots where database = current_database() and plugin = 'pgoutput' \
                   order by slot_name")
        .await?;
    let counts = q("select (select count(*) from staging_acra_companies), (select count(*) from companies), \
                    (select count(*) from company_enrichment_runs)")
    .await?;
    let today = crate::enrichment::usage::today(&client).await?;
    let (enriched_today, tokens_today) = (today.enrichments, today.llm_tokens);
    let queue = crate::enrichment::queue::stats(&client).await?;
    // Leads: scores by bucket, and the Odoo exports by state with the latest errors.
    // A database migrated by an older acraflow has no leads tables yet: the section is then empty.
    let leads_schema = client
        .query_one("select to_regclass('odoo_exports') is not null and to_regclass('lead_features') is not null", &[])
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false);
    let (buckets, exports, export_errors) = if leads_schema {
        (
            q("select coalesce(bucket, '?'), count(*) from lead_scores group by 1 order by 1").await?,
            q("select state, count(*), count(*) filter (where not_before > now()), \
                 count(*) filter (where attempts > 0) from odoo_exports group by 1 order by 1")
            .await?,
            q("select c.uen, e.attempts, e.last_error from odoo_exports e join companies c using (company_id) \
                 where e.last_error is not null order by e.updated_at desc limit 5")
            .await?,
        )
    } else {
        (Vec::new(), Vec::new(), Vec::new())
    };
    let (staged, companies, history): (i64, i64, i64) = (counts[0].get(0), counts[0].get(1), counts[0].get(2));
    if args.json {
        let v = serde_json::json!({
            "database": db::describe(dsn),
            "tables": { "staging_acra_companies": staged, "companies": companies, "company_enrichment_runs": history },
            "checkpoints": checkpoints.iter().map(|r| serde_json::json!({
                "key": r.get::<_, String>(0), "cursor": r.get::<_, String>(1), "last_id": r.get::<_, Option<i64>>(2),
                "last_uen": r.get::<_, Option<String>>(3), "last_lsn": r.get::<_, Option<String>>(4),
                "last_seq": r.get::<_, Option<i64>>(5), "updated_at": r.get::<_, String>(6),
            })).collect::<Vec<_>>(),
            "runs": runs.iter().map(|r| serde_json::json!({
                "run_id": r.get::<_, i64>(0), "pipeline": r.get::<_, Option<String>>(1), "mode": r.get::<_, Option<String>>(2),
                "status": r.get::<_, String>(3), "started_at": r.get::<_, String>(4), "ended_at": r.get::<_, Option<String>>(5),
                "rows_in": r.get::<_, i64>(6), "processed": r.get::<_, i64>(7), "filtered": r.get::<_, i64>(8),
                "skipped": r.get::<_, i64>(9), "failed": r.get::<_, i64>(10), "dead_lettered": r.get::<_, i64>(11),
                "error": r.get::<_, Option<String>>(12), "tenant_id": r.get::<_, Option<String>>(13),
            })).collect::<Vec<_>>(),
            "slots": slots.iter().map(|r| serde_json::json!({
                "slot": r.get::<_, String>(0), "active": r.get::<_, bool>(1), "wal_status": r.get::<_, String>(2),
                "confirmed_flush_lsn": r.get::<_, String>(3), "lag_bytes": r.get::<_, i64>(4),
                "wal_held_bytes": r.get::<_, i64>(5),
            })).collect::<Vec<_>>(),
            "daily_cap": {
                "enriched_today": enriched_today, "cap": args.daily_cap,
                "remaining": args.daily_cap.map(|c| c.saturating_sub(enriched_today as u64)),
                "llm_tokens_today": tokens_today, "llm_tokens_cap": args.tokens_cap,
                "email_verifications_today": today.email_verifications,
                "email_verifications_cap": args.verifications_cap,
                "contact_lookups_today": today.contact_lookups, "contact_lookups_cap": args.lookups_cap,
            },
            "dead_letters": dead.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))).collect::<std::collections::BTreeMap<_, _>>(),
            "queue": queue,
            "lead_buckets": buckets.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))).collect::<std::collections::BTreeMap<_, _>>(),
            "odoo_exports": exports.iter().map(|r| (r.get::<_, String>(0), serde_json::json!({
                "count": r.get::<_, i64>(1), "backing_off": r.get::<_, i64>(2), "retried": r.get::<_, i64>(3),
            }))).collect::<std::collections::BTreeMap<_, _>>(),
            "odoo_export_errors": export_errors.iter().map(|r| serde_json::json!({
                "uen": r.get::<_, Option<String>>(0), "attempts": r.get::<_, i32>(1), "error": r.get::<_, Option<String>>(2),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("database  {}", db::describe(dsn));
    println!("tables    staging {staged}, companies {companies}, history {history}");
    println!("\ncheckpoints");
    if checkpoints.is_empty() {
        println!("  none (the first `acraflow backfill` or `acraflow run` writes one)");
    }
    for r in &checkpoints {
        let cursor: String = r.get(1);
        let at = match cursor.as_str() {
            "uen" => format!(
                "after uen {} (id {})",
                r.get::<_, Option<String>>(3).unwrap_or_default(),
                r.get::<_, Option<i64>>(2).unwrap_or(0)
            ),
            "lsn" => format!(
                "after {} #{}",
                r.get::<_, Option<String>>(4).unwrap_or_default(),
                r.get::<_, Option<i64>>(5).unwrap_or(0)
            ),
            _ => format!("after id {}", r.get::<_, Option<i64>>(2).unwrap_or(0)),
        };
        println!("  {:<16} {:<36} updated {}", r.get::<_, String>(0), at, r.get::<_, String>(6));
    }
    println!("\nreplication slots");
    if slots.is_empty() {
        println!("  none (`acraflow run` creates one)");
    }
    for r in &slots {
        println!(
            "  {:<16} {:<8} confirmed {:<14} lag {:>12} bytes  holds {:>9} of WAL  wal {}",
            r.get::<_, String>(0),
            if r.get::<_, bool>(1) { "active" } else { "idle" },
            r.get::<_, String>(3),
            r.get::<_, i64>(4),
            crate::admin::human_bytes(r.get(5)),
            r.get::<_, String>(2)
        );
    }
    println!("\nrecent runs");
    if runs.is_empty() {
        println!("  none");
    }
    for r in &runs {
        println!(
            "  #{:<4} {:<14} {:<9} {:<11} in {:>8}  processed {:>8}  filtered {:>8}  skipped {:>8}  dead {:>5}  started {}",
            r.get::<_, i64>(0),
            r.get::<_, Option<String>>(1).unwrap_or_default(),
            r.get::<_, Option<String>>(2).unwrap_or_default(),
            r.get::<_, String>(3),
            r.get::<_, i64>(6),
            r.get::<_, i64>(7),
            r.get::<_, i64>(8),
            r.get::<_, i64>(9),
            r.get::<_, i64>(11),
            r.get::<_, String>(4),
        );
        if let Some(e) = r.get::<_, Option<String>>(12) {
            println!("         error: {e}");
        }
    }
    println!("\ndaily budget (UTC day)");
    let cap = |used: i64, cap: Option<u64>| match cap {
        Some(c) => format!("{used} of {c} ({} left)", c.saturating_sub(used as u64)),
        None => format!("{used} (no cap)"),
    };
    println!("  enrichments     {}  ACRA_DIRECT_DAILY_CAP", cap(enriched_today, args.daily_cap));
    println!("  llm tokens      {}  OPENAI_DAILY_TOKENS_CAP", cap(tokens_today, args.tokens_cap));
    println!(
        "  verifications   {}  ZEROBOUNCE_MAX_VERIFICATIONS",
        cap(today.email_verifications, args.verifications_cap)
    );
    println!("  contact lookups {}  APIFY_MAX_LOOKUPS", cap(today.contact_lookups, args.lookups_cap));
    print_queue(&queue);
    println!("\nleads");
    if buckets.is_empty() {
        println!("  no scores (the score step runs with --pipeline acra_direct)");
    } else {
        let parts: Vec<String> =
            buckets.iter().map(|r| format!("{} {}", r.get::<_, String>(0), r.get::<_, i64>(1))).collect();
        println!("  by bucket       {}", parts.join(", "));
    }
    if exports.is_empty() {
        println!("  odoo exports    none (ODOO_URL unset, or no score reached SCORE_MIN_EXPORT)");
    }
    for r in &exports {
        println!(
            "  odoo {:<10} {:>6}  ({} backing off after a failure, {} retried){}",
            r.get::<_, String>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3),
            if r.get::<_, String>(0) == "parked" { "; `acraflow refresh --exports` re-queues them" } else { "" }
        );
    }
    for r in &export_errors {
        println!(
            "    {} after {} attempt(s): {}",
            r.get::<_, Option<String>>(0).unwrap_or_default(),
            r.get::<_, i32>(1),
            r.get::<_, Option<String>>(2).unwrap_or_default()
        );
    }
    println!("\ndead letters by stage");
    if dead.is_empty() {
        println!("  none");
    }
    for r in &dead {
        println!("  {:<10} {}", r.get::<_, String>(0), r.get::<_, i64>(1));
    }
    Ok(())
}

/// The queue section of `acraflow status`.
fn print_queue(q: &crate::enrichment::queue::QueueStats) {
    println!("\nenrichment queue");
    let waiting = q.waiting_total();
    if waiting == 0 && q.leased.is_empty() && q.parked == 0 {
        println!("  empty (jobs appear as the registry pipeline processes companies, or with `acraflow refresh`)");
    } else {
        let by_reason: Vec<String> = q.waiting.iter().map(|(r, n)| format!("{r} {n}")).collect();
        println!(
            "  waiting         {waiting}  ({})",
            if by_reason.is_empty() { "-".into() } else { by_reason.join(", ") }
        );
        if q.backing_off > 0 {
            println!("    of which      {} wait for a retry's backoff", q.backing_off);
        }
        println!("  oldest waiting  {}", human_seconds(q.oldest_waiting_seconds));
        if q.leased.is_empty() {
            println!("  leased          0  (no worker holds a job)");
        }
        for (worker, n) in &q.leased {
            println!("  leased          {n:<6} by {worker}");
        }
        println!(
            "  parked          {}  (failed ENRICH_MAX_ATTEMPTS times; `acraflow refresh --failed` re-queues them)",
            q.parked
        );
        for (who, error) in &q.parked_errors {
            println!("    {who:<14} {error}");
        }
    }
    match (q.latency_p50_seconds, q.latency_p95_seconds, q.latency_p99_seconds) {
        (Some(p50), Some(p95), Some(p99)) => println!(
            "  enqueue->done   p50 {}  p95 {}  p99 {}  ({} jobs in the last hour)",
            human_seconds(p50),
            human_seconds(p95),
            human_seconds(p99),
            q.done_last_hour
        ),
        _ => println!("  enqueue->done   no job done in the last hour"),
    }
}

fn human_seconds(s: f64) -> String {
    match s {
        s if s < 1.0 => format!("{:.0} ms", s * 1000.0),
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.1} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}
