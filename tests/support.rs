//! The test harness: one private PostgreSQL cluster per test binary (acraflow's own embedded cluster, with
//! fsync off), one database per test, dropped when the test ends.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use acraflow::config::{Overrides, PipelineSpec};
use acraflow::embedded::{Cluster, ClusterOptions};
use acraflow::pipeline::RunSummary;
use tokio_postgres::Client;

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        // Engine logs in the test output, filtered by RUST_LOG (off by default).
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into());
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        // One cluster per server version: a data directory made by one major version cannot be started by
        // another (`ACRAFLOW_PG_BIN` picks the binaries).
        let bin = std::env::var("ACRAFLOW_PG_BIN").unwrap_or_default();
        let flavour = if bin.is_empty() {
            String::new()
        } else {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bin.hash(&mut h);
            format!("-{:x}", h.finish())
        };
        let home = std::env::temp_dir().join(format!("acraflow-test-{}{flavour}", nix::unistd::geteuid()));
        Cluster::start(&ClusterOptions { home, durable: false, port: None })
            .expect("starting the test PostgreSQL cluster")
    })
}

pub struct AttachedDb {
    pub client: Client,
}

pub struct TestDb {
    pub name: String,
    pub dsn: String,
    pub client: Client,
}

impl TestDb {
    /// A fresh database with acraflow's schema.
    pub async fn new() -> TestDb {
        let db = Self::empty().await;
        let mut client = acraflow::db::connect(&db.dsn).await.unwrap();
        acraflow::db::migrate(&mut client).await.unwrap();
        db
    }

    /// A second connection to the same database (dropping it leaves the database alone).
    pub async fn attach(other: &TestDb) -> AttachedDb {
        AttachedDb { client: acraflow::db::connect(&other.dsn).await.unwrap() }
    }

    /// A fresh database with no tables at all.
    pub async fn empty() -> TestDb {
        let cluster = cluster();
        let name = format!("t_{}_{}", std::process::id(), rand::random::<u32>());
        let admin = acraflow::db::connect(&cluster.dsn("postgres")).await.unwrap();
        admin.batch_execute(&format!("create database {name}")).await.unwrap();
        let dsn = cluster.dsn(&name);
        let client = acraflow::db::connect(&dsn).await.unwrap();
        TestDb { name, dsn, client }
    }

    pub async fn seed(&self, rows: u64, seed: u64) {
        acraflow::seed::seed(&self.client, "staging_acra_companies", rows, seed).await.unwrap();
    }

    /// Runs the registry pipeline in-process with these overrides, to completion.
    pub async fn run(&self, overrides: Overrides) -> RunSummary {
        self.try_run(overrides).await.expect("pipeline run")
    }

    pub async fn try_run(&self, overrides: Overrides) -> acraflow::Result<RunSummary> {
        let mut spec = PipelineSpec::registry_sync();
        spec.apply(&overrides);
        let (_tx, rx) = tokio::sync::watch::channel(false);
        acraflow::pipeline::run(&self.dsn, &spec, acraflow::pipeline::Mode::Backfill, rx).await
    }

    /// A login role (`{prefix}_{db}`, not the tables' owner, so row level security holds for it) with the
    /// rights acraflow needs, then `policies` run as the owner; returns the DSN of its sessions.
    pub async fn tenant_role(&self, prefix: &str, password: &str, policies: &str) -> String {
        let role = format!("{prefix}_{}", self.name);
        self.client
            .batch_execute(&format!(
                "create role {role} login password '{password}';
                 grant usage on schema public to {role};
                 grant select, insert, update, delete on all tables in schema public to {role};
                 grant usage, select on all sequences in schema public to {role};
                 {policies}"
            ))
            .await
            .unwrap();
        format!("{} user={role} password={password}", self.dsn)
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
    }

