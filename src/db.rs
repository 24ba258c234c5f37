//! Connections, migrations and the facts about a user's schema the engine adapts to.
//!
//! A DSN is never shown as given: [`describe`] keeps host, port, user and database and drops the password,
//! and connection errors are reported with that description.

use std::time::Duration;

use tokio_postgres::{Client, Config, NoTls};

use crate::error::{Error, ErrorKind, Result};

/// The numbered migrations in `sql/`, applied in order. Each is idempotent and never drops anything.
const MIGRATIONS: &[(&str, &str)] = &[
    ("001_staging", include_str!("../sql/001_staging.sql")),
    ("002_companies", include_str!("../sql/002_companies.sql")),
    ("003_engine", include_str!("../sql/003_engine.sql")),
    ("004_enrichment", include_str!("../sql/004_enrichment.sql")),
    ("005_queue", include_str!("../sql/005_queue.sql")),
    ("006_trust", include_str!("../sql/006_trust.sql")),
    ("007_backfill", include_str!("../sql/007_backfill.sql")),
    ("008_leads", include_str!("../sql/008_leads.sql")),
    ("009_pacing", include_str!("../sql/009_pacing.sql")),
];

/// Whether this process has connected to its database at least once (a fresh start that never did fails
/// sooner: see `commands::with_reconnects`).
static EVER_CONNECTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn ever_connected() -> bool {
    EVER_CONNECTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// How long a connection may take to start when the DSN sets no `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const SSIC_CSV: &str = include_str!("../data/ssic2020_classification_structure.csv");

/// `user@host:port/dbname` for logs and errors; the password never appears.
pub fn describe(dsn: &str) -> String {
    match crate::pgtls::without_tls(dsn).parse::<Config>() {
        Ok(c) => {
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(s) => s.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".into());
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!("{}@{host}:{port}/{}", c.get_user().unwrap_or("?"), c.get_dbname().or(c.get_user()).unwrap_or("?"))
        }
        Err(_) => "(an unparsable POSTGRES_DSN)".into(),
    }
}

/// Opens a connection, retrying briefly (a server that is starting up, a network blip).
pub async fn connect(dsn: &str) -> Result<Client> {
    connect_named(dsn, "acraflow").await
}

/// [`connect`] with `application_name` set to `app` (unless the DSN sets one), so `pg_stat_activity`
/// says which part of the engine a session belongs to.
pub async fn connect_named(dsn: &str, app: &str) -> Result<Client> {
    let (mut config, tls) = crate::pgtls::parse(dsn)?;
    let rustls = crate::pgtls::client_config(&tls)?;
    if config.get_application_name().is_none() {
        config.application_name(app);
    }
    // `connect_timeout` bounds the whole start-up (TCP, TLS, authentication), not only the TCP connect: a
    // server that accepts and then says nothing must not hang a command.
    let timeout = config.get_connect_timeout().copied().unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        let connected = match tokio::time::timeout(timeout, open(&config, rustls.as_ref())).await {
            Ok(c) => c,
            Err(_) => {
                // Not retried here: a server silent this long is not about to answer.
                return Err(Error::new(
                    ErrorKind::Connect,
                    format!(
                        "connecting to {}: no answer within {} s (connect_timeout in POSTGRES_DSN; default {} s)",
                        describe(dsn),
                        timeout.as_secs_f64(),
                        DEFAULT_CONNECT_TIMEOUT.as_secs()
                    ),
                ));
            }
        };
        match connected {
            Ok(client) => {
                EVER_CONNECTED.store(true, std::sync::atomic::Ordering::Relaxed);
                // The engine's statements are batches of key lookups (`unnest` of array parameters joined
                // to a table by key), and are planned for that:
                // - jit off: compiling one with LLVM costs more than running it. With jit on, a fresh
                //   database's estimates made Postgres compile the dedupe probe on every batch, cutting
                //   throughput by half.
                // - generic plans: a custom plan sees the batch's size and, for a few thousand keys,
                //   hashes the whole target table instead of looking the keys up (50-130 ms a batch
                //   instead of about 5 in `bench stream`), and costs milliseconds of planning on top.
                //   A generic plan assumes a few keys and uses the index. (The upsert prepares again as
                //   `companies` grows, so a plan made while it was nearly empty does not stay.)
                client
                    .batch_execute("set jit = off; set plan_cache_mode = force_generic_plan")
                    .await
                    .map_err(|e| Error::db("setting the session's planner options", e))?;
                return Ok(client);
            }
            Err(e) => {
                let what = match tls.mode {
                    crate::pgtls::SslMode::VerifyCa | crate::pgtls::SslMode::VerifyFull => format!(
                        "connecting to {} with sslmode={} (a certificate that does not match sslrootcert or \
                         the host name is refused)",
                        describe(dsn),
                        tls.mode.as_str()
                    ),
                    _ => format!("connecting to {}", describe(dsn)),
                };
                let err = Error::db(what, e);
                if !err.is_retryable() || attempt >= 5 {
                    return Err(err);
                }
                tracing::warn!(attempt, error = %err, "connection failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
        }
    }
}

/// One connection attempt, over TLS when `rustls` is given; its connection task spawned.
async fn open(
    config: &Config,
    rustls: Option<&rustls::ClientConfig>,
) -> std::result::Result<Client, tokio_postgres::Error> {
    fn drive<F>(conn: F)
    where
        F: std::future::Future<Output = std::result::Result<(), tokio_postgres::Error>> + Send + 'static,
    {
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed");
            }
        });
    }
    match rustls {
        None => {
            let (client, conn) = config.connect(NoTls).await?;
            drive(conn);
            Ok(client)
        }
        Some(c) => {
            let (client, conn) = config.connect(tokio_postgres_rustls::MakeRustlsConnect::new(c.clone())).await?;
            drive(conn);
            Ok(client)
        }
    }
}

