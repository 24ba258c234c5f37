//! What each CLI command does. `main` only parses flags and calls [`execute`].

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::cli::{BenchCommand, Cli, Command, DemoArgs, RunArgs, StatusArgs};
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
    let database = Database::open(&cli).await?;
    let result = dispatch(&cli, &database).await;
    database.close().await;
    result
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
        Command::Demo(args) => demo(database, args).await,
        Command::Status(args) => status(dsn, args).await,
        Command::Bench(BenchCommand::Backfill(args)) => crate::bench::backfill(dsn, args).await,
        Command::Bench(BenchCommand::Stream(args)) => crate::bench::stream(dsn, args).await,
        Command::Bench(BenchCommand::Enrich(args)) => crate::bench::enrich(dsn, args).await,
    }
}

fn pipeline_spec(args: &RunArgs, overrides: &Overrides) -> Result<PipelineSpec> {
    let mut spec = match &args.pipeline {
        Some(path) => PipelineSpec::named_or_file(path)?,
        None => PipelineSpec::registry_sync(),
    };
    spec.apply(overrides);
    spec.validate()?;
    Ok(spec)
}

async fn run_pipeline(database: &Database, args: &RunArgs, mode: Mode) -> Result<()> {
    let spec = pipeline_spec(args, &args.overrides.to_overrides())?;
    if database.embedded {
        db::migrate(&mut db::connect(&database.dsn).await?).await?;
    }
    // A backfill fails fast (the connection itself retries briefly); the long-running stream rides out
    // outages within its reconnect budget.
    let summary = match mode {
        Mode::Backfill => pipeline::run(&database.dsn, &spec, mode, shutdown_signal()).await?,
        Mode::Stream => supervise(&database.dsn, &spec, mode, shutdown_signal()).await?,
    };
    println!("{summary}");
    Ok(())
}

