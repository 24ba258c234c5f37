//! The command line as a user meets it.

use std::time::Duration;

use crate::support::{wait_until, TestDb};

fn acraflow() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_acraflow"))
}

#[test]
fn help_lists_every_command_and_the_prd_environment_names() {
    let out = acraflow().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["migrate", "seed", "backfill", "run", "demo", "status", "bench"] {
        assert!(help.contains(cmd), "--help lacks {cmd}:\n{help}");
    }
    let out = acraflow().args(["backfill", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for env in [
        "POSTGRES_DSN",
        "ACRA_DIRECT_START_AFTER_ID",
        "ACRA_DIRECT_START_FROM_UEN",
        "ACRA_DIRECT_BATCH_LIMIT",
        "ACRA_DIRECT_EXCLUDE_STATUS",
        "ACRA_DIRECT_MIN_AGE_DAYS",
        "ENRICH_RECHECK_DAYS",
        "ENRICH_SKIP_IF_ANY_HISTORY",
        "ACRA_DIRECT_FORCE",
        "METRICS_PROMETHEUS_ENABLE",
        "METRICS_PORT",
        "ACRA_DIRECT_TENANT_ID",
        "SLACK_WEBHOOK_URL",
        "ACRA_DIRECT_ERROR_ALERT_THRESHOLD",
        "ACRA_DIRECT_PAUSE_COOLDOWN",
        "ACRA_DIRECT_DRAIN_TIMEOUT",
        "ACRA_DIRECT_PROGRESS",
    ] {
        assert!(help.contains(env), "backfill --help lacks {env}:\n{help}");
    }
}

#[test]
fn bad_operations_settings_are_named_and_the_webhook_is_not_echoed() {
    for (env, value, named) in [
        ("ACRA_DIRECT_ERROR_ALERT_THRESHOLD", "150", "ACRA_DIRECT_ERROR_ALERT_THRESHOLD"),
        ("ACRA_DIRECT_ALERT_MIN_EVENTS", "0", "ACRA_DIRECT_ALERT_MIN_EVENTS"),
        ("SLACK_WEBHOOK_URL", "hooks.slack.com/services/T0/B0/secretpart", "SLACK_WEBHOOK_URL"),
        ("ACRA_DIRECT_PAUSE_COOLDOWN", "soon", "soon"),
    ] {
        let out = acraflow()
            .arg("backfill")
            .env("POSTGRES_DSN", "host=127.0.0.1 port=1 dbname=x")
            .env(env, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{env}={value} was accepted");
        assert!(stderr.contains(named), "{env}={value}: {stderr}");
        assert!(!stderr.contains("secretpart"), "the webhook URL was echoed: {stderr}");
    }
}

#[test]
fn unreachable_database_exits_non_zero_naming_it_without_the_password() {
    let out = acraflow()
        .arg("backfill")
        .env("POSTGRES_DSN", "host=127.0.0.1 port=1 user=ops password=hunter2secret dbname=crm connect_timeout=2")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("connecting to ops@127.0.0.1:1/crm"), "{stderr}");
    assert!(!stderr.contains("hunter2secret"), "the password leaked: {stderr}");
}

#[test]
fn run_gives_up_after_its_reconnect_budget_with_the_cause() {
    let started = std::time::Instant::now();
    let out = acraflow()
        .arg("run")
        .env("POSTGRES_DSN", "host=127.0.0.1 port=1 user=ops password=hunter2secret dbname=crm connect_timeout=1")
        .env("ACRA_DIRECT_RECONNECT_BUDGET", "2s")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gave up after 2s of reconnecting"), "{stderr}");
    assert!(stderr.contains("connecting to ops@127.0.0.1:1/crm"), "{stderr}");
    assert!(!stderr.contains("hunter2secret"), "the password leaked: {stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

#[test]
fn bad_settings_are_named() {
    let out = acraflow()
        .arg("backfill")
        .env("POSTGRES_DSN", "host=127.0.0.1 port=1 dbname=x")
        .env("ACRA_DIRECT_BATCH_SIZE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ACRA_DIRECT_BATCH_SIZE"));
    let dir = std::env::temp_dir().join(format!("acraflow-badpipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("p.toml");
    std::fs::write(&file, "name = 'p'\n[source]\nbatch_sise = 10\n").unwrap();
    let out = acraflow()
        .args(["backfill", "--pipeline"])
        .arg(&file)
        .env("POSTGRES_DSN", "host=127.0.0.1 port=1 dbname=x")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("p.toml") && stderr.contains("batch_sise"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_reports_checkpoint_runs_and_dead_letters() {
    let db = TestDb::new().await;
    db.seed(300, 2).await;
    db.client.batch_execute("insert into staging_acra_companies (uen, entity_name) values ('na', 'na')").await.unwrap();
    let out = db.cli(&["backfill"], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("rows read") && summary.contains("301"), "{summary}");

    let out = db.cli(&["status", "--json"], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tables"]["staging_acra_companies"], 301);
    assert_eq!(v["checkpoints"][0]["key"], "acra_direct");
    assert_eq!(v["checkpoints"][0]["last_id"], 301);
    assert_eq!(v["runs"][0]["status"], "completed");
    assert_eq!(v["runs"][0]["rows_in"], 301);
    assert_eq!(v["dead_letters"]["filter"], 1);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&db.dsn), "status must not print the DSN");
}

/// The embedded default: a private server is started on demand, reused, and never outlives acraflow,
/// even when acraflow is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_server_starts_on_demand_and_never_outlives_acraflow() {
    let home = std::env::temp_dir().join(format!("acraflow-embedded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let out = acraflow()
        .args(["seed", "--rows", "50"])
        .env_remove("POSTGRES_DSN")
        .env("ACRAFLOW_HOME", &home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(home.join("pgdata/PG_VERSION").exists());
    assert!(!server_running(&home), "the server outlived `acraflow seed`");

    let mut child = acraflow()
        .args(["seed", "--rows", "3000000"])
        .env_remove("POSTGRES_DSN")
        .env("ACRAFLOW_HOME", &home)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(60), || async { server_running(&home) }).await, "server never started");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || async { !server_running(&home) }).await,
        "the server outlived a killed acraflow"
    );
    // Killed at moments all through the server's start-up (fork, the death signal armed, exec, recovery):
    // never an orphan server, and the next command starts its own.
    for delay_ms in [0u64, 5, 10, 20, 40, 60, 80, 120, 200, 350] {
        let mut child = acraflow()
            .args(["status"])
            .env_remove("POSTGRES_DSN")
            .env("ACRAFLOW_HOME", &home)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let _ = child.kill();
        child.wait().unwrap();
        assert!(
            wait_until(Duration::from_secs(30), || async { !server_running(&home) }).await,
            "the server outlived acraflow killed {delay_ms} ms into its start"
        );
    }
    let _ = std::fs::remove_dir_all(&home);
}

/// A postgres process whose command line names this home's data directory.
fn server_running(home: &std::path::Path) -> bool {
    let needle = home.join("pgdata").display().to_string();
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(&needle))
            .unwrap_or(false)
    })
}

/// The bench's two sides must do the same work: the command itself fails when the pipeline's companies
/// differ from the set-based ceiling's. Run small here for that check; the figures come from `./dev bench`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_pipeline_and_set_based_ceiling_agree() {
    let db = TestDb::empty().await;
    let out = db.cli(&["bench", "backfill", "--rows", "3000", "--repeat", "1", "--batch-size", "500"], &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ratio") && stdout.contains("peak RSS"), "{stdout}");
}

/// The PRD's environment names reach the engine: start after an id, stop after a number of rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_and_limit_environment_variables_drive_the_backfill() {
    let db = TestDb::new().await;
    db.seed(300, 6).await;
    let out = db.cli(&["backfill"], &[("ACRA_DIRECT_START_AFTER_ID", "200"), ("ACRA_DIRECT_BATCH_LIMIT", "50")]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows_in: i64 = db.client.query_one("select rows_in from enrichment_runs", &[]).await.unwrap().get(0);
    assert_eq!(rows_in, 50);
    assert_eq!(db.count("select last_id from service_progress where key = 'acra_direct'").await, 250);
    assert_eq!(
        db.count("select count(*) from company_enrichment_runs where staging_id <= 200 or staging_id > 250").await,
        0
    );
    let out = db.cli(&["backfill"], &[("ACRA_DIRECT_FORCE", "true"), ("ENRICH_RECHECK_DAYS", "abc")]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("abc"), "the bad value is named");
}

/// Settings that would make the engine panic (a zero interval, a timeout past what a Duration holds) are
/// refused at start with the setting's name, and nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_would_panic_are_refused_by_name() {
    let db = TestDb::new().await;
    for (args, env, named) in [
        (vec!["run"], ("ACRA_DIRECT_BATCH_DEADLINE", "1ns"), "ACRA_DIRECT_BATCH_DEADLINE"),
        (vec!["backfill", "--pipeline", "acra_direct"], ("CRAWLER_TIMEOUT_S", "1e20"), "CRAWLER_TIMEOUT_S"),
    ] {
        let out = db.cli(&args, &[env]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(named) && !stderr.contains("panicked"), "{stderr}");
    }
    assert_eq!(db.count("select count(*) from enrichment_runs").await, 0, "nothing ran");
}

