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
use crate::fixture_web::{Fault, FixtureWeb, SiteSpec};

const DB: &str = "acraflow_bench_enrich";

pub async fn enrich(admin_dsn: &str, args: &BenchEnrichArgs) -> Result<()> {
    extraction();
    let (dsn, client) = super::scratch_database(admin_dsn, DB).await?;
    let sweep: u64 = args.concurrency.iter().map(|c| (*c as u64 * args.per_slot).max(args.per_slot)).sum();
    // Then two rounds of PATHOLOGICAL companies at concurrency 16: a control, and one whose first company's
    // homepage is the 2 MB nested page.
    let verify: u64 = VERIFY_ROUNDS.iter().map(|(_, n)| n).sum();
    let total = sweep + 2 * PATHOLOGICAL + verify;
    let deep_at = (sweep + PATHOLOGICAL) as usize;
    let (web, sites) = super::companies_with_sites(&client, total, 5, "BENCH", args.latency, |i, site| {
        if i == deep_at {
            site.fault = Some(Fault::Deep);
        }
    })
    .await?;
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
    let mut after_id = 0i64;
    for &c in &args.concurrency {
        let n = (c as u64 * args.per_slot).max(args.per_slot);
        let r = round(&dsn, &client, &web, args, c, n, after_id, &format!("bench_{c}"), &[]).await?;
        after_id += n as i64;
        if r.durations.len() as u64 != n {
            return Err(Error::new(
                ErrorKind::Data,
                format!(
                    "{} of {n} companies were enriched ok at concurrency {c}; the bench needs all",
                    r.durations.len()
                ),
            ));
        }
        let h = histogram(&r.durations)?;
        let rate = n as f64 / r.seconds;
        let bound = c as f64 / per_company.as_secs_f64();
        let naive = c as f64 / (pages as f64 * args.latency.as_secs_f64().max(1e-9));
        println!(
            "{c:>11} {n:>9} {rate:>13.2} {bound:>13.2} {:>6.0}% {:>8} {:>8} {:>8} {:>9.1} {naive:>13.1}",
            100.0 * rate / bound,
            h.value_at_quantile(0.50),
            h.value_at_quantile(0.95),
            h.value_at_quantile(0.99),
            r.peak_kb as f64 / 1024.0
        );
    }
    println!("\ntargets: >= 90% of the bound at every concurrency; peak RSS <= 200 MB at 256");

    // A pathological page among healthy companies: handled within the company deadline, and the others
    // are not slowed (compared with a control round of the same size measured just before).
    println!("\npathological page (2 MB, 200,000 levels of nesting) among {PATHOLOGICAL} companies at concurrency 16:");
    println!("{:>10} {:>13} {:>8} {:>8} {:>22}", "round", "companies/s", "p50 ms", "p95 ms", "pathological company");
    let mut control_p50 = 0u64;
    for (label, key) in [("control", "bench_control"), ("with page", "bench_deep")] {
        let r = round(&dsn, &client, &web, args, 16, PATHOLOGICAL, after_id, key, &[]).await?;
        after_id += PATHOLOGICAL as i64;
        let deep = client
            .query_opt(
                "select h.status, h.duration_ms from company_enrichment_runs h join companies c using (company_id) \
                 join enrichment_runs r using (run_id) where r.checkpoint_key = $1 and h.enriched and c.uen = $2",
                &[&key, &format!("B{:09}", deep_at as i64 + 1)],
            )
            .await
            .map_err(|e| Error::db("reading the pathological company", e))?
            .map(|row| format!("{} in {} ms", row.get::<_, String>(0), row.get::<_, i32>(1)))
            .unwrap_or_else(|| "-".into());
        let h = histogram(&r.durations)?;
        if label == "control" {
            control_p50 = h.value_at_quantile(0.5).max(1);
        }
        println!(
            "{label:>10} {:>13.2} {:>8} {:>8} {:>22}",
            PATHOLOGICAL as f64 / r.seconds,
            h.value_at_quantile(0.50),
            h.value_at_quantile(0.95),
            if label == "control" { "-".to_owned() } else { deep }
        );
        if label != "control" {
            println!(
                "healthy companies' p50 with the page / without: {:.2} (target <= 1.10; the company deadline is {})",
                h.value_at_quantile(0.5) as f64 / control_p50 as f64,
                humantime::format_duration(crate::config::DEFAULT_COMPANY_TIMEOUT)
            );
        }
    }

    after_id = verification(&dsn, &client, &web, args, per_company, after_id).await?;
    debug_assert_eq!(after_id as u64, total);
    Ok(())
}