/// Runs the pipeline; after a lost connection (a database restart, a network cut) starts it again from
/// the checkpoint, with exponential backoff and jitter, until `reconnect_budget` has passed without a
/// successful start. Then it gives up with the cause.
pub async fn supervise(
    dsn: &str,
    spec: &PipelineSpec,
    mode: Mode,
    stop: watch::Receiver<bool>,
) -> Result<pipeline::RunSummary> {
    use rand::Rng;
    let budget = spec.source.reconnect_budget;
    let mut failing_since: Option<Instant> = None;
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = Instant::now();
        match pipeline::run(dsn, spec, mode, stop.clone()).await {
            Ok(summary) => return Ok(summary),
            Err(e) if e.is_retryable() && !*stop.borrow() => {
                if attempt.elapsed() > Duration::from_secs(30) {
                    // It ran for a while: this is a new outage, not the same one.
                    failing_since = None;
                    delay = Duration::from_millis(200);
                }
                let since = *failing_since.get_or_insert(attempt);
                if since.elapsed() >= budget {
                    return Err(Error::with_source(
                        crate::ErrorKind::Connect,
                        format!("gave up after {}s of reconnecting (ACRA_DIRECT_RECONNECT_BUDGET)", budget.as_secs()),
                        e,
                    ));
                }
                let wait = delay + delay.mul_f64(rand::thread_rng().gen_range(0.0..0.5));
                tracing::warn!(error = %pipeline::error_chain(&e), retry_in_ms = wait.as_millis() as u64,
                    "lost the database; restarting from the checkpoint");
                tokio::time::sleep(wait).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
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

async fn demo(database: &Database, args: &DemoArgs) -> Result<()> {
    let dsn = database.dsn.as_str();
    let mut client = db::connect(dsn).await?;
    db::migrate(&mut client).await?;
    let staged: i64 = client
        .query_one("select count(*) from staging_acra_companies", &[])
        .await
        .map_err(|e| Error::db("counting staging rows", e))?
        .get(0);
    if staged == 0 {
        let n = seed::seed(&client, &quote_table(DEFAULT_TABLE), args.rows, 20).await?;
        println!("seeded {n} ACRA-shaped sample rows into {DEFAULT_TABLE}");
    } else {
        println!("{DEFAULT_TABLE} already holds {staged} rows; replaying them all");
    }
    // The demo replays staging from the start each time under its own checkpoint key, so a second demo
    // shows what a re-run does: registry fields refreshed, nothing rewritten, nothing processed twice.
    let mut spec = PipelineSpec::registry_sync();
    spec.apply(&Overrides { start_after_id: Some(0), checkpoint_key: Some("demo".into()), ..Default::default() });
    let summary = pipeline::run(dsn, &spec, Mode::Backfill, shutdown_signal()).await?;
    println!("\n{summary}\n");
    let rows = client
        .query("select coalesce(status, '(none)'), count(*) from companies group by 1 order by 2 desc limit 6", &[])
        .await
        .map_err(|e| Error::db("summarising companies", e))?;
    println!("companies by status:");
    for r in rows {
        println!("  {:<45} {:>8}", r.get::<_, String>(0), r.get::<_, i64>(1));
    }
    let rows = client
        .query(
            "select uen, name, coalesce(industry_norm, ''), coalesce(incorporation_year::text, '') \
             from companies order by company_id limit 5",
            &[],
        )
        .await
        .map_err(|e| Error::db("sampling companies", e))?;
    println!("\nfirst companies:");
    for r in rows {
        let industry: String = r.get(2);
        println!(
            "  {:<11} {:<40} {:<5} {}",
            r.get::<_, Option<String>>(0).unwrap_or_default(),
            r.get::<_, String>(1),
            r.get::<_, String>(3),
            industry.chars().take(50).collect::<String>()
        );
    }
    Ok(())
}

async fn status(dsn: &str, args: &StatusArgs) -> Result<()> {
    let client = db::connect(dsn).await?;
    db::schema_facts(&client).await?;
    let q = |sql: &'static str| {
        let client = &client;
        async move { client.query(sql, &[]).await.map_err(|e| Error::db("reading status", e)) }
    };
    let checkpoints = q("select key, coalesce(cursor, 'id'), last_id, last_uen, last_lsn::text, last_seq, \
                         updated_at::text from service_progress order by key")
    .await?;
    let runs = q("select run_id, pipeline, mode, status, started_at::text, ended_at::text, rows_in, processed, \
                  filtered, skipped, failed, dead_lettered, error from enrichment_runs order by run_id desc limit 5")
    .await?;
    let dead = q("select stage, count(*) from dead_letters group by stage order by stage").await?;
    let slots =
        q("select slot_name::text, active, coalesce(wal_status, ''), coalesce(confirmed_flush_lsn::text, ''), \
                     coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, 0) \
                   from pg_replication_slots where database = current_database() and plugin = 'pgoutput' \
                   order by slot_name")
        .await?;
    let counts = q("select (select count(*) from staging_acra_companies), (select count(*) from companies), \
                    (select count(*) from company_enrichment_runs)")
    .await?;
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
                "error": r.get::<_, Option<String>>(12),
            })).collect::<Vec<_>>(),
            "slots": slots.iter().map(|r| serde_json::json!({
                "slot": r.get::<_, String>(0), "active": r.get::<_, bool>(1), "wal_status": r.get::<_, String>(2),
                "confirmed_flush_lsn": r.get::<_, String>(3), "lag_bytes": r.get::<_, i64>(4),
            })).collect::<Vec<_>>(),
            "dead_letters": dead.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))).collect::<std::collections::BTreeMap<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("database  {}", db::describe(dsn));
    println!("tables    staging {staged}, companies {companies}, history {history}");
    println!("\ncheckpoints");
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
            "  {:<16} {:<8} confirmed {:<14} lag {:>12} bytes  wal {}",
            r.get::<_, String>(0),
            if r.get::<_, bool>(1) { "active" } else { "idle" },
            r.get::<_, String>(3),
            r.get::<_, i64>(4),
            r.get::<_, String>(2)
        );
    }
    println!("\nrecent runs");
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
    println!("\ndead letters by stage");
    if dead.is_empty() {
        println!("  none");
    }
    for r in &dead {
        println!("  {:<10} {}", r.get::<_, String>(0), r.get::<_, i64>(1));
    }
    Ok(())
}
