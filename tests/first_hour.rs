//! What a new user sees in the first hour: the demo's report, loading ACRA's files, the configuration check,
//! and logs a machine reads.

use crate::support::TestDb;

/// A fresh directory under the system's temp dir, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("acraflow-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn number_after(text: &str, label: &str) -> i64 {
    let rest = &text[text.find(label).unwrap_or_else(|| panic!("no {label:?} in:\n{text}")) + label.len()..];
    rest.split_whitespace().next().and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("no number after {label:?}"))
}

/// The demo on a database the user names: refused without --yes; with it, a short report that names its
/// hit rates and reasons, about this run only, and no slot left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_reports_its_own_run_briefly_and_leaves_no_slot() {
    let db = TestDb::new().await;
    let home = TempDir::new("demo-home");
    let home_env = home.path().to_str().unwrap();
    let env = [("ACRAFLOW_HOME", home_env), ("COLUMNS", "100")];

    let out = db.cli(&["demo", "--rows", "300"], &env).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--yes"), "a user's database was used without --yes: {stderr}");
    assert_eq!(db.count("select count(*) from staging_acra_companies").await, 0, "refused, yet it seeded");

    let out = db.cli(&["demo", "--rows", "300", "--yes"], &env).await;
    let first = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{first}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines = first.lines().count();
    assert!((10..=60).contains(&lines), "the demo printed {lines} lines:\n{first}");
    assert!(first.contains("demo completed"), "{first}");
    for named in [
        "websites   found for",
        "emails",
        "phones",
        "LinkedIn",
        "uen",
        "acraflow import",
        "leads      High",
        "exported to Odoo",
        "valid",
    ] {
        assert!(first.contains(named), "the report lacks {named:?}:\n{first}");
    }
    assert!(first.lines().all(|l| l.chars().count() <= 100), "a line is wider than COLUMNS:\n{first}");
    let enriched_first = number_after(&first, "  enrichment ");
    assert!(enriched_first > 50, "{first}");
    // Every company with a site in the local web was found, and every website found is the right one.
    let websites = first.lines().find(|l| l.contains("websites   found for")).unwrap();
    assert_eq!(number_after(websites, "found for "), number_after(websites, " of the "), "{first}");
    assert!(first.contains("0 wrong"), "{first}");
    assert!(home.path().join("demo.log").exists(), "the report names a log that is not there");
    assert_eq!(db.count("select count(*) from pg_replication_slots where slot_name = 'acraflow_demo'").await, 0);

    // A second demo on the same data: its report counts its own run, not the totals.
    let out = db.cli(&["demo", "--rows", "300", "--yes"], &env).await;
    let second = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{second}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(second.contains("already holds"), "{second}");
    let enriched_second = number_after(&second, "  enrichment ");
    let second_run_rows =
        db.count("select count(distinct company_id) from company_enrichment_runs where enriched and run_id = (select max(run_id) from enrichment_runs)").await;
    assert_eq!(enriched_second, second_run_rows, "{second}");
    assert!(enriched_second < enriched_first, "the second report counts the first run too:\n{second}");
    assert_eq!(db.count("select count(*) from pg_replication_slots where slot_name = 'acraflow_demo'").await, 0);
}

