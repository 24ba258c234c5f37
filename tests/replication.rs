//! `acraflow run`: the replication stream, its hand-over from the backfill, crashes and WAL safety.

use std::time::Duration;

use acraflow::config::Overrides;

use crate::support::{wait_until, AttachedDb, TestDb};

trait HasClient {
    fn client(&self) -> &tokio_postgres::Client;
}
impl HasClient for TestDb {
    fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }
}
impl HasClient for AttachedDb {
    fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

const CATCH_UP: Duration = Duration::from_secs(60);

/// Inserts `n` rows in one statement (one transaction): uens `{prefix}NNNNNN`, alternating Live / Struck Off.
async fn insert_rows(db: &impl HasClient, prefix: &str, from: i64, n: i64) {
    db.client()
        .execute(
            "insert into staging_acra_companies (uen, entity_name, entity_status_description, \
               registration_incorporation_date, primary_ssic_code, primary_ssic_description) \
             select $1 || lpad(g::text, 7, '0'), 'STREAM CO ' || g || ' PTE. LTD.', \
               case when g % 2 = 0 then 'Live Company' else 'Struck Off' end, '2015-03-04', '62011', 'na' \
             from generate_series($2::bigint, $3::bigint) g",
            &[&prefix, &from, &(from + n - 1)],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_updates_deletes_and_truncate_flow_through() {
    let db = TestDb::new().await;
    db.seed(1_000, 21).await;
    let engine = db.start_engine(db.stream_overrides());
    db.wait_streaming(CATCH_UP).await;

    insert_rows(&db, "S", 1, 10).await;
    db.client
        .batch_execute(
            "update staging_acra_companies set entity_name = 'RENAMED PTE. LTD.', primary_ssic_code = '01111' \
               where uen = 'S0000002'; \
             insert into staging_acra_companies (uen, entity_name, entity_status_description) \
               values ('na', 'NO UEN TRADING', 'Live'), ('na', 'na', 'na');",
        )
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    db.assert_companies_match_rules().await;
    // An entity struck off later: its company stays and shows the registry's word. (The rules oracle reads
    // staging as history, which an in-place update rewrites, so this is checked directly.)
    db.client
        .batch_execute(
            "update staging_acra_companies set entity_status_description = 'Struck Off' where uen = 'S0000004'",
        )
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    let renamed: String =
        db.client.query_one("select name from companies where uen = 'S0000002'", &[]).await.unwrap().get(0);
    assert_eq!(renamed, "RENAMED PTE. LTD.");
    let status: String =
        db.client.query_one("select status from companies where uen = 'S0000004'", &[]).await.unwrap().get(0);
    assert_eq!(status, "Struck Off");
    assert_eq!(db.count("select count(*) from dead_letters where stage = 'filter'").await, 1);
    db.assert_one_history_row_per_company().await;

    // Deletes and truncates never delete companies, and a reload of the same content rewrites nothing.
    let companies = db.count("select count(*) from companies").await;
    let snapshot = "select string_agg(company_id || ':' || xmin::text, ',' order by company_id) from companies";
    db.client.batch_execute("delete from staging_acra_companies where uen = 'S0000002'").await.unwrap();
    db.client
        .batch_execute(
            "create temp table keep as select * from staging_acra_companies; \
             truncate staging_acra_companies;",
        )
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    assert_eq!(db.count("select count(*) from companies").await, companies);
    let before: String = db.client.query_one(snapshot, &[]).await.unwrap().get(0);
    let history = db.count("select count(*) from company_enrichment_runs").await;
    db.client
        .batch_execute(
            // Same content, same ids (the identity column allows explicit values).
            "insert into staging_acra_companies select * from keep",
        )
        .await
        .unwrap();
    assert_eq!(db.count("select count(*) from staging_acra_companies").await, 1_011, "the reload happened");
    db.wait_caught_up(CATCH_UP).await;
    let after: String = db.client.query_one(snapshot, &[]).await.unwrap().get(0);
    assert_eq!(before, after, "the reload rewrote companies");
    assert_eq!(db.count("select count(*) from company_enrichment_runs").await, history, "the reload re-processed");

    let summary = engine.stop().await;
    assert!(summary.counters.ignored >= 2, "a delete and a truncate: {:?}", summary.counters);
    // The final acknowledgement reached the server before the engine stopped.
    let target: String = db.client.query_one("select pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    let confirmed: bool = db
        .client
        .query_one(
            "select confirmed_flush_lsn >= (select max(last_lsn) from service_progress) from pg_replication_slots \
             where slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(confirmed, "confirmed_flush_lsn is behind the checkpoint at {target}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_during_the_initial_backfill_appear_exactly_once() {
    let db = TestDb::new().await;
    db.seed(20_000, 22).await;
    // A writer that inserts new companies and renames existing ones while the engine starts up, until the
    // engine has been streaming for a while: some writes land before the slot's snapshot, some during the
    // backfill, some after.
    let writer_db = TestDb::attach(&db).await;
    let writer = tokio::spawn(async move {
        for i in 1..=400i64 {
            insert_rows(&writer_db, "H", i, 1).await;
            writer_db
                .client
                .execute(
                    // Only rows whose uen is unique: with an in-place update of an older duplicate, the stream
                    // rightly applies the most recent change, while the oracle ranks rows by id.
                    "update staging_acra_companies s set entity_name = entity_name || ' (RENAMED ' || $1::text || ')' \
                     where id = $1 and (select count(*) from staging_acra_companies d where d.uen = s.uen) = 1",
                    &[&(i * 37)],
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let engine = db.start_engine(Overrides { batch_size: Some(1_000), ..db.stream_overrides() });
    writer.await.unwrap();
    db.wait_caught_up(CATCH_UP).await;
    engine.stop().await;

    db.assert_companies_match_rules().await;
    db.assert_one_history_row_per_company().await;
    assert_eq!(db.count("select count(*) from companies where uen like 'H%'").await, 200, "every other H row is Live");
}

/// Waits for the checkpoint of a run to pass `pred`; returns false on timeout.
async fn wait_checkpoint(db: &TestDb, sql_pred: &str) -> bool {
    let sql = format!("select count(*) from service_progress where key = 'acra_direct' and {sql_pred}");
    wait_until(Duration::from_secs(120), || async { db.count(&sql).await > 0 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_several_points_loses_and_duplicates_nothing() {
    let db = TestDb::new().await;
    db.seed(2_000, 23).await;
    let mut engine = db.spawn_cli_run(&[("ACRA_DIRECT_BATCH_SIZE", "500")]);

    // 50k rows in 250 transactions, written while the engine is killed and restarted three times.
    let writer_db = TestDb::attach(&db).await;
    let writer = tokio::spawn(async move {
        for t in 0..250i64 {
            insert_rows(&writer_db, "K", t * 200 + 1, 200).await;
        }
    });
    for (round, threshold) in [(1, 5_000i64), (2, 20_000), (3, 35_000)].into_iter() {
        // Kill only a run that has started: a kill before its header exists tests nothing.
        let started = wait_until(Duration::from_secs(60), || async {
            db.count("select count(*) from enrichment_runs").await >= round
        })
        .await;
        assert!(started, "round {round}: the run never started");
        let progressed = wait_checkpoint(
            &db,
            &format!(
                "cursor = 'lsn' and (select count(*) from companies where uen like 'K%') >= {}",
                threshold / 2 - 500
            ),
        )
        .await;
        // An engine that ended by itself is a different failure from a slow one: say which.
        let ended = engine.try_wait().unwrap();
        engine.kill().unwrap();
        engine.wait().unwrap();
        let progress = db.count("select count(*) from companies where uen like 'K%'").await;
        let cursor = db
            .client
            .query_opt("select cursor from service_progress where key = 'acra_direct'", &[])
            .await
            .unwrap()
            .and_then(|r| r.get::<_, Option<String>>(0));
        assert!(
            progressed,
            "round {round}: no progress before the kill (engine ended by itself: {ended:?}; {progress} K companies; \
             checkpoint cursor {cursor:?})"
        );
        engine = db.spawn_cli_run(&[("ACRA_DIRECT_BATCH_SIZE", "500")]);
    }
    writer.await.unwrap();
    let started =
        wait_until(Duration::from_secs(60), || async { db.count("select count(*) from enrichment_runs").await >= 4 })
            .await;
    assert!(started, "the last run never started");
    db.wait_caught_up(CATCH_UP).await;
    engine.kill().unwrap();
    engine.wait().unwrap();

    assert_eq!(db.count("select count(*) from staging_acra_companies where uen like 'K%'").await, 50_000);
    db.assert_companies_match_rules().await;
    db.assert_one_history_row_per_company().await;
    // Every killed run is marked abandoned (by each restart, and by `status`) once the server has noticed
    // its session is gone.
    let started = db.count("select count(*) from enrichment_runs").await;
    assert!(started >= 4, "only {started} runs started");
    let marked = wait_until(Duration::from_secs(30), || async {
        acraflow::run::mark_abandoned(&db.client).await.unwrap();
        db.count("select count(*) from enrichment_runs where status = 'abandoned'").await == started
    })
    .await;
    assert!(
        marked,
        "{} of {started} killed runs marked abandoned",
        db.count("select count(*) from enrichment_runs where status = 'abandoned'").await
    );
    assert_eq!(db.count("select count(*) from enrichment_runs where status = 'running'").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_inside_a_200k_row_transaction_resumes_inside_it() {
    let db = TestDb::new().await;
    let mut engine = db.spawn_cli_run(&[]);
    db.wait_streaming(CATCH_UP).await;
    insert_rows(&db, "B", 1, 200_000).await;
    let inside = wait_checkpoint(&db, "cursor = 'lsn' and last_seq between 20000 and 150000").await;
    engine.kill().unwrap();
    engine.wait().unwrap();
    assert!(inside, "never saw a checkpoint inside the transaction");
    let killed_at = db.count("select last_seq from service_progress where key = 'acra_direct'").await;
    let before = db.count("select count(*) from company_enrichment_runs").await;
    assert!(before > 0 && before < 100_000, "{before} history rows at the kill");

    let engine = db.spawn_cli_run(&[]);
    db.wait_caught_up(Duration::from_secs(180)).await;
    let mut engine = engine;
    engine.kill().unwrap();
    engine.wait().unwrap();
    db.assert_companies_match_rules().await;
    db.assert_one_history_row_per_company().await;
    assert_eq!(db.count("select count(*) from companies").await, 100_000);
    // The resumed run started right after the checkpoint: it read only the rest of the transaction.
    let min_resumed = db
        .count(&format!(
            "select count(*) from company_enrichment_runs where run_id = (select max(run_id) from enrichment_runs) \
             and source_seq <= {killed_at}"
        ))
        .await;
    assert_eq!(min_resumed, 0, "the resumed run re-applied changes at or before the checkpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_writes_elsewhere_advance_an_idle_slot() {
    let db = TestDb::new().await;
    let engine = db.start_engine(db.stream_overrides());
    db.wait_streaming(CATCH_UP).await;
    db.client
        .batch_execute("create table other_table (x int, pad text); insert into other_table select g, repeat('x', 200) from generate_series(1, 200000) g")
        .await
        .unwrap();
    let before: String = db
        .client
        .query_one("select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1", &[&db.name])
        .await
        .unwrap()
        .get(0);
    db.wait_caught_up(Duration::from_secs(30)).await;
    let lag = db
        .count(&format!(
            "select pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint from pg_replication_slots \
             where slot_name = '{}'",
            db.name
        ))
        .await;
    assert!(lag < 1_000_000, "slot still pins {lag} bytes of WAL (confirmed was {before} before)");
    // `acraflow status` reports the slot and its lag.
    let out = db.cli(&["status", "--json"], &[]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["slots"][0]["slot"], db.name.as_str());
    assert_eq!(v["slots"][0]["active"], true);
    // The lag itself was checked above; by now other tests' writes elsewhere on the server may have moved
    // the WAL on (CI saw 4 MB), so status is checked for reporting it, not for its size.
    assert!(v["slots"][0]["lag_bytes"].as_i64().is_some_and(|l| l >= 0), "{v}");
    assert!(v["slots"][0]["wal_held_bytes"].as_i64().is_some_and(|l| l >= 0), "{v}");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_column_to_staging_mid_stream_does_not_stop_it() {
    let db = TestDb::new().await;
    let engine = db.start_engine(db.stream_overrides());
    db.wait_streaming(CATCH_UP).await;
    insert_rows(&db, "A", 1, 10).await;
    db.client.batch_execute("alter table staging_acra_companies add column risk_score text").await.unwrap();
    db.client
        .batch_execute(
            "insert into staging_acra_companies (risk_score, uen, entity_name, entity_status_description) \
             values ('high', 'A9999999', 'AFTER ALTER PTE. LTD.', 'Live')",
        )
        .await
        .unwrap();
    insert_rows(&db, "A", 11, 10).await;
    db.wait_caught_up(CATCH_UP).await;
    assert_eq!(db.count("select count(*) from companies where uen like 'A%'").await, 11);
    db.assert_companies_match_rules().await;
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_toasted_column_never_becomes_null() {
    let db = TestDb::new().await;
    let engine = db.start_engine(db.stream_overrides());
    db.wait_streaming(CATCH_UP).await;
    // A description too long (and too random) to stay inline: updates that do not touch it send 'u'.
    db.client
        .batch_execute(
            "insert into staging_acra_companies (uen, entity_name, entity_status_description, primary_ssic_code, \
               primary_ssic_description) \
             select 'T0000001', 'TOAST PTE. LTD.', 'Live', '9999999', string_agg(md5(g::text), '') \
             from generate_series(1, 300) g",
        )
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    db.client
        .batch_execute(
            "update staging_acra_companies set entity_status_description = 'Live Company' where uen = 'T0000001'",
        )
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    let row = db
        .client
        .query_one("select status, length(industry_norm) from companies where uen = 'T0000001'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "Live Company");
    assert_eq!(row.get::<_, Option<i32>>(1), Some(9_600), "the unchanged description was lost");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_problems_are_loud_and_say_what_to_do() {
    let db = TestDb::new().await;
    let engine = db.start_engine(db.stream_overrides());
    db.wait_streaming(CATCH_UP).await;
    insert_rows(&db, "L", 1, 4).await;
    db.wait_caught_up(CATCH_UP).await;

    // A second engine on the same checkpoint; then one on another checkpoint but the same slot.
    let second = db.start_engine(db.stream_overrides()).join().await.unwrap_err().to_string();
    assert!(second.contains("another acraflow is running with checkpoint key 'acra_direct'"), "{second}");
    let third = db
        .start_engine(Overrides { checkpoint_key: Some("other".into()), ..db.stream_overrides() })
        .join()
        .await
        .unwrap_err()
        .to_string();
    assert!(third.contains("is in use by server process"), "{third}");
    engine.stop().await;

    // The slot is gone while the checkpoint points into its stream.
    db.client.execute("select pg_drop_replication_slot($1)", &[&db.name]).await.unwrap();
    let err = db.start_engine(db.stream_overrides()).join().await.unwrap_err().to_string();
    assert!(err.contains("is missing") && err.contains("delete from service_progress"), "{err}");
}

/// Postgres restarts under a running `acraflow run`: the engine reconnects on its own and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_rides_out_a_postgres_restart() {
    use acraflow::embedded::{Cluster, ClusterOptions};
    let home = std::env::temp_dir().join(format!("acraflow-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let opts = ClusterOptions { home: home.clone(), durable: false, port: Some(port) };
    let start = |o: ClusterOptions| tokio::task::spawn_blocking(move || Cluster::start(&o).unwrap());
    let cluster = start(opts.clone()).await.unwrap();
    let dsn = cluster.ensure_database().await.unwrap();
    let mut client = acraflow::db::connect(&dsn).await.unwrap();
    acraflow::db::migrate(&mut client).await.unwrap();
    acraflow::seed::seed(&client, "staging_acra_companies", 500, 9).await.unwrap();

    let mut engine = std::process::Command::new(env!("CARGO_BIN_EXE_acraflow"))
        .arg("run")
        .env("POSTGRES_DSN", &dsn)
        .env("ACRA_DIRECT_RECONNECT_BUDGET", "60s")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let insert = |from: i64| {
        let dsn = dsn.clone();
        async move {
            let c = acraflow::db::connect(&dsn).await.unwrap();
            c.execute(
                "insert into staging_acra_companies (uen, entity_name, entity_status_description) \
                 select 'R' || lpad(g::text, 7, '0'), 'RESTART ' || g, 'Live' from generate_series($1::bigint, $1 + 99) g",
                &[&from],
            )
            .await
            .unwrap();
        }
    };
    let companies = |n: i64| {
        let dsn = dsn.clone();
        async move {
            let Ok(c) = acraflow::db::connect(&dsn).await else { return false };
            c.query_one("select count(*) from companies where uen like 'R%'", &[])
                .await
                .map(|r| r.get::<_, i64>(0) == n)
                .unwrap_or(false)
        }
    };
    insert(1).await;
    assert!(wait_until(CATCH_UP, || companies(100)).await, "first rows never arrived");

    drop(client);
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap(); // fast shutdown: every session is cut
    let cluster = start(opts).await.unwrap();
    insert(101).await;
    assert!(wait_until(CATCH_UP, || companies(200)).await, "rows after the restart never arrived");
    assert!(engine.try_wait().unwrap().is_none(), "the engine exited instead of reconnecting");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(engine.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = engine.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("restarting from the checkpoint"), "{stderr}");
    let client = acraflow::db::connect(&cluster.dsn("acraflow")).await.unwrap();
    let history: i64 = client.query_one("select count(*) from company_enrichment_runs", &[]).await.unwrap().get(0);
    let distinct: i64 =
        client.query_one("select count(distinct company_id) from company_enrichment_runs", &[]).await.unwrap().get(0);
    assert_eq!(history, distinct, "a company processed twice across the restart");
    drop(client);
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
    let _ = std::fs::remove_dir_all(&home);
}

/// `ACRA_DIRECT_SLOT_FAILOVER`: a failover slot on PostgreSQL 17 and later; before 17, an error that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_slot_is_created_where_the_server_offers_it() {
    let db = TestDb::new().await;
    let version = db.count("select current_setting('server_version_num')::bigint").await;
    let engine = db.start_engine(Overrides { slot_failover: Some(true), ..db.stream_overrides() });
    if version >= 170_000 {
        db.wait_streaming(CATCH_UP).await;
        let failover = db
            .count(&format!("select count(*) from pg_replication_slots where slot_name = '{}' and failover", db.name))
            .await;
        engine.stop().await;
        assert_eq!(failover, 1, "the slot is a failover slot");
    } else {
        let err = engine.join().await.unwrap_err().to_string();
        assert!(err.contains("ACRA_DIRECT_SLOT_FAILOVER needs PostgreSQL 17"), "{err}");
    }
}