/// [`connect_named`], then `request.tenant_id` set for the whole session when a tenant is given, so row
/// level security policies that read `current_setting('request.tenant_id')` hold for everything it writes.
pub async fn connect_as(dsn: &str, tenant: Option<&str>, app: &str) -> Result<Client> {
    let client = connect_named(dsn, app).await?;
    if let Some(tenant) = tenant {
        client
            .execute("select set_config('request.tenant_id', $1, false)", &[&tenant])
            .await
            .map_err(|e| Error::db("setting request.tenant_id (ACRA_DIRECT_TENANT_ID)", e))?;
    }
    Ok(client)
}

/// Applies every migration and loads the SSIC 2020 reference into `ssic_ref`.
pub async fn migrate(client: &mut Client) -> Result<()> {
    let tx = client.transaction().await.map_err(|e| Error::db("starting the migration transaction", e))?;
    // Two processes migrating at once would race on `create ... if not exists`.
    // `if not exists` notices are expected on every run after the first.
    tx.batch_execute("set local client_min_messages = warning")
        .await
        .map_err(|e| Error::db("starting the migrations", e))?;
    tx.execute("select pg_advisory_xact_lock(hashtext('acraflow.migrate'))", &[])
        .await
        .map_err(|e| Error::db("taking the migration lock", e))?;
    for (name, sql) in MIGRATIONS {
        tx.batch_execute(sql)
            .await
            .map_err(|e| Error::with_source(ErrorKind::Schema, format!("applying migration {name}"), e))?;
    }
    load_ssic(&tx).await?;
    tx.commit().await.map_err(|e| Error::db("committing the migrations", e))?;
    Ok(())
}

async fn load_ssic(tx: &tokio_postgres::Transaction<'_>) -> Result<()> {
    let mut codes = Vec::new();
    let mut titles = Vec::new();
    let mut levels = Vec::new();
    let mut sections = Vec::new();
    for (i, rec) in csv::Reader::from_reader(SSIC_CSV.as_bytes()).records().enumerate() {
        let rec = rec.map_err(|e| {
            Error::with_source(ErrorKind::Data, format!("ssic2020_classification_structure.csv record {}", i + 1), e)
        })?;
        codes.push(rec[0].to_owned());
        titles.push(rec[1].to_owned());
        levels.push(rec[2].to_owned());
        sections.push(rec[3].to_owned());
    }
    tx.execute(
        "insert into ssic_ref as r (code, title, level, section) \
         select * from unnest($1::text[], $2::text[], $3::text[], $4::text[]) \
         on conflict (code) do update set title = excluded.title, level = excluded.level, section = excluded.section \
         where (r.title, r.level, r.section) is distinct from (excluded.title, excluded.level, excluded.section)",
        &[&codes, &titles, &levels, &sections],
    )
    .await
    .map_err(|e| Error::db("loading ssic_ref", e))?;
    Ok(())
}

/// What the engine found in the target schema, to adapt its statements to.
#[derive(Debug, Clone, Copy, Default)]
pub struct SchemaFacts {
    /// `companies.industry` exists (optional; mirrors `industry_norm`).
    pub companies_has_industry: bool,
}

pub async fn schema_facts(client: &Client) -> Result<SchemaFacts> {
    let required =
        ["companies", "company_enrichment_runs", "service_progress", "dead_letters", "enrichment_runs", "ssic_ref"];
    let present: Vec<String> = client
        .query(
            "select table_name::text from information_schema.tables \
             where table_schema = current_schema() and table_name = any($1)",
            &[&required.as_slice()],
        )
        .await
        .map_err(|e| Error::db("reading the schema", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<&str> = required.iter().copied().filter(|t| !present.iter().any(|p| p == t)).collect();
    if !missing.is_empty() {
        return Err(Error::new(
            ErrorKind::Schema,
            format!("table(s) {} missing; run `acraflow migrate` first", missing.join(", ")),
        ));
    }
    let has_industry = client
        .query_opt(
            "select 1 from information_schema.columns \
             where table_schema = current_schema() and table_name = 'companies' and column_name = 'industry'",
            &[],
        )
        .await
        .map_err(|e| Error::db("reading the schema", e))?
        .is_some();
    Ok(SchemaFacts { companies_has_industry: has_industry })
}

/// The same connection string pointed at another database on the same server.
pub fn with_dbname(dsn: &str, dbname: &str) -> String {
    if let Some(rest) = dsn.strip_prefix("postgres://").or_else(|| dsn.strip_prefix("postgresql://")) {
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let host = authority.split_once('/').map_or(authority, |(h, _)| h);
        let query = query.map(|q| format!("?{q}")).unwrap_or_default();
        format!("postgres://{host}/{dbname}{query}")
    } else {
        format!("{dsn} dbname={dbname}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_dbname_points_at_another_database() {
        assert_eq!(with_dbname("host=h user=u password=p dbname=a", "b"), "host=h user=u password=p dbname=a dbname=b");
        assert_eq!(with_dbname("postgres://u:p@h:5/a?sslmode=disable", "b"), "postgres://u:p@h:5/b?sslmode=disable");
        let c: Config = with_dbname("host=h dbname=a", "b").parse().unwrap();
        assert_eq!(c.get_dbname(), Some("b"));
    }

    #[test]
    fn describe_never_shows_the_password() {
        let d = describe("host=db.example port=6543 user=ops password=hunter2 dbname=crm");
        assert_eq!(d, "ops@db.example:6543/crm");
        let d = describe("postgres://ops:hunter2@db.example:6543/crm");
        assert_eq!(d, "ops@db.example:6543/crm");
        assert!(!describe("postgres://ops:hunter2@[::1").contains("hunter2"));
    }
}