/// `seed --csv` writes ACRA's published format; `import` loads every row, `--replace` swaps them, and a
/// file with a wrong header is refused by name before anything is loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_loads_published_files_and_names_a_wrong_header() {
    let db = TestDb::empty().await;
    let dir = TempDir::new("import");
    let a = dir.path().join("ACRA_A.csv");
    let b = dir.path().join("ACRA_B.csv");
    for (path, rows, seed) in [(&a, "700", "1"), (&b, "300", "2")] {
        let out = db.cli(&["seed", "--csv", path.to_str().unwrap(), "--rows", rows, "--seed", seed], &[]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let header = std::fs::read_to_string(&a).unwrap().lines().next().unwrap().to_owned();
    assert!(header.starts_with("uen,issuance_agency_id,entity_name,"), "{header}");

    let out = db.cli(&["import", a.to_str().unwrap(), b.to_str().unwrap()], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported 1000 rows from 2 file(s)"));
    assert_eq!(db.count("select count(*) from staging_acra_companies").await, 1000);
    // The values are the file's: `na` kept as published, for the registry rules to read as missing.
    assert_eq!(db.count("select count(*) from staging_acra_companies where level_no = 'na'").await, 1000);

    let out = db.cli(&["import", "--replace", b.to_str().unwrap()], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(db.count("select count(*) from staging_acra_companies").await, 300);

    let bad = dir.path().join("renamed.csv");
    let text = std::fs::read_to_string(&b).unwrap().replacen("entity_name", "company_name", 1);
    std::fs::write(&bad, text).unwrap();
    let out = db.cli(&["import", b.to_str().unwrap(), bad.to_str().unwrap()], &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a wrong header was accepted");
    assert!(
        stderr.contains("renamed.csv") && stderr.contains("company_name") && stderr.contains("entity_name"),
        "{stderr}"
    );
    assert_eq!(db.count("select count(*) from staging_acra_companies").await, 300, "a refused import loaded rows");

    // A short row: nothing of the file is loaded, and the error names its line.
    let short = dir.path().join("short.csv");
    let mut text = std::fs::read_to_string(&b).unwrap();
    text.push_str("200012345A,ACRA,TRUNCATED ROW PTE. LTD.\n");
    std::fs::write(&short, text).unwrap();
    let out = db.cli(&["import", short.to_str().unwrap()], &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("short.csv line 302"), "{stderr}");
    assert_eq!(db.count("select count(*) from staging_acra_companies").await, 300);
}

/// With `--log-format json` the last line on stderr is the run summary, as one JSON event, and stdout
/// stays empty for the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_log_ends_with_the_run_summary() {
    let db = TestDb::new().await;
    db.seed(200, 3).await;
    let out = db.cli(&["backfill", "--log-format", "json"], &[("RUST_LOG", "info")]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let events: Vec<serde_json::Value> =
        stderr.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"))).collect();
    let last = events.last().unwrap();
    assert_eq!(last["message"], "run summary", "{last}");
    assert_eq!(last["status"], "completed");
    assert_eq!(last["rows_in"], 200);
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty(), "text on stdout in JSON mode");
    // No Rust debug text in any field.
    for e in &events {
        let text = e.to_string();
        assert!(!text.contains("Some(") && !text.contains("None"), "debug formatting in {text}");
    }
}

/// `check` names a misspelled variable's closest setting, hides secrets, and fails on an unmigrated
/// database; on a migrated one it says a run would start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_flags_a_misspelled_variable_and_fails_on_an_unmigrated_database() {
    let env = [
        ("ACRA_DIRECT_CONCURENCY", "4"),
        ("SLACK_WEBHOOK_URL", "https://hooks.slack.com/services/T0/B0/secretpart"),
        ("ACRA_DIRECT_BATCH_SIZE", "800"),
    ];
    let db = TestDb::empty().await;
    let out = db.cli(&["check"], &env).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "check passed an unmigrated database:\n{stdout}");
    assert!(
        stdout.contains("ACRA_DIRECT_CONCURENCY") && stdout.contains("did you mean ACRA_DIRECT_CONCURRENCY"),
        "{stdout}"
    );
    assert!(stdout.contains("FAIL") && stdout.contains("acraflow migrate"), "{stdout}");
    // Every setting with its value and where it came from.
    let line = |name: &str| stdout.lines().find(|l| l.trim_start().starts_with(name)).unwrap_or("").to_owned();
    assert!(
        line("ACRA_DIRECT_BATCH_SIZE ").contains("800") && line("ACRA_DIRECT_BATCH_SIZE ").ends_with("environment"),
        "{stdout}"
    );
    assert!(
        line("ACRA_DIRECT_SLOT ").contains("acraflow") && line("ACRA_DIRECT_SLOT ").ends_with("built-in pipeline"),
        "{stdout}"
    );
    assert!(line("METRICS_PORT ").contains("9464") && line("METRICS_PORT ").ends_with("default"), "{stdout}");
    assert!(line("SLACK_WEBHOOK_URL ").contains("hidden"), "{stdout}");
    assert!(!stdout.contains("secretpart") && !stdout.contains(&db.dsn), "a secret was printed:\n{stdout}");

    let db = TestDb::new().await;
    let out = db.cli(&["check"], &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("wal_level is logical") && stdout.contains("ready"), "{stdout}");
}

/// A bad value set in the environment is named by its variable, not only by the flag it feeds.
#[test]
fn a_bad_value_names_the_variable_the_user_set() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_acraflow"))
        .args(["backfill", "--pipeline", "acra_direct"])
        .env("ACRA_DIRECT_CONCURRENCY", "lots")
        .env("POSTGRES_DSN", "host=127.0.0.1 port=1 dbname=x")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("lots") && stderr.contains("ACRA_DIRECT_CONCURRENCY"), "{stderr}");

    // An unknown pipeline lists the built-in ones; a timeout takes a unit like every other duration.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_acraflow"))
        .args(["check", "--pipeline", "acra_directt"])
        .env("CRAWLER_TIMEOUT_S", "1500ms")
        .env("POSTGRES_DSN", "host=127.0.0.1 port=1 dbname=x connect_timeout=1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("acra_directt") && stdout.contains("registry_sync, acra_direct"), "{stdout}");
    assert!(stdout.contains("CRAWLER_TIMEOUT_S") && stdout.contains("1500ms"), "{stdout}");
}

