//! The full pipeline (acra_direct: filter -> dedupe -> upsert -> enrich -> sink) against the fixture web,
//! checked from the tables a user reads and from the web server's own request log.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use acraflow::config::{EnrichOverrides, Overrides, PipelineSpec};
use acraflow::enrichment::enrich::discover::name_tokens;
use acraflow::enrichment::enrich::http::{FetchError, Http, HttpSettings, RobotsCache};
use acraflow::fixture_web::{realistic_sites, Fault, FixtureWeb, SiteSpec};
use acraflow::pipeline::{Mode, RunSummary};

use crate::support::{wait_until, TestDb};

/// Settings pointing the enricher at the fixture web, with test-sized timeouts and spacing. A failing site
/// fails its company at once (no retry: `queue` tests cover retries), so a backfill ends with every
/// company's outcome recorded.
pub(crate) fn web_overrides(web: &FixtureWeb, concurrency: usize) -> EnrichOverrides {
    EnrichOverrides {
        max_attempts: Some(1),
        concurrency: Some(concurrency),
        proxy: Some(web.proxy_url()),
        search_url: Some(web.search_url()),
        reader_url: Some(web.reader_url()),
        llm_base_url: Some(web.llm_url()),
        host_spacing: Some(Duration::from_millis(200)),
        timeout_s: Some(1.0),
        search_rate: Some(None),
        reader_rate: Some(None),
        ..Default::default()
    }
}

async fn run_acra_direct(db: &TestDb, overrides: Overrides) -> acraflow::Result<RunSummary> {
    let mut spec = PipelineSpec::acra_direct();
    spec.apply(&overrides);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    acraflow::pipeline::run(&db.dsn, &spec, Mode::Backfill, rx).await
}

/// Staging rows all live (so every company is eligible), and the companies as (name, uen).
pub(crate) async fn live_companies(db: &TestDb, rows: u64) -> Vec<(String, Option<String>)> {
    db.seed(rows, 11).await;
    db.client
        .batch_execute(
            "update staging_acra_companies set entity_status_description = 'Live Company', \
             registration_incorporation_date = '2015-06-01'",
        )
        .await
        .unwrap();
    db.client
        .query("select distinct on (upper(btrim(uen))) btrim(entity_name), upper(btrim(uen)) from staging_acra_companies order by upper(btrim(uen)), id desc", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// New live staging rows, as the ACRA ingester would write them (while a stream runs, they are streamed).
pub(crate) async fn insert_live_rows(db: &TestDb, companies: &[(String, Option<String>)]) {
    for (name, uen) in companies {
        db.client
            .execute(
                "insert into staging_acra_companies (uen, entity_name, entity_status_description, \
                   registration_incorporation_date) values ($1, $2, 'Live Company', '2016-03-01')",
                &[uen, name],
            )
            .await
            .unwrap();
    }
}

struct Row {
    name: String,
    status: String,
    error: Option<String>,
    domain: Option<String>,
    emails: Vec<String>,
    phones: Vec<String>,
    jobs: Option<i32>,
    linkedin: Option<String>,
    employees: Option<i32>,
    hq_city: Option<String>,
}

/// The latest enrichment per company UEN, as stored.
async fn enrichments(db: &TestDb) -> HashMap<String, Row> {
    let rows = db
        .client
        .query(
            "select c.uen, h.status, h.error, c.website_domain, h.public_emails, h.phones, h.jobs_count, \
               c.linkedin_url, c.employees_est, c.hq_city, c.name \
             from company_enrichment_runs h join companies c using (company_id) where h.enriched",
            &[],
        )
        .await
        .unwrap();
    let list = |v: Option<serde_json::Value>| -> Vec<String> {
        v.and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default()
    };
    rows.iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                Row {
                    name: r.get(10),
                    status: r.get(1),
                    error: r.get(2),
                    domain: r.get(3),
                    emails: list(r.get(4)),
                    phones: list(r.get(5)),
                    jobs: r.get(6),
                    linkedin: r.get(7),
                    employees: r.get(8),
                    hq_city: r.get(9),
                },
            )
        })
        .collect()
}

