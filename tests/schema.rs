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