    /// Asserts that `companies` holds exactly what the PRD's rules give for the whole of staging, computed
    /// by an SQL formulation of the rules written independently of the engine's Rust mapping.
    pub async fn assert_companies_match_rules(&self) {
        self.client.batch_execute(ORACLE).await.unwrap();
        let missing = self
            .client
            .query("select * from pg_temp.expected except select * from pg_temp.actual limit 5", &[])
            .await
            .unwrap();
        let extra = self
            .client
            .query("select * from pg_temp.actual except select * from pg_temp.expected limit 5", &[])
            .await
            .unwrap();
        let show = |rows: &[tokio_postgres::Row]| {
            rows.iter()
                .map(|r| {
                    format!(
                        "({:?}, {:?}, {:?})",
                        r.get::<_, Option<String>>(0),
                        r.get::<_, Option<String>>(1),
                        r.get::<_, Option<String>>(5)
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        if let Some(uen) = missing.first().and_then(|r| r.get::<_, Option<String>>(0)) {
            let staged = self
                .client
                .query("select id, entity_name, entity_status_description from staging_acra_companies where upper(btrim(uen)) = $1 order by id", &[&uen])
                .await
                .unwrap();
            let staged: Vec<String> = staged
                .iter()
                .map(|r| {
                    format!(
                        "#{} {:?} {:?}",
                        r.get::<_, i64>(0),
                        r.get::<_, Option<String>>(1),
                        r.get::<_, Option<String>>(2)
                    )
                })
                .collect();
            let company = self
                .client
                .query_opt("select name, status from companies where uen = $1", &[&uen])
                .await
                .unwrap()
                .map(|r| format!("{:?} {:?}", r.get::<_, String>(0), r.get::<_, Option<String>>(1)));
            panic!(
                "companies lacks rows the rules give: {}\n  staging: {staged:?}\n  company: {company:?}",
                show(&missing)
            );
        }
        assert!(extra.is_empty(), "companies has rows the rules do not give: {}", show(&extra));
        let expected = self.count("select count(*) from pg_temp.expected").await;
        assert_eq!(self.count("select count(*) from companies").await, expected, "duplicate companies");
    }

    pub async fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_acraflow"));
        cmd.args(args).env("POSTGRES_DSN", &self.dsn).env("RUST_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let dsn = cluster().dsn("postgres");
        // The test's runtime may be shutting down; drop the database from a runtime of our own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(admin) = acraflow::db::connect(&dsn).await {
                    // A database with a replication slot cannot be dropped; slots are cluster-wide.
                    let _ = admin
                        .execute(
                            "select pg_terminate_backend(active_pid) from pg_replication_slots \
                             where database = $1 and active_pid is not null",
                            &[&name],
                        )
                        .await;
                    for _ in 0..50 {
                        let dropped = admin
                            .execute(
                                "select pg_drop_replication_slot(slot_name) from pg_replication_slots \
                                 where database = $1 and not active",
                                &[&name],
                            )
                            .await;
                        let left = admin
                            .query_one("select count(*) from pg_replication_slots where database = $1", &[&name])
                            .await
                            .map(|r| r.get::<_, i64>(0))
                            .unwrap_or(0);
                        if dropped.is_ok() && left == 0 {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    let _ = admin.batch_execute(&format!("drop database if exists {name} with (force)")).await;
                }
            });
        })
        .join();
    }
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// PRD 20's registry rules over all of staging, as SQL: the companies that processing staging in id order
/// must leave behind. Deliberately not shared with the engine: dates are validated by casting (with the
/// cast error caught), not by parsing.
const ORACLE: &str = r#"
create or replace function pg_temp.clean(t text) returns text language sql immutable as $$
  select case when lower(btrim(t, E' \t\n\r\f')) in ('', 'na') then null else btrim(t, E' \t\n\r\f') end $$;

create or replace function pg_temp.valid_year(t text) returns int language plpgsql immutable as $$
declare d date;
begin
  if t is null or t !~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}$' then return null; end if;
  begin
    d := t::date;
  exception when others then return null;
  end;
  if to_char(d, 'YYYY-MM-DD') <> t then return null; end if;
  if extract(year from d) between 1800 and extract(year from current_date) then return extract(year from d)::int; end if;
  return null;
end $$;

create or replace temp view expected as
with r as (
  select id,
    upper(pg_temp.clean(uen)) as uen,
    pg_temp.clean(entity_name) as name,
    pg_temp.clean(entity_status_description) as status,
    pg_temp.valid_year(pg_temp.clean(registration_incorporation_date)) as year,
    regexp_replace(coalesce(primary_ssic_code, ''), '[^0-9]', '', 'g') as digits,
    pg_temp.clean(primary_ssic_description) as descr
  from staging_acra_companies
), valid as (
  select *,
    coalesce('uen:' || uen, 'name:' || lower(name) || ':' || coalesce(year::text, '-')) as key,
    (status is null or lower(status) !~ '^(dissolved|struck off|cancelled|terminated|ceased registration|amalgamated|converted to llp|removed|revoked|registration expired|in liquidation|gazetted to be struck off|cancellation in progress|to be ceased)') as eligible,
    case when length(digits) between 1 and 5 then lpad(digits, 5, '0') end as code
  from r
  where (uen is not null or name is not null) and coalesce(char_length(name), 0) <= 500
), latest as (
  select distinct on (key) key, uen, status, year, code, descr from valid order by key, id desc
), named as (
  select distinct on (key) key, name from valid where name is not null order by key, id desc
), created as (
  select distinct key from valid where eligible and name is not null
)
select l.uen, n.name, l.code as industry_code, coalesce(s.title, l.descr) as industry_norm,
       l.year as incorporation_year, l.status
from latest l join created using (key) join named n using (key) left join ssic_ref s on s.code = l.code;

create or replace temp view actual as
select uen, name, industry_code, industry_norm, incorporation_year, status from companies;
"#;

/// An engine running `acraflow run`'s pipeline in-process.
pub struct Engine {
    stop: tokio::sync::watch::Sender<bool>,
    handle: tokio::task::JoinHandle<acraflow::Result<RunSummary>>,
}

impl Engine {
    /// SIGTERM, in effect: stop reading, commit what is in flight, acknowledge, return the summary.
    pub async fn stop(self) -> RunSummary {
        self.stop.send(true).unwrap();
        self.handle.await.unwrap().expect("the engine failed")
    }

