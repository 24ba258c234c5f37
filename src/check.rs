//! `acraflow check`, in the spirit of `dbt debug`: is everything in place for `acraflow run`?
//!
//! 1. The effective settings and where each came from (a flag, the environment, a default, the pipeline),
//!    secrets hidden; variables that look like ours but are not (`ACRA_DIRECT_CONCURENCY`) with the closest
//!    known name; settings the chosen pipeline ignores (enrichment settings with `registry_sync`).
//! 2. The database: reachable, acraflow's schema migrated, the staging table there, `wal_level=logical`,
//!    the role allowed to replicate, the slot and publication.
//!
//! Every finding is `ok`, `warn` or `FAIL`; a `FAIL` (something that would stop a run) makes the command
//! exit non-zero. `run` and `backfill` log the same configuration warnings when they start.

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory};

use crate::cli::{Cli, RunArgs};
use crate::config::PipelineSpec;
use crate::db;
use crate::demo::cut;
use crate::error::{Error, ErrorKind, Result};

/// Environment variables acraflow reads that no flag carries.
const OTHER_KNOWN: &[&str] = &[
    "ACRAFLOW_PG_BIN",
    "LLM_API_KEY",
    "OPENAI_API_KEY",
    "APIFY_TOKEN",
    "ZEROBOUNCE_API_KEY",
    "ODOO_API_KEY",
    "DEFAULT_TENANT_ID",
    "RUST_LOG",
];

/// Prefixes of the variables that are ours: a variable with one of them that we do not know is a typo.
const OUR_PREFIXES: &[&str] = &[
    "ACRA_DIRECT_",
    "ACRAFLOW_",
    "ENRICH_",
    "CRAWL",
    "LLM_",
    "EXTRACT_",
    "METRICS_",
    "ZEROBOUNCE_",
    "ODOO_",
    "SCORE_",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub what: String,
}

impl Finding {
    fn new(level: Level, what: impl Into<String>) -> Finding {
        Finding { level, what: what.into() }
    }
}

/// Every environment name the command line knows, for the run/backfill flags and globally.
fn known_names() -> Vec<String> {
    let mut names: Vec<String> = OTHER_KNOWN.iter().map(|s| (*s).to_owned()).collect();
    let cmd = Cli::command();
    let mut stack = vec![&cmd];
    while let Some(c) = stack.pop() {
        for a in c.get_arguments() {
            if let Some(env) = a.get_env().and_then(|e| e.to_str()) {
                names.push(env.to_owned());
            }
        }
        stack.extend(c.get_subcommands());
    }
    names.sort();
    names.dedup();
    names
}

/// The configuration findings that do not need the database: unknown variables with the closest known
/// name, and settings the pipeline ignores.
pub fn config_findings(spec: &PipelineSpec, vars: &[(String, String)]) -> Vec<Finding> {
    let known = known_names();
    let mut out = Vec::new();
    for (name, _) in vars {
        if known.contains(name) || !OUR_PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let closest = known.iter().min_by_key(|k| levenshtein(name, k)).filter(|k| levenshtein(name, k) <= 4);
        out.push(Finding::new(
            Level::Warn,
            match closest {
                Some(k) => format!("{name} is not a setting acraflow reads; did you mean {k}?"),
                None => format!("{name} is not a setting acraflow reads"),
            },
        ));
    }
    if spec.enrich().is_none() {
        let enrichment = enrichment_names();
        let ignored: Vec<&str> =
            vars.iter().map(|(n, _)| n.as_str()).filter(|n| enrichment.iter().any(|e| e == n)).collect();
        if !ignored.is_empty() {
            out.push(Finding::new(
                Level::Warn,
                format!(
                    "pipeline {} has no enrich operator, so it ignores {}; use --pipeline acra_direct \
                     (ACRA_DIRECT_PIPELINE=acra_direct) to enrich",
                    spec.name,
                    ignored.join(", ")
                ),
            ));
        }
    }
    out
}

/// The environment names of the enrichment settings (the flags under the "Enrichment" heading).
fn enrichment_names() -> Vec<String> {
    let cmd = Cli::command();
    let Some(run) = cmd.find_subcommand("run") else { return Vec::new() };
    run.get_arguments()
        .filter(|a| a.get_help_heading() == Some("Enrichment"))
        .filter_map(|a| a.get_env().and_then(|e| e.to_str()).map(str::to_owned))
        .collect()
}

/// Logs [`config_findings`] as warnings: what `run` and `backfill` say when they start.
pub fn warn_at_start(spec: &PipelineSpec) {
    for f in config_findings(spec, &our_vars()) {
        tracing::warn!("{}", f.what);
    }
}