/// The embedded cluster leaves the mode of a home the user made alone, and keeps its log private.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_cluster_respects_the_users_home_and_keeps_its_log_private() {
    use std::os::unix::fs::PermissionsExt;
    let home = std::env::temp_dir().join(format!("acraflow-home-mode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o711)).unwrap();
    let out = acraflow().arg("migrate").env_remove("POSTGRES_DSN").env("ACRAFLOW_HOME", &home).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&home), 0o711, "the user's home keeps its mode");
    assert_eq!(mode(&home.join("postgres.log")), 0o600, "the server log is the owner's only");
    assert_eq!(mode(&home.join("password")), 0o600);
    // The settings it needs are in the cluster's own configuration, for pg_ctl and other standard tools.
    let conf = std::fs::read_to_string(home.join("pgdata/acraflow.conf")).unwrap();
    assert!(conf.contains("wal_level = 'logical'"), "{conf}");
    let main_conf = std::fs::read_to_string(home.join("pgdata/postgresql.conf")).unwrap();
    assert_eq!(main_conf.matches("include_if_exists = 'acraflow.conf'").count(), 1);
    let _ = std::fs::remove_dir_all(&home);
}

/// URL settings can carry credentials (a token in a query, a proxy password): `--help` never shows them.
#[test]
fn help_hides_the_values_of_url_settings() {
    let secret = "tok-5ecret-1234";
    let out = acraflow()
        .args(["run", "--help"])
        .env("APIFY_LINKEDIN_URL", format!("https://api.example/run?token={secret}"))
        .env("ENRICH_HTTP_PROXY", format!("http://user:{secret}@proxy:3128"))
        .env("ENRICH_SEARCH_URL", format!("https://search.example/?key={secret}&q={{query}}"))
        .env("ENRICH_READER_URL", format!("https://reader.example/{secret}/{{url}}"))
        .env("LLM_BASE_URL", format!("https://{secret}@llm.example"))
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("APIFY_LINKEDIN_URL") && !help.contains(secret), "{help}");
}

