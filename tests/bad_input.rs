//! Bad rows get their documented treatment, and the run goes on.

use acraflow::config::Overrides;

use crate::support::TestDb;

async fn company(db: &TestDb, where_: &str) -> Option<tokio_postgres::Row> {
    db.client
        .query_opt(
            &format!(
                "select uen, name, industry_code, industry_norm, incorporation_year, status from companies where {where_}"
            ),
            &[],
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_get_the_documented_treatment_and_the_run_goes_on() {
    let db = TestDb::new().await;
    db.seed(500, 1).await;
    let long_name = "X".repeat(10_000);
    db.client
        .execute(
            "insert into staging_acra_companies \
               (uen, entity_name, entity_status_description, registration_incorporation_date, primary_ssic_code, primary_ssic_description) \
             values \
               ('na', 'na', 'na', 'na', 'na', 'na'), \
               ('202000001K', $1, 'Live', '2020-01-01', '62011', 'na'), \
               ('202000002K', '株式会社 Ünïcödé 🚀 PTE. LTD.', 'Live Company', '31/12/2019', '9999999', 'SOMETHING ODD'), \
               ('202000003K', 'BAD DATE PTE. LTD.', 'Live', '2019-13-45', ' 62.011 ', 'na'), \
               ('202000004K', 'REPEAT OLD NAME', 'Live', '2018-05-05', '4711', 'na'), \
               ('202000004K', 'na', 'Live', '2018-05-05', '47111', 'na'), \
               ('202000004K', 'REPEAT NEW NAME', 'Live Company', '2018-05-05', '47111', 'na'), \
               (' 202000005k ', '  spaced pte. ltd.  ', '  Live  ', ' 2017-02-28 ', '01111', 'na'), \
               ('202000006K', 'na', 'Live', '2019-01-01', '01111', 'na'), \
               (NULL, 'Nameless Uen Trading', 'Live', '2015-06-01', NULL, NULL), \
               ('', 'NAMELESS UEN TRADING', 'Live', '2015-06-01', NULL, NULL), \
               ('NA', 'Nameless Uen Trading', 'Live', '2016-06-01', NULL, NULL)",
            &[&long_name],
        )
        .await
        .unwrap();
    let s = db.run(Overrides::default()).await;
    assert_eq!(s.status, "completed");
    assert_eq!(s.counters.rows_in, 512);

    // Dead letters: each names the row and the field.
    let dead = db
        .client
        .query("select staging_id, stage, reason, row->>'entity_name' from dead_letters order by staging_id", &[])
        .await
        .unwrap();
    let reasons: Vec<(String, String)> = dead.iter().map(|r| (r.get(1), r.get(2))).collect();
    assert_eq!(dead.len(), 3, "{reasons:?}");
    assert!(reasons[0].0 == "filter" && reasons[0].1.contains("neither uen nor entity_name"), "{reasons:?}");
    assert!(reasons[1].0 == "filter" && reasons[1].1.contains("entity_name is 10000 characters"), "{reasons:?}");
    assert!(reasons[2].0 == "upsert" && reasons[2].1.contains("entity_name: missing"), "{reasons:?}");
    assert_eq!(dead[1].get::<_, String>(3).len(), 10_000, "the dead letter keeps the row as it was");
    assert_eq!(s.counters.dead_lettered, 3);
    assert_eq!(db.count("select count(*) from companies where uen in ('202000001K', '202000006K')").await, 0);

    // Unicode is kept as is; a d/m/y date is not a date; an SSIC code of 7 digits is no code.
    let r = company(&db, "uen = '202000002K'").await.unwrap();
    assert_eq!(r.get::<_, String>(1), "株式会社 Ünïcödé 🚀 PTE. LTD.");
    assert_eq!(r.get::<_, Option<i32>>(4), None);
    assert_eq!(r.get::<_, Option<String>>(2), None);
    assert_eq!(r.get::<_, Option<String>>(3).as_deref(), Some("SOMETHING ODD"), "falls back to the description");

    // An impossible date gives no year; ' 62.011 ' is code 62011 with its SSIC 2020 title.
    let r = company(&db, "uen = '202000003K'").await.unwrap();
    assert_eq!(r.get::<_, Option<i32>>(4), None);
    assert_eq!(r.get::<_, Option<String>>(2).as_deref(), Some("62011"));
    let title: String =
        db.client.query_one("select title from ssic_ref where code = '62011'", &[]).await.unwrap().get(0);
    assert_eq!(r.get::<_, Option<String>>(3), Some(title));

    // Repeated uens in one batch: one company, the latest row wins, one history row.
    let r = company(&db, "uen = '202000004K'").await.unwrap();
    assert_eq!(r.get::<_, String>(1), "REPEAT NEW NAME");
    assert_eq!(r.get::<_, Option<String>>(2).as_deref(), Some("47111"));
    assert_eq!(r.get::<_, Option<String>>(5).as_deref(), Some("Live Company"));
    assert_eq!(
        db.count("select count(*) from company_enrichment_runs h join companies c using (company_id) where c.uen = '202000004K'").await,
        1
    );

    // Padding and case are normalised; 4-digit codes are zero-padded.
    let r = company(&db, "uen = '202000005K'").await.unwrap();
    assert_eq!(r.get::<_, String>(1), "spaced pte. ltd.");
    assert_eq!(r.get::<_, Option<String>>(5).as_deref(), Some("Live"));
    assert_eq!(r.get::<_, Option<i32>>(4), Some(2017));

    // No uen: keyed by (lower(name), year); 'na', '' and NULL are all missing.
    let named =
        db.count("select count(*) from companies where uen is null and lower(name) = 'nameless uen trading'").await;
    assert_eq!(named, 2, "one company for 2015 (two rows), one for 2016");

    db.assert_companies_match_rules().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_company_struck_off_later_is_updated_but_not_processed_again() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "insert into staging_acra_companies (uen, entity_name, entity_status_description) values \
             ('201500001A', 'SOON GONE PTE. LTD.', 'Live Company'), ('201500002A', 'NEVER HERE PTE. LTD.', 'Struck Off')",
        )
        .await
        .unwrap();
    db.run(Overrides::default()).await;
    db.client
        .batch_execute(
            "insert into staging_acra_companies (uen, entity_name, entity_status_description) values \
             ('201500001A', 'SOON GONE PTE. LTD.', 'Struck Off')",
        )
        .await
        .unwrap();
    let s = db.run(Overrides::default()).await;
    assert_eq!((s.counters.rows_in, s.counters.filtered, s.counters.processed), (1, 1, 0));
    let status: String =
        db.client.query_one("select status from companies where uen = '201500001A'", &[]).await.unwrap().get(0);
    assert_eq!(status, "Struck Off", "the registry's word must reach companies");
    assert_eq!(db.count("select count(*) from companies where uen = '201500002A'").await, 0);
    assert_eq!(db.count("select count(*) from company_enrichment_runs").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_batch_after_a_crash_adds_no_second_history_row_or_dead_letter() {
    let db = TestDb::new().await;
    db.seed(1_000, 4).await;
    db.client.batch_execute("insert into staging_acra_companies (uen, entity_name) values ('na', 'na')").await.unwrap();
    db.run(Overrides::default()).await;
    let history = db.count("select count(*) from company_enrichment_runs").await;
    // As if the sink's last commits were lost after the writes: rewind the checkpoint and replay.
    db.client.batch_execute("update service_progress set last_id = 0, cursor = 'id'").await.unwrap();
    let s = db.run(Overrides { force: Some(true), ..Default::default() }).await;
    assert_eq!(s.counters.rows_in, 1_001);
    assert_eq!(db.count("select count(*) from company_enrichment_runs").await, history, "same positions, no new rows");
    assert_eq!(db.count("select count(*) from dead_letters").await, 1);
    db.assert_companies_match_rules().await;
}

/// A value the user's `companies` table refuses (here a check constraint and a column narrower than the
/// registry's names): the changes that carry it are dead-lettered with the database's reason, found by
/// halving the batch, and every other change in the batch is written. The run goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_database_refuses_is_dead_lettered_and_the_batch_goes_on() {
    let db = TestDb::new().await;
    db.seed(400, 17).await;
    db.client
        .batch_execute(
            "update staging_acra_companies set entity_status_description = 'Live Company'; \
             update staging_acra_companies set entity_name = 'REFUSED ' || repeat('X', 80) where id in (50, 250); \
             alter table companies add constraint short_names check (length(name) <= 60)",
        )
        .await
        .unwrap();
    let s = db.run(Overrides { batch_size: Some(100), ..Default::default() }).await;
    assert_eq!(s.counters.rows_in, 400);
    assert!(s.counters.dead_lettered >= 2, "{:?}", s.counters);
    let refused = db
        .client
        .query("select staging_id, reason from dead_letters where stage = 'upsert' order by staging_id", &[])
        .await
        .unwrap();
    let ids: Vec<i64> = refused.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, [50, 250]);
    let reason: String = refused[0].get(1);
    assert!(reason.contains("short_names"), "the reason names the constraint: {reason}");
    // Everything else is there: every other row that was not dead-lettered has its company.
    let long = db.count("select count(*) from companies where name like 'REFUSED %'").await;
    assert_eq!(long, 0);
    let missing = db
        .count(
            "select count(*) from staging_acra_companies s where s.id not in (50, 250) \
               and not exists (select 1 from dead_letters d where d.staging_id = s.id) \
               and not exists (select 1 from companies c where c.uen = upper(btrim(s.uen)) \
                                 or (c.uen is null and lower(c.name) = lower(btrim(s.entity_name))))",
        )
        .await;
    assert_eq!(missing, 0, "rows of the batches that held a refused value are written");
}
