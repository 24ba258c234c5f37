//! `acraflow demo`: the whole job on the embedded default, ending in a report a person reads at a glance.
//!
//! - It works in a database of its own (`acraflow_demo` in the private cluster), made afresh each time, so
//!   its sample rows and the local web's domains never sit where a real run would trust them, and its
//!   report is about this run alone. On a database the user names (`--dsn`) it refuses unless told
//!   `--yes`, and it then counts only its own runs.
//! - A local web stands in for the internet: a site of one of the kinds real Singapore SMEs have (see
//!   [`crate::fixture_web::trust`]) for most companies, with its ground truth, so the report can say how
//!   many websites were found and how many of them are right.
//! - Per-company logs go to `<home>/demo.log`; the terminal gets a few progress lines and the report, on
//!   completion, Ctrl-C or a timeout alike. Its replication slot is dropped at the end.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::cli::DemoArgs;
use crate::commands::{shutdown_signal, supervise, Database};
use crate::config::{Overrides, PipelineSpec, DEFAULT_TABLE};
use crate::db;
use crate::error::{Error, Result};
use crate::fixture_web::trust::{trust_web, Registered, Truth};
use crate::pipeline::{self, Mode};
use crate::seed;
use crate::source::quote_table;

pub const DATABASE: &str = "acraflow_demo";
const SLOT: &str = "acraflow_demo";
const KEY: &str = "demo";
/// How long each phase may take before the demo stops and reports what it has.
const PHASE_TIMEOUT: Duration = Duration::from_secs(900);

/// Companies added while the demo streams, to show a registry change flowing through live.
const LIVE: [&str; 3] = [
    "DEMO HARBOUR ALPHA LOGISTICS PTE. LTD.",
    "DEMO HARBOUR BRAVO LOGISTICS PTE. LTD.",
    "DEMO HARBOUR CHARLIE LOGISTICS PTE. LTD.",
];