/// A database address that accepts the connection and never answers: the command ends non-zero within its
/// `connect_timeout`, naming the setting, instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_database_times_out_by_connect_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accept and hold every connection, answering nothing.
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            open.push(s);
        }
    });
    let dsn = format!("host=127.0.0.1 port={port} user=x password=pw-not-shown dbname=x connect_timeout=2");
    let started = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || acraflow().arg("status").env("POSTGRES_DSN", dsn).output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert!(stderr.contains("no answer within 2 s") && stderr.contains("connect_timeout"), "{stderr}");
    assert!(!stderr.contains("pw-not-shown"), "{stderr}");
    held.abort();
}

/// A fresh `run` that never reaches its database gives up within the first-start budget (not the 5 minutes
/// meant for an outage), and SIGTERM ends its waits at once.
#[test]
fn a_run_that_never_connects_fails_soon_and_sigterm_ends_its_waits() {
    let dsn = "host=127.0.0.1 port=1 user=ops password=pw dbname=crm connect_timeout=1";
    let started = std::time::Instant::now();
    let out = acraflow().arg("run").env("POSTGRES_DSN", dsn).env("RUST_LOG", "warn").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("gave up after 30s") && stderr.contains("never reached the database"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(90), "took {:?}", started.elapsed());

    let child = acraflow()
        .arg("run")
        .env("POSTGRES_DSN", dsn)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let signalled = std::time::Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(signalled.elapsed() < Duration::from_secs(15), "SIGTERM took {:?}", signalled.elapsed());
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("connecting to ops@127.0.0.1:1/crm"), "the cause is named: {stderr}");
}