fn our_vars() -> Vec<(String, String)> {
    let known = known_names();
    let mut vars: Vec<(String, String)> =
        std::env::vars().filter(|(k, _)| OUR_PREFIXES.iter().any(|p| k.starts_with(p)) || known.contains(k)).collect();
    vars.sort();
    vars
}

pub async fn check(cli: &Cli, dsn: &str, embedded: bool, args: &RunArgs) -> Result<()> {
    let mut findings = Vec::new();
    println!("acraflow check\n");

    // 1. Settings.
    let spec = match crate::commands::pipeline_spec(args, &args.overrides.to_overrides()) {
        Ok(spec) => Some(spec),
        Err(e) => {
            findings.push(Finding::new(Level::Fail, format!("configuration: {}", crate::pipeline::error_chain(&e))));
            None
        }
    };
    let pipeline = match &args.pipeline {
        Some(p) if p.exists() => format!("{} (a pipeline file)", p.display()),
        Some(p) if ["registry_sync", "acra_direct"].contains(&p.to_string_lossy().as_ref()) => {
            format!("{} (built in)", p.display())
        }
        Some(p) => format!("{} (not found)", p.display()),
        None => "registry_sync (built in, the default)".to_owned(),
    };
    println!("pipeline  {pipeline}");
    if let Some(spec) = &spec {
        let ops: Vec<&str> = spec.operators.iter().map(|o| o.kind()).collect();
        println!("          source -> {} -> sink", ops.join(" -> "));
    }
    println!("\nsettings: the effective value and where it came from (secrets hidden)");
    let matches = Cli::command().ignore_errors(true).get_matches();
    let run = matches.subcommand().map(|(_, m)| m.clone());
    let (text, origin) = match args.pipeline.as_deref().and_then(|p| p.to_str()) {
        None | Some("registry_sync") => (crate::config::REGISTRY_SYNC.to_owned(), "built-in pipeline"),
        Some("acra_direct") => (crate::config::ACRA_DIRECT.to_owned(), "built-in pipeline"),
        Some(path) => (std::fs::read_to_string(path).unwrap_or_default(), "pipeline file"),
    };
    let enriching = spec.as_ref().is_some_and(|s| s.enrich().is_some());
    print_settings(cli, run.as_ref(), dsn, embedded, &pipeline_values(&text), origin, enriching);
    if let Some(spec) = &spec {
        findings.extend(config_findings(spec, &our_vars()));
    }

    // 2. The database.
    findings.extend(database_findings(dsn, spec.as_ref(), embedded).await);

    println!("\nfindings");
    for f in &findings {
        let tag = match f.level {
            Level::Ok => "  ok  ",
            Level::Warn => "  warn",
            Level::Fail => "  FAIL",
        };
        println!("{tag}  {}", f.what);
    }
    let failed = findings.iter().filter(|f| f.level == Level::Fail).count();
    let warned = findings.iter().filter(|f| f.level == Level::Warn).count();
    if failed > 0 {
        println!("\n{failed} problem(s) would stop a run; {warned} warning(s)");
        return Err(Error::new(ErrorKind::Config, format!("check found {failed} problem(s) that would stop a run")));
    }
    println!("\nready: nothing would stop a run ({warned} warning(s))");
    Ok(())
}

/// The settings a pipeline file gives, by the environment name its comment names:
/// `batch_size = 5000   # [ACRA_DIRECT_BATCH_SIZE] ...` gives `ACRA_DIRECT_BATCH_SIZE = 5000`.
pub fn pipeline_values(text: &str) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let (Some((setting, comment)), true) = (line.split_once('#'), line.contains('=')) else { continue };
        let Some(value) = setting.split_once('=').map(|(_, v)| v.trim().trim_matches('"').to_owned()) else { continue };
        let Some(name) = comment.trim().strip_prefix('[').and_then(|c| c.split_once(']')).map(|(n, _)| n.to_owned())
        else {
            continue;
        };
        if name.chars().all(|c| c.is_ascii_uppercase() || c == '_') && !value.is_empty() {
            out.insert(name, value);
        }
    }
    out
}