/// The company's own site: the one printing its UEN. (A namesake's site is someone else's.)
fn site_for<'a>(sites: &'a [SiteSpec], uen: &str) -> Option<&'a SiteSpec> {
    sites.iter().find(|s| s.uen.as_deref() == Some(uen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acra_direct_enriches_200_companies_politely_and_once() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 240).await;
    let sites = realistic_sites(&companies);
    let web = FixtureWeb::start(sites.clone(), Duration::ZERO).await.unwrap();
    let overrides = Overrides { enrich: web_overrides(&web, 24), ..Default::default() };

    let s = run_acra_direct(&db, overrides.clone()).await.unwrap();
    assert!(s.counters.processed >= 200, "{:?}", s.counters);

    let stored = enrichments(&db).await;
    // Exactly one history row per enrichment, one enrichment per processed company.
    assert!(stored.len() >= 200);
    assert_eq!(
        db.count("select count(*) from company_enrichment_runs where enriched").await as u64,
        s.counters.processed
    );
    assert_eq!(
        db.count("select count(distinct company_id) from company_enrichment_runs").await as u64,
        s.counters.processed
    );

    // Domains: found for the companies whose site can be read; never for a company without one (a
    // namesake's site prints another UEN: it is someone else's).
    let with_site: Vec<(&String, &SiteSpec)> =
        stored.keys().filter_map(|uen| site_for(&sites, uen).map(|s| (uen, s))).collect();
    let reachable: Vec<&(&String, &SiteSpec)> =
        with_site.iter().filter(|(_, s)| s.fault.is_none() && !s.robots_disallow).collect();
    let found = reachable.iter().filter(|(u, s)| stored[*u].domain.as_deref() == Some(&s.domain())).count();
    assert!(reachable.len() >= 150, "{} companies with reachable sites", reachable.len());
    assert!(found * 100 >= reachable.len() * 97, "domain found for {found} of {}", reachable.len());
    for (uen, row) in &stored {
        if site_for(&sites, uen).is_none() {
            assert_eq!((row.status.as_str(), row.domain.as_deref()), ("degraded", None), "{}", row.name);
            assert!(row.error.as_deref().unwrap_or("").starts_with("no website"), "{}: {:?}", row.name, row.error);
        }
    }

    // Fields persisted for healthy sites match what the site says.
    for (uen, site) in &reachable {
        let row = &stored[*uen];
        let name = &row.name;
        let want = site.expected();
        assert_eq!(row.status, "ok", "{name}: {:?}", row.error);
        for e in &want.emails {
            assert!(row.emails.contains(e), "{name}: {e} not in {:?}", row.emails);
        }
        assert!(row.phones.contains(&want.phone), "{name}: {} not in {:?}", want.phone, row.phones);
        assert_eq!(row.jobs, Some(want.jobs), "{name}");
        assert_eq!(row.linkedin.as_deref(), Some(want.linkedin_url.as_str()), "{name}");
        assert_eq!(row.hq_city.as_deref(), Some("Singapore"), "{name}");
        assert!(row.employees.is_some(), "{name}: the LLM's estimate is stored");
    }

    // robots.txt: a disallowing site is asked for robots.txt and nothing else.
    let hits = web.hits();
    let disallowed: Vec<&SiteSpec> = sites.iter().filter(|s| s.robots_disallow).collect();
    assert!(!disallowed.is_empty());
    for site in &disallowed {
        let paths: Vec<&str> = hits.iter().filter(|h| h.host == site.host).map(|h| h.path.as_str()).collect();
        assert!(paths.iter().all(|p| *p == "/robots.txt"), "{}: {paths:?}", site.host);
        if let Some(row) = stored.get(site.uen.as_deref().unwrap_or("")) {
            assert_eq!(row.status, "degraded");
            assert!(row.error.as_deref().unwrap_or("").contains("robots.txt disallows"), "{:?}", row.error);
        }
    }
    // Spacing: consecutive requests to one host are 200 ms apart as the client sends them. The server sees
    // them through connection set-up and scheduling jitter on a busy 2-core machine (the other tests run
    // alongside), hence the margin on each pair and the median held to the full spacing; without spacing
    // they would arrive within a few milliseconds of each other.
    let mut gaps = Vec::new();
    let mut by_host: HashMap<&str, Vec<Instant>> = HashMap::new();
    for h in &hits {
        by_host.entry(h.host.as_str()).or_default().push(h.at);
    }
    let mut pairs = 0;
    for (host, mut times) in by_host {
        if host.starts_with("127.0.0.1") {
            continue;
        }
        times.sort();
        for w in times.windows(2) {
            pairs += 1;
            gaps.push(w[1] - w[0]);
            assert!(w[1] - w[0] >= Duration::from_millis(100), "{host}: requests {:?} apart", w[1] - w[0]);
        }
    }
    assert!(pairs > 500, "only {pairs} same-host request pairs");
    gaps.sort();
    assert!(gaps[gaps.len() / 2] >= Duration::from_millis(200), "median gap {:?}", gaps[gaps.len() / 2]);
    // A site answering 500 fails its company, with the cause; the run goes on.
    for site in sites.iter().filter(|s| s.fault == Some(Fault::ServerError)) {
        if let Some(row) = stored.get(site.uen.as_deref().unwrap_or("")) {
            assert_eq!(row.status, "failed");
            assert!(row.error.as_deref().unwrap_or("").contains("HTTP 500"), "{:?}", row.error);
        }
    }
    assert_eq!(
        s.counters.failed as i64,
        db.count("select count(*) from company_enrichment_runs where status = 'failed'").await
    );

    // A second pass over the same rows skips the recently enriched companies: no new requests, no new rows.
    let before = web.hits().len();
    let again = run_acra_direct(
        &db,
        Overrides { start_after_id: Some(0), checkpoint_key: Some("again".into()), ..overrides.clone() },
    )
    .await
    .unwrap();
    assert_eq!(again.counters.processed, 0, "{:?}", again.counters);
    assert_eq!(again.counters.skipped, s.counters.processed);
    assert_eq!(web.hits().len(), before, "the second pass fetched nothing");
    assert_eq!(
        db.count("select count(*) from company_enrichment_runs where enriched").await as u64,
        s.counters.processed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_ends_in_bounded_time_with_the_right_status() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 40).await;
    // One site per fault, then healthy ones.
    let mut faults: Vec<Option<Fault>> = Fault::ALL.iter().copied().map(Some).collect();
    faults.push(Some(Fault::SlowBody(Duration::from_millis(300)))); // 3 s body, 1 s timeout
    let mut sites = Vec::new();
    let mut expect: HashMap<String, (Option<Fault>, &str, &str)> = HashMap::new();
    for ((name, uen), fault) in companies.iter().zip(faults.iter().chain(std::iter::repeat(&None))) {
        let host = format!("{}.com.sg", name_tokens(name).join("-"));
        if name_tokens(name).is_empty() || sites.iter().any(|s: &SiteSpec| s.host == host) {
            continue;
        }
        let mut site = SiteSpec::new(&host, name, uen.as_deref());
        site.fault = *fault;
        let too_slow = Some(Fault::SlowBody(Duration::from_millis(300)));
        let (status, error) = match fault {
            f if *f == too_slow => ("failed", "timed out"),
            None | Some(Fault::SlowBody(_)) => ("ok", ""),
            Some(Fault::Hang) => ("failed", "timed out"),
            Some(Fault::ServerError) => ("failed", "HTTP 500"),
            Some(Fault::RateLimited(_)) | Some(Fault::Huge) | Some(Fault::InvalidUtf8) | Some(Fault::Deep) => {
                ("ok", "")
            }
            Some(Fault::RedirectLoop) => ("failed", "more than 5 redirects"),
            Some(Fault::RedirectToPrivate) => ("failed", "refused to fetch http://169.254.169.254/"),
            Some(Fault::Forbidden) => ("degraded", "read through ENRICH_READER_URL"),
            Some(Fault::NotHtml) => ("failed", "not HTML (application/pdf)"),
        };
        expect.insert(uen.clone().unwrap_or_default(), (*fault, status, error));
        sites.push(site);
    }
    let web = FixtureWeb::start(sites.clone(), Duration::ZERO).await.unwrap();
    web.set_llm_failing(true);
    let mut enrich = web_overrides(&web, 16);
    enrich.host_spacing = Some(Duration::from_millis(50));

    let started = Instant::now();
    let s = run_acra_direct(&db, Overrides { enrich, ..Default::default() }).await.unwrap();
    // Worst case per company: robots.txt and a page, each 3 attempts of 1 s plus backoff.
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());

    let stored = enrichments(&db).await;
    for (uen, (fault, status, error)) in &expect {
        let row = stored.get(uen).unwrap_or_else(|| panic!("{uen} ({fault:?}) has no history row"));
        let name = &row.name;
        // The LLM is failing throughout: healthy sites are degraded by it, never failed.
        let want = if *status == "ok" { "degraded" } else { status };
        assert_eq!(row.status, want, "{name} ({fault:?}): {:?}", row.error);
        let got = row.error.as_deref().unwrap_or("");
        assert!(got.contains(error), "{name} ({fault:?}): error {got:?} lacks {error:?}");
        if *status == "ok" {
            assert!(got.contains("llm: HTTP 500"), "{name}: {got:?}");
            assert!(!row.emails.is_empty(), "{name} ({fault:?}): emails still extracted");
        }
    }
    assert_eq!(s.counters.failed, expect.values().filter(|e| e.1 == "failed").count() as u64);

    // 429 with Retry-After: 1 was waited out, then the same path succeeded.
    let limited = sites.iter().find(|s| s.fault == Some(Fault::RateLimited(1))).unwrap();
    let hits: Vec<_> = web.hits().into_iter().filter(|h| h.host == limited.host && h.path == "/robots.txt").collect();
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert_eq!(hits[0].status, 429);
    assert_ne!(hits[1].status, 429);
    assert!(hits[1].at - hits[0].at >= Duration::from_millis(950), "Retry-After honoured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crawler_refuses_private_addresses_unless_allowed() {
    let web = FixtureWeb::start(Vec::new(), Duration::ZERO).await.unwrap();
    let settings = |allow_private: bool| HttpSettings {
        user_agent: "acraflow-test".into(),
        timeout: Duration::from_secs(2),
        host_spacing: Duration::from_millis(1),
        max_bytes: 1 << 20,
        max_redirects: 5,
        attempts: 1,
        allow_private,
        proxy: None,
        max_retry_after: Duration::from_secs(1),
        backoff: Duration::from_millis(10),
    };
    let guarded = Http::new(settings(false)).unwrap();
    let port = web.addr().port();
    for url in [
        format!("http://127.0.0.1:{port}/search?q=x"),
        format!("http://localhost:{port}/"),
        "http://169.254.169.254/latest/meta-data/".into(),
        "http://10.0.0.1/".into(),
        "http://[::1]/".into(),
        "file:///etc/passwd".into(),
    ] {
        let got = guarded.page(&url.parse().unwrap(), &mut RobotsCache::default()).await;
        assert!(matches!(got, Err(FetchError::Refused(_))), "{url}: {got:?}");
    }
    assert!(web.hits().is_empty(), "nothing reached the server");
    // The same fetch is allowed with ENRICH_ALLOW_PRIVATE: the guard, not the network, refused it.
    let open = Http::new(settings(true)).unwrap();
    let page =
        open.page(&format!("http://127.0.0.1:{port}/search?q=x").parse().unwrap(), &mut RobotsCache::default()).await;
    assert!(page.unwrap().body.contains("serp__results"));

    // End to end: a company whose known website is a loopback address fails with the refusal, and the
    // pipeline goes on.
    let db = TestDb::new().await;
    let companies = live_companies(&db, 1).await;
    let (name, uen) = companies.iter().find(|c| c.1.is_some()).expect("a company with a uen");
    db.client
        .execute(
            "insert into companies (uen, name, website_domain) values ($1, $2, $3)",
            &[uen, name, &format!("http://127.0.0.1:{port}/")],
        )
        .await
        .unwrap();
    let enrich = EnrichOverrides {
        search_url: Some(web.search_url()),
        timeout_s: Some(1.0),
        search_rate: Some(None),
        ..Default::default()
    };
    let s = run_acra_direct(&db, Overrides { enrich, ..Default::default() }).await.unwrap();
    assert!(s.counters.processed >= 1);
    let stored = enrichments(&db).await;
    let row = &stored[uen.as_deref().unwrap()];
    assert_eq!(row.status, "failed");
    assert!(row.error.as_deref().unwrap().contains("private, loopback or link-local"), "{:?}", row.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_cap_holds_across_runs_and_leaves_the_rest_queued() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 30).await;
    let web = FixtureWeb::start(realistic_sites(&companies), Duration::ZERO).await.unwrap();
    let mut enrich = web_overrides(&web, 4);
    enrich.daily_cap = Some(5);
    enrich.llm_base_url = None;
    let overrides = Overrides { batch_size: Some(7), enrich, ..Default::default() };
    let s = run_acra_direct(&db, overrides.clone()).await.unwrap();
    // The registry side is not held back by the cap: every company is current and has its job.
    let companies = db.count("select count(*) from companies").await;
    assert_eq!(s.counters.processed as i64, companies, "{:?}", s.counters);
    assert_eq!(
        db.count("select last_id from service_progress where key = 'acra_direct'").await,
        db.count("select max(id) from staging_acra_companies").await,
        "the checkpoint is at the end of staging"
    );
    assert_eq!(db.count("select count(*) from company_enrichment_runs where enriched").await, 5);
    let x = s.enrichment.as_ref().expect("an enriching run reports its enrichments");
    assert!(x.capped, "{x:?}");
    // The rest wait in the queue for tomorrow, each company once.
    assert_eq!(db.count("select count(*) from enrichment_jobs where state = 'pending'").await, companies - 5);
    // Same day, across a restart: the cap still holds.
    let again = run_acra_direct(&db, overrides).await.unwrap();
    assert_eq!(again.enrichment.map(|x| x.ok + x.degraded + x.failed), Some(0));
    assert_eq!(db.count("select count(*) from company_enrichment_runs where enriched").await, 5);
    assert_eq!(db.count("select used from enrichment_usage where kind = 'enrichments'").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_enrichment_leaves_no_duplicate_history() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 120).await;
    let sites = realistic_sites(&companies);
    let web = FixtureWeb::start(sites, Duration::from_millis(30)).await.unwrap();
    let proxy = web.proxy_url();
    let search = web.search_url();
    let env = [
        ("ACRA_DIRECT_PIPELINE", "acra_direct"),
        ("ACRA_DIRECT_CONCURRENCY", "8"),
        ("ACRA_DIRECT_BATCH_SIZE", "25"),
        ("ENRICH_HTTP_PROXY", proxy.as_str()),
        ("ENRICH_SEARCH_URL", search.as_str()),
        ("ENRICH_SEARCH_RATE", "off"),
        ("ENRICH_HOST_SPACING", "100ms"),
        ("CRAWLER_TIMEOUT_S", "1"),
        ("ENRICH_MAX_ATTEMPTS", "1"),
        // The killed process's leases return to the queue after this.
        ("ENRICH_LEASE", "3s"),
    ];
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_acraflow"));
    cmd.arg("backfill").env("POSTGRES_DSN", &db.dsn).env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let some = wait_until(Duration::from_secs(60), || async {
        db.count("select count(*) from company_enrichment_runs where enriched").await >= 20
    })
    .await;
    assert!(some, "enrichment did not start");
    child.kill().unwrap(); // SIGKILL: in-flight companies are lost mid-crawl
    child.wait().unwrap();
    let before = db.count("select count(*) from company_enrichment_runs where enriched").await;
    assert!(before < 100, "killed too late to test anything ({before})");

    let out = db.cli(&["backfill"], &env).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let eligible = db.count("select count(*) from companies").await;
    assert_eq!(db.count("select count(*) from company_enrichment_runs where enriched").await, eligible);
    assert_eq!(
        db.count("select count(distinct company_id) from company_enrichment_runs where enriched").await,
        eligible
    );
    // Registry history rows are one per source position; enrichment rows one per job.
    assert_eq!(db.count("select count(*) from (select source_lsn, source_seq from company_enrichment_runs where source_lsn is not null group by 1, 2 having count(*) > 1) d").await, 0);
    assert_eq!(db.count("select count(*) from (select job_id from company_enrichment_runs where enriched group by 1 having count(*) > 1) d").await, 0);
    assert_eq!(
        db.count("select count(*) from enrichment_jobs where state = 'pending'").await,
        0,
        "no job left waiting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acraflow_run_enriches_new_staging_rows_as_they_stream_in() {
    let db = TestDb::new().await;
    let names = ["HARBOURFRONT PRECISION PTE. LTD.", "KALLANG RIVER FOODS PTE. LTD.", "ORCHID BAY STUDIO PTE. LTD."];
    let companies: Vec<(String, Option<String>)> =
        names.iter().enumerate().map(|(i, n)| (n.to_string(), Some(format!("20240000{i}K")))).collect();
    let sites: Vec<SiteSpec> = companies
        .iter()
        .map(|(n, u)| SiteSpec::new(&format!("www.{}.com.sg", name_tokens(n).join("")), n, u.as_deref()))
        .collect();
    let web = FixtureWeb::start(sites.clone(), Duration::ZERO).await.unwrap();
    let overrides = Overrides { enrich: web_overrides(&web, 4), ..db.stream_overrides() };
    let engine = db.start_engine_with(PipelineSpec::acra_direct(), overrides);
    db.wait_streaming(Duration::from_secs(30)).await;

    insert_live_rows(&db, &companies).await;
    let all = wait_until(Duration::from_secs(30), || async {
        db.count("select count(*) from company_enrichment_runs where enriched").await == 3
    })
    .await;
    assert!(all, "the streamed companies were not enriched");
    db.wait_caught_up(Duration::from_secs(30)).await;
    let summary = engine.stop().await;
    assert_eq!(summary.counters.processed, 3);

    let stored = enrichments(&db).await;
    for site in &sites {
        let row = &stored[site.uen.as_deref().unwrap()];
        assert_eq!(row.status, "ok", "{:?}", row.error);
        assert_eq!(row.domain.as_deref(), Some(site.domain().as_str()));
        assert_eq!(row.linkedin.as_deref(), Some(site.expected().linkedin_url.as_str()));
    }
    // The stream's checkpoint is a position in the WAL, committed with the enrichments.
    assert_eq!(db.count("select count(*) from service_progress where key = 'acra_direct' and cursor = 'lsn'").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn companies_the_registry_pipeline_processed_are_still_enriched() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 20).await;
    let web = FixtureWeb::start(realistic_sites(&companies), Duration::ZERO).await.unwrap();
    let registry = db.run(Overrides::default()).await;
    assert!(registry.counters.processed > 0);
    // Registry-only history rows do not count as enrichment: a replay with acra_direct enriches them all.
    let enrich = EnrichOverrides { llm_base_url: None, ..web_overrides(&web, 8) };
    let s = run_acra_direct(&db, Overrides { start_after_id: Some(0), enrich, ..Default::default() }).await.unwrap();
    assert_eq!(s.counters.processed, registry.counters.processed);
    assert_eq!(
        db.count("select count(*) from company_enrichment_runs where enriched").await as u64,
        registry.counters.processed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_never_reach_logs_or_stored_errors() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 15).await;
    let web = FixtureWeb::start(realistic_sites(&companies), Duration::ZERO).await.unwrap();
    web.set_llm_failing(true);
    let (proxy, search, llm) = (web.proxy_url(), web.search_url(), format!("http://user:pw-in-url@{}", web.addr()));
    let secret = "sk-test-5ecret-key-0042";
    let out = db
        .cli(
            &["backfill", "--pipeline", "acra_direct"],
            &[
                ("RUST_LOG", "debug"),
                ("ACRA_DIRECT_CONCURRENCY", "8"),
                ("ENRICH_HTTP_PROXY", proxy.as_str()),
                ("ENRICH_SEARCH_URL", search.as_str()),
                ("ENRICH_SEARCH_RATE", "off"),
                ("ENRICH_HOST_SPACING", "50ms"),
                ("LLM_BASE_URL", llm.as_str()),
                ("LLM_API_KEY", secret),
                ("APIFY_TOKEN", secret),
            ],
        )
        .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(web.llm_calls() > 0, "the LLM was called (and failed)");
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("llm: HTTP 500"), "the failure is logged");
    for needle in [secret, "pw-in-url"] {
        assert!(!logs.contains(needle), "{needle} appears in the logs");
        let stored = db
            .count(&format!(
                "select count(*) from company_enrichment_runs where error like '%{needle}%' or corpus like '%{needle}%'"
            ))
            .await;
        assert_eq!(stored, 0, "{needle} stored in an error");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_llm_token_cap_and_the_contacts_budget_hold_and_contacts_are_stored() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 12).await;
    let web = FixtureWeb::start(realistic_sites(&companies), Duration::ZERO).await.unwrap();
    let mut enrich = web_overrides(&web, 4);
    enrich.llm_daily_tokens = Some(1); // less than any call needs
    enrich.contacts = Some(true);
    enrich.contacts_url = Some(web.contacts_url());
    // The contacts provider's budget: 5 lookups today, 20 a second across workers (its limit: 25).
    enrich.contacts_daily_cap = Some(5);
    enrich.contacts_rate = Some(acraflow::config::parse_rate("20/s").unwrap());
    web.set_contacts_rate_limit(25, Duration::from_secs(1));
    let s = run_acra_direct(&db, Overrides { enrich, ..Default::default() }).await.unwrap();
    assert!(s.counters.processed > 0);
    assert_eq!(web.llm_calls(), 0, "no call over the daily token cap");
    let capped = db
        .count("select count(*) from company_enrichment_runs where error like '%OPENAI_DAILY_TOKENS_CAP reached%'")
        .await;
    // Every company whose site was read reached the LLM stage, and was refused by the cap.
    let pages = db.count("select count(*) from company_enrichment_runs where pages_fetched > 0").await;
    assert!(pages > 0);
    assert_eq!(capped, pages);
    // The contacts endpoint's people (two each from the fixture), for the first five companies: the rest
    // are enriched without contacts, and say why.
    assert!(pages > 5, "{pages}");
    assert_eq!(db.count("select count(*) from contacts").await, 2 * 5);
    assert_eq!(db.count("select count(distinct company_id) from contacts").await, 5);
    assert_eq!(web.contacts_calls(), (5, 0), "lookups made, and refused for coming too fast");
    assert_eq!(db.count("select used from enrichment_usage where kind = 'contact_lookups'").await, 5);
    assert_eq!(
        db.count("select count(*) from company_enrichment_runs where error like '%APIFY_MAX_LOOKUPS reached%'").await,
        pages - 5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_daily_cap_a_stream_leaves_jobs_queued_and_keeps_the_registry_fresh() {
    let db = TestDb::new().await;
    let companies: Vec<(String, Option<String>)> = (0..4)
        .map(|i| {
            (format!("CAPPED STREAM {} PTE. LTD.", ["ONE", "TWO", "THREE", "FOUR"][i]), Some(format!("20250000{i}C")))
        })
        .collect();
    let web = FixtureWeb::start(realistic_sites(&companies), Duration::ZERO).await.unwrap();
    let mut enrich = web_overrides(&web, 2);
    enrich.daily_cap = Some(2);
    let engine = db.start_engine_with(PipelineSpec::acra_direct(), Overrides { enrich, ..db.stream_overrides() });
    db.wait_streaming(Duration::from_secs(30)).await;
    insert_live_rows(&db, &companies).await;
    db.wait_caught_up(Duration::from_secs(60)).await;
    let two = wait_until(Duration::from_secs(30), || async {
        db.count("select count(*) from company_enrichment_runs where enriched").await == 2
    })
    .await;
    assert!(two, "the worker did not enrich up to the cap");
    let summary = engine.stop().await;
    // Two enriched; the other two companies exist and are current, and their jobs wait in the queue for
    // the next UTC day.
    assert_eq!(db.count("select count(*) from company_enrichment_runs where enriched").await, 2);
    assert_eq!(db.count("select count(*) from enrichment_jobs where state = 'pending'").await, 2);
    assert_eq!(db.count("select count(*) from companies where status = 'Live Company'").await, 4);
    assert_eq!(summary.counters.processed, 4, "{:?}", summary.counters);
    assert!(summary.enrichment.is_some_and(|x| x.capped && x.ok + x.degraded == 2));
}

/// With enrichment, several streamed transactions can complete inside one batch the operator hands on.
/// The slot must still learn that all of them are committed: afterwards, WAL written elsewhere (the slot
/// is idle) is acknowledged, so the slot does not pin it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_streamed_enrichments_an_idle_slot_still_advances() {
    let db = TestDb::new().await;
    let companies: Vec<(String, Option<String>)> = (0..12)
        .map(|i| {
            (
                format!(
                    "{} MARINA SUPPLIES PTE. LTD.",
                    ["NORTH", "SOUTH", "EAST", "WEST"][i % 4].to_owned() + &"I".repeat(i / 4 + 1)
                ),
                Some(format!("20210{i:04}M")),
            )
        })
        .collect();
    // The first company's site is slow, so the others finish behind it and leave the operator together.
    let sites: Vec<SiteSpec> = companies
        .iter()
        .enumerate()
        .map(|(i, (n, u))| {
            let mut site = SiteSpec::new(&format!("www.{}.com.sg", name_tokens(n).join("")), n, u.as_deref());
            if i == 0 {
                site.fault = Some(Fault::SlowBody(Duration::from_millis(300)));
            }
            site
        })
        .collect();
    let web = FixtureWeb::start(sites, Duration::ZERO).await.unwrap();
    let overrides = Overrides { enrich: web_overrides(&web, 12), ..db.stream_overrides() };
    let engine = db.start_engine_with(PipelineSpec::acra_direct(), overrides);
    db.wait_streaming(Duration::from_secs(30)).await;
    // One transaction per company, each a source batch of its own (a batch is cut after 20 ms).
    for company in &companies {
        insert_live_rows(&db, std::slice::from_ref(company)).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let all = wait_until(Duration::from_secs(60), || async {
        db.count("select count(*) from company_enrichment_runs where enriched").await == companies.len() as i64
    })
    .await;
    assert!(all, "the streamed companies were not all enriched");
    db.client
        .batch_execute("create table other_table (x int, pad text); insert into other_table select g, repeat('x', 200) from generate_series(1, 50000) g")
        .await
        .unwrap();
    db.wait_caught_up(Duration::from_secs(30)).await;
    engine.stop().await;
}

/// Precision and recall of one field over (company, value) pairs.
#[derive(Default)]
struct Score {
    stored: usize,
    right: usize,
    truth: usize,
    found: usize,
}

impl Score {
    fn add(&mut self, stored: &[String], truth: &[String]) {
        self.stored += stored.len();
        self.right += stored.iter().filter(|s| truth.contains(s)).count();
        self.truth += truth.len();
        self.found += truth.iter().filter(|t| stored.contains(t)).count();
    }
    fn precision(&self) -> f64 {
        if self.stored == 0 {
            1.0
        } else {
            self.right as f64 / self.stored as f64
        }
    }
    fn recall(&self) -> f64 {
        if self.truth == 0 {
            1.0
        } else {
            self.found as f64 / self.truth as f64
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_realistic_web_every_domain_is_verified_and_every_field_is_precise() {
    use acraflow::fixture_web::trust::{trust_web, Registered, CASES};
    let db = TestDb::new().await;
    live_companies(&db, 900).await;
    let registered: Vec<Registered> = db
        .client
        .query(
            "select distinct on (upper(btrim(uen))) btrim(entity_name), upper(btrim(uen)), postal_code, street_name \
             from staging_acra_companies order by upper(btrim(uen)), id desc",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Registered { name: r.get(0), uen: r.get(1), postal: r.get(2), street: r.get(3) })
        .collect();
    let (sites, mut truth) = trust_web(&registered);
    truth.truncate(CASES.len() * 10);
    assert_eq!(truth.len(), 180, "enough distinct names for 10 companies per case");
    let uens: Vec<String> = truth.iter().map(|t| t.uen.clone()).collect();
    db.client.execute("delete from staging_acra_companies where upper(btrim(uen)) <> all($1)", &[&uens]).await.unwrap();
    let web = FixtureWeb::start(sites, Duration::ZERO).await.unwrap();
    let mut enrich = web_overrides(&web, 24);
    enrich.llm_base_url = None;
    enrich.host_spacing = Some(Duration::from_millis(200));
    let s = run_acra_direct(&db, Overrides { enrich, ..Default::default() }).await.unwrap();
    assert_eq!(s.counters.processed, 180, "{:?}", s.counters);

    let rows = db
        .client
        .query(
            "select c.uen, c.website_domain, c.domain_confidence, c.domain_evidence, c.linkedin_url, \
               c.hq_postal_code, h.public_emails, h.phones, h.status, h.error \
             from companies c join company_enrichment_runs h using (company_id) where h.enriched",
            &[],
        )
        .await
        .unwrap();
    let list = |v: Option<serde_json::Value>| -> Vec<String> {
        v.and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default()
    };
    let by_uen: HashMap<String, &tokio_postgres::Row> = rows.iter().map(|r| (r.get(0), r)).collect();
    let (mut domain, mut email, mut phone, mut linkedin, mut hq) =
        (Score::default(), Score::default(), Score::default(), Score::default(), Score::default());
    let mut per_case: HashMap<&str, (usize, usize)> = HashMap::new();
    // Each case's own fields: every format must be read, not only most of them overall.
    let mut case_fields: HashMap<(&str, &str), Score> = HashMap::new();
    let mut misses = Vec::new();
    for t in &truth {
        let r = by_uen[&t.uen];
        let got_domain: Option<String> = r.get(1);
        let opt = |o: Option<String>| o.into_iter().collect::<Vec<_>>();
        domain.add(&opt(got_domain.clone()), &opt(t.domain.clone()));
        email.add(&list(r.get(6)), &t.emails);
        phone.add(&list(r.get(7)), &t.phones);
        linkedin.add(&opt(r.get(4)), &opt(t.linkedin_url.clone()));
        hq.add(&opt(r.get(5)), &opt(t.hq_postal.clone()));
        for (field, got, want) in [
            ("email", list(r.get(6)), t.emails.clone()),
            ("phone", list(r.get(7)), t.phones.clone()),
            ("linkedin", opt(r.get(4)), opt(t.linkedin_url.clone())),
            ("hq", opt(r.get(5)), opt(t.hq_postal.clone())),
        ] {
            case_fields.entry((t.case, field)).or_default().add(&got, &want);
        }
        let right = got_domain == t.domain;
        let e = per_case.entry(t.case).or_default();
        e.0 += usize::from(right);
        e.1 += 1;
        if !right {
            misses.push(format!(
                "{} [{}]: stored {got_domain:?}, truth {:?} ({}: {:?})",
                t.name,
                t.case,
                t.domain,
                r.get::<_, String>(8),
                r.get::<_, Option<String>>(9)
            ));
        }
        if got_domain.is_some() {
            let confidence: f32 = r.get::<_, Option<f32>>(2).expect("a stored domain has its confidence");
            let evidence = list(r.get(3));
            assert!(confidence >= 0.5 && !evidence.is_empty(), "{}: {confidence} {evidence:?}", t.name);
            // The registry's address reached the verifier (from the company's staging row).
            assert!(evidence.iter().any(|e| e == "postal"), "{}: {evidence:?}", t.name);
        }
    }
    eprintln!("field      precision  recall");
    for (field, sc) in [("domain", &domain), ("email", &email), ("phone", &phone), ("linkedin", &linkedin), ("hq", &hq)]
    {
        eprintln!(
            "{field:<10} {:>9.3}  {:>6.3}   ({} stored, {} true)",
            sc.precision(),
            sc.recall(),
            sc.stored,
            sc.truth
        );
    }
    let mut cases: Vec<_> = per_case.iter().collect();
    cases.sort();
    for (case, (right, all)) in cases {
        eprintln!("  {case:<26} {right}/{all}");
    }
    for m in &misses {
        eprintln!("  miss: {m}");
    }
    for ((case, field), sc) in &case_fields {
        assert!(
            sc.recall() >= 0.9 && sc.precision() >= 0.95,
            "{case}: {field} {:.2}/{:.2}",
            sc.precision(),
            sc.recall()
        );
    }
    for (case, (right, all)) in &per_case {
        assert!(right * 10 >= all * 9, "{case}: {right} of {all} domains right");
    }
    // The work-arounds are recorded in the history rows: https read over http, the meta refresh followed.
    for (case, note) in [("https that fails", "read over http"), ("meta refresh", "refreshes to")] {
        let uens: Vec<String> = truth.iter().filter(|t| t.case == case).map(|t| t.uen.clone()).collect();
        let noted = db
            .count(&format!(
                "select count(*) from company_enrichment_runs h join companies c using (company_id) \
                 where c.uen = any('{{{}}}') and h.notes::text like '%{note}%'",
                uens.join(",")
            ))
            .await;
        assert_eq!(noted, uens.len() as i64, "{case}: '{note}' recorded");
    }
    // `x.sg` and `www.x.sg` are one site: one politeness spacing between them.
    let hits = web.hits();
    for t in truth.iter().filter(|t| t.case == "www and bare host") {
        let site = t.domain.clone().unwrap();
        let mut times: Vec<Instant> =
            hits.iter().filter(|h| h.host == site || h.host == format!("www.{site}")).map(|h| h.at).collect();
        times.sort();
        assert!(hits.iter().any(|h| h.host == site), "{site}: the bare host was crawled too");
        for w in times.windows(2) {
            // 200 ms as sent; the margin absorbs connection set-up and scheduling on a busy machine.
            assert!(w[1] - w[0] >= Duration::from_millis(100), "{site}: requests {:?} apart", w[1] - w[0]);
        }
    }
    // No company without a website is given one.
    let invented = truth.iter().filter(|t| t.domain.is_none() && by_uen[&t.uen].get::<_, Option<String>>(1).is_some());
    assert_eq!(invented.count(), 0, "domains recorded for companies without a site");
    assert!(
        domain.precision() >= 0.97 && domain.recall() >= 0.95,
        "domain {:.3}/{:.3}",
        domain.precision(),
        domain.recall()
    );
    for (field, sc) in [("email", &email), ("phone", &phone), ("linkedin", &linkedin), ("hq", &hq)] {
        assert!(sc.precision() >= 0.95, "{field} precision {:.3}", sc.precision());
        assert!(sc.recall() >= 0.90, "{field} recall {:.3}", sc.recall());
    }
}

/// 50 companies at once against a search endpoint that answers HTTP 202 (DuckDuckGo's bot check) above its
/// budget of 5 calls per second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_search_provider_is_kept_to_its_budget_and_its_refusals_never_mean_no_website() {
    let budget = (5usize, Duration::from_secs(1));
    // Kept to 4/s, a little under the budget: arrivals at the provider jitter by a few tens of ms.
    for (rate, over_budget) in [((4, Duration::from_secs(1)), false), ((40, Duration::from_secs(1)), true)] {
        let db = TestDb::new().await;
        let companies = live_companies(&db, 80).await;
        let mut sites: Vec<SiteSpec> = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (name, uen) in &companies {
            let joined = name_tokens(name).concat();
            if sites.len() < 50 && joined.len() >= 4 && names.insert(joined.clone()) {
                sites.push(SiteSpec::new(&format!("www.{joined}.sg"), name, uen.as_deref()));
            }
        }
        let keep: Vec<String> = sites.iter().filter_map(|s| s.uen.clone()).collect();
        db.client
            .execute("delete from staging_acra_companies where upper(btrim(uen)) <> all($1)", &[&keep])
            .await
            .unwrap();
        let web = FixtureWeb::start(sites.clone(), Duration::ZERO).await.unwrap();
        web.set_search_budget(budget.0, budget.1);
        let mut enrich = web_overrides(&web, 50);
        enrich.llm_base_url = None;
        enrich.host_spacing = Some(Duration::from_millis(20));
        enrich.search_rate = Some(Some(acraflow::config::Rate { calls: rate.0, per: rate.1 }));
        enrich.max_attempts = Some(30);
        enrich.retry_backoff = Some(Duration::from_millis(300));
        let s = run_acra_direct(&db, Overrides { enrich: enrich.clone(), ..Default::default() }).await.unwrap();
        assert_eq!(s.counters.processed, 50, "{:?}", s.counters);
        // A backfill stops when no job is due; jobs the provider refused wait for their retry. Work them off
        // as `acraflow worker` would, once they are due.
        for _ in 0..20 {
            if db.count("select count(*) from enrichment_jobs").await == 0 {
                break;
            }
            let wait = db
                .count("select ceil(extract(epoch from min(not_before) - now()) * 1000)::bigint from enrichment_jobs")
                .await;
            tokio::time::sleep(Duration::from_millis(wait.clamp(0, 30_000) as u64)).await;
            let again = Overrides {
                enrich: enrich.clone(),
                start_after_id: Some(i64::MAX),
                checkpoint_key: Some("retries".into()),
                ..Default::default()
            };
            run_acra_direct(&db, again).await.unwrap();
        }
        assert_eq!(db.count("select count(*) from enrichment_jobs").await, 0, "every job done");

        let searches = web.searches();
        let refused = searches.iter().filter(|(_, ok)| !ok).count();
        if over_budget {
            assert!(refused > 0, "a rate above the budget meets refusals");
        } else {
            assert_eq!(refused, 0, "kept to its budget, the provider never refuses");
            // The provider's own view: never more than its budget within any window.
            let times: Vec<Instant> = searches.iter().map(|(at, _)| *at).collect();
            for (i, t) in times.iter().enumerate() {
                let within = times[i..].iter().take_while(|u| u.duration_since(*t) < budget.1).count();
                assert!(within <= budget.0, "{within} searches within {:?}", budget.1);
            }
        }
        // Every company ends with its website: a refusal is retried, never read as "no website".
        let stored = enrichments(&db).await;
        assert_eq!(stored.len(), 50);
        for site in &sites {
            let row = &stored[site.uen.as_deref().unwrap()];
            assert_eq!(row.domain.as_deref(), Some(site.domain().as_str()), "{}: {:?}", row.name, row.error);
        }
        let no_website = db.count("select count(*) from company_enrichment_runs where error like 'no website%'").await;
        assert_eq!(no_website, 0, "a refusal was recorded as no website");
        eprintln!(
            "search rate {}/{:?} against a budget of {}/{:?}: {refused} refusals",
            rate.0, rate.1, budget.0, budget.1
        );
    }
}

/// A site that answers every request, slowly: the company deadline ends its crawl, as a failure that is
/// retried, and the run goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_company_deadline_bounds_a_slow_site() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 1).await;
    let (name, uen) = &companies[0];
    let site = SiteSpec::new(&format!("www.{}.sg", name_tokens(name).concat()), name, uen.as_deref());
    let web = FixtureWeb::start(vec![site], Duration::from_millis(700)).await.unwrap();
    let mut enrich = web_overrides(&web, 1);
    enrich.llm_base_url = None;
    enrich.company_timeout = Some(Duration::from_secs(2));
    let started = Instant::now();
    run_acra_direct(&db, Overrides { enrich, ..Default::default() }).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    let stored = enrichments(&db).await;
    let row = &stored[uen.as_deref().unwrap()];
    assert_eq!(row.status, "failed");
    assert!(row.error.as_deref().unwrap_or("").contains("ENRICH_COMPANY_TIMEOUT (2s)"), "{:?}", row.error);
    assert_eq!(row.domain, None, "an unfinished crawl stores nothing");
}

/// robots.txt's `Crawl-delay` longer than our spacing is honoured between the site's requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sites_crawl_delay_is_honoured() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 1).await;
    let (name, uen) = &companies[0];
    let mut site = SiteSpec::new(&format!("www.{}.sg", name_tokens(name).concat()), name, uen.as_deref());
    site.crawl_delay = Some(1);
    let web = FixtureWeb::start(vec![site.clone()], Duration::ZERO).await.unwrap();
    let mut enrich = web_overrides(&web, 1);
    enrich.llm_base_url = None;
    enrich.host_spacing = Some(Duration::from_millis(50));
    run_acra_direct(&db, Overrides { enrich, ..Default::default() }).await.unwrap();
    let mut times: Vec<Instant> = web.hits().iter().filter(|h| h.host == site.host).map(|h| h.at).collect();
    times.sort();
    assert!(times.len() >= 4, "{} requests", times.len());
    // After robots.txt, every request waits out the delay (the margin covers scheduling on a busy machine).
    for w in times[1..].windows(2) {
        assert!(w[1] - w[0] >= Duration::from_millis(900), "requests {:?} apart", w[1] - w[0]);
    }
    assert_eq!(enrichments(&db).await[uen.as_deref().unwrap()].domain.as_deref(), Some(site.domain().as_str()));
}

/// A site that refuses us (403) while the reader refuses too (429): the company fails for now and is
/// retried; it is not given up on as if the site could not be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_refuses_fails_the_company_for_now() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 1).await;
    let (name, uen) = &companies[0];
    let mut site = SiteSpec::new(&format!("www.{}.sg", name_tokens(name).concat()), name, uen.as_deref());
    site.fault = Some(Fault::Forbidden);
    let web = FixtureWeb::start(vec![site], Duration::ZERO).await.unwrap();
    web.set_reader_refusing(true);
    let mut enrich = web_overrides(&web, 1);
    enrich.llm_base_url = None;
    enrich.max_attempts = Some(2);
    enrich.retry_backoff = Some(Duration::from_secs(600));
    run_acra_direct(&db, Overrides { enrich, ..Default::default() }).await.unwrap();
    // Not final: the job waits for its retry, with the reader's refusal as its last error.
    let (attempts, error): (i32, String) = {
        let r = db.client.query_one("select attempts, last_error from enrichment_jobs", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(attempts, 1);
    assert!(error.contains("reader provider refused with HTTP 429"), "{error}");
    assert_eq!(db.count("select count(*) from companies where website_domain is not null").await, 0);
}