pub async fn demo(database: &Database, args: &DemoArgs, log: &std::path::Path) -> Result<()> {
    let q = |e| Error::db("running the demo", e);
    let dsn = if database.embedded {
        fresh_database(&database.dsn).await?
    } else {
        if !args.yes {
            return Err(Error::config(format!(
                "demo: {} is not acraflow's private database. The demo seeds sample rows into {DEFAULT_TABLE}, \
                 writes sample companies and crawls a local web for every company in staging. Run it without \
                 --dsn/POSTGRES_DSN (it then uses a database of its own), or pass --yes to run it here anyway",
                db::describe(&database.dsn)
            )));
        }
        database.dsn.clone()
    };
    let mut client = db::connect(&dsn).await?;
    db::migrate(&mut client).await?;
    let staged: i64 = client.query_one(&format!("select count(*) from {DEFAULT_TABLE}"), &[]).await.map_err(q)?.get(0);
    if staged == 0 {
        let n = seed::seed(&client, &quote_table(DEFAULT_TABLE), args.rows, 20).await?;
        distinct_names(&client).await?;
        println!("seeded {n} ACRA-shaped sample rows (real UENs, SSIC codes, postal codes) into {DEFAULT_TABLE}");
    } else {
        println!("{DEFAULT_TABLE} already holds {staged} rows; the demo uses them");
    }
    let before: i64 =
        client.query_one("select coalesce(max(run_id), 0) from enrichment_runs", &[]).await.map_err(q)?.get(0);

    // The local web: one site (or a trap) per company, with what enrichment should find there.
    // UENs of a kind ACRA never issues (T + time + Z), new each demo.
    let stamp = chrono::Utc::now().format("%M%S%3f").to_string();
    let live: Vec<Registered> = LIVE
        .iter()
        .enumerate()
        .map(|(i, name)| Registered {
            name: (*name).to_owned(),
            uen: format!("T{stamp}{i}Z"),
            postal: Some(format!("0{}8{i}01", 1 + i)),
            street: Some("ALEXANDRA ROAD".into()),
        })
        .collect();
    let mut companies: Vec<Registered> = client
        .query(
            &format!(
                "select distinct on (upper(btrim(uen))) btrim(entity_name), upper(btrim(uen)), \
                   nullif(btrim(postal_code), ''), nullif(btrim(street_name), '') \
                 from {DEFAULT_TABLE} where entity_name is not null and uen is not null \
                 order by upper(btrim(uen)), id desc"
            ),
            &[],
        )
        .await
        .map_err(q)?
        .iter()
        .map(|r| Registered { name: r.get(0), uen: r.get(1), postal: r.get(2), street: r.get(3) })
        .collect();
    companies.extend(live.iter().cloned());
    let (sites, truth) = trust_web(&companies);
    let web = crate::fixture_web::FixtureWeb::start(sites, Duration::from_millis(20))
        .await
        .map_err(|e| Error::io("starting the local web", e))?;
    println!("a local web stands in for the internet: {} sites and traps, search, an LLM and an Odoo CRM", truth.len());

    client.execute("delete from service_progress where key = $1", &[&KEY]).await.map_err(q)?;
    drop_slot(&client).await;
    let mut spec = PipelineSpec::acra_direct();
    spec.ops = args.ops.to_spec();
    spec.apply(&Overrides {
        checkpoint_key: Some(KEY.into()),
        slot: Some(SLOT.into()),
        enrich: crate::config::EnrichOverrides {
            concurrency: Some(64),
            host_spacing: Some(Duration::from_millis(100)),
            timeout_s: Some(2.0),
            proxy: Some(web.proxy_url()),
            search_url: Some(web.search_url()),
            reader_url: Some(web.reader_url()),
            llm_base_url: Some(web.llm_url()),
            // The local web's search and reader are ours: no budget to keep to.
            search_rate: Some(None),
            reader_rate: Some(None),
            odoo_rate: Some(None),
            // Leads at or above the default SCORE_MIN_EXPORT go to the local web's Odoo.
            odoo_url: Some(web.odoo_url()),
            odoo_db: Some(crate::fixture_web::odoo::DB.into()),
            odoo_username: Some(crate::fixture_web::odoo::USERNAME.into()),
            odoo_api_key: Some(crate::config::Secret::new(crate::fixture_web::odoo::API_KEY)),
            odoo_retry_backoff: Some(Duration::from_secs(1)),
            // Emails are verified by the local web's ZeroBounce (no pace to keep: it is ours).
            zerobounce_url: Some(web.zerobounce_url()),
            zerobounce_api_key: Some(crate::config::Secret::new("demo")),
            zerobounce_batch_rate: Some(None),
            ..Default::default()
        },
        ..Default::default()
    });
    if let Some(addr) = args.ops.metrics_addr() {
        crate::telemetry::metrics::serve(addr).await?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut signal = shutdown_signal();
    let forward = stop_tx.clone();
    tokio::spawn(async move {
        if signal.wait_for(|s| *s).await.is_ok() {
            let _ = forward.send(true);
        }
    });
    let engine_dsn = dsn.clone();
    let engine = tokio::spawn(async move { supervise(&engine_dsn, &spec, Mode::Stream, stop_rx).await });

    let started = Instant::now();
    println!("running: the registry pipeline backfills staging, then streams; enrichment crawls beside it ...");
    let phases = phases(&client, &stop_tx, &live, started).await;
    let _ = stop_tx.send(true);
    let outcome = engine.await.map_err(|e| Error::new(crate::ErrorKind::Io, format!("the engine task ended: {e}")))?;
    drop_slot(&client).await;
    let mut report = Report::read(&client, before, &truth, &live).await?;
    report.log = log.exists().then(|| log.to_owned());
    let (stopped, error) = match (&phases, &outcome) {
        (Err(e), _) | (_, Err(e)) => (true, Some(pipeline::error_chain(e))),
        (Ok(done), Ok(_)) => (!done, None),
    };
    report.print(stopped, started.elapsed(), &dsn, database.embedded);
    match error {
        Some(e) => Err(Error::new(crate::ErrorKind::Io, e)),
        None => Ok(()),
    }
}

/// Waits for the backfill to catch up, the queue to drain, and the live companies to stream through and
/// be enriched. `Ok(false)`: stopped (Ctrl-C or a timeout) before the end.
async fn phases(
    client: &tokio_postgres::Client,
    stop: &watch::Sender<bool>,
    live: &[Registered],
    started: Instant,
) -> Result<bool> {
    let caught_up = format!(
        "select count(*) from pg_replication_slots s join pg_stat_activity a on a.pid = s.active_pid \
         where s.slot_name = '{SLOT}' and a.application_name = 'acraflow-replication' and exists \
         (select 1 from service_progress p where p.key = '{KEY}' and (p.cursor = 'lsn' or \
          p.last_id >= (select coalesce(max(id), 0) from {DEFAULT_TABLE})))"
    );
    if !wait(client, stop, &caught_up).await? {
        return Ok(false);
    }
    println!("registry caught up in {:.1}s; now streaming changes from slot {SLOT}", started.elapsed().as_secs_f64());
    let drained = "select count(*) where not exists \
         (select 1 from enrichment_jobs where state in ('pending', 'leased') and not_before <= now())";
    if !wait(client, stop, drained).await? {
        return Ok(false);
    }
    println!(
        "enrichment worked off its queue in {:.1}s; adding {} companies to staging ...",
        started.elapsed().as_secs_f64(),
        live.len()
    );
    for c in live {
        client
            .execute(
                &format!(
                    "insert into {DEFAULT_TABLE} (uen, entity_name, entity_status_description, \
                       registration_incorporation_date, primary_ssic_code, primary_ssic_description, postal_code, \
                       street_name) \
                     values ($1, $2, 'Live Company', '2016-03-01', '52101', 'Freight transport arrangement', $3, $4)"
                ),
                &[&c.uen, &c.name, &c.postal, &c.street],
            )
            .await
            .map_err(|e| Error::db("adding the demo's live companies", e))?;
    }
    let t = Instant::now();
    let uens: Vec<String> = live.iter().map(|c| c.uen.clone()).collect();
    let enriched = format!(
        "select case when count(*) >= {} then 1 else 0 end::int8 from company_enrichment_runs h join companies c using (company_id) \
         where c.uen = any(array['{}']) and h.enriched",
        uens.len(),
        uens.join("','")
    );
    if !wait(client, stop, &enriched).await? {
        return Ok(false);
    }
    println!("the {} new companies were streamed and enriched in {:.1}s", uens.len(), t.elapsed().as_secs_f64());
    let exported = "select count(*) where not exists (select 1 from odoo_exports where state = 'pending')";
    if !wait(client, stop, exported).await? {
        return Ok(false);
    }
    Ok(true)
}

/// The sample generator draws names from a few hundred word pairs; real companies' names are distinct, and
/// the local web can only give a site to a name it has not seen. A Singapore place name after the first word
/// makes them (nearly all) distinct: `RED DOT HOLDINGS PTE. LTD.` becomes `RED DOT TAMPINES HOLDINGS PTE. LTD.`.
async fn distinct_names(client: &tokio_postgres::Client) -> Result<()> {
    const PLACES: [&str; 48] = [
        "ANG MO KIO",
        "BEDOK",
        "BISHAN",
        "BOON LAY",
        "BUKIT BATOK",
        "BUKIT MERAH",
        "BUKIT PANJANG",
        "BUKIT TIMAH",
        "CHANGI",
        "CHINATOWN",
        "CLEMENTI",
        "GEYLANG",
        "HOLLAND",
        "HOUGANG",
        "JURONG",
        "KALLANG",
        "KATONG",
        "KRANJI",
        "LAVENDER",
        "LIM CHU KANG",
        "MANDAI",
        "MARINA",
        "MARINE PARADE",
        "NEWTON",
        "NOVENA",
        "ORCHARD",
        "PASIR RIS",
        "PAYA LEBAR",
        "PIONEER",
        "PUNGGOL",
        "QUEENSTOWN",
        "RAFFLES",
        "SELETAR",
        "SEMBAWANG",
        "SENGKANG",
        "SERANGOON",
        "SIGLAP",
        "SIMEI",
        "TAMPINES",
        "TANGLIN",
        "TANJONG PAGAR",
        "TELOK AYER",
        "TIONG BAHRU",
        "TOA PAYOH",
        "TUAS",
        "UPPER THOMSON",
        "WOODLANDS",
        "YISHUN",
    ];
    let places: Vec<&str> = PLACES.to_vec();
    client
        .execute(
            &format!(
                "update {DEFAULT_TABLE} set entity_name = split_part(entity_name, ' ', 1) || ' ' || \
                   ($1::text[])[1 + (id * 7919) % cardinality($1::text[])] || ' ' || \
                   substr(entity_name, strpos(entity_name, ' ') + 1) \
                 where strpos(entity_name, ' ') > 0"
            ),
            &[&places],
        )
        .await
        .map_err(|e| Error::db("making the sample names distinct", e))?;
    Ok(())
}

/// Polls `count_sql` until it is at least 1; `false` when the user stops the demo or the phase times out.
async fn wait(client: &tokio_postgres::Client, stop: &watch::Sender<bool>, count_sql: &str) -> Result<bool> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    while Instant::now() < deadline && !*stop.borrow() {
        let n: i64 = client.query_one(count_sql, &[]).await.map_err(|e| Error::db("watching the demo", e))?.get(0);
        if n >= 1 {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(false)
}

/// `acraflow_demo` in the private cluster, dropped (with its slot) and created again.
async fn fresh_database(dsn: &str) -> Result<String> {
    let admin = db::connect(dsn).await?;
    let q = |e| Error::db(format!("recreating the {DATABASE} database"), e);
    let _ = admin
        .execute(
            "select pg_terminate_backend(active_pid) from pg_replication_slots where database = $1 and active_pid is not null",
            &[&DATABASE],
        )
        .await;
    // A database with a replication slot cannot be dropped.
    let left = drop_slots(&admin, "database = $1", DATABASE).await.map_err(q)?;
    if left > 0 {
        return Err(Error::new(
            crate::ErrorKind::Config,
            format!("{DATABASE} still has {left} replication slot(s) in use: is another demo running?"),
        ));
    }
    admin.batch_execute(&format!("drop database if exists {DATABASE} with (force)")).await.map_err(q)?;
    admin.batch_execute(&format!("create database {DATABASE}")).await.map_err(q)?;
    Ok(db::with_dbname(dsn, DATABASE))
}

/// Drops the demo's slot, waiting for its walsender to let go of it.
async fn drop_slot(client: &tokio_postgres::Client) {
    match drop_slots(client, "slot_name = $1", SLOT).await {
        Ok(0) => {}
        Ok(_) => tracing::warn!(
            slot = SLOT,
            "the demo's replication slot is still in use; drop it with `acraflow slots drop acraflow_demo`"
        ),
        Err(e) => tracing::warn!(error = %e, slot = SLOT, "could not drop the demo's replication slot"),
    }
}

/// Drops the replication slots `filter` (with `$1` = `value`) selects, waiting up to 10 s for a walsender
/// to let go of one; returns how many are left.
async fn drop_slots(
    client: &tokio_postgres::Client,
    filter: &str,
    value: &str,
) -> std::result::Result<i64, tokio_postgres::Error> {
    let sql = format!(
        "select count(*) from pg_replication_slots where {filter} and \
           (active or pg_drop_replication_slot(slot_name) is null)"
    );
    let mut left = 0;
    for _ in 0..100 {
        left = client.query_one(&sql, &[&value]).await?.get::<_, i64>(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(left)
}

/// What this demo's runs did, read back from the database.
struct Report {
    staged: i64,
    processed: i64,
    filtered: i64,
    skipped: i64,
    dead: i64,
    companies: i64,
    enriched: i64,
    ok: i64,
    degraded: i64,
    failed: i64,
    with_site: i64,
    site_found: i64,
    site_right: i64,
    site_wrong: i64,
    emails: i64,
    /// Emails by verification status (valid, catch-all, ...), over every company's latest enrichment.
    verified: Vec<(String, i64)>,
    phones: i64,
    linkedin: i64,
    about: i64,
    reasons: Vec<(String, i64)>,
    /// Leads by bucket (High, Medium, Low) and the Odoo exports (done, pending or parked).
    buckets: Vec<(String, i64)>,
    exports: Vec<(String, i64)>,
    examples: Vec<[String; 5]>,
    log: Option<std::path::PathBuf>,
}

impl Report {
    async fn read(
        client: &tokio_postgres::Client,
        before: i64,
        truth: &[Truth],
        live: &[Registered],
    ) -> Result<Report> {
        let q = |e| Error::db("reading the demo's results", e);
        let one = |r: &tokio_postgres::Row, i: usize| r.get::<_, Option<i64>>(i).unwrap_or(0);
        let runs = client
            .query_one(
                "select sum(rows_in)::int8, sum(processed)::int8, sum(filtered)::int8, sum(skipped)::int8, \
                   (select count(*) from dead_letters where run_id > $1) \
                 from enrichment_runs where run_id > $1 and mode <> 'worker'",
                &[&before],
            )
            .await
            .map_err(q)?;
        // The latest enrichment of each company in this demo.
        let latest = "select distinct on (h.company_id) h.company_id, h.status, h.error, h.website_domain, \
               h.public_emails, h.phones, h.linkedin_url, h.about_text, c.uen, c.name, h.email_status \
             from company_enrichment_runs h join companies c using (company_id) \
             where h.run_id > $1 and h.enriched order by h.company_id, h.id desc";
        let rows = client.query(latest, &[&before]).await.map_err(q)?;
        let by_uen: std::collections::HashMap<&str, &Truth> = truth.iter().map(|t| (t.uen.as_str(), t)).collect();
        let mut r = Report {
            staged: one(&runs, 0),
            processed: one(&runs, 1),
            filtered: one(&runs, 2),
            skipped: one(&runs, 3),
            dead: one(&runs, 4),
            companies: client.query_one("select count(*) from companies", &[]).await.map_err(q)?.get(0),
            enriched: rows.len() as i64,
            ok: 0,
            degraded: 0,
            failed: 0,
            with_site: 0,
            site_found: 0,
            site_right: 0,
            site_wrong: 0,
            emails: 0,
            verified: Vec::new(),
            phones: 0,
            linkedin: 0,
            about: 0,
            reasons: Vec::new(),
            buckets: pairs(
                client,
                "select s.bucket, count(*) from lead_scores s where s.company_id in \
                   (select company_id from company_enrichment_runs where run_id > $1) \
                 group by 1 order by min(s.score) desc",
                before,
            )
            .await?,
            exports: pairs(
                client,
                "select e.state, count(*) from odoo_exports e where e.company_id in \
                   (select company_id from company_enrichment_runs where run_id > $1) group by 1 order by 1",
                before,
            )
            .await?,
            examples: Vec::new(),
            log: None,
        };
        let mut reasons: std::collections::HashMap<String, i64> = Default::default();
        let mut verified: std::collections::HashMap<String, i64> = Default::default();
        let live_uens: Vec<&str> = live.iter().map(|c| c.uen.as_str()).collect();
        for row in &rows {
            let status: String = row.get(1);
            let error: Option<String> = row.get(2);
            let domain: Option<String> = row.get(3);
            let list = |i: usize| {
                row.get::<_, Option<serde_json::Value>>(i).and_then(|v| v.as_array().cloned()).unwrap_or_default()
            };
            let (emails, phones) = (list(4), list(5));
            let linkedin: Option<String> = row.get(6);
            let about: Option<String> = row.get(7);
            let uen: Option<String> = row.get(8);
            match status.as_str() {
                "ok" => r.ok += 1,
                "degraded" => r.degraded += 1,
                _ => r.failed += 1,
            }
            if status != "ok" {
                if let Some(e) = &error {
                    *reasons.entry(reason(e)).or_default() += 1;
                }
            }
            let expected = uen.as_deref().and_then(|u| by_uen.get(u));
            if expected.is_some_and(|t| t.domain.is_some()) {
                r.with_site += 1;
            }
            if let Some(d) = &domain {
                r.site_found += 1;
                match expected.and_then(|t| t.domain.as_deref()) {
                    Some(want) if want.trim_start_matches("www.") == d.trim_start_matches("www.") => r.site_right += 1,
                    _ => r.site_wrong += 1,
                }
            }
            r.emails += i64::from(!emails.is_empty());
            for pair in list(10) {
                if let Some(status) = pair.get(1).and_then(|s| s.as_str()) {
                    *verified.entry(status.to_owned()).or_default() += 1;
                }
            }
            r.phones += i64::from(!phones.is_empty());
            r.linkedin += i64::from(linkedin.is_some());
            r.about += i64::from(about.as_deref().is_some_and(|a| !a.is_empty()));
            let is_live = uen.as_deref().is_some_and(|u| live_uens.contains(&u));
            if is_live || (r.examples.len() < 5 && domain.is_some() && !emails.is_empty()) {
                let first = |v: &[serde_json::Value]| v.first().and_then(|x| x.as_str()).unwrap_or("-").to_owned();
                r.examples.push([
                    uen.unwrap_or_default(),
                    row.get(9),
                    domain.unwrap_or_else(|| "-".into()),
                    first(&emails),
                    first(&phones),
                ]);
            }
        }
        // The live companies first, then the others, five in all.
        r.examples.sort_by_key(|e| !live_uens.contains(&e[0].as_str()));
        r.examples.truncate(5);
        let mut reasons: Vec<(String, i64)> = reasons.into_iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        reasons.truncate(5);
        r.reasons = reasons;
        let mut verified: Vec<(String, i64)> = verified.into_iter().collect();
        verified.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        r.verified = verified;
        Ok(r)
    }

    fn print(&self, stopped: bool, took: Duration, dsn: &str, embedded: bool) {
        let pct = |n: i64, of: i64| if of > 0 { format!("{:.0}%", 100.0 * n as f64 / of as f64) } else { "-".into() };
        let width = terminal_width();
        println!();
        println!(
            "demo {} in {:.0}s",
            if stopped { "STOPPED before the end (Ctrl-C or a timeout): what it did so far" } else { "completed" },
            took.as_secs_f64()
        );
        println!(
            "  registry   {} staging rows read: {} companies written or refreshed, {} unchanged,",
            self.staged, self.processed, self.skipped
        );
        println!(
            "             {} not live (struck off, dissolved, ...: not kept), {} dead letters",
            self.filtered, self.dead
        );
        println!(
            "  enrichment {} companies: {} ok, {} no website verified, {} failed",
            self.enriched, self.ok, self.degraded, self.failed
        );
        println!(
            "  websites   found for {} of the {} companies that have one ({}); {} right, {} wrong",
            self.site_found.min(self.with_site.max(self.site_found)),
            self.with_site,
            pct(self.site_right, self.with_site),
            self.site_right,
            self.site_wrong
        );
        println!(
            "  found      emails {} ({}), phones {} ({}), LinkedIn {} ({}), about text {} ({})",
            self.emails,
            pct(self.emails, self.enriched),
            self.phones,
            pct(self.phones, self.enriched),
            self.linkedin,
            pct(self.linkedin, self.enriched),
            self.about,
            pct(self.about, self.enriched),
        );
        if !self.verified.is_empty() {
            let total: i64 = self.verified.iter().map(|(_, n)| n).sum();
            let parts: Vec<String> = self.verified.iter().take(4).map(|(s, n)| format!("{n} {s}")).collect();
            println!("  verified   {total} emails with ZeroBounce: {}", parts.join(", "));
        }
        if !self.buckets.is_empty() {
            let of = |list: &[(String, i64)], k: &str| list.iter().find(|(b, _)| b == k).map_or(0, |(_, n)| *n);
            println!(
                "  leads      High {}, Medium {}, Low {}; exported to Odoo {}{}",
                of(&self.buckets, "High"),
                of(&self.buckets, "Medium"),
                of(&self.buckets, "Low"),
                of(&self.exports, "done"),
                match (of(&self.exports, "pending"), of(&self.exports, "parked")) {
                    (0, 0) => String::new(),
                    (p, k) => format!(" ({p} still pending, {k} parked)"),
                }
            );
        }
        if !self.reasons.is_empty() {
            println!("  top reasons a company got no website or failed:");
            for (reason, n) in &self.reasons {
                println!("    {n:>6}  {}", cut(reason, width.saturating_sub(14)));
            }
        }
        if !self.examples.is_empty() {
            println!("\n  some enriched companies ({} in `companies` now):", self.companies);
            // uen, name, website, email, phone: the name takes what the terminal leaves.
            let fixed = [11usize, 0, 22, 24, 12];
            let name_w = width.saturating_sub(2 + 4 * 2 + fixed.iter().sum::<usize>()).clamp(12, 40);
            let widths = [11, name_w, 22, 24, 12];
            let line = |cells: [&str; 5]| {
                let parts: Vec<String> =
                    cells.iter().zip(widths).map(|(c, w)| format!("{:<w$}", cut(c, w), w = w)).collect();
                println!("  {}", parts.join("  ").trim_end());
            };
            line(["uen", "name", "website", "email", "phone"]);
            for e in &self.examples {
                line([&e[0], &e[1], &e[2], &e[3], &e[4]]);
            }
        }
        println!("\nnext:");
        if let Some(log) = &self.log {
            println!("  the full log of this demo:  {}", log.display());
        }
        let me = invocation();
        if embedded {
            println!("  the demo's data, in database {DATABASE} of the private cluster (kept until the next demo):");
            println!("    {me} psql -d {DATABASE} -- -c 'select uen, name, website_domain from companies'");
        } else {
            println!("  what ran, checkpoints, queue (with the same POSTGRES_DSN):");
            println!("    {me} status");
            println!("  the demo's data:  psql \"{}\"", db::describe(dsn));
        }
        println!("  your own database (check says what is missing, run starts the job):");
        println!("    POSTGRES_DSN='host=... dbname=...' {me} check");
        println!("  real ACRA files from data.gov.sg:");
        println!("    {me} import FILE.csv ...");
        if me != "acraflow" {
            println!("  (`cargo install --path .` puts acraflow on your PATH)");
        }
    }
}

/// How the user can call this binary: `acraflow` when that is what their PATH finds, else its path
/// (relative to the working directory when under it, as `./dev demo` leaves it in target/release).
fn invocation() -> String {
    let Ok(me) = std::env::current_exe().and_then(std::fs::canonicalize) else { return "acraflow".into() };
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .any(|dir| std::fs::canonicalize(dir.join("acraflow")).is_ok_and(|found| found == me))
    });
    if on_path {
        return "acraflow".into();
    }
    let relative = std::env::current_dir()
        .ok()
        .and_then(|cwd| me.strip_prefix(std::fs::canonicalize(cwd).ok()?).ok().map(std::path::Path::to_path_buf));
    relative.unwrap_or(me).display().to_string()
}

async fn pairs(client: &tokio_postgres::Client, sql: &str, before: i64) -> Result<Vec<(String, i64)>> {
    Ok(client
        .query(sql, &[&before])
        .await
        .map_err(|e| Error::db("reading the demo's leads", e))?
        .iter()
        .map(|r| (r.get::<_, Option<String>>(0).unwrap_or_default(), r.get(1)))
        .collect())
}

/// An error reduced to what it says about the company, so the same reason counts once: addresses, hosts,
/// numbers and candidate lists dropped.
fn reason(error: &str) -> String {
    if error.starts_with("no website") {
        let scored = error.contains("scored") || error.contains(" (0.");
        let why = if error.contains("(parked") {
            "no website: the likely domain is parked or for sale"
        } else if scored {
            "no website verified: the candidates found do not match the registry"
        } else if error.contains("(directory") {
            "no website: only directories list the company"
        } else if error.contains("tried") {
            "no website: the search results could not be read"
        } else {
            "no website found: no search result or likely domain"
        };
        return why.to_owned();
    }
    let mut out = String::new();
    for word in error.split_whitespace() {
        let host_like = word.contains("://")
            || (word.contains('.') && word.chars().any(|c| c.is_ascii_alphabetic()) && !word.starts_with("robots.txt"));
        let numeric =
            word.trim_matches(|c: char| !c.is_ascii_alphanumeric()).chars().all(|c| c.is_ascii_digit() || c == '.');
        if host_like {
            if !out.ends_with("…") {
                out.push_str(" …");
            }
        } else if numeric && !word.is_empty() {
            out.push_str(" N");
        } else {
            out.push(' ');
            out.push_str(word);
        }
        if word.ends_with(';') || word.ends_with(':') {
            break;
        }
    }
    out.trim().trim_end_matches([';', ':']).to_owned()
}

/// `s` cut to `width` characters, an ellipsis marking the cut.
pub(crate) fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// The terminal's columns (`COLUMNS`, else 100: what fits a laptop's split screen).
fn terminal_width() -> usize {
    std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).filter(|&c: &usize| c >= 60).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_group_across_companies() {
        assert_eq!(
            reason("no website verified; tried acme.co.uk (0.10), www.sgbiz12.net (directory)"),
            "no website verified: the candidates found do not match the registry"
        );
        assert_eq!(
            reason("no website verified; tried a.sg (HTTP 404 from http://a.sg/), b.sg (parked)"),
            "no website: the likely domain is parked or for sale"
        );
        assert_eq!(reason("robots.txt disallows https://www.x.sg/"), "robots.txt disallows …");
        assert_eq!(reason("HTTP 503 from https://a.sg/"), "HTTP N from …");
        assert_eq!(reason("HTTP 500 from https://a.sg/; retried"), "HTTP N from …");
    }

    #[test]
    fn cells_are_cut_to_their_width() {
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abc", 4), "abc");
    }
}