/// Every setting with its effective value and where it came from (flag, environment, the pipeline, the
/// default), the database first; secrets hidden. Enrichment settings only when the pipeline enriches.
#[allow(clippy::too_many_arguments)]
fn print_settings(
    cli: &Cli,
    run: Option<&ArgMatches>,
    dsn: &str,
    embedded: bool,
    from_pipeline: &std::collections::HashMap<String, String>,
    origin: &str,
    enriching: bool,
) {
    let row = |name: &str, value: &str, source: &str| println!("  {name:<34} {:<40} {source}", cut(value, 40));
    if embedded {
        row("POSTGRES_DSN", "(unset)", "the private cluster");
        row("ACRAFLOW_HOME", &home(cli), "where its data lives");
    } else {
        row("POSTGRES_DSN", &db::describe(dsn), "environment or --dsn (password hidden)");
    }
    let Some(m) = run else { return };
    let cmd = Cli::command();
    let Some(sub) = cmd.find_subcommand("check") else { return };
    for a in sub.get_arguments() {
        let id = a.get_id().as_str();
        let Some(name) = a.get_env().and_then(|e| e.to_str()).map(str::to_owned) else { continue };
        if name == "POSTGRES_DSN" || name == "ACRAFLOW_HOME" {
            continue;
        }
        let given = match m.value_source(id) {
            Some(ValueSource::CommandLine) => Some("flag"),
            Some(ValueSource::EnvVariable) => Some("environment"),
            _ => None,
        };
        if given.is_none() && !enriching && a.get_help_heading() == Some("Enrichment") {
            continue; // not read by this pipeline
        }
        let secret = a.is_hide_env_values_set() || looks_secret(&name);
        let (value, source) = match given {
            Some(source) => {
                let raw: Vec<String> = m
                    .get_raw(id)
                    .map(|vals| vals.map(|v| v.to_string_lossy().into_owned()).collect())
                    .unwrap_or_default();
                (raw.join(","), source)
            }
            None => match from_pipeline.get(&name) {
                Some(v) => (v.clone(), origin),
                None => match default_of(a) {
                    Some(d) => (d, "default"),
                    None => ("(unset)".to_owned(), "default"),
                },
            },
        };
        let value = if secret && source != "default" { "(set; hidden)".to_owned() } else { value };
        row(&name, &value, source);
    }
}

/// A flag's default: clap's, or the `[default: X]` its help names.
fn default_of(a: &clap::Arg) -> Option<String> {
    if let Some(d) = a.get_default_values().first() {
        return Some(d.to_string_lossy().into_owned());
    }
    let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
    let start = help.rfind("[default: ")? + "[default: ".len();
    let end = help[start..].find(']')? + start;
    Some(help[start..end].to_owned())
}

fn home(cli: &Cli) -> String {
    cli.home.clone().unwrap_or_else(crate::embedded::ClusterOptions::default_home).display().to_string()
}

fn looks_secret(name: &str) -> bool {
    ["API_KEY", "TOKEN", "PASSWORD", "SECRET", "WEBHOOK", "URL", "PROXY"].iter().any(|w| name.contains(w))
}

