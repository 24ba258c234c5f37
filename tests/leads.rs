//! From enriched companies to leads: email verification (batched, cached, capped across workers) and lead
//! scores (deterministic, recomputed on every enrichment, tenant-scoped).

use std::collections::HashMap;
use std::time::Duration;

use acraflow::config::Overrides;
use acraflow::fixture_web::FixtureWeb;

use crate::enrich::live_companies;
use crate::support::TestDb;

fn env(web: &FixtureWeb, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("ACRA_DIRECT_PIPELINE", "acra_direct".to_owned()),
        ("ENRICH_HTTP_PROXY", web.proxy_url()),
        ("ENRICH_SEARCH_URL", web.search_url()),
        ("ENRICH_SEARCH_RATE", "off".into()),
        ("ENRICH_HOST_SPACING", "50ms".into()),
        ("CRAWLER_TIMEOUT_S", "2".into()),
        ("ENRICH_POLL_INTERVAL", "100ms".into()),
        ("ACRA_DIRECT_CONCURRENCY", "4".into()),
        ("ZEROBOUNCE_URL", web.zerobounce_url()),
        ("ZEROBOUNCE_API_KEY", "zb-test-key-31337".into()),
        ("ZEROBOUNCE_BATCH_RATE", "4/s".into()),
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

async fn acraflow(db: &TestDb, args: &[&str], env: &[(String, String)]) -> std::process::Output {
    crate::queue::run_to_end(crate::queue::acraflow(db, args, env)).await
}

/// Every email a company's latest enrichment saw, with its status.
async fn statuses(db: &TestDb) -> HashMap<String, String> {
    db.client
        .query(
            "select e->>0, e->>1 from company_enrichment_runs h, jsonb_array_elements(h.email_status) e \
             where h.enriched and h.email_status is not null",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_are_verified_in_batches_cached_and_never_paid_for_twice() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 60).await;
    let web = FixtureWeb::start(crate::queue::healthy_sites(&companies), Duration::from_millis(10)).await.unwrap();
    // ZeroBounce's validatebatch limit, scaled down: one call per 5 s, and a call within 3.5 s of the last
    // is refused (the margin is for a call sent late by a loaded machine).
    web.set_verify_rate_limit(1, Duration::from_millis(3500));
    let env = env(&web, &[("ZEROBOUNCE_BATCH_RATE", "1/5s")]);
    acraflow(&db, &["backfill"], &env).await;

    let seen = statuses(&db).await;
    assert!(seen.len() >= 20, "{seen:?}");
    for (email, status) in &seen {
        let want = if email.starts_with("sales@") { "valid" } else { "catch-all" };
        assert_eq!(status, want, "{email}");
    }
    let paid = web.verified_emails();
    let distinct: std::collections::HashSet<&String> = paid.iter().collect();
    assert_eq!(paid.len(), distinct.len(), "an email was paid for twice in one run");
    assert_eq!(paid.len(), seen.len());
    assert_eq!(db.count("select count(*) from email_verification_cache").await, seen.len() as i64);
    // Batches gather the emails of the companies that finished meanwhile, and keep to the limit.
    let (calls, refused) = web.verify_calls();
    assert_eq!(refused, 0, "the provider's rate limit was exceeded");
    assert!(calls * 3 <= seen.len() / 2, "{calls} validatebatch calls for {} companies' emails", seen.len() / 2);
    // Sales-facing order: the verified address first.
    let first: Vec<String> = db
        .client
        .query("select public_emails->>0 from company_enrichment_runs where enriched and jsonb_array_length(public_emails) > 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!first.is_empty() && first.iter().all(|e| e.starts_with("sales@")), "{first:?}");

    // Every company enriched again: every email comes from the cache, nothing is paid for.
    acraflow(&db, &["refresh", "--where", "true", "--force"], &[]).await;
    acraflow(&db, &["worker", "--exit-when-idle"], &env).await;
    let enrichments = db.count("select count(*) from company_enrichment_runs where enriched").await;
    assert!(enrichments >= 2 * seen.len() as i64 / 2, "{enrichments}");
    assert_eq!(web.verified_emails().len(), paid.len(), "the second run paid for verifications");
    assert_eq!(
        db.count("select used from enrichment_usage where kind = 'email_verifications'").await,
        paid.len() as i64
    );
    // The API key is nowhere in what acraflow stored.
    assert_eq!(
        db.count("select count(*) from company_enrichment_runs where coalesce(error, '') || coalesce(notes::text, '') like '%zb-test-key%'").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_verification_cap_holds_across_two_workers_and_an_outage_only_leaves_emails_unverified() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 60).await;
    db.run(Overrides::default()).await;
    acraflow(&db, &["refresh", "--where", "true"], &[]).await;
    let jobs = db.count("select count(*) from enrichment_jobs").await;
    let web = FixtureWeb::start(crate::queue::healthy_sites(&companies), Duration::from_millis(10)).await.unwrap();
    let env = env(&web, &[("ZEROBOUNCE_MAX_VERIFICATIONS", "7")]);
    // Two workers share the provider's limit (4 a second here, paced in the database; the provider refuses
    // a seventh call within a second, a margin for calls sent late by a loaded machine).
    web.set_verify_rate_limit(6, Duration::from_secs(1));
    let spawn = || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_acraflow"));
        cmd.args(["worker", "--exit-when-idle"]).env("POSTGRES_DSN", &db.dsn).stdout(std::process::Stdio::null());
        for (k, v) in &env {
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
        assert!(out.status.success());
    }
    let paid = web.verified_emails().len();
    assert!((5..=7).contains(&paid), "{paid} verifications against a cap of 7 (a company's two emails go together)");
    assert!(db.count("select used from enrichment_usage where kind = 'email_verifications'").await <= 7);
    let seen = statuses(&db).await;
    let unverified = seen.values().filter(|s| *s == "unverified").count();
    assert_eq!(unverified, seen.len() - paid, "past the cap, emails stay unverified");
    assert_eq!(web.verify_calls().1, 0, "two workers together exceeded the provider's rate limit");
    let status = String::from_utf8_lossy(&acraflow(&db, &["status"], &env).await.stdout).into_owned();
    let line = format!("verifications   {paid} of 7 ({} left)", 7 - paid);
    assert!(status.contains(&line), "status lacks {line:?}:\n{status}");
    // The cap fails no company: every job was worked off.
    assert_eq!(db.count("select count(*) from enrichment_jobs").await, 0, "of {jobs} jobs");
    assert_eq!(db.count("select count(*) from company_enrichment_runs where enriched and status = 'failed'").await, 0);

    // An outage of the provider: retried, then the emails stay unverified and the companies are enriched.
    web.set_verify_failing(true);
    db.client.batch_execute("delete from enrichment_usage; delete from email_verification_cache").await.unwrap();
    acraflow(&db, &["refresh", "--where", "true", "--force"], &[]).await;
    acraflow(&db, &["worker", "--exit-when-idle"], &env).await;
    assert_eq!(db.count("select count(*) from company_enrichment_runs where enriched and status = 'failed'").await, 0);
    assert_eq!(db.count("select count(*) from email_verification_cache").await, 0);
    assert_eq!(
        db.count("select coalesce(max(used), 0) from enrichment_usage where kind = 'email_verifications'").await,
        0,
        "refused calls are given back"
    );
}

/// Scores match the features they were computed from, move when a feature moves, and another tenant's
/// session sees none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_follow_their_features_and_row_level_security_hides_another_tenants() {
    let db = TestDb::new().await;
    let companies = live_companies(&db, 40).await;
    let web = FixtureWeb::start(crate::queue::healthy_sites(&companies), Duration::from_millis(10)).await.unwrap();
    let dsn = db
        .tenant_role(
            "s",
            "tenant-pw-2",
            "alter table lead_scores enable row level security;
             alter table lead_scores force row level security;
             create policy tenant_scores on lead_scores
               using (tenant_id = current_setting('request.tenant_id', true))
               with check (tenant_id = current_setting('request.tenant_id', true));",
        )
        .await;
    let mut env = env(&web, &[("ACRA_DIRECT_TENANT_ID", "acme")]);
    env.push(("POSTGRES_DSN".into(), dsn.clone()));
    acraflow(&db, &["backfill"], &env).await;

    let scored = db.count("select count(*) from lead_scores").await;
    let enriched = db
        .count("select count(distinct company_id) from company_enrichment_runs where enriched and status <> 'failed'")
        .await;
    assert!(scored > 10 && scored == enriched, "{scored} scores for {enriched} companies");
    assert_eq!(db.count("select count(*) from lead_scores where tenant_id is distinct from 'acme'").await, 0);
    assert_eq!(db.count("select count(*) from lead_features").await, scored);
    // Each score is the weighted mean of its features with the default weights (sum 1).
    let off = db
        .count(
            "select count(*) from lead_scores s join lead_features f using (company_id) where abs(s.score - ( \
               0.20 * (f.features->>'email')::float8 + 0.10 * (f.features->>'phone')::float8 \
               + 0.15 * (f.features->>'website')::float8 + 0.05 * (f.features->>'about')::float8 \
               + 0.10 * (f.features->>'linkedin')::float8 + 0.10 * (f.features->>'size')::float8 \
               + 0.10 * (f.features->>'age')::float8 + 0.10 * (f.features->>'hiring')::float8 \
               + 0.10 * (f.features->>'industry')::float8)) > 0.0001 \
               or s.bucket <> case when s.score >= 0.66 then 'High' when s.score >= 0.33 then 'Medium' else 'Low' end \
               or s.rationale not like s.bucket || ' %'",
        )
        .await;
    assert_eq!(off, 0, "scores that do not follow from their features");
    // Every email is catch-all or valid here: the email feature is 1 (sales@ is valid).
    assert_eq!(db.count("select count(*) from lead_features where (features->>'email')::float8 <> 1").await, 0);

    // A feature changes (the verified address stops being valid): the score drops by its weight, once.
    let (company, before): (i64, f64) = {
        let r = db
            .client
            .query_one("select company_id, score::float8 from lead_scores order by company_id limit 1", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    db.client
        .batch_execute("update email_verification_cache set status = 'invalid' where email like 'sales@%'")
        .await
        .unwrap();
    let uen: String =
        db.client.query_one("select uen from companies where company_id = $1", &[&company]).await.unwrap().get(0);
    let mut refresh_env = env.clone();
    refresh_env.retain(|(k, _)| k != "ACRA_DIRECT_PIPELINE");
    acraflow(&db, &["refresh", "--uen", &uen], &refresh_env).await;
    acraflow(&db, &["worker", "--exit-when-idle"], &env).await;
    let after: f64 = db
        .client
        .query_one("select score::float8 from lead_scores where company_id = $1", &[&company])
        .await
        .unwrap()
        .get(0);
    assert!((before - after - 0.10).abs() < 1e-4, "email 1 -> 0.5 (catch-all only): {before} -> {after}");
    assert_eq!(db.count(&format!("select count(*) from lead_scores where company_id = {company}")).await, 1);

    // Another tenant's session sees none of acme's scores and changes none.
    let globex = acraflow::db::connect_as(&dsn, Some("globex"), "acraflow").await.unwrap();
    let seen: i64 = globex.query_one("select count(*) from lead_scores", &[]).await.unwrap().get(0);
    assert_eq!(seen, 0);
    assert_eq!(globex.execute("update lead_scores set score = 1", &[]).await.unwrap(), 0);
    let acme = acraflow::db::connect_as(&dsn, Some("acme"), "acraflow").await.unwrap();
    let mine: i64 = acme.query_one("select count(*) from lead_scores", &[]).await.unwrap().get(0);
    assert_eq!(mine, scored);
}

/// Companies in Odoo by UEN (`res.partner` with `is_company` and `ref`): how many partners each has.
fn partners_by_uen(web: &FixtureWeb) -> HashMap<String, Vec<i64>> {
    let mut by: HashMap<String, Vec<i64>> = HashMap::new();
    for p in web.odoo_records("res.partner") {
        if p["is_company"] == true {
            by.entry(p["ref"].as_str().unwrap_or("").to_owned()).or_default().push(p["id"].as_i64().unwrap());
        }
    }
    by
}

/// The export to Odoo: each qualifying company once, with its contacts and one lead; a re-run updates
/// instead of duplicating; a worker killed mid-export leaves no duplicate; an outage is ridden out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_odoo_export_is_idempotent_through_a_kill_a_rerun_and_an_outage() {
    use acraflow::fixture_web::odoo;
    let db = TestDb::new().await;
    let companies = live_companies(&db, 40).await;
    let web = FixtureWeb::start(crate::queue::healthy_sites(&companies), Duration::from_millis(10)).await.unwrap();
    let (odoo_url, contacts_url) = (web.odoo_url(), web.contacts_url());
    let env = env(
        &web,
        &[
            ("ODOO_URL", &odoo_url),
            ("ODOO_DB", odoo::DB),
            ("ODOO_USERNAME", odoo::USERNAME),
            ("ODOO_API_KEY", odoo::API_KEY),
            ("SCORE_MIN_EXPORT", "0.3"),
            ("ODOO_RETRY_BACKOFF", "300ms"),
            ("ENABLE_APIFY_LINKEDIN", "true"),
            ("APIFY_LINKEDIN_URL", &contacts_url),
            ("ENRICH_LEASE", "3s"),
            ("CRAWLER_TIMEOUT_S", "1"),
            ("ODOO_RATE", "40/s"),
        ],
    );
    web.set_odoo_rate_limit(50, Duration::from_secs(1));

    // 1. Killed mid-export: Odoo applies a call, then takes 2 s to answer; the worker dies in between.
    web.set_odoo_delay(Duration::from_secs(2));
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_acraflow"));
    cmd.arg("backfill")
        .env("POSTGRES_DSN", &db.dsn)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let created =
        crate::support::wait_until(Duration::from_secs(60), || async { !partners_by_uen(&web).is_empty() }).await;
    assert!(created, "no partner was ever created");
    child.kill().unwrap();
    let _ = child.wait();
    web.set_odoo_delay(Duration::ZERO);
    let before_kill: HashMap<String, Vec<i64>> = partners_by_uen(&web);
    // Its leases (enrichment jobs and exports) return after ENRICH_LEASE.
    tokio::time::sleep(Duration::from_secs(4)).await;
    acraflow(&db, &["worker", "--exit-when-idle"], &env).await;

    let qualifying = db.count("select count(*) from lead_scores where score >= 0.3").await;
    assert!(qualifying >= 10, "{qualifying} companies scored at or above 0.3");
    let partners = partners_by_uen(&web);
    assert_eq!(partners.len() as i64, qualifying, "every qualifying company is in Odoo");
    for (uen, ids) in &partners {
        assert_eq!(ids.len(), 1, "{uen} has {} partners in Odoo (kill before: {:?})", ids.len(), before_kill.get(uen));
    }
    assert_eq!(db.count("select count(*) from odoo_exports where state = 'done'").await, qualifying);
    // What Odoo returned is stored: each export's partner is the one with its UEN.
    let stored = db
        .client
        .query("select c.uen, e.partner_id, e.lead_id from odoo_exports e join companies c using (company_id)", &[])
        .await
        .unwrap();
    for r in &stored {
        let uen: String = r.get(0);
        assert_eq!(Some(partners[&uen][0]), r.get::<_, Option<i64>>(1), "{uen}");
        assert!(r.get::<_, Option<i64>>(2).is_some(), "{uen} has no lead id");
    }
    let leads = web.odoo_records("crm.lead");
    let mut lead_partners: Vec<i64> = leads.iter().map(|l| l["partner_id"].as_i64().unwrap()).collect();
    lead_partners.sort();
    lead_partners.dedup();
    assert_eq!((leads.len(), lead_partners.len()), (qualifying as usize, qualifying as usize), "one lead per company");
    let contacts = web.odoo_records("res.partner").into_iter().filter(|p| p["parent_id"].is_i64()).count();
    assert_eq!(contacts as i64, 2 * qualifying, "two contacts per company, as child partners, once");

    // 2. A re-run updates what is there.
    acraflow(&db, &["refresh", "--where", "true", "--force"], &[]).await;
    acraflow(&db, &["worker", "--exit-when-idle"], &env).await;
    assert_eq!(partners_by_uen(&web), partners, "a re-run created or lost partners");
    assert_eq!(web.odoo_records("crm.lead").len(), leads.len(), "a re-run created leads");
    let (requests, refused) = web.odoo_requests();
    assert_eq!(refused, 0, "{refused} of {requests} requests to Odoo came faster than ODOO_RATE");
    assert!(web.odoo_calls().iter().filter(|c| *c == "res.partner.write").count() as i64 >= 2 * qualifying);

    // 3. An outage: the enrichment commits, the export waits and retries, then goes out.
    web.set_odoo_down(true);
    let uen: String = db
        .client
        .query_one(
            "select c.uen from lead_scores s join companies c using (company_id) where s.score >= 0.3 limit 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let enriched_before = db.count("select count(*) from company_enrichment_runs where enriched").await;
    acraflow(&db, &["refresh", "--uen", &uen, "--force"], &[]).await;
    acraflow(&db, &["worker", "--exit-when-idle"], &env).await;
    assert_eq!(db.count("select count(*) from company_enrichment_runs where enriched").await, enriched_before + 1);
    let row = db
        .client
        .query_one("select e.state, e.attempts, e.last_error from odoo_exports e join companies c using (company_id) where c.uen = $1", &[&uen])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pending");
    assert!(row.get::<_, i32>(1) >= 1);
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("Odoo answered HTTP 503"));
    let status = acraflow(&db, &["status"], &[]).await;
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains("odoo pending") && status.contains("Odoo answered HTTP 503"), "{status}");
    assert!(!status.contains(odoo::API_KEY));
    web.set_odoo_down(false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    acraflow(&db, &["worker", "--exit-when-idle"], &env).await;
    assert_eq!(db.count("select count(*) from odoo_exports where state <> 'done'").await, 0);
    assert_eq!(partners_by_uen(&web), partners);
    // The key is nowhere in what acraflow stored.
    assert_eq!(
        db.count(&format!("select count(*) from odoo_exports where last_error like '%{}%'", odoo::API_KEY)).await,
        0
    );

    // 4. An export that fails ODOO_MAX_ATTEMPTS times is parked, shown, and re-queued by one command.
    web.set_odoo_down(true);
    let once: Vec<(String, String)> = env.iter().cloned().chain([("ODOO_MAX_ATTEMPTS".into(), "1".into())]).collect();
    acraflow(&db, &["refresh", "--uen", &uen], &[]).await;
    acraflow(&db, &["worker", "--exit-when-idle"], &once).await;
    assert_eq!(db.count("select count(*) from odoo_exports where state = 'parked'").await, 1);
    let status = String::from_utf8_lossy(&acraflow(&db, &["status"], &[]).await.stdout).into_owned();
    assert!(status.contains("odoo parked") && status.contains("acraflow refresh --exports"), "{status}");
    web.set_odoo_down(false);
    let out = acraflow(&db, &["refresh", "--exports"], &[]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("re-queued 1 parked export"));
    acraflow(&db, &["worker", "--exit-when-idle"], &env).await;
    assert_eq!(db.count("select count(*) from odoo_exports where state <> 'done'").await, 0);
    assert_eq!(partners_by_uen(&web), partners);
}
