//! Operating the engine: metrics, JSON logs, run summaries, alerts with auto-pause, progress, tenant
//! isolation, graceful shutdown, status. Each test checks what an operator would look at.

use std::collections::HashMap;
use std::time::Duration;

use acraflow::config::{AlertSpec, Overrides, PipelineSpec, Secret};
use acraflow::enrichment::enrich::discover::name_tokens;
use acraflow::fixture_web::{realistic_sites, FixtureWeb, SiteSpec};
use acraflow::pipeline::Mode;

use crate::enrich::{insert_live_rows, live_companies, web_overrides};
use crate::support::{wait_until, TestDb};

/// The environment that points a CLI acra_direct run at the fixture web.
fn web_env(web: &FixtureWeb) -> Vec<(&'static str, String)> {
    vec![
        ("ACRA_DIRECT_PIPELINE", "acra_direct".into()),
        ("ENRICH_HTTP_PROXY", web.proxy_url()),
        ("ENRICH_SEARCH_URL", web.search_url()),
        ("ENRICH_SEARCH_RATE", "off".into()),
        ("ENRICH_READER_RATE", "off".into()),
        ("ENRICH_READER_URL", web.reader_url()),
        ("ENRICH_HOST_SPACING", "50ms".into()),
        ("CRAWLER_TIMEOUT_S", "1".into()),
        // A failing site fails its company at once (retries are the queue tests' subject).
        ("ENRICH_MAX_ATTEMPTS", "1".into()),
    ]
}

fn command(db: &TestDb, args: &[&str], env: &[(&str, String)]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_acraflow"));
    cmd.args(args).env("POSTGRES_DSN", &db.dsn).env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs a command to its end off the async threads.
async fn output(mut cmd: std::process::Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn get(url: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(url).await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

/// Samples of one metric name, label sets rendered as `k=v,...` (sorted), to values.
fn samples(scrape: &prometheus_parse::Scrape, name: &str) -> HashMap<String, f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| {
            let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            let value = match &s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => *v,
                prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
                prometheus_parse::Value::Summary(_) => f64::NAN,
            };
            (labels.join(","), value)
        })
        .collect()
}

fn one(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    let s = samples(scrape, name);
    assert_eq!(s.len(), 1, "{name}: {s:?}");
    s.into_values().next().unwrap()
}

