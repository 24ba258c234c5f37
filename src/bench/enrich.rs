//! `acraflow bench enrich`: the enrich operator's throughput against the bound its politeness allows,
//! measured in the same run.
//!
//! Every company has a healthy fixture site (homepage, about, contact, careers) answering after `latency`;
//! the engine is the real `acraflow backfill --pipeline acra_direct` as a child process, at each
//! concurrency in turn, over `per_slot × concurrency` fresh companies.
//!
//! The bound: a company needs `pages + 1` requests to its host (robots.txt first), one after another, each
//! at least `max(latency, host_spacing)` after the previous one started, so it takes at least
//! `T = pages × max(latency, spacing) + latency`; `concurrency` companies at a time give `concurrency / T`
//! companies/s. The figure reported is the measured rate over that bound (wall clock, start-up and the
//! final stragglers included). The issue's own form, `concurrency / (pages × latency)`, is printed too.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::cli::BenchEnrichArgs;
use crate::error::{Error, ErrorKind, Result};

const DB: &str = "acraflow_bench_enrich";

pub async fn enrich(admin_dsn: &str, args: &BenchEnrichArgs) -> Result<()> {
    let (dsn, client) = super::scratch_database(admin_dsn, DB).await?;
    let total: u64 = args.concurrency.iter().map(|c| (*c as u64 * args.per_slot).max(args.per_slot)).sum();
    let (web, sites) = super::companies_with_sites(&client, total, 5, "BENCH", args.latency).await?;
    let pages = 4u32; // home, about, contact, careers: what the fixture sites have and CRAWL_MAX_PAGES allows
    let step = args.latency.max(args.host_spacing);
    let per_company = step * pages + args.latency;
    println!(
        "fixture web: {} sites, {} ms latency, {pages} pages + robots.txt per company, host spacing {} ms",
        sites,
        args.latency.as_millis(),
        args.host_spacing.as_millis()
    );
    println!(
        "minimum time per company T = {pages} x max(latency, spacing) + latency = {:.2}s\n",
        per_company.as_secs_f64()
    );
    println!(
        "{:>11} {:>9} {:>13} {:>13} {:>7} {:>8} {:>8} {:>8} {:>9} {:>13}",
        "concurrency",
        "companies",
        "companies/s",
        "bound c/T",
        "ratio",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "RSS MB",
        "c/(pages*L)"
    );
    let exe = std::env::current_exe().map_err(|e| Error::io("locating the acraflow binary", e))?;
    let mut after_id = 0i64;
    for &c in &args.concurrency {
        let n = (c as u64 * args.per_slot).max(args.per_slot);
        let started = Instant::now();
        let mut child = tokio::process::Command::new(&exe)
            .args(["backfill", "--pipeline", "acra_direct"])
            .env("POSTGRES_DSN", &dsn)
            .env("RUST_LOG", std::env::var("BENCH_CHILD_LOG").unwrap_or_else(|_| "warn".into()))
            .env("ACRA_DIRECT_CHECKPOINT_KEY", format!("bench_{c}"))
            .env("ACRA_DIRECT_START_AFTER_ID", after_id.to_string())
            .env("ACRA_DIRECT_BATCH_LIMIT", n.to_string())
            .env("ACRA_DIRECT_CONCURRENCY", c.to_string())
            .env("ENRICH_HTTP_PROXY", web.proxy_url())
            .env("ENRICH_SEARCH_URL", web.search_url())
            .env("ENRICH_SEARCH_RATE", "off")
            .env("ENRICH_READER_RATE", "off")
            .env("ENRICH_HOST_SPACING", format!("{}ms", args.host_spacing.as_millis()))
            .env("CRAWL_MAX_PAGES", pages.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| Error::io("running acraflow backfill", e))?;
        let pid = child.id().unwrap_or(0);
        let mut peak_kb = 0u64;
        let status = loop {
            peak_kb = peak_kb.max(vm_hwm_kb(pid));
            tokio::select! {
                s = child.wait() => break s.map_err(|e| Error::io("waiting for acraflow backfill", e))?,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            return Err(Error::new(ErrorKind::Io, format!("acraflow backfill exited with {status}")));
        }
        after_id += n as i64;
        let durations: Vec<i32> = client
            .query(
                "select h.duration_ms from company_enrichment_runs h join enrichment_runs r using (run_id) \
                 where r.checkpoint_key = $1 and h.enriched and h.status = 'ok'",
                &[&format!("bench_{c}")],
            )
            .await
            .map_err(|e| Error::db("reading enrichment durations", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if durations.len() as u64 != n {
            return Err(Error::new(
                ErrorKind::Data,
                format!(
                    "{} of {n} companies were enriched ok at concurrency {c}; the bench needs all",
                    durations.len()
                ),
            ));
        }
        let mut h = Histogram::<u64>::new(3).expect("valid histogram");
        for d in &durations {
            h.record(d.max(&0).to_owned() as u64).map_err(|e| Error::new(ErrorKind::Data, e.to_string()))?;
        }
        let rate = n as f64 / seconds;
        let bound = c as f64 / per_company.as_secs_f64();
        let naive = c as f64 / (pages as f64 * args.latency.as_secs_f64().max(1e-9));
        println!(
            "{c:>11} {n:>9} {rate:>13.2} {bound:>13.2} {:>6.0}% {:>8} {:>8} {:>8} {:>9.1} {naive:>13.1}",
            100.0 * rate / bound,
            h.value_at_quantile(0.50),
            h.value_at_quantile(0.95),
            h.value_at_quantile(0.99),
            peak_kb as f64 / 1024.0
        );
    }
    println!("\ntargets: >= 90% of the bound at every concurrency; peak RSS <= 200 MB at 256");
    Ok(())
}

/// The child's peak resident set so far (VmHWM), 0 once it is gone.
fn vm_hwm_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
