//! `acraflow bench enrich --workers 1,2,4`: the durable queue's two promises, measured in one run.
//!
//! 1. **Scaling with workers.** For each worker count `w`, `w × jobs_per_worker` express jobs are enqueued
//!    and `w` real `acraflow worker --exit-when-idle` processes (each at `--worker-concurrency`) work them
//!    off against fixture sites answering after `--latency`. Reported: companies/s (wall clock, process
//!    start-up included) and the ratio to one worker measured in the same run.
//! 2. **The registry is not held back.** `acraflow run --pipeline acra_direct` (a child, its worker at
//!    concurrency 1 on the same slow sites) backfills `--waiting` companies into the queue; then a writer
//!    inserts staging rows at a steady 200 rows/s and each row's commit-to-visible latency is measured, as
//!    `bench stream` does. The reference is the same measurement with `acraflow run` on `registry_sync`
//!    (no queue at all), earlier in the same run.

use std::time::{Duration, Instant};

use crate::cli::BenchEnrichArgs;
use crate::config::{Overrides, PipelineSpec};
use crate::enrichment::enrich::JobOptions;
use crate::enrichment::queue::{self, Selection};
use crate::error::{Error, ErrorKind, Result};

const DB: &str = "acraflow_bench_queue";
/// The steady write rate while the registry's latency is measured (rows/s), and for how long.
const LATENCY_RATE: u64 = 200;
const LATENCY_SECONDS: u64 = 10;