/// The shipped alert rules and dashboard: promtool accepts the rules and their unit tests, and every
/// metric they name is one acraflow exports.
#[test]
fn the_shipped_alert_rules_and_dashboard_use_real_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let rules = root.join("prometheus/acraflow.rules.yml");
    let dashboard = root.join("grafana/acraflow.json");
    let exposition = acraflow::telemetry::metrics::metrics().encode_prometheus();
    for path in [&rules, &dashboard] {
        let text = std::fs::read_to_string(path).unwrap();
        let mut names: Vec<&str> = text
            .match_indices("acra_direct_")
            .map(|(i, _)| {
                let rest = &text[i..];
                &rest[..rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len())]
            })
            .collect();
        names.sort();
        names.dedup();
        assert!(names.len() >= 5, "{}: {names:?}", path.display());
        for name in names {
            assert!(
                exposition.lines().any(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{'])),
                "{} names {name}, which acraflow does not export",
                path.display()
            );
        }
    }
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&dashboard).unwrap()).unwrap();
    assert!(dash["panels"].as_array().unwrap().len() >= 8);
    crate::ops::promtool(&["check", "rules", rules.to_str().unwrap()], None);
    crate::ops::promtool(&["test", "rules", root.join("prometheus/acraflow.rules.test.yml").to_str().unwrap()], None);
}

/// Slots and checkpoints that pile up can be listed, and dropped or reset only when confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_slots_and_checkpoints_are_listed_and_dropped_when_confirmed() {
    let db = TestDb::new().await;
    db.seed(100, 4).await;
    let slot = format!("old_{}", db.name);
    db.client.execute("select pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await.unwrap();
    let out = db.cli(&["backfill", "--checkpoint-key", "old_key"], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let out = db.cli(&["slots"], &[]).await;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.lines().any(|l| l.starts_with(&slot) && l.contains("idle") && l.contains("this one")),
        "{slot} not listed as idle here:\n{listed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = db.cli(&["checkpoints"], &[]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("old_key"));

    // Without a terminal and without --yes nothing is dropped.
    let out = db.cli(&["slots", "drop", &slot], &[]).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert_eq!(db.count(&format!("select count(*) from pg_replication_slots where slot_name = '{slot}'")).await, 1);
    let out = db.cli(&["slots", "drop", &slot, "--yes"], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(db.count(&format!("select count(*) from pg_replication_slots where slot_name = '{slot}'")).await, 0);

    let out = db.cli(&["checkpoints", "reset", "old_key"], &[]).await;
    assert!(!out.status.success());
    let out = db.cli(&["checkpoints", "reset", "old_key", "--yes"], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(db.count("select count(*) from service_progress where key = 'old_key'").await, 0);
}

/// Ctrl-C in the middle of the demo: it stops its engine and still prints its report, saying it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_demo_still_reports_what_it_did() {
    let db = TestDb::new().await;
    let home = TempDir::new("demo-int");
    let out_path = home.path().join("stdout");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_acraflow"))
        .args(["demo", "--rows", "3000", "--yes"])
        .env("POSTGRES_DSN", &db.dsn)
        .env("ACRAFLOW_HOME", home.path())
        .env("COLUMNS", "100")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Interrupt once enrichment is under way (some companies enriched, the queue not yet worked off).
    let under_way = crate::support::wait_until(std::time::Duration::from_secs(120), || async {
        db.count("select count(*) from company_enrichment_runs where enriched").await >= 5
    })
    .await;
    assert!(under_way, "enrichment never started");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    let report = std::fs::read_to_string(&out_path).unwrap();
    assert!(status.success(), "{status:?}\n{report}");
    assert!(report.contains("demo STOPPED before the end"), "{report}");
    assert!(report.contains("  enrichment ") && report.contains("websites   found for"), "{report}");
    assert_eq!(db.count("select count(*) from pg_replication_slots where slot_name = 'acraflow_demo'").await, 0);
}