/// Runs `promtool ARGS` (stdin: `input`) and asserts it passes; without promtool, says so and returns.
pub fn promtool(args: &[&str], input: Option<&str>) {
    use std::io::Write;
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        println!("SKIPPED promtool {}: promtool is not installed (Debian: apt-get install prometheus)", args.join(" "));
        return;
    };
    if let Some(text) = input {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What Prometheus sends: OpenMetrics preferred.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

async fn scrape(port: u16) -> prometheus_parse::Scrape {
    let resp = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .header("accept", PROMETHEUS_ACCEPT)
        .send()
        .await
        .expect("/metrics answers");
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.text().await.unwrap();
    assert!(body.ends_with("# EOF\n"), "an OpenMetrics exposition ends with # EOF");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("the exposition parses")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_what_the_run_did_with_health_and_readiness() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 30).await;
    let web = FixtureWeb::start(realistic_sites(&companies), Duration::ZERO).await.unwrap();
    let port = free_port();
    let mut env = web_env(&web);
    env.extend([
        ("METRICS_PROMETHEUS_ENABLE", "true".into()),
        ("METRICS_PORT", port.to_string()),
        ("METRICS_BIND", "127.0.0.1".into()),
        ("ACRA_DIRECT_SLOT", db.name.clone()),
        ("ACRA_DIRECT_CONCURRENCY", "8".into()),
        ("RUST_LOG", "warn".into()),
    ]);
    let mut child = command(&db, &["run"], &env).stdout(std::process::Stdio::null()).spawn().unwrap();

    let staged = db.count("select count(*) from staging_acra_companies").await;
    let ready = wait_until(Duration::from_secs(60), || async {
        matches!(get(&format!("http://127.0.0.1:{port}/readyz")).await, Some((200, _)))
    })
    .await;
    assert!(ready, "/readyz never became ready");
    assert_eq!(get(&format!("http://127.0.0.1:{port}/healthz")).await.map(|r| r.0), Some(200));
    db.wait_streaming(Duration::from_secs(60)).await;
    // A row the filter cannot map: a dead letter, streamed.
    db.client.batch_execute("insert into staging_acra_companies (uen, entity_name) values ('na', 'na')").await.unwrap();
    db.wait_caught_up(Duration::from_secs(60)).await;
    let drained = wait_until(Duration::from_secs(60), || async {
        db.count("select count(*) from enrichment_jobs where state = 'pending'").await == 0
    })
    .await;
    assert!(drained, "the worker did not work the queue off");

    let processed = db.count("select count(*) from company_enrichment_runs where not enriched").await;
    let enriched = db.count("select count(*) from company_enrichment_runs where enriched").await;
    assert_eq!(enriched, processed, "every processed company was enriched once");
    // The queue gauges are read from the table every 5 s.
    let parked = db.count("select count(*) from enrichment_jobs where state = 'parked'").await;
    let gauges_caught_up = wait_until(Duration::from_secs(15), || async {
        let s = scrape(port).await;
        samples(&s, "acra_direct_queue_jobs_waiting").values().sum::<f64>() == 0.0
            && one(&s, "acra_direct_queue_jobs_parked") == parked as f64
    })
    .await;
    assert!(gauges_caught_up, "the queue gauges never showed the empty queue");
    let lag_seen = wait_until(Duration::from_secs(15), || async {
        samples(&scrape(port).await, "acra_direct_slot_lag_bytes").len() == 1
    })
    .await;
    assert!(lag_seen, "the slot lag gauge was never set");
    let s = scrape(port).await;
    assert_eq!(one(&s, "acra_direct_companies_processed_total"), processed as f64);
    assert_eq!(one(&s, "acra_direct_latency_seconds_count"), processed as f64);
    assert!(one(&s, "acra_direct_latency_seconds_sum") > 0.0);
    let rows_in = samples(&s, "acra_direct_operator_rows_in_total");
    let rows_out = samples(&s, "acra_direct_operator_rows_out_total");
    assert_eq!(rows_in["operator=filter"], (staged + 1) as f64, "every staging row entered the filter");
    assert_eq!(rows_out["operator=filter"], staged as f64, "the bad row did not leave it eligible");
    assert!(!rows_in.contains_key("operator=enrich"), "enrichment is not an operator of the registry stream");
    // The queue: a gauge per reason from the start, the enqueue-to-done latency of every job.
    let waiting = samples(&s, "acra_direct_queue_jobs_waiting");
    for reason in ["new", "changed", "express", "retry", "stale"] {
        assert_eq!(waiting.get(&format!("reason={reason}")), Some(&0.0), "{waiting:?}");
    }
    assert_eq!(one(&s, "acra_direct_queue_jobs_leased"), 0.0);
    // Done jobs only: a parked job (a site that kept failing) is not done.
    assert_eq!(one(&s, "acra_direct_queue_latency_seconds_count"), (enriched - parked) as f64);
    assert_eq!(samples(&s, "acra_direct_dead_letters_total")["stage=filter"], 1.0);
    let failed = db.count("select count(*) from company_enrichment_runs where status = 'failed'").await;
    assert_eq!(one(&s, "acra_direct_failures_total"), (failed + 1) as f64, "failed enrichments plus the dead letter");
    let by_status = samples(&s, "acra_direct_enrichments_total");
    assert_eq!(by_status.values().sum::<f64>(), enriched as f64);
    assert_eq!(one(&s, "acra_direct_enrichments_in_flight"), 0.0);
    assert_eq!(one(&s, "acra_direct_enrichment_paused"), 0.0);
    let confirmed: i64 = db
        .client
        .query_one("select (last_lsn - '0/0'::pg_lsn)::int8 from service_progress where key = 'acra_direct'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(one(&s, "acra_direct_checkpoint_lsn"), confirmed as f64);
    assert!(one(&s, "acra_direct_slot_lag_bytes") >= 0.0);
    assert_eq!(get(&format!("http://127.0.0.1:{port}/nope")).await.map(|r| r.0), Some(404));

    // Without an OpenMetrics Accept header: the Prometheus text format, which promtool checks clean.
    let resp = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    let text = resp.text().await.unwrap();
    assert!(!text.contains("# EOF") && text.contains("# TYPE acra_direct_companies_processed_total counter"), "{text}");
    assert!(text.contains("# HELP acra_direct_companies_processed_total "), "{text}");
    promtool(&["check", "metrics"], Some(&text));

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
}

/// The per-company JSON log: every line parses; each enriched company's span carries the PRD's stages in
/// order; no secret appears; the exit summary has latency percentiles; status shows today's budget use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_each_company_through_its_stages_without_secrets() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 12).await;
    let web = FixtureWeb::start(realistic_sites(&companies), Duration::ZERO).await.unwrap();
    let mut env = web_env(&web);
    let hook = format!("{}?token=xoxb-hook-secret-77", web.webhook_url());
    env.extend([
        ("LLM_BASE_URL", web.llm_url()),
        ("LLM_API_KEY", "sk-live-llm-secret-42".into()),
        ("ENABLE_APIFY_LINKEDIN", "true".into()),
        ("APIFY_LINKEDIN_URL", web.contacts_url()),
        ("APIFY_TOKEN", "apify_api_secret_99".into()),
        ("SLACK_WEBHOOK_URL", hook),
        ("ACRA_DIRECT_CONCURRENCY", "4".into()),
        ("ACRA_DIRECT_LOG_FORMAT", "json".into()),
    ]);
    let out = output(command(&db, &["backfill"], &env)).await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stderr}");

    let password = db.dsn.split_whitespace().find_map(|kv| kv.strip_prefix("password=")).unwrap().to_owned();
    for secret in ["sk-live-llm-secret-42", "apify_api_secret_99", "xoxb-hook-secret-77", password.as_str()] {
        assert!(!stderr.contains(secret) && !stdout.contains(secret), "{secret} leaked into the output");
    }
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let mut stages: HashMap<String, Vec<String>> = HashMap::new();
    for l in &lines {
        if let (Some(uen), Some(stage)) = (l.pointer("/span/uen").and_then(|v| v.as_str()), l["stage"].as_str()) {
            stages.entry(uen.to_owned()).or_default().push(stage.to_owned());
        }
    }
    let ok: Vec<String> = db
        .client
        .query(
            "select c.uen from company_enrichment_runs h join companies c using (company_id) \
             where h.enriched and h.status = 'ok'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(ok.len() >= 5, "too few companies enriched ok to check: {}", ok.len());
    // The span starts when a worker leases the company's job (`select`); the registry's upsert is a batch
    // step before the enqueue, counted by the operator metrics.
    let want = ["select", "find_domain", "crawl", "extract", "chunks", "llm_extract", "contacts", "persist", "summary"];
    for uen in &ok {
        let got = &stages[uen];
        let mut at = 0;
        for stage in want {
            match got[at..].iter().position(|s| s == stage) {
                Some(i) => at += i + 1,
                None => panic!("company {uen}: stage {stage} missing or out of order in {got:?}"),
            }
        }
        let summary = lines
            .iter()
            .find(|l| l.pointer("/span/uen").and_then(|v| v.as_str()) == Some(uen) && l["stage"] == "summary")
            .unwrap();
        assert_eq!(summary["status"], "ok");
        assert!(summary["pages"].as_i64().unwrap() >= 1 && summary.get("latency_ms").is_some(), "{summary}");
    }
    // JSON mode: the final summary is the last event, with its latency percentiles; stdout stays empty.
    let last = lines.last().unwrap();
    assert_eq!(last["message"], "run summary", "{last}");
    assert!(last["latency"]["p50_ms"].is_u64() && last["latency"]["p99_ms"].is_u64(), "{last}");
    assert!(last["enrichment"]["queue_latency"]["p95_ms"].is_u64(), "{last}");
    assert!(stdout.trim().is_empty(), "{stdout}");
    let header =
        db.client.query_one("select status, ended_at is not null, processed from enrichment_runs", &[]).await.unwrap();
    assert_eq!((header.get::<_, String>(0).as_str(), header.get::<_, bool>(1)), ("completed", true));

    // status: today's use of the daily caps, and the run's counters.
    let enriched = db.count("select count(*) from company_enrichment_runs where enriched").await;
    let out = db.cli(&["status", "--json"], &[("ACRA_DIRECT_DAILY_CAP", "100")]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daily_cap"]["enriched_today"], enriched);
    assert_eq!(v["daily_cap"]["cap"], 100);
    assert_eq!(v["daily_cap"]["remaining"], 100 - enriched);
    assert!(v["daily_cap"]["llm_tokens_today"].as_i64().unwrap() > 0);
    assert_eq!(v["runs"][0]["processed"], header.get::<_, i64>(2));
}

/// Sites start failing: one alert for the window, then a pause (companies deferred, registry fields and the
/// checkpoint still moving), then an automatic resume after the cool-down, each posted to the webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_alert_once_per_window_pause_enrichment_and_resume_it() {
    let db = TestDb::new().await;
    let words = ["ALPHA", "BRAVO", "CEDAR", "DELTA", "EMBER", "FALCON", "GROVE", "HARBOR"];
    let names: Vec<(String, Option<String>)> = (0..64)
        .map(|i| (format!("{} {} TRADING PTE. LTD.", words[i / 8], words[i % 8]), Some(format!("2019{i:05}W"))))
        .collect();
    // Every company has a site that search finds, so while sites fail, every enrichment fails.
    let sites: Vec<SiteSpec> = names
        .iter()
        .map(|(n, u)| SiteSpec::new(&format!("www.{}.com.sg", name_tokens(n).join("")), n, u.as_deref()))
        .collect();
    let web = FixtureWeb::start(sites, Duration::ZERO).await.unwrap();
    web.set_sites_failing(true);
    let mut spec = PipelineSpec::acra_direct();
    spec.ops.alert = AlertSpec {
        webhook: Some(Secret::new(web.webhook_url())),
        threshold_pct: 50.0,
        window: Duration::from_secs(600),
        min_events: 8,
        auto_pause: true,
        cooldown: Duration::from_secs(10),
    };
    let overrides = Overrides { enrich: web_overrides(&web, 8), ..db.stream_overrides() };
    let engine = db.start_engine_with(spec, overrides);
    db.wait_streaming(Duration::from_secs(30)).await;

    // Wave 1: every site fails. Rows go in five at a time, each group committed before the next, so the
    // monitor sees the alert's outcomes and then min_events more (one group of 30 could be one batch).
    for group in names[..30].chunks(5) {
        insert_live_rows(&db, group).await;
        db.wait_caught_up(Duration::from_secs(60)).await;
        if web.webhooks().len() >= 2 {
            break;
        }
    }
    let paused = wait_until(Duration::from_secs(10), || async { web.webhooks().len() >= 2 }).await;
    assert!(paused, "no alert and pause: {:?}", web.webhooks());
    // What /readyz and the gauge report (no other test pauses this process's enrichment).
    let m = acraflow::telemetry::metrics::metrics();
    assert_eq!(m.paused.get(), 1);
    assert!(!m.ready(), "/readyz must fail while enrichment is paused");
    db.wait_caught_up(Duration::from_secs(60)).await;
    // Wave 2, while paused: registry fields applied and the checkpoint moves past them; their jobs wait.
    insert_live_rows(&db, &names[30..40]).await;
    db.wait_caught_up(Duration::from_secs(30)).await;
    let wave2: Vec<String> = names[30..40].iter().filter_map(|(_, u)| u.clone()).collect();
    let upserted: i64 =
        db.client.query_one("select count(*) from companies where uen = any($1)", &[&wave2]).await.unwrap().get(0);
    assert_eq!(upserted, 10, "the registry path keeps moving while enrichment is paused");
    let wave2_enriched: i64 = db
        .client
        .query_one(
            "select count(*) from company_enrichment_runs h join companies c using (company_id)              where c.uen = any($1) and h.enriched",
            &[&wave2],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(wave2_enriched, 0, "nothing leased while paused");
    let wave2_queued: i64 = db
        .client
        .query_one(
            "select count(*) from enrichment_jobs j join companies c using (company_id) where c.uen = any($1)",
            &[&wave2],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(wave2_queued, 10, "their jobs wait in the queue");

    // The sites recover; after the cool-down enrichment resumes by itself.
    web.set_sites_failing(false);
    let resumed = wait_until(Duration::from_secs(30), || async { web.webhooks().len() >= 3 }).await;
    assert!(resumed, "never resumed: {:?}", web.webhooks());
    assert_eq!(m.paused.get(), 0);
    insert_live_rows(&db, &names[40..50]).await;
    let wave3: Vec<String> = names[40..50].iter().filter_map(|(_, u)| u.clone()).collect();
    let enriched = wait_until(Duration::from_secs(60), || async {
        db.client
            .query_one(
                "select count(*) from company_enrichment_runs h join companies c using (company_id) \
                 where c.uen = any($1) and h.enriched and h.status <> 'failed'",
                &[&wave3],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 10
    })
    .await;
    assert!(enriched, "companies streamed after the resume were not enriched");
    db.wait_caught_up(Duration::from_secs(30)).await;
    engine.stop().await;

    let texts: Vec<String> = web.webhooks().iter().map(|v| v["text"].as_str().unwrap().to_owned()).collect();
    assert_eq!(texts.len(), 3, "one alert per window, one pause, one resume: {texts:#?}");
    assert!(
        texts[0].contains("failure rate") && texts[0].contains("ACRA_DIRECT_ERROR_ALERT_THRESHOLD=50%"),
        "{}",
        texts[0]
    );
    assert!(texts[1].contains("enrichment paused for 10s"), "{}", texts[1]);
    assert!(texts[2].contains("enrichment resumed"), "{}", texts[2]);
}

/// With ACRA_DIRECT_TENANT_ID every session carries request.tenant_id, so a real RLS policy holds: the
/// tenant's rows are its own, and a run as another tenant can neither see nor overwrite them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_security_holds_for_the_tenant_and_blocks_another() {
    let db = TestDb::new().await;
    db.seed(200, 4).await;
    let dsn = db
        .tenant_role(
            "w",
            "tenant-pw-1",
            "alter table companies add column tenant_id text not null default current_setting('request.tenant_id', true);
             alter table companies enable row level security;
             alter table companies force row level security;
             create policy tenant_rows on companies
               using (tenant_id = current_setting('request.tenant_id', true))
               with check (tenant_id = current_setting('request.tenant_id', true));
             alter table enrichment_runs enable row level security;
             create policy tenant_runs on enrichment_runs
               using (tenant_id = current_setting('request.tenant_id', true))
               with check (tenant_id = current_setting('request.tenant_id', true));",
        )
        .await;
    let run_as = |tenant: &'static str| {
        let dsn = dsn.clone();
        async move {
            let mut spec = PipelineSpec::registry_sync();
            spec.apply(&Overrides { force: Some(true), start_after_id: Some(0), ..Default::default() });
            spec.ops.tenant_id = Some(tenant.to_owned());
            let (_tx, rx) = tokio::sync::watch::channel(false);
            acraflow::pipeline::run(&dsn, &spec, Mode::Backfill, rx).await
        }
    };

    let acme = run_as("acme").await.expect("the tenant's own run");
    assert!(acme.counters.processed > 30, "{:?}", acme.counters);
    db.assert_companies_match_rules().await;
    assert_eq!(db.count("select count(*) from companies where tenant_id <> 'acme'").await, 0);
    assert_eq!(db.count("select count(*) from enrichment_runs where tenant_id = 'acme'").await, 1);

    // Another tenant's session sees none of it and changes none of it.
    let globex = acraflow::db::connect_as(&dsn, Some("globex"), "acraflow").await.unwrap();
    let seen: i64 = globex.query_one("select count(*) from companies", &[]).await.unwrap().get(0);
    assert_eq!(seen, 0);
    assert_eq!(globex.execute("update companies set name = 'HIJACKED'", &[]).await.unwrap(), 0);
    let runs: i64 = globex.query_one("select count(*) from enrichment_runs", &[]).await.unwrap().get(0);
    assert_eq!(runs, 0, "another tenant's run headers are hidden");

    // A run as the wrong tenant over the same companies fails loudly and leaves them as they were.
    let companies = || async {
        let rows = db.client.query("select uen, name from companies order by company_id", &[]).await.unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect::<Vec<(String, String)>>()
    };
    let before = companies().await;
    let err = run_as("globex").await.expect_err("RLS must refuse another tenant's writes");
    let msg = acraflow::pipeline::error_chain(&err);
    assert!(msg.contains("row-level security"), "{msg}");
    assert_eq!(before, companies().await);
    assert_eq!(db.count("select count(*) from companies where tenant_id <> 'acme'").await, 0);
}

/// SIGTERM mid-enrichment: the run drains, commits, exits 0 and is marked interrupted; SIGUSR1 logs a
/// summary and updates the header; a second signal exits at once; the next run finishes the job with
/// exactly one enrichment per company.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_drains_and_loses_nothing() {
    use nix::sys::signal::{kill, Signal};
    let db = TestDb::new().await;
    let companies = live_companies(&db, 300).await;
    let web = FixtureWeb::start(realistic_sites(&companies), Duration::from_millis(30)).await.unwrap();
    let mut env = web_env(&web);
    env.extend([
        ("ACRA_DIRECT_CONCURRENCY", "8".into()),
        ("ACRA_DIRECT_DRAIN_TIMEOUT", "5s".into()),
        ("ACRA_DIRECT_SUMMARY_EVERY", "1s".into()),
        ("ACRA_DIRECT_BATCH_SIZE", "20".into()),
        ("ACRA_DIRECT_LOG_FORMAT", "json".into()),
    ]);
    let enriched = || async { db.count("select count(*) from company_enrichment_runs where enriched").await };

    // Output to files: a pipe nobody reads would fill and stall the child.
    let dir = std::env::temp_dir().join(format!("acraflow-sigterm-{}", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let child = command(&db, &["backfill"], &env)
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    assert!(wait_until(Duration::from_secs(60), || async { enriched().await >= 10 }).await, "enrichment did not start");
    kill(pid, Signal::SIGUSR1).unwrap();
    let counted = wait_until(Duration::from_secs(10), || async {
        db.count("select count(*) from enrichment_runs where status = 'running' and rows_in > 0").await == 1
    })
    .await;
    assert!(counted, "SIGUSR1 did not update the run header");
    kill(pid, Signal::SIGTERM).unwrap();
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap().status).await.unwrap();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "stopped within the drain timeout");
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    // One summary for SIGUSR1, more from ACRA_DIRECT_SUMMARY_EVERY; each with its latency percentiles.
    let summaries = stderr.lines().filter(|l| l.contains("\"run summary\"") && l.contains("p99_ms")).count();
    assert!(summaries >= 2, "{summaries} run summaries logged: {stderr}");
    // The last event is the final summary (JSON mode: nothing on stdout).
    let last: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
    assert_eq!(
        (last["message"].as_str(), last["status"].as_str()),
        (Some("run summary"), Some("interrupted")),
        "{last}"
    );
    assert!(std::fs::read_to_string(&out_path).unwrap().trim().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
    let header =
        db.client.query_one("select status, ended_at is not null, enriched from enrichment_runs", &[]).await.unwrap();
    assert_eq!((header.get::<_, String>(0).as_str(), header.get::<_, bool>(1)), ("interrupted", true));
    let done = enriched().await;
    assert_eq!(header.get::<_, i64>(2), done, "the header counts what was committed");
    assert!(done < companies.len() as i64, "stopped too late to test anything");
    // Every company not enriched yet has its job waiting, and no lease is left held.
    assert_eq!(
        db.count("select count(*) from enrichment_jobs where state = 'pending'").await,
        db.count("select count(*) from companies").await - done
    );
    assert_eq!(db.count("select count(*) from enrichment_jobs where lease_owner is not null").await, 0);

    // A second signal exits at once.
    let mut child = command(&db, &["backfill"], &env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    assert!(wait_until(Duration::from_secs(60), || async { enriched().await >= done + 5 }).await);
    kill(pid, Signal::SIGTERM).unwrap();
    // (Two signals in the same instant arrive as one.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(pid, Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(130));
    // No process holds that run any more: status says so instead of `running` forever.
    let out = output(command(&db, &["status", "--json"], &[])).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["runs"][0]["status"], "abandoned", "{}", v["runs"][0]);

    // The next run finishes: every company enriched exactly once.
    let out = output(command(&db, &["backfill"], &env)).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let eligible = db.count("select count(*) from companies").await;
    assert_eq!(enriched().await, eligible);
    assert_eq!(
        db.count("select count(distinct company_id) from company_enrichment_runs where enriched").await,
        eligible
    );
    db.assert_companies_match_rules().await;
}

/// A backfill on a terminal draws a progress bar; without one it logs progress lines with rate and ETA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_a_bar_on_a_terminal_and_log_lines_otherwise() {
    let db = TestDb::new().await;
    db.seed(3000, 9).await;
    let env = [
        ("ACRA_DIRECT_BATCH_SIZE", "100".to_owned()),
        ("ACRA_DIRECT_PROGRESS_EVERY", "0s".to_owned()),
        ("ACRA_DIRECT_LOG_FORMAT", "json".to_owned()),
    ];
    let out = output(command(&db, &["backfill"], &env)).await;
    assert!(out.status.success());
    let progress: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "progress")
        .collect();
    assert!(progress.len() >= 2, "{progress:?}");
    let last = progress.last().unwrap();
    assert_eq!(last["rows_total"], 3000);
    assert!(last["rows_done"].as_u64().unwrap() > 0 && last.get("rows_per_second").is_some());
    assert!(last.get("eta_seconds").is_some(), "{last}");

    // On a terminal (util-linux `script` gives the command a pty): a bar, and no progress log lines.
    let command_line =
        format!("{} backfill --start-after-id 0 --force --batch-size 100", env!("CARGO_BIN_EXE_acraflow"));
    let mut script = std::process::Command::new("script");
    script.args(["-qec", &command_line, "/dev/null"]).env("POSTGRES_DSN", &db.dsn).env("RUST_LOG", "info");
    let out = output(script).await;
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("3,000/3,000 rows") && screen.contains("ETA"), "no progress bar: {screen}");
    assert!(!screen.contains("rows_done"), "progress log lines while a bar is shown: {screen}");

    // `run` on a terminal: the same bar over its first backfill, then it streams until SIGTERM. The
    // signal is sent once the bar is full, not after a fixed time: creating the slot waits for every
    // transaction open on the server, and other tests share it.
    let pid_file = std::env::temp_dir().join(format!("acraflow-runbar-{}.pid", std::process::id()));
    let command_line = format!(
        "echo $$ > {}; exec {} run --checkpoint-key runbar --slot runbar --batch-size 100",
        pid_file.display(),
        env!("CARGO_BIN_EXE_acraflow")
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &command_line, "/dev/null"])
        .env("POSTGRES_DSN", &db.dsn)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let screen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (mut stdout, screen) = (child.stdout.take().unwrap(), screen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut stdout, &mut buf) {
                screen.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !screen.lock().unwrap().contains("3,000/3,000 rows") {
        assert!(tokio::time::Instant::now() < deadline, "run showed no full backfill bar: {}", screen.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    reader.join().unwrap();
    let _ = std::fs::remove_file(&pid_file);
    let screen = screen.lock().unwrap().clone();
    assert!(status.success(), "{screen}");
    assert!(screen.contains("interrupted"), "{screen}");
}

/// `pg_stat_activity` says which part of the engine each session is, and the sessions run without JIT
/// (compiling a batch statement costs more than running it) and with generic plans (a custom plan for a
/// large batch scans whole tables).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_sessions_are_named_in_pg_stat_activity_and_plan_generically_without_jit() {
    let db = TestDb::new().await;
    let engine = db.start_engine(db.stream_overrides());
    db.wait_streaming(Duration::from_secs(30)).await;
    // The replication session starts on its own thread while the pipeline opens its other sessions.
    let parts = ["acraflow-replication", "acraflow-dedupe", "acraflow-operators", "acraflow-sink"];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let names: Vec<String> = db
            .client
            .query(
                "select application_name from pg_stat_activity where datname = $1 and application_name like 'acraflow%'",
                &[&db.name],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let missing: Vec<_> = parts.iter().filter(|p| !names.iter().any(|n| n == *p)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no {missing:?} session among {names:?} after 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engine.stop().await;
    let session = acraflow::db::connect(&db.dsn).await.unwrap();
    let jit: String = session.query_one("show jit", &[]).await.unwrap().get(0);
    assert_eq!(jit, "off");
    let plans: String = session.query_one("show plan_cache_mode", &[]).await.unwrap().get(0);
    assert_eq!(plans, "force_generic_plan", "a custom plan for a large batch scans whole tables");
}

/// The metrics endpoint does not let a client that says nothing hold a connection (a slowloris).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_closes_a_connection_that_sends_no_request() {
    use tokio::io::AsyncReadExt;
    let addr = acraflow::telemetry::metrics::serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), idle.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "still open after 30 s");
    assert!(started.elapsed() >= Duration::from_secs(5), "closed before the header timeout");
    // The endpoint still answers.
    assert_eq!(get(&format!("http://{addr}/healthz")).await.map(|r| r.0), Some(200));
}
