//! Migrations against a database that already has some of the tables, with more or fewer columns.

use acraflow::config::Overrides;

use crate::support::TestDb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_companies_table_with_extra_columns_and_no_industry_works() {
    let db = TestDb::empty().await;
    db.client
        .batch_execute(
            "create table companies ( \
               company_id bigserial primary key, uen text unique, name text not null, \
               crm_owner text not null default 'unassigned', notes jsonb, \
               created_at timestamptz not null default now()); \
             insert into companies (uen, name, crm_owner) values ('201908808K', 'OLD NAME', 'alice');",
        )
        .await
        .unwrap();
    let mut client = acraflow::db::connect(&db.dsn).await.unwrap();
    acraflow::db::migrate(&mut client).await.unwrap();
    acraflow::db::migrate(&mut client).await.expect("migrations are idempotent");
    let has_industry =
        db.count("select count(*) from information_schema.columns where table_name = 'companies' and column_name = 'industry'").await;
    assert_eq!(has_industry, 0, "migrate must not add the optional industry column");

    db.client
        .batch_execute(
            "insert into staging_acra_companies (uen, entity_name, entity_status_description, primary_ssic_code) values \
             ('201908808K', 'NEW NAME PTE. LTD.', 'Live Company', '62011'), ('201900001A', 'FRESH PTE. LTD.', 'Live', '01111')",
        )
        .await
        .unwrap();
    let s = db.run(Overrides::default()).await;
    assert_eq!(s.counters.processed, 2);
    let row = db
        .client
        .query_one("select name, crm_owner, industry_norm from companies where uen = '201908808K'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "NEW NAME PTE. LTD.");
    assert_eq!(row.get::<_, String>(1), "alice", "columns acraflow does not own are left alone");
    assert!(row.get::<_, Option<String>>(2).is_some());
    assert_eq!(db.count("select count(*) from companies where crm_owner = 'unassigned'").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_loads_the_real_ssic_reference_and_refuses_to_run_unmigrated() {
    let db = TestDb::new().await;
    assert_eq!(db.count("select count(*) from ssic_ref").await, 1711);
    assert_eq!(db.count("select count(*) from ssic_ref where level = 'subclass' and length(code) = 5").await, 1023);
    let title: String =
        db.client.query_one("select title from ssic_ref where code = '01111'", &[]).await.unwrap().get(0);
    assert_eq!(title, "Growing of leafy and fruit vegetables");

    let bare = TestDb::empty().await;
    let err = bare.try_run(Overrides::default()).await.unwrap_err();
    assert!(err.to_string().contains("run `acraflow migrate` first"), "{err}");
}

/// A deployment from before the queue (migrations 001-004, enriched history, inline enrichment): `migrate`
/// keeps every history row, marks its companies' last enrichment, and the acra_direct pipeline runs on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_upgrades_a_deployment_from_before_the_queue_and_keeps_its_history() {
    let db = TestDb::empty().await;
    for sql in [
        include_str!("../sql/001_staging.sql"),
        include_str!("../sql/002_companies.sql"),
        include_str!("../sql/003_engine.sql"),
        include_str!("../sql/004_enrichment.sql"),
    ] {
        db.client.batch_execute(sql).await.unwrap();
    }
    db.client
        .batch_execute(
            "insert into staging_acra_companies (uen, entity_name, entity_status_description, \
               registration_incorporation_date) values ('201911111A', 'OLD ENRICHED PTE. LTD.', 'Live Company', '2015-01-01'); \
             insert into companies (uen, name, website_domain) values ('201911111A', 'OLD ENRICHED PTE. LTD.', 'oldenriched.com.sg'); \
             insert into company_enrichment_runs (company_id, source_lsn, source_seq, staging_id, status, enriched, \
               website_domain, updated_at) \
             select company_id, '0/10', 1, 1, 'ok', true, 'oldenriched.com.sg', now() - interval '3 days' from companies;",
        )
        .await
        .unwrap();
    let mut client = acraflow::db::connect(&db.dsn).await.unwrap();
    acraflow::db::migrate(&mut client).await.unwrap();
    acraflow::db::migrate(&mut client).await.expect("migrations are idempotent");
    assert_eq!(
        db.count("select count(*) from company_enrichment_runs where enriched and source_lsn = '0/10'").await,
        1
    );
    assert_eq!(
        db.count("select count(*) from companies where enriched_at between now() - interval '4 days' and now() - interval '2 days'").await,
        1,
        "the last enrichment from history"
    );
    // The pipeline file with an `enrich` operator still runs: the company, enriched 3 days ago, is within
    // ENRICH_RECHECK_DAYS, so it is refreshed and not enqueued.
    let mut spec = acraflow::config::PipelineSpec::acra_direct();
    spec.apply(&Overrides {
        enrich: acraflow::config::EnrichOverrides {
            search_url: Some("http://127.0.0.1:9/?q={query}".into()),
            ..Default::default()
        },
        ..Default::default()
    });
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let s = acraflow::pipeline::run(&db.dsn, &spec, acraflow::pipeline::Mode::Backfill, rx).await.unwrap();
    assert_eq!((s.counters.rows_in, s.counters.skipped), (1, 1), "{:?}", s.counters);
    assert_eq!(db.count("select count(*) from enrichment_jobs").await, 0);
    assert_eq!(db.count("select count(*) from company_enrichment_runs").await, 1);
}