const PATHOLOGICAL: u64 = 64;
/// The verify rounds at concurrency 64: (ZEROBOUNCE_BATCH_RATE, companies). ZeroBounce's own limit, where
/// the provider bounds throughput, and a pace at which it keeps up with the crawl.
const VERIFY_ROUNDS: [(&str, u64); 2] = [("5/min", 400), ("30/min", 1024)];

/// Email verification on, against the fixture's ZeroBounce, which refuses a call sooner than the pace: the
/// rate against the smaller of the crawl's bound and the provider's (`BATCH_MAX` emails per call).
async fn verification(
    dsn: &str,
    client: &tokio_postgres::Client,
    web: &FixtureWeb,
    args: &BenchEnrichArgs,
    per_company: Duration,
    mut after_id: i64,
) -> Result<i64> {
    let c = 64usize;
    println!(
        "
email verification at concurrency {c} (validatebatch of {} emails at most):",
        crate::enrichment::leads::BATCH_MAX
    );
    println!(
        "{:>8} {:>9} {:>13} {:>11} {:>14} {:>13} {:>7} {:>6} {:>8}",
        "pace", "companies", "companies/s", "crawl bound", "provider bound", "emails/call", "ratio", "calls", "refused"
    );
    for (pace, n) in VERIFY_ROUNDS {
        let rate = crate::config::parse_rate(pace)
            .map_err(crate::error::Error::config)?
            .unwrap_or(crate::config::DEFAULT_ZEROBOUNCE_BATCH_RATE);
        let interval = rate.interval();
        client
            .batch_execute(
                "delete from provider_pacing; delete from enrichment_usage where kind = 'email_verifications'",
            )
            .await
            .map_err(|e| Error::db("resetting the verification pace", e))?;
        web.set_verify_rate_limit(1, interval.mul_f64(0.9));
        let (calls_before, refused_before) = web.verify_calls();
        let emails_before = web.verified_emails().len();
        let key = format!("bench_verify_{}", pace.replace('/', "_"));
        let env = [
            ("ZEROBOUNCE_API_KEY", "bench".to_owned()),
            ("ZEROBOUNCE_URL", web.zerobounce_url()),
            ("ZEROBOUNCE_BATCH_RATE", pace.to_owned()),
        ];
        let r = round(dsn, client, web, args, c, n, after_id, &key, &env).await?;
        after_id += n as i64;
        let (calls, refused) = web.verify_calls();
        let (calls, refused) = (calls - calls_before, refused - refused_before);
        let emails = web.verified_emails().len() - emails_before;
        let per_call = emails as f64 / calls.max(1) as f64;
        let emails_per_company = emails as f64 / n as f64;
        let crawl_bound = c as f64 / per_company.as_secs_f64();
        let provider_bound =
            crate::enrichment::leads::BATCH_MAX as f64 / emails_per_company.max(1e-9) / interval.as_secs_f64();
        let measured = n as f64 / r.seconds;
        println!(
            "{pace:>8} {n:>9} {measured:>13.2} {crawl_bound:>11.2} {provider_bound:>14.2} {per_call:>13.1} {:>6.0}% {calls:>6} {refused:>8}",
            100.0 * measured / crawl_bound.min(provider_bound)
        );
    }
    println!(
        "targets: no call refused; >= 80% of the smaller bound (a round starts with one call and ends with a \
         partial batch)"
    );
    Ok(after_id)
}

struct Round {
    seconds: f64,
    peak_kb: u64,
    /// Durations of the companies enriched ok.
    durations: Vec<i32>,
}