    pub async fn join(self) -> acraflow::Result<RunSummary> {
        self.handle.await.unwrap()
    }
}

impl TestDb {
    /// Stream settings for this database: its own slot (slots are cluster-wide).
    pub fn stream_overrides(&self) -> Overrides {
        Overrides { slot: Some(self.name.clone()), ..Default::default() }
    }

    pub fn start_engine(&self, overrides: Overrides) -> Engine {
        self.start_engine_with(PipelineSpec::registry_sync(), overrides)
    }

    pub fn start_engine_with(&self, mut spec: PipelineSpec, overrides: Overrides) -> Engine {
        spec.apply(&overrides);
        let (stop, rx) = tokio::sync::watch::channel(false);
        let dsn = self.dsn.clone();
        let handle = tokio::spawn(async move {
            acraflow::commands::supervise(&dsn, &spec, acraflow::pipeline::Mode::Stream, rx).await
        });
        Engine { stop, handle }
    }

    /// Waits until the slot has acknowledged all WAL written so far: every change is processed and committed.
    pub async fn wait_caught_up(&self, timeout: Duration) {
        let target: String = self.client.query_one("select pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
        let ok = wait_until(timeout, || async {
            self.client
                .query_opt(
                    "select 1 from pg_replication_slots where slot_name = $1 and confirmed_flush_lsn >= $2::text::pg_lsn",
                    &[&self.name, &target],
                )
                .await
                .unwrap()
                .is_some()
        })
        .await;
        let state: Option<String> = self
            .client
            .query_opt("select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1", &[&self.name])
            .await
            .unwrap()
            .and_then(|r| r.get(0));
        assert!(ok, "slot {} did not catch up with {target} (confirmed {state:?})", self.name);
    }

    /// Waits until the engine streams (its slot is active).
    pub async fn wait_streaming(&self, timeout: Duration) {
        let ok = wait_until(timeout, || async {
            self.count_opt(
                "select count(*) from pg_replication_slots s join pg_stat_activity a on a.pid = s.active_pid \
                 where s.slot_name = current_database() and a.application_name = 'acraflow-replication'",
            )
            .await
                == 1
        })
        .await;
        assert!(ok, "the engine never started streaming");
    }

    async fn count_opt(&self, sql: &str) -> i64 {
        self.client.query_one(sql, &[]).await.map(|r| r.get(0)).unwrap_or(0)
    }

    /// `acraflow run` as a separate process (for crash tests), with its own slot.
    pub fn spawn_cli_run(&self, env: &[(&str, &str)]) -> std::process::Child {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_acraflow"));
        cmd.arg("run")
            .env("POSTGRES_DSN", &self.dsn)
            .env("ACRA_DIRECT_SLOT", &self.name)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    }

    /// One history row per company, none for a company twice.
    pub async fn assert_one_history_row_per_company(&self) {
        let history = self.count("select count(*) from company_enrichment_runs").await;
        assert_eq!(self.count("select count(distinct company_id) from company_enrichment_runs").await, history);
        assert_eq!(self.count("select count(*) from companies").await, history, "a company without history");
    }
}