async fn database_findings(dsn: &str, spec: Option<&PipelineSpec>, embedded: bool) -> Vec<Finding> {
    // The private cluster is migrated by `run` and `backfill` themselves; a user's database by `acraflow migrate`.
    let unmigrated = if embedded { Level::Warn } else { Level::Fail };
    let mut out = Vec::new();
    let client = match db::connect(dsn).await {
        Ok(c) => c,
        Err(e) => {
            out.push(Finding::new(
                Level::Fail,
                format!("database {}: {}", db::describe(dsn), crate::pipeline::error_chain(&e)),
            ));
            return out;
        }
    };
    let one = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await }
    };
    if let Ok(r) = one("select current_setting('server_version'), current_setting('wal_level')").await {
        let (version, wal_level): (String, String) = (r.get(0), r.get(1));
        out.push(Finding::new(Level::Ok, format!("database {} reachable (PostgreSQL {version})", db::describe(dsn))));
        if wal_level == "logical" {
            out.push(Finding::new(Level::Ok, "wal_level is logical"));
        } else {
            out.push(Finding::new(
                Level::Fail,
                format!(
                    "wal_level is {wal_level}: `acraflow run` streams by logical replication and needs \
                     wal_level=logical (ALTER SYSTEM SET wal_level = logical, then restart the server); \
                     `acraflow backfill` works without it"
                ),
            ));
        }
    }
    match one("select rolsuper or rolreplication from pg_roles where rolname = current_user").await {
        Ok(r) if r.get::<_, bool>(0) => out.push(Finding::new(Level::Ok, "the role may replicate")),
        Ok(_) => out.push(Finding::new(
            Level::Fail,
            "the role has no REPLICATION attribute: `acraflow run` cannot create or read its slot \
             (ALTER ROLE <role> REPLICATION, or on managed services their replication role)",
        )),
        Err(e) => out.push(Finding::new(Level::Warn, format!("could not read the role's attributes: {e}"))),
    }
    match db::schema_facts(&client).await {
        Ok(_) => {
            let current = client
                // The newest migration's mark (sql/009_pacing.sql).
                .query_opt(
                    "select 1 from information_schema.tables where table_schema = current_schema() \
                     and table_name = 'provider_pacing'",
                    &[],
                )
                .await
                .map(|r| r.is_some())
                .unwrap_or(false);
            if current {
                out.push(Finding::new(Level::Ok, "acraflow's schema is migrated and current"));
            } else {
                out.push(Finding::new(
                    unmigrated,
                    "acraflow's schema is from an older version: run `acraflow migrate`",
                ));
            }
        }
        Err(e) => out.push(Finding::new(unmigrated, format!("schema: {e}"))),
    }
    let table = spec.map_or(crate::config::DEFAULT_TABLE.to_owned(), |s| s.source.table.clone());
    match client.query_one("select to_regclass($1) is not null", &[&table]).await {
        Ok(r) if r.get::<_, bool>(0) => {
            let rows: i64 = client
                .query_one("select coalesce(reltuples, 0)::int8 from pg_class where oid = to_regclass($1)", &[&table])
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            out.push(Finding::new(Level::Ok, format!("staging table {table} is there (about {} rows)", rows.max(0))));
        }
        _ => out.push(Finding::new(
            unmigrated,
            format!("staging table {table} does not exist: `acraflow migrate` creates it, `acraflow import` fills it"),
        )),
    }
    if let Some(spec) = spec {
        let slot = &spec.source.slot;
        match client
            .query_opt(
                "select active, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8 \
                 from pg_replication_slots where slot_name = $1",
                &[slot],
            )
            .await
        {
            Ok(Some(r)) => {
                let (active, held): (bool, i64) = (r.get(0), r.get(1));
                out.push(Finding::new(
                    if active { Level::Warn } else { Level::Ok },
                    format!(
                        "slot {slot} exists, {} and holding {} of WAL{}",
                        if active { "in use by another process" } else { "idle" },
                        crate::admin::human_bytes(held),
                        if active { ": a second `run` on it would wait for the first" } else { "" }
                    ),
                ));
            }
            Ok(None) => out.push(Finding::new(
                Level::Ok,
                format!("slot {slot} does not exist yet: the first `acraflow run` creates it and backfills"),
            )),
            Err(e) => out.push(Finding::new(Level::Warn, format!("could not read the replication slots: {e}"))),
        }
        let publication = &spec.source.publication;
        if let Ok(r) = client.query_one("select count(*) from pg_publication where pubname = $1", &[publication]).await
        {
            let exists = r.get::<_, i64>(0) > 0;
            out.push(Finding::new(
                Level::Ok,
                if exists {
                    format!("publication {publication} exists")
                } else {
                    format!("publication {publication} does not exist yet: the first `acraflow run` creates it")
                },
            ));
        }
    }
    out
}

/// Edit distance (insertions, deletions, substitutions), for "did you mean".
fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelled_variable_gets_the_closest_name() {
        let spec = PipelineSpec::registry_sync();
        let vars = vec![("ACRA_DIRECT_CONCURENCY".to_owned(), "8".to_owned())];
        let f = config_findings(&spec, &vars);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].what.contains("did you mean ACRA_DIRECT_CONCURRENCY"), "{f:?}");
    }

    #[test]
    fn enrichment_settings_on_the_registry_pipeline_are_flagged() {
        let vars =
            vec![("CRAWL_MAX_PAGES".to_owned(), "3".to_owned()), ("ACRA_DIRECT_BATCH_SIZE".to_owned(), "9".to_owned())];
        let f = config_findings(&PipelineSpec::registry_sync(), &vars);
        assert!(f.iter().any(|f| f.what.contains("ignores CRAWL_MAX_PAGES")), "{f:?}");
        assert!(!f.iter().any(|f| f.what.contains("ACRA_DIRECT_BATCH_SIZE")), "{f:?}");
        assert!(config_findings(&PipelineSpec::acra_direct(), &vars).is_empty());
    }

    #[test]
    fn the_pipeline_files_settings_are_read_by_their_environment_names() {
        let v = pipeline_values(crate::config::ACRA_DIRECT);
        assert_eq!(v.get("ACRA_DIRECT_BATCH_SIZE").map(String::as_str), Some("5000"));
        assert_eq!(v.get("ENRICH_SEARCH_RATE").map(String::as_str), Some("200/hour"));
        assert!(!v.contains_key("ACRA_DIRECT_START_AFTER_ID"), "a commented-out setting is not set");
    }

    #[test]
    fn edit_distance() {
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
    }
}