/// One `acraflow backfill` over the `n` companies after `after_id`, at concurrency `c`.
#[allow(clippy::too_many_arguments)]
async fn round(
    dsn: &str,
    client: &tokio_postgres::Client,
    web: &FixtureWeb,
    args: &BenchEnrichArgs,
    c: usize,
    n: u64,
    after_id: i64,
    key: &str,
    env: &[(&str, String)],
) -> Result<Round> {
    let started = Instant::now();
    let mut child = super::child_on_fixture_web(dsn, web, args.host_spacing)?;
    child.envs(env.iter().map(|(k, v)| (k, v)));
    let mut child = child
        .args(["backfill", "--pipeline", "acra_direct"])
        .env("ACRA_DIRECT_CHECKPOINT_KEY", key)
        .env("ACRA_DIRECT_START_AFTER_ID", after_id.to_string())
        .env("ACRA_DIRECT_BATCH_LIMIT", n.to_string())
        .env("ACRA_DIRECT_CONCURRENCY", c.to_string())
        .env("CRAWL_MAX_PAGES", "4")
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
    let durations: Vec<i32> = client
        .query(
            "select h.duration_ms from company_enrichment_runs h join enrichment_runs r using (run_id) \
             where r.checkpoint_key = $1 and h.enriched and h.status = 'ok'",
            &[&key],
        )
        .await
        .map_err(|e| Error::db("reading enrichment durations", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Round { seconds, peak_kb, durations })
}

fn histogram(durations: &[i32]) -> Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new(3).expect("valid histogram");
    for d in durations {
        h.record((*d).max(0) as u64).map_err(|e| Error::new(ErrorKind::Data, e.to_string()))?;
    }
    Ok(h)
}

/// Extraction CPU per page, in this process: each page kind of a fixture site, against the HTML parse
/// alone (the strongest reference: extraction cannot be cheaper than parsing the page once); then the
/// pathological page, against parses of growing nested pages without the depth limit.
fn extraction() {
    use crate::enrichment::enrich::extract::{page, PageKind};
    use crate::fixture_web::{pages, SiteKind};
    let mut site = SiteSpec::new("www.acmelogistics.com.sg", "ACME LOGISTICS PTE. LTD.", Some("199801234K"));
    let url = url::Url::parse("http://www.acmelogistics.com.sg/").expect("a valid url");
    println!("extraction CPU per page (this process, one core):");
    println!("{:>18} {:>8} {:>11} {:>11} {:>7}", "page", "KB", "extract us", "parse us", "ratio");
    let time = |f: &dyn Fn()| {
        f(); // warm: compiled regexes and selectors
        let runs = 200;
        let started = Instant::now();
        for _ in 0..runs {
            f();
        }
        started.elapsed().as_secs_f64() * 1e6 / runs as f64
    };
    for (label, kind) in
        [("plain", SiteKind::Plain), ("json-ld", SiteKind::JsonLd), ("cloudflare", SiteKind::CloudflareEmail)]
    {
        site.kind = kind;
        for (name, html) in
            [("home", pages::home(&site)), ("contact", pages::contact(&site)), ("careers", pages::careers(&site))]
        {
            let extract = time(&|| {
                std::hint::black_box(page(&html, &url, PageKind::Home));
            });
            let parse = time(&|| {
                std::hint::black_box(scraper::Html::parse_document(&html));
            });
            println!(
                "{:>18} {:>8.1} {extract:>11.0} {parse:>11.0} {:>7.2}",
                format!("{label} {name}"),
                html.len() as f64 / 1024.0,
                extract / parse
            );
        }
    }
    site.kind = SiteKind::Plain;
    let deep = pages::deep(&site);
    let started = Instant::now();
    let x = page(&deep, &url, PageKind::Home);
    let ours = started.elapsed();
    println!(
        "pathological page, {:.1} MB of nesting: extracted in {:.3} s (the name found: {})",
        deep.len() as f64 / 1_048_576.0,
        ours.as_secs_f64(),
        x.visible.contains("ACME LOGISTICS")
    );
    // The reference: the same nesting parsed and walked without the depth limit, as extraction did before,
    // at growing sizes until one takes more than 5 s (it grows with the square of the depth).
    print!("without the depth limit:");
    for kb in [16usize, 32, 64, 128, 256, 512] {
        let page = format!("<html><body>{}", "<div><b>x".repeat(kb * 1024 / 9));
        let started = Instant::now();
        let doc = scraper::Html::parse_document(&page);
        let steps: usize = doc
            .tree
            .nodes()
            .filter(|n| matches!(n.value(), scraper::Node::Text(_)))
            .map(|n| n.ancestors().count())
            .sum();
        std::hint::black_box(steps);
        let took = started.elapsed();
        let started = Instant::now();
        std::hint::black_box(page_fn(&page, &url));
        print!(" {kb} KB {:.2} s (with the limit {:.3} s);", took.as_secs_f64(), started.elapsed().as_secs_f64());
        if took > Duration::from_secs(5) {
            break;
        }
    }
    println!("\n");
}

fn page_fn(html: &str, url: &url::Url) -> crate::enrichment::enrich::extract::Extracted {
    crate::enrichment::enrich::extract::page(html, url, crate::enrichment::enrich::extract::PageKind::Home)
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
