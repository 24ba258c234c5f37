//! The durable queue between the registry and enrichment: freshness while jobs wait, workers sharing the
//! queue and taking over a killed one's jobs, express refreshes, the stale sweeper, caps across workers,
//! retries and parking. Checked from the tables, `status` and the fixture web's request log.

use std::time::{Duration, Instant};

use acraflow::config::{EnrichOverrides, Overrides, PipelineSpec};
use acraflow::enrichment::enrich::discover::name_tokens;
use acraflow::fixture_web::{FixtureWeb, SiteSpec};

use crate::enrich::{live_companies, web_overrides};
use crate::support::{wait_until, TestDb};

/// A healthy site for every company, found by search.
pub(crate) fn healthy_sites(companies: &[(String, Option<String>)]) -> Vec<SiteSpec> {
    let mut sites: Vec<SiteSpec> = Vec::new();
    for (name, uen) in companies {
        let host = format!("www.{}.com.sg", name_tokens(name).join(""));
        if name_tokens(name).is_empty() || sites.iter().any(|s| s.host == host) {
            continue;
        }
        sites.push(SiteSpec::new(&host, name, uen.as_deref()));
    }
    sites
}

/// The environment pointing an `acraflow worker` (or `refresh`) at the fixture web.
fn worker_env(web: &FixtureWeb, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("ENRICH_HTTP_PROXY", web.proxy_url()),
        ("ENRICH_SEARCH_URL", web.search_url()),
        ("ENRICH_SEARCH_RATE", "off".into()),
        ("ENRICH_HOST_SPACING", "50ms".into()),
        ("CRAWLER_TIMEOUT_S", "1".into()),
        ("ENRICH_POLL_INTERVAL", "100ms".into()),
        ("ENRICH_MAX_ATTEMPTS", "1".into()),
        ("RUST_LOG", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

pub(crate) fn acraflow(db: &TestDb, args: &[&str], env: &[(String, String)]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_acraflow"));
    cmd.args(args).env("POSTGRES_DSN", &db.dsn);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

pub(crate) async fn run_to_end(mut cmd: std::process::Command) -> std::process::Output {
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Companies from the registry pipeline, and an express job for each (`refresh --where true`): a queue
/// that no engine works until the test starts its workers.
async fn queued_companies(db: &TestDb, rows: u64) -> Vec<(String, Option<String>)> {
    let companies = live_companies(db, rows).await;
    db.run(Overrides::default()).await;
    let out = run_to_end(acraflow(db, &["refresh", "--where", "true"], &[])).await;
    let n = db.count("select count(*) from companies").await;
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("enqueued {n} express refreshes")));
    companies
}

async fn enriched(db: &TestDb) -> i64 {
    db.count("select count(*) from company_enrichment_runs where enriched").await
}

fn sigterm(child: &std::process::Child) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
}

/// The engine with acra_direct on slow sites at concurrency 1, after its backfill filled the queue.
async fn slow_engine(db: &TestDb, web: &FixtureWeb) -> crate::support::Engine {
    let enrich = EnrichOverrides { llm_base_url: None, ..web_overrides(web, 1) };
    let engine = db.start_engine_with(PipelineSpec::acra_direct(), Overrides { enrich, ..db.stream_overrides() });
    db.wait_streaming(Duration::from_secs(120)).await;
    assert!(wait_until(Duration::from_secs(60), || async { enriched(db).await >= 1 }).await, "nothing enriched");
    engine
}

async fn waiting(db: &TestDb) -> i64 {
    db.count("select count(*) from enrichment_jobs where state = 'pending' and lease_owner is null").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_struck_off_company_is_visible_within_2s_while_2000_companies_wait_for_enrichment() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 2100).await;
    let web = FixtureWeb::start(healthy_sites(&companies), Duration::from_millis(300)).await.unwrap();
    let engine = slow_engine(&db, &web).await;
    assert!(waiting(&db).await >= 2000, "{} jobs wait", waiting(&db).await);

    // An enriched company is struck off in staging while the worker crawls at its own pace.
    let uen: String = db
        .client
        .query_one(
            "select c.uen from companies c join company_enrichment_runs h using (company_id) where h.enriched limit 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let t = Instant::now();
    db.client
        .execute(
            "update staging_acra_companies set entity_status_description = 'Struck Off' where upper(btrim(uen)) = $1",
            &[&uen],
        )
        .await
        .unwrap();
    let visible = wait_until(Duration::from_secs(2), || async {
        db.client
            .query_opt("select 1 from companies where uen = $1 and status = 'Struck Off'", &[&uen])
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let took = t.elapsed();
    assert!(visible, "the strike-off was not visible in companies within 2 s");
    // The slot's acknowledged LSN catches up with the registry stream: it is not held by enrichment.
    db.wait_caught_up(Duration::from_secs(5)).await;
    assert!(waiting(&db).await >= 1990, "the queue still holds the backlog");
    eprintln!("strike-off visible after {took:?} with {} jobs waiting", waiting(&db).await);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_express_refresh_is_enriched_before_every_job_waiting_before_it() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 2100).await;
    let web = FixtureWeb::start(healthy_sites(&companies), Duration::from_millis(100)).await.unwrap();
    let engine = slow_engine(&db, &web).await;
    assert!(waiting(&db).await >= 2000);
    // The last company in line.
    let uen: String = db
        .client
        .query_one(
            "select c.uen from enrichment_jobs j join companies c using (company_id) \
             where j.state = 'pending' and j.lease_owner is null and c.uen is not null \
             order by j.priority desc, j.enqueued_at desc, j.job_id desc limit 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let leased = || async {
        db.client
            .query("select company_id from enrichment_jobs where lease_owner is not null", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .collect::<Vec<i64>>()
    };
    let before = db.count("select coalesce(max(id), 0) from company_enrichment_runs").await;
    let mut in_flight = leased().await;
    let out = run_to_end(acraflow(&db, &["refresh", "--uen", &uen, "--no-llm"], &[])).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("enqueued 1 express refresh"), "{out:?}");
    in_flight.extend(leased().await);

    let done = wait_until(Duration::from_secs(30), || async {
        db.count(&format!(
            "select count(*) from company_enrichment_runs h join companies c using (company_id) \
             where c.uen = '{uen}' and h.enriched"
        ))
        .await
            == 1
    })
    .await;
    assert!(done, "the express refresh was not enriched within 30 s");
    let row = db
        .client
        .query_one(
            "select h.id, h.job_reason from company_enrichment_runs h join companies c using (company_id) \
             where c.uen = $1 and h.enriched",
            &[&uen],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("express"));
    // Between the refresh and the express job, only jobs already leased at the refresh were enriched.
    let ahead: Vec<i64> = db
        .client
        .query(
            "select company_id from company_enrichment_runs where enriched and id > $1 and id < $2",
            &[&before, &row.get::<_, i64>(0)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for c in &ahead {
        assert!(in_flight.contains(c), "company {c} was enriched before the express job without being leased first");
    }
    assert!(ahead.len() <= 2, "{ahead:?}");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_queue_and_take_over_a_killed_workers_jobs_after_its_lease() {
    let db = TestDb::new().await;
    let companies = queued_companies(&db, 80).await;
    let jobs = db.count("select count(*) from enrichment_jobs").await;
    let web = FixtureWeb::start(healthy_sites(&companies), Duration::from_millis(100)).await.unwrap();
    let env = worker_env(&web, &[("ACRA_DIRECT_CONCURRENCY", "4"), ("ENRICH_LEASE", "3s")]);
    let spawn = || acraflow(&db, &["worker"], &env).stdout(std::process::Stdio::null()).spawn().unwrap();
    let mut a = spawn();
    let mut b = spawn();
    let owned_by = |pid: u32| format!("%:{pid}:%");
    let a_holds = wait_until(Duration::from_secs(60), || async {
        enriched(&db).await >= 10
            && db
                .count(&format!("select count(*) from enrichment_jobs where lease_owner like '{}'", owned_by(a.id())))
                .await
                >= 1
    })
    .await;
    assert!(a_holds, "worker A never held a job while others were done");
    // SIGKILL: no drain, no release; its jobs stay leased until their lease expires. They are read after
    // the kill: until then A may still commit one.
    let a_pid = a.id();
    a.kill().unwrap();
    a.wait().unwrap();
    let held: Vec<(i64, std::time::SystemTime)> = db
        .client
        .query("select job_id, lease_expires_at from enrichment_jobs where lease_owner like $1", &[&owned_by(a_pid)])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(!held.is_empty(), "the killed worker held no job (it had finished them all)");

    let all =
        wait_until(Duration::from_secs(90), || async { db.count("select count(*) from enrichment_jobs").await == 0 })
            .await;
    assert!(all, "{} jobs left", db.count("select count(*) from enrichment_jobs").await);
    // Every job done exactly once: one enriched history row per job and per company.
    assert_eq!(enriched(&db).await, jobs);
    assert_eq!(db.count("select count(distinct job_id) from company_enrichment_runs where enriched").await, jobs);
    assert_eq!(db.count("select count(distinct company_id) from company_enrichment_runs where enriched").await, jobs);
    // The dead worker's jobs were taken over by the other, and only after their leases expired.
    let b_run = db
        .count(&format!(
            "select run_id from enrichment_runs where mode = 'worker' and checkpoint_key like '{}'",
            owned_by(b.id())
        ))
        .await;
    for (job, expires) in &held {
        let row = db
            .client
            .query_one(
                "select run_id, updated_at, job_lease from company_enrichment_runs where job_id = $1 and enriched",
                &[job],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), b_run, "job {job} done by the surviving worker");
        assert!(row.get::<_, std::time::SystemTime>(1) >= *expires, "job {job} taken before its lease expired");
        assert!(row.get::<_, i64>(2) >= 2, "job {job} was leased again");
    }
    sigterm(&b);
    let status = tokio::task::spawn_blocking(move || b.wait().unwrap()).await.unwrap();
    assert!(status.success(), "SIGTERM ends a worker with 0: {status:?}");
    assert_eq!(
        db.count("select count(*) from enrichment_runs where mode = 'worker' and status = 'interrupted'").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stale_sweeper_enqueues_only_companies_past_the_age_at_most_its_bound_per_sweep() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 12).await;
    db.run(Overrides::default()).await;
    // Six enriched 40-45 days ago, four 5 days ago, the rest never.
    db.client
        .batch_execute(
            "with c as (select company_id, row_number() over (order by company_id) as n from companies) \
             update companies set enriched_at = now() - make_interval(days => case when c.n <= 6 then 39 + c.n::int \
               else 5 end) from c where c.company_id = companies.company_id and c.n <= 10",
        )
        .await
        .unwrap();
    let oldest = |n: i64| {
        let db = &db;
        async move {
            db.client
                .query(
                    "select company_id from companies where enriched_at < now() - interval '30 days' \
                     order by enriched_at limit $1",
                    &[&n],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, i64>(0))
                .collect::<Vec<_>>()
        }
    };
    let first_three = oldest(3).await;
    // A worker with the sweeper on: it sweeps when it starts, enriches what it enqueued, and exits.
    let web = FixtureWeb::start(healthy_sites(&companies), Duration::ZERO).await.unwrap();
    let env = worker_env(&web, &[("ENRICH_REFRESH_AFTER_DAYS", "30"), ("ENRICH_REFRESH_BATCH", "3")]);
    run_to_end(acraflow(&db, &["worker", "--exit-when-idle"], &env)).await;
    let stale: Vec<i64> = db
        .client
        .query("select company_id from company_enrichment_runs where job_reason = 'stale' order by company_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut want = first_three.clone();
    want.sort();
    assert_eq!(stale, want, "the three oldest past 30 days, and only them");
    assert_eq!(db.count("select count(*) from companies where enriched_at > now() - interval '1 hour'").await, 3);

    // The next sweeps: the three left past the age, then nothing (the young and the never-enriched stay).
    let client = &db.client;
    assert_eq!(acraflow::enrichment::queue::sweep_stale(client, 30, 5, None).await.unwrap(), 3);
    assert_eq!(db.count("select count(*) from enrichment_jobs where reason = 'stale' and priority = 300").await, 3);
    assert_eq!(acraflow::enrichment::queue::sweep_stale(client, 30, 5, None).await.unwrap(), 0, "each once");
    db.client.batch_execute("delete from enrichment_jobs").await.unwrap();
    assert_eq!(acraflow::enrichment::queue::sweep_stale(client, 30, 2, None).await.unwrap(), 2, "the bound holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_cap_and_the_llm_token_cap_hold_across_two_workers() {
    let db = TestDb::new().await;
    let companies = queued_companies(&db, 40).await;
    let jobs = db.count("select count(*) from enrichment_jobs").await;
    let web = FixtureWeb::start(healthy_sites(&companies), Duration::from_millis(50)).await.unwrap();
    let llm = web.llm_url();
    let env = worker_env(
        &web,
        &[
            ("ACRA_DIRECT_CONCURRENCY", "4"),
            ("ACRA_DIRECT_DAILY_CAP", "9"),
            ("LLM_BASE_URL", &llm),
            ("OPENAI_DAILY_TOKENS_CAP", "1200"),
        ],
    );
    let spawn = || acraflow(&db, &["worker", "--exit-when-idle"], &env).stdout(std::process::Stdio::null()).spawn();
    let (a, b) = (spawn().unwrap(), spawn().unwrap());
    for child in [a, b] {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
        assert!(out.status.success());
    }
    assert_eq!(enriched(&db).await, 9, "ACRA_DIRECT_DAILY_CAP across both workers");
    assert_eq!(db.count("select used from enrichment_usage where kind = 'enrichments'").await, 9);
    assert_eq!(db.count("select count(*) from enrichment_jobs where state = 'pending'").await, jobs - 9);
    // Tokens: never past the cap, whatever both workers asked for; the companies refused still enriched.
    let used = db.count("select coalesce(sum(llm_tokens), 0)::int8 from company_enrichment_runs").await;
    assert!(used > 0 && used <= 1200, "{used} tokens");
    assert!(db.count("select used from enrichment_usage where kind = 'llm_tokens'").await <= 1200);
    let refused = db
        .count("select count(*) from company_enrichment_runs where error like '%OPENAI_DAILY_TOKENS_CAP reached%'")
        .await;
    assert!(refused >= 1 && web.llm_calls() >= 1, "refused {refused}, calls {}", web.llm_calls());
    assert_eq!(
        db.count("select count(*) from company_enrichment_runs where enriched and status = 'failed'").await,
        0,
        "a refused LLM call degrades, never fails"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_is_retried_with_backoff_then_parked_shown_and_requeued_by_refresh_failed() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 1).await;
    db.run(Overrides::default()).await;
    let (name, uen) = companies.iter().find(|c| c.1.is_some()).cloned().unwrap();
    let uen = uen.unwrap();
    let sites = healthy_sites(&[(name, Some(uen.clone()))]);
    let host = sites[0].host.clone();
    let web = FixtureWeb::start(sites, Duration::ZERO).await.unwrap();
    web.set_sites_failing(true);
    run_to_end(acraflow(&db, &["refresh", "--uen", &uen], &[])).await;
    let env = worker_env(&web, &[("ENRICH_MAX_ATTEMPTS", "3"), ("ENRICH_RETRY_BACKOFF", "1s")]);
    let worker = acraflow(&db, &["worker"], &env).stdout(std::process::Stdio::null()).spawn().unwrap();

    let parked = wait_until(Duration::from_secs(60), || async {
        db.count("select count(*) from enrichment_jobs where state = 'parked'").await == 1
    })
    .await;
    assert!(parked, "the job was not parked");
    let job = db.client.query_one("select attempts, last_error from enrichment_jobs", &[]).await.unwrap();
    assert_eq!(job.get::<_, i32>(0), 3);
    assert!(job.get::<_, String>(1).contains("HTTP 500"), "{}", job.get::<_, String>(1));
    // Three attempts, the second 1 s after the first failed and the third 2 s after the second.
    let hits: Vec<Instant> = web.hits().iter().filter(|h| h.host == host).map(|h| h.at).collect();
    let mut attempts = vec![vec![hits[0]]];
    for w in hits.windows(2) {
        if w[1] - w[0] >= Duration::from_millis(900) {
            attempts.push(Vec::new());
        }
        attempts.last_mut().unwrap().push(w[1]);
    }
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    let gap = |i: usize| attempts[i + 1][0] - *attempts[i].last().unwrap();
    assert!(gap(0) >= Duration::from_millis(950) && gap(1) >= Duration::from_millis(1950), "{:?} {:?}", gap(0), gap(1));
    // One history row: the final failure, with why.
    let error: String = db
        .client
        .query_one("select error from company_enrichment_runs where enriched and status = 'failed'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(error.contains("HTTP 500") && error.contains("parked after 3 attempts"), "{error}");

    // status shows it, in text and JSON.
    let out = run_to_end(acraflow(&db, &["status"], &[])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("parked          1") && text.contains(&uen) && text.contains("refresh --failed"), "{text}");
    let out = run_to_end(acraflow(&db, &["status", "--json"], &[])).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["queue"]["parked"], 1);

    // The site recovers; `refresh --failed` puts the job back, and the worker enriches it.
    web.set_sites_failing(false);
    let out = run_to_end(acraflow(&db, &["refresh", "--failed"], &[])).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("re-queued 1 parked job"), "{out:?}");
    let ok = wait_until(Duration::from_secs(30), || async {
        db.count("select count(*) from company_enrichment_runs where enriched and status = 'ok'").await == 1
    })
    .await;
    let rows: Vec<(String, Option<String>)> = db
        .client
        .query("select status, error from company_enrichment_runs where enriched order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let jobs = db.client.query("select state, attempts, last_error, reason from enrichment_jobs", &[]).await.unwrap();
    let jobs: Vec<String> = jobs
        .iter()
        .map(|r| {
            format!(
                "{:?} {:?} {:?} {:?}",
                r.get::<_, String>(0),
                r.get::<_, i32>(1),
                r.get::<_, Option<String>>(2),
                r.get::<_, String>(3)
            )
        })
        .collect();
    assert!(ok, "the re-queued job was not enriched: history {rows:?}, jobs {jobs:?}");
    assert_eq!(db.count("select count(*) from enrichment_jobs").await, 0);
    sigterm(&worker);
    let status = tokio::task::spawn_blocking(move || {
        let mut w = worker;
        w.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_renewed_while_a_job_outlasts_them_so_no_other_worker_takes_it() {
    let db = TestDb::new().await;
    let companies = queued_companies(&db, 6).await;
    let jobs = db.count("select count(*) from enrichment_jobs").await;
    // Robots.txt and four pages at 600 ms each: about 3 s a company, three times the lease.
    let web = FixtureWeb::start(healthy_sites(&companies), Duration::from_millis(600)).await.unwrap();
    let env = worker_env(&web, &[("ACRA_DIRECT_CONCURRENCY", "3"), ("ENRICH_LEASE", "1s"), ("CRAWLER_TIMEOUT_S", "3")]);
    let spawn = || acraflow(&db, &["worker", "--exit-when-idle"], &env).stdout(std::process::Stdio::null()).spawn();
    let (a, b) = (spawn().unwrap(), spawn().unwrap());
    for child in [a, b] {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
        assert!(out.status.success());
    }
    assert_eq!(enriched(&db).await, jobs);
    assert!(db.count("select min(duration_ms)::int8 from company_enrichment_runs where enriched").await > 1500);
    // Each job leased once: renewals kept the other worker off it.
    assert_eq!(db.count("select count(*) from company_enrichment_runs where enriched and job_lease <> 1").await, 0);
}

/// Values that would fail the sink's transaction (NUL characters, names equal under the database's
/// `lower()` only, a title too long for the index) are cleaned; a result the database still refuses (here,
/// a trigger) is dead-lettered and its job parked, and the rest of the batch commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_value_stops_the_enrichment_sink() {
    use acraflow::enrichment::enrich::contacts::Contact;
    use acraflow::enrichment::enrich::{Enrichment, Status};
    use acraflow::enrichment::sink::{Done, EnrichmentSink, RetryPolicy};
    let db = TestDb::new().await;
    queued_companies(&db, 3).await;
    db.client
        .batch_execute(
            "create function refuse_poison() returns trigger language plpgsql as $$ begin \
               raise exception 'poison.example is refused by policy'; end $$; \
             create trigger refuse_poison before update on companies for each row \
               when (new.website_domain = 'poison.example') execute function refuse_poison();",
        )
        .await
        .unwrap();
    let mut lease_client = acraflow::db::connect(&db.dsn).await.unwrap();
    let leased = acraflow::enrichment::queue::lease(
        &mut lease_client,
        "test-worker",
        None,
        10,
        Duration::from_secs(60),
        None,
        "\"staging_acra_companies\"",
    )
    .await
    .unwrap();
    assert!(leased.jobs.len() >= 3, "{leased:?}");
    let person =
        |name: &str, title: String| Contact { name: name.into(), title: Some(title), linkedin_url: None, email: None };
    let done: Vec<Done> = leased
        .jobs
        .into_iter()
        .enumerate()
        .map(|(i, job)| {
            let mut x = Enrichment {
                status: Status::Ok,
                website_domain: Some(format!("site{i}.com.sg")),
                ..Default::default()
            };
            match i {
                0 => {
                    x.about_text = Some("About\u{0} us\u{1}".into());
                    x.public_emails = vec!["sales\u{0}@site0.com.sg".into()];
                    x.contacts = vec![
                        person("İLKER TAN", "Director".into()),
                        person("ILKER TAN", "Director".into()),
                        person("LONG TITLE", "Head of ".repeat(400)),
                    ];
                }
                1 => x.website_domain = Some("poison.example".into()),
                _ => {}
            }
            Done { job, enrichment: x }
        })
        .collect();
    let poisoned = done[1].job.company.id;
    let cleaned = done[0].job.company.id;
    let sink_client = acraflow::db::connect(&db.dsn).await.unwrap();
    let retry = RetryPolicy { max_attempts: 3, backoff: Duration::from_secs(60) };
    let mut sink = EnrichmentSink::new(sink_client, "test-worker".into(), 0, retry);
    let out = sink.write(&done).await.expect("a poison value never fails the sink");
    assert_eq!((out.ok, out.dead_lettered, out.parked), (done.len() as u64 - 1, 1, 1), "{out:?}");

    let about: String = db
        .client
        .query_one("select about_text from companies where company_id = $1", &[&cleaned])
        .await
        .unwrap()
        .get(0);
    assert_eq!(about, "About us");
    let emails: serde_json::Value = db
        .client
        .query_one("select public_emails from company_enrichment_runs where company_id = $1 and enriched", &[&cleaned])
        .await
        .unwrap()
        .get(0);
    assert_eq!(emails, serde_json::json!(["sales@site0.com.sg"]));
    assert!(db.count(&format!("select count(*) from contacts where company_id = {cleaned}")).await >= 2);
    assert!(db.count("select max(char_length(title))::int8 from contacts").await <= 300);
    // The refused one: a dead letter that says why, its job parked, its company untouched.
    let reason: String = db
        .client
        .query_one("select reason from dead_letters where stage = 'enrich' and source_seq = $1", &[&done[1].job.id])
        .await
        .unwrap()
        .get(0);
    assert!(reason.contains("poison.example is refused by policy") && reason.contains("refresh --failed"), "{reason}");
    assert_eq!(
        db.count(&format!("select count(*) from enrichment_jobs where company_id = {poisoned} and state = 'parked'"))
            .await,
        1
    );
    assert_eq!(
        db.count(&format!(
            "select count(*) from companies where company_id = {poisoned} and website_domain is not null"
        ))
        .await,
        0
    );
    assert_eq!(
        db.count("select count(*) from enrichment_jobs where state = 'pending'").await,
        0,
        "the others are done"
    );
}
