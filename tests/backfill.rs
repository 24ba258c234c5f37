//! The backfill through filter -> dedupe -> upsert -> sink, checked against the tables a user would read.

use std::time::Duration;

use acraflow::config::Overrides;

use crate::support::{wait_until, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_of_20k_rows_gives_exactly_the_companies_the_rules_give() {
    let db = TestDb::new().await;
    db.seed(20_000, 7).await;
    // Real ACRA data repeats some UENs: make sure this sample exercises the latest-row-wins rule.
    assert!(db.count("select count(*) - count(distinct uen) from staging_acra_companies").await > 0);

    let s = db.run(Overrides::default()).await;

    db.assert_companies_match_rules().await;
    let c = s.counters;
    assert_eq!(c.rows_in, 20_000);
    assert_eq!(c.processed + c.filtered + c.skipped + c.dead_lettered, 20_000);
    assert!(c.filtered > 10_000, "the real status mix excludes most entities: {c:?}");
    // One history row per processed change, each for a distinct company, each company processed once.
    let history = db.count("select count(*) from company_enrichment_runs").await;
    assert_eq!(history as u64, c.processed);
    assert_eq!(db.count("select count(distinct company_id) from company_enrichment_runs").await, history);
    assert_eq!(db.count("select count(*) from companies").await, history);
    // The run header carries the same counters.
    let header = db
        .client
        .query_one("select status, rows_in, processed, filtered, ended_at is not null from enrichment_runs", &[])
        .await
        .unwrap();
    assert_eq!(header.get::<_, String>(0), "completed");
    assert_eq!(header.get::<_, i64>(1), 20_000);
    assert_eq!(header.get::<_, i64>(2) as u64, c.processed);
    assert_eq!(header.get::<_, i64>(3) as u64, c.filtered);
    assert!(header.get::<_, bool>(4));
    // The checkpoint is at the last staging row.
    let last_id = db.count("select last_id from service_progress where key = 'acra_direct'").await;
    assert_eq!(last_id, db.count("select max(id) from staging_acra_companies").await);
    // industry_norm comes from the real SSIC 2020 titles.
    assert_eq!(
        db.count(
            "select count(*) from companies c join ssic_ref s on s.code = c.industry_code \
             where c.industry_norm = s.title and c.industry = s.title"
        )
        .await,
        db.count("select count(*) from companies").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backfill_resumes_without_loss_or_duplicates() {
    let db = TestDb::new().await;
    db.seed(30_000, 11).await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_acraflow"))
        .args(["backfill", "--batch-size", "200"])
        .env("POSTGRES_DSN", &db.dsn)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let progressed = wait_until(Duration::from_secs(60), || async {
        db.count("select coalesce(max(last_id), 0) from service_progress").await >= 4_000
    })
    .await;
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    assert!(progressed, "the backfill never reached staging id 4000");
    let status: String = db.client.query_one("select status from enrichment_runs", &[]).await.unwrap().get(0);
    assert_eq!(status, "running", "the first run must have died mid-way for this test to mean anything");
    let checkpoint = db.count("select last_id from service_progress").await;
    assert!(checkpoint < 30_000, "killed after the end");

    let out = db.cli(&["backfill"], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows_in: i64 =
        db.client.query_one("select rows_in from enrichment_runs where run_id = 2", &[]).await.unwrap().get(0);
    assert_eq!(rows_in, 30_000 - checkpoint, "the resumed run starts right after the checkpoint");

    db.assert_companies_match_rules().await;
    let history = db.count("select count(*) from company_enrichment_runs").await;
    assert_eq!(db.count("select count(distinct company_id) from company_enrichment_runs").await, history);
    assert_eq!(db.count("select count(*) from companies").await, history, "every company has exactly one history row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_after_id_start_from_uen_and_batch_limit() {
    let db = TestDb::new().await;
    db.seed(3_000, 3).await;

    let s =
        db.run(Overrides { start_after_id: Some(2_000), checkpoint_key: Some("a".into()), ..Default::default() }).await;
    assert_eq!(s.counters.rows_in, 1_000);
    assert_eq!(db.count("select count(*) from company_enrichment_runs where staging_id <= 2000").await, 0);

    let s = db
        .run(Overrides {
            batch_limit: Some(700),
            batch_size: Some(300),
            checkpoint_key: Some("b".into()),
            ..Default::default()
        })
        .await;
    assert_eq!(s.counters.rows_in, 700);
    assert_eq!(db.count("select last_id from service_progress where key = 'b'").await, 700);
    // Without a start setting, the next run resumes from the checkpoint.
    let s = db.run(Overrides { batch_limit: Some(100), checkpoint_key: Some("b".into()), ..Default::default() }).await;
    assert_eq!(s.counters.rows_in, 100);
    assert_eq!(db.count("select last_id from service_progress where key = 'b'").await, 800);

    let pivot: String = db
        .client
        .query_one("select uen from staging_acra_companies order by uen offset 1500 limit 1", &[])
        .await
        .unwrap()
        .get(0);
    let after = db.count(&format!("select count(*) from staging_acra_companies where uen > '{pivot}'")).await;
    let s = db
        .run(Overrides {
            start_from_uen: Some(pivot.clone()),
            checkpoint_key: Some("c".into()),
            batch_size: Some(250),
            ..Default::default()
        })
        .await;
    assert_eq!(s.counters.rows_in as i64, after, "exactly the rows whose uen sorts after {pivot}");
    // A uen walk that reaches the end hands over to an id cursor, so later runs pick up only new rows.
    let cursor: String =
        db.client.query_one("select cursor from service_progress where key = 'c'", &[]).await.unwrap().get(0);
    assert_eq!(cursor, "id");
    let s = db.run(Overrides { checkpoint_key: Some("c".into()), ..Default::default() }).await;
    assert_eq!(s.counters.rows_in, 0);
    db.seed(10, 99).await;
    let s = db.run(Overrides { checkpoint_key: Some("c".into()), ..Default::default() }).await;
    assert_eq!(s.counters.rows_in, 10, "only the rows ingested since");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uen_walk_interrupted_by_the_limit_resumes_in_uen_order() {
    let db = TestDb::new().await;
    db.seed(2_000, 5).await;
    let key = || Some("u".to_string());
    let first = db
        .run(Overrides {
            start_from_uen: Some("0".into()),
            batch_limit: Some(500),
            checkpoint_key: key(),
            ..Default::default()
        })
        .await;
    assert_eq!(first.counters.rows_in, 500);
    let rest = db.run(Overrides { checkpoint_key: key(), ..Default::default() }).await;
    assert_eq!(
        first.counters.rows_in + rest.counters.rows_in,
        db.count("select count(*) from staging_acra_companies where uen > '0'").await as u64
    );
    db.assert_companies_match_rules().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_run_skips_what_the_first_processed_and_rewrites_nothing() {
    let db = TestDb::new().await;
    db.seed(5_000, 13).await;
    let first = db.run(Overrides::default()).await;
    assert!(first.counters.processed > 1_000);
    let snapshot = "select string_agg(company_id || ':' || xmin::text, ',' order by company_id) from companies";
    let before: String = db.client.query_one(snapshot, &[]).await.unwrap().get(0);
    let history = db.count("select count(*) from company_enrichment_runs").await;

    let second = db.run(Overrides { start_after_id: Some(0), ..Default::default() }).await;
    assert_eq!(second.counters.processed, 0, "{:?}", second.counters);
    assert_eq!(second.counters.rows_in, 5_000);
    assert_eq!(db.count("select count(*) from company_enrichment_runs").await, history);
    let after: String = db.client.query_one(snapshot, &[]).await.unwrap().get(0);
    assert_eq!(before, after, "unchanged companies must not be rewritten (xmin changed)");
    db.assert_companies_match_rules().await;

    // ENRICH_RECHECK_DAYS=0 makes every history row old enough; ACRA_DIRECT_FORCE ignores history.
    let third = db.run(Overrides { start_after_id: Some(0), recheck_days: Some(0), ..Default::default() }).await;
    assert_eq!(third.counters.processed, first.counters.processed);
    let fourth = db
        .run(Overrides {
            start_after_id: Some(0),
            skip_if_any_history: Some(true),
            recheck_days: Some(0),
            ..Default::default()
        })
        .await;
    assert_eq!(fourth.counters.processed, 0, "any history skips when ENRICH_SKIP_IF_ANY_HISTORY=true");
    let fifth = db.run(Overrides { start_after_id: Some(0), force: Some(true), ..Default::default() }).await;
    assert_eq!(fifth.counters.processed, first.counters.processed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclude_status_and_min_age_settings() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "insert into staging_acra_companies (uen, entity_name, entity_status_description, registration_incorporation_date) values \
             ('201900001A', 'Old Live', 'Live Company', '2019-01-01'), \
             ('201900002B', 'Struck', 'Struck Off', '2019-01-01'), \
             ('202600003C', 'Young Live', 'Live', to_char(current_date - 3, 'YYYY-MM-DD'))",
        )
        .await
        .unwrap();
    let s = db.run(Overrides { min_age_days: Some(30), ..Default::default() }).await;
    assert_eq!((s.counters.processed, s.counters.filtered), (1, 2));
    assert_eq!(db.count("select count(*) from companies").await, 1);

    // A custom list replaces the default: now "struck off" passes and "live company" is excluded.
    let s = db
        .run(Overrides {
            start_after_id: Some(0),
            exclude_status: Some("live company".into()),
            force: Some(true),
            ..Default::default()
        })
        .await;
    assert_eq!((s.counters.processed, s.counters.filtered), (2, 1));
    assert_eq!(db.count("select count(*) from companies where name in ('Struck', 'Young Live')").await, 2);
}

/// Another writer inserts a company between the upsert's probe and its insert (here: a transaction that
/// commits while the upsert waits on its uncommitted key). The upsert falls back to `ON CONFLICT` and the
/// run ends with the companies the rules give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_company_inserted_concurrently_by_another_writer_is_upserted_not_failed() {
    let db = TestDb::new().await;
    db.seed(200, 31).await;
    let (_, uen) = first_eligible_row(&db).await;
    let other = TestDb::attach(&db).await;
    other.client.batch_execute("begin").await.unwrap();
    other
        .client
        .execute("insert into companies (uen, name) values ($1, 'INSERTED ELSEWHERE PTE. LTD.')", &[&uen])
        .await
        .unwrap();
    let run = tokio::spawn({
        let dsn = db.dsn.clone();
        async move {
            let spec = acraflow::config::PipelineSpec::registry_sync();
            let (_tx, rx) = tokio::sync::watch::channel(false);
            acraflow::pipeline::run(&dsn, &spec, acraflow::pipeline::Mode::Backfill, rx).await
        }
    });
    // The upsert's insert waits on the uncommitted key; then the other writer commits.
    let waiting = wait_until(Duration::from_secs(20), || async {
        db.count("select count(*) from pg_locks where not granted and locktype = 'transactionid'").await > 0
    })
    .await;
    assert!(waiting, "the upsert never waited on the other writer's key");
    other.client.batch_execute("commit").await.unwrap();
    let summary = run.await.unwrap().expect("the run survives the concurrent insert");
    assert!(summary.counters.processed > 0);
    db.assert_companies_match_rules().await;
}

/// The sink inserts history rows without `ON CONFLICT` first. Where another engine (another checkpoint key
/// over the same positions) already wrote one, the batch is written again skipping it: no error, no
/// second row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_row_already_at_a_position_is_kept_and_the_batch_still_commits() {
    let db = TestDb::new().await;
    db.seed(300, 12).await;
    let (id, _) = first_eligible_row(&db).await;
    // A resumed backfill gives its rows positions at the checkpoint's snapshot LSN.
    db.client
        .batch_execute(&format!(
            "insert into service_progress (key, last_id, last_lsn, cursor) values ('acra_direct', 0, '0/ABC', 'id');
             insert into company_enrichment_runs (company_id, source_lsn, source_seq, staging_id, status)
               values (0, '0/ABC', {id}, {id}, 'elsewhere');"
        ))
        .await
        .unwrap();
    let summary = db.run(Overrides::default()).await;
    assert!(summary.counters.processed > 0);
    let at = format!("select count(*) from company_enrichment_runs where source_lsn = '0/ABC' and source_seq = {id}");
    assert_eq!(db.count(&at).await, 1);
    assert_eq!(db.count(&format!("{at} and status = 'elsewhere'")).await, 1, "the existing row is kept");
    db.assert_companies_match_rules().await;
    assert_eq!(
        db.count("select count(*) from company_enrichment_runs where company_id <> 0").await as u64 + 1,
        summary.counters.processed,
        "every other processed change has its history row"
    );
}

/// The first staging row the pipeline will process (live, with a name and a uen): its id and uen.
async fn first_eligible_row(db: &TestDb) -> (i64, String) {
    let row = db
        .client
        .query_one(
            "select id, upper(btrim(uen)) from staging_acra_companies where entity_status_description ilike 'live%' \
             and entity_name <> 'na' and uen <> 'na' order by id limit 1",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uen_walk_reads_rows_without_a_uen_last_and_resumes_among_them() {
    let db = TestDb::new().await;
    db.seed(600, 9).await;
    // 40 rows without a uen (matched to companies by name and year, as the rules say).
    db.client
        .batch_execute(
            "update staging_acra_companies set uen = null, entity_status_description = 'Live Company', \
               entity_name = 'NO UEN TRADING ' || id where id % 15 = 0",
        )
        .await
        .unwrap();
    let nulls = db.count("select count(*) from staging_acra_companies where uen is null").await;
    assert_eq!(nulls, 40);
    let key = || Some("u".to_string());
    // Stopped by the limit inside the rows without a uen, then resumed there.
    let first = db
        .run(Overrides {
            start_from_uen: Some("0".into()),
            batch_limit: Some(580),
            checkpoint_key: key(),
            ..Default::default()
        })
        .await;
    assert_eq!(first.counters.rows_in, 580);
    let cursor: String =
        db.client.query_one("select cursor from service_progress where key = 'u'", &[]).await.unwrap().get(0);
    assert_eq!(cursor, "uen_null", "the walk stopped among the rows without a uen");
    let rest = db.run(Overrides { checkpoint_key: key(), ..Default::default() }).await;
    assert_eq!(
        first.counters.rows_in + rest.counters.rows_in,
        db.count("select count(*) from staging_acra_companies where uen > '0' or uen is null").await as u64
    );
    let no_uen = db.count("select count(*) from companies where uen is null and name like 'NO UEN TRADING %'").await;
    assert_eq!(no_uen, 40, "every row without a uen was read");
    db.assert_companies_match_rules().await;
}

/// A row whose transaction commits after a backfill's snapshot, with a lower id than rows that snapshot saw,
/// is read by the next backfill (it used to be skipped for good: the next one started after the highest id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_commits_after_the_snapshot_with_a_lower_id_is_read_next_time() {
    let db = TestDb::new().await;
    db.seed(300, 4).await;
    db.client
        .batch_execute("update staging_acra_companies set entity_status_description = 'Live Company'")
        .await
        .unwrap();
    let first = db.run(Overrides::default()).await;
    assert_eq!(first.counters.rows_in, 300);
    // Transaction A takes an id and stays open; B takes a higher one and commits.
    let a = TestDb::attach(&db).await;
    a.client.batch_execute("begin").await.unwrap();
    let late_id: i64 = a
        .client
        .query_one(
            "insert into staging_acra_companies (uen, entity_name, entity_status_description) \
             values ('201900001L', 'LATE COMMIT PTE. LTD.', 'Live Company') returning id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    db.client
        .batch_execute(
            "insert into staging_acra_companies (uen, entity_name, entity_status_description) \
             values ('201900002E', 'EARLY COMMIT PTE. LTD.', 'Live Company')",
        )
        .await
        .unwrap();
    // The second backfill's snapshot sees B's row, not A's.
    let second = db.run(Overrides::default()).await;
    assert_eq!(second.counters.rows_in, 1);
    let cursor = db.count("select last_id from service_progress where key = 'acra_direct'").await;
    assert!(cursor > late_id, "the checkpoint ({cursor}) is past the uncommitted row ({late_id})");
    a.client.batch_execute("commit").await.unwrap();
    // The third reads A's row, once; a fourth reads nothing more.
    let third = db.run(Overrides::default()).await;
    assert_eq!((third.counters.rows_in, third.counters.processed), (1, 1), "{:?}", third.counters);
    assert_eq!(db.count("select count(*) from companies where uen = '201900001L'").await, 1);
    let fourth = db.run(Overrides::default()).await;
    assert_eq!(fourth.counters.rows_in, 0, "{:?}", fourth.counters);
    db.assert_companies_match_rules().await;
    db.assert_one_history_row_per_company().await;
}