pub async fn workers(admin_dsn: &str, args: &BenchEnrichArgs) -> Result<()> {
    let (dsn, client) = super::scratch_database(admin_dsn, DB).await?;
    let scaling: u64 = args.workers.iter().map(|w| *w as u64 * args.jobs_per_worker).sum();
    let (web, _) =
        super::companies_with_sites(&client, scaling + args.waiting, 7, "QUEUE", args.latency, |_, _| {}).await?;
    let child = || -> Result<tokio::process::Command> {
        let mut cmd = super::child_on_fixture_web(&dsn, &web, args.host_spacing)?;
        cmd.env("ENRICH_POLL_INTERVAL", "100ms");
        Ok(cmd)
    };

    // The registry's companies for the scaling rounds (the registry pipeline, in this process).
    let mut spec = PipelineSpec::registry_sync();
    spec.apply(&Overrides {
        batch_limit: Some(scaling),
        checkpoint_key: Some("bench_scaling".into()),
        ..Default::default()
    });
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    crate::pipeline::run(&dsn, &spec, crate::pipeline::Mode::Backfill, stop).await?;

    println!(
        "bench enrich --workers: {} ms site latency, host spacing {} ms, {} jobs at once per worker, {} jobs per worker",
        args.latency.as_millis(),
        args.host_spacing.as_millis(),
        args.worker_concurrency,
        args.jobs_per_worker
    );
    println!("\n{:>8} {:>6} {:>10} {:>12} {:>10}", "workers", "jobs", "seconds", "companies/s", "ratio");
    let mut first_id = 0i64;
    let mut one_worker: Option<f64> = None;
    for &w in &args.workers {
        let n = w as u64 * args.jobs_per_worker;
        let last_id = first_id + n as i64;
        let selection = Selection::Where(format!(
            "company_id in (select company_id from companies order by company_id offset {first_id} limit {n})"
        ));
        let enqueued =
            queue::refresh(&client, &selection, &JobOptions { llm: Some(false), ..Default::default() }, None).await?;
        first_id = last_id;
        let started = Instant::now();
        let mut children = Vec::new();
        for _ in 0..w {
            let mut cmd = child()?;
            cmd.args(["worker", "--exit-when-idle"])
                .env("ACRA_DIRECT_CONCURRENCY", args.worker_concurrency.to_string());
            children.push(cmd.spawn().map_err(|e| Error::io("starting acraflow worker", e))?);
        }
        for mut c in children {
            let status = c.wait().await.map_err(|e| Error::io("waiting for acraflow worker", e))?;
            if !status.success() {
                return Err(Error::new(ErrorKind::Io, format!("acraflow worker exited with {status}")));
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let left: i64 = client
            .query_one("select count(*) from enrichment_jobs", &[])
            .await
            .map_err(|e| Error::db("counting jobs left", e))?
            .get(0);
        if left > 0 || enqueued.enqueued != n {
            return Err(Error::new(
                ErrorKind::Data,
                format!(
                    "{w} workers: {} jobs enqueued of {n}, {left} left undone; the bench needs all done",
                    enqueued.enqueued
                ),
            ));
        }
        let rate = n as f64 / seconds;
        let base = *one_worker.get_or_insert(rate / w as f64);
        println!("{w:>8} {n:>6} {seconds:>10.2} {rate:>12.1} {:>9.2}x", rate / base);
    }
    println!("targets: >= 1.8x at 2 workers, >= 3.5x at 4 (ratios to 1 worker, measured in this run)");

    // 2. The registry's commit-to-visible latency: without enrichment, then with the queue full.
    let reference = registry_latency(&client, &child, "registry_sync", "LATREF_", 10).await?;
    let start_after = scaling as i64;
    let loaded = {
        let waiting_sql = "select count(*) from enrichment_jobs where lease_owner is null";
        let mut cmd = child()?;
        cmd.args(["run", "--pipeline", "acra_direct"])
            .env("ACRA_DIRECT_SLOT", "bench_queue")
            .env("ACRA_DIRECT_CHECKPOINT_KEY", "bench_queue")
            .env("ACRA_DIRECT_START_AFTER_ID", start_after.to_string())
            .env("ACRA_DIRECT_CONCURRENCY", "1");
        let mut engine = cmd.kill_on_drop(true).spawn().map_err(|e| Error::io("starting acraflow run", e))?;
        // Its backfill has filled the queue and it streams.
        super::wait_for(
            &client,
            &format!(
                "select count(*) from pg_replication_slots s join pg_stat_activity a on a.pid = s.active_pid \
                 where s.slot_name = 'bench_queue' and a.application_name = 'acraflow-replication' \
                   and (select count(*) from enrichment_jobs) >= {}",
                args.waiting
            ),
            600,
        )
        .await?;
        let waiting: i64 = client.query_one(waiting_sql, &[]).await.map_err(|e| Error::db("bench", e))?.get(0);
        let hist = super::steady_latency(&client, LATENCY_RATE, LATENCY_SECONDS, "LATQ_", 11).await?;
        let still: i64 = client.query_one(waiting_sql, &[]).await.map_err(|e| Error::db("bench", e))?.get(0);
        stop_child(&mut engine).await;
        (hist, waiting.min(still))
    };
    let _ = client
        .execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where database = $1", &[&DB])
        .await;
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let (hist, waiting) = loaded;
    println!("\nregistry commit-to-visible latency at {LATENCY_RATE} rows/s for {LATENCY_SECONDS} s:");
    println!(
        "  without enrichment (registry_sync)     p50 {:>6.1} ms  p95 {:>6.1} ms  p99 {:>6.1} ms  ({} rows)",
        ms(&reference, 0.5),
        ms(&reference, 0.95),
        ms(&reference, 0.99),
        reference.len()
    );
    println!(
        "  acra_direct, >= {waiting} jobs waiting    p50 {:>6.1} ms  p95 {:>6.1} ms  p99 {:>6.1} ms  ({} rows)",
        ms(&hist, 0.5),
        ms(&hist, 0.95),
        ms(&hist, 0.99),
        hist.len()
    );
    println!(
        "  p99 ratio to without enrichment         {:.2}   (target: p99 <= 100 ms with >= {} jobs waiting)",
        ms(&hist, 0.99) / ms(&reference, 0.99).max(0.001),
        args.waiting
    );
    Ok(())
}

/// `acraflow run --pipeline <pipeline>` as a child with its own slot and checkpoint, the steady-rate latency
/// measured against it, then SIGTERM.
async fn registry_latency(
    client: &tokio_postgres::Client,
    child: &dyn Fn() -> Result<tokio::process::Command>,
    pipeline: &str,
    prefix: &str,
    sentinel: i64,
) -> Result<hdrhistogram::Histogram<u64>> {
    let mut cmd = child()?;
    if pipeline == "registry_sync" {
        // The reference enriches nothing: without the fixture web's settings it has nothing to warn about.
        let fixture_web_settings = [
            "ENRICH_HOST_SPACING",
            "ENRICH_HTTP_PROXY",
            "ENRICH_POLL_INTERVAL",
            "ENRICH_READER_RATE",
            "ENRICH_SEARCH_RATE",
            "ENRICH_SEARCH_URL",
        ];
        for var in fixture_web_settings {
            cmd.env_remove(var);
        }
    }
    cmd.args(["run", "--pipeline", pipeline])
        .env("ACRA_DIRECT_SLOT", "bench_reference")
        .env("ACRA_DIRECT_CHECKPOINT_KEY", "bench_reference")
        .env("ACRA_DIRECT_START_AFTER_ID", i64::MAX.to_string());
    let mut engine = cmd.kill_on_drop(true).spawn().map_err(|e| Error::io("starting acraflow run", e))?;
    super::wait_for(
        client,
        "select count(*) from pg_replication_slots s join pg_stat_activity a on a.pid = s.active_pid \
         where s.slot_name = 'bench_reference' and a.application_name = 'acraflow-replication'",
        600,
    )
    .await?;
    let hist = super::steady_latency(client, LATENCY_RATE, LATENCY_SECONDS, prefix, sentinel).await?;
    stop_child(&mut engine).await;
    super::wait_for(
        client,
        "select count(*) where not exists \
           (select 1 from pg_stat_activity where application_name = 'acraflow-replication')",
        60,
    )
    .await?;
    // The walsender may take a moment to go after its client.
    for _ in 0..100 {
        if client.execute("select pg_drop_replication_slot('bench_reference')", &[]).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(hist)
}

async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(60), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}
