//! `acraflow bench backfill`: the registry pipeline's throughput against the set-based ceiling, measured in
//! the same run on the same data, so the figure is a ratio and machine noise mostly cancels.
//!
//! The ceiling is what Postgres does alone: one `INSERT ... SELECT ... ON CONFLICT` applying the same rules
//! in SQL (and writing the same history rows), with no bytes leaving the server. The pipeline side runs
//! the real `acraflow backfill` binary as a child process, so its peak RSS is the CLI's own (`wait4`).
//! Both sides start from empty target tables, alternate `--repeat` times, and must produce the same
//! `companies` (checked by a fingerprint), or the bench fails.

use std::time::Instant;

use nix::sys::resource::{getrusage, UsageWho};

use crate::cli::BenchBackfillArgs;
use crate::db;
use crate::error::{Error, ErrorKind, Result};
use crate::ops::filter::DEFAULT_EXCLUDED_STATUSES;
use crate::seed;

const BENCH_DB: &str = "acraflow_bench";

pub async fn backfill(admin_dsn: &str, args: &BenchBackfillArgs) -> Result<()> {
    let admin = db::connect(admin_dsn).await?;
    for sql in [format!("drop database if exists {BENCH_DB} with (force)"), format!("create database {BENCH_DB}")] {
        admin
            .batch_execute(&sql)
            .await
            .map_err(|e| Error::db(format!("recreating the {BENCH_DB} database (the bench needs CREATEDB)"), e))?;
    }
    let dsn = db::with_dbname(admin_dsn, BENCH_DB);
    let mut client = db::connect(&dsn).await?;
    db::migrate(&mut client).await?;

    let t = Instant::now();
    let n = seed::seed(&client, "staging_acra_companies", args.rows, 20).await?;
    client.batch_execute("vacuum analyze staging_acra_companies").await.map_err(|e| Error::db("vacuum", e))?;
    println!("seeded {n} rows in {:.1}s", t.elapsed().as_secs_f64());

    let mut best_ceiling = f64::MAX;
    let mut best_pipeline = f64::MAX;
    let mut peak_rss_kb = 0i64;
    for round in 1..=args.repeat {
        reset(&client).await?;
        let t = Instant::now();
        client.batch_execute(&ceiling_sql()).await.map_err(|e| Error::db("running the set-based ceiling", e))?;
        let ceiling = t.elapsed().as_secs_f64();
        let expected = fingerprint(&client).await?;

        reset(&client).await?;
        let exe = std::env::current_exe().map_err(|e| Error::io("locating the acraflow binary", e))?;
        let t = Instant::now();
        let status = tokio::process::Command::new(exe)
            .arg("backfill")
            .env("POSTGRES_DSN", &dsn)
            .env("ACRA_DIRECT_BATCH_SIZE", args.batch_size.to_string())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .map_err(|e| Error::io("running acraflow backfill", e))?;
        let pipeline = t.elapsed().as_secs_f64();
        if !status.success() {
            return Err(Error::new(ErrorKind::Io, format!("acraflow backfill exited with {status}")));
        }
        let got = fingerprint(&client).await?;
        if got != expected {
            return Err(Error::new(
                ErrorKind::Data,
                format!("the pipeline's companies differ from the ceiling's: {got:?} vs {expected:?}"),
            ));
        }
        peak_rss_kb = getrusage(UsageWho::RUSAGE_CHILDREN).map(|u| u.max_rss()).unwrap_or(0).max(peak_rss_kb);
        println!(
            "round {round}: ceiling {:.2}s ({:.0} rows/s), pipeline {:.2}s ({:.0} rows/s), ratio {:.2}, companies {}",
            ceiling,
            n as f64 / ceiling,
            pipeline,
            n as f64 / pipeline,
            ceiling / pipeline,
            expected.0
        );
        best_ceiling = best_ceiling.min(ceiling);
        best_pipeline = best_pipeline.min(pipeline);
    }
    let ratio = best_ceiling / best_pipeline;
    let rss_mb = peak_rss_kb as f64 / 1024.0;
    println!("\nbench backfill: {n} staging rows, batch size {}, best of {}", args.batch_size, args.repeat);
    println!("  set-based ceiling   {:>10.0} rows/s", n as f64 / best_ceiling);
    println!("  registry pipeline   {:>10.0} rows/s", n as f64 / best_pipeline);
    println!("  ratio               {:>10.2}   (target >= 0.80)", ratio);
    println!("  pipeline peak RSS   {:>10.1} MB (target <= 100)", rss_mb);
    Ok(())
}

async fn reset(client: &tokio_postgres::Client) -> Result<()> {
    client
        .batch_execute(
            "truncate companies, company_enrichment_runs, dead_letters, service_progress, enrichment_runs \
             restart identity; checkpoint",
        )
        .await
        .map_err(|e| Error::db("resetting the bench tables", e))
}

/// Row count and an order-independent hash of the registry fields of `companies`.
async fn fingerprint(client: &tokio_postgres::Client) -> Result<(i64, i64)> {
    let row = client
        .query_one(
            "select count(*), coalesce(sum(hashtext(concat_ws('|', uen, name, industry_code, industry_norm, \
               incorporation_year, status))::bigint), 0)::bigint from companies",
            &[],
        )
        .await
        .map_err(|e| Error::db("fingerprinting companies", e))?;
    Ok((row.get(0), row.get(1)))
}

/// The registry rules as one set-based statement (see `registry` for the rules themselves).
pub fn ceiling_sql() -> String {
    let clean = |c: &str| {
        format!("case when lower(btrim({c}, E' \\t\\n\\r\\f')) in ('', 'na') then null else btrim({c}, E' \\t\\n\\r\\f') end")
    };
    let excluded: Vec<String> = DEFAULT_EXCLUDED_STATUSES.iter().map(|s| format!("'{s}%'")).collect();
    format!(
        "with s as ( \
           select id, upper({uen}) as uen, {name} as name, {status} as status, {desc} as ssic_desc, \
             regexp_replace(coalesce(primary_ssic_code, ''), '[^0-9]', '', 'g') as digits, {date} as d \
           from staging_acra_companies \
         ), m as ( \
           select id, uen, name, status, ssic_desc, \
             case when length(digits) between 1 and 5 then lpad(digits, 5, '0') end as industry_code, \
             case when d ~ '^[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}$' \
                   and substr(d, 1, 4)::int between 1800 and extract(year from current_date)::int \
                   and substr(d, 6, 2)::int between 1 and 12 \
                   and substr(d, 9, 2)::int between 1 and extract(day from make_date(substr(d, 1, 4)::int, \
                         substr(d, 6, 2)::int, 1) + interval '1 month - 1 day')::int \
                  then substr(d, 1, 4)::int end as year, \
             not coalesce(lower(status) like any (array[{excluded}]), false) as included \
           from s \
           where (uen is not null or name is not null) and coalesce(char_length(name), 0) <= {max_name} \
         ), k as ( \
           select *, coalesce(uen, md5(lower(name)) || '/' || coalesce(year, 0)) as ckey from m \
         ), agg as ( \
           select distinct on (ckey) ckey, uen, status, industry_code, ssic_desc, year, \
             first_value(name) over (partition by ckey order by name is null, id desc) as name, \
             bool_or(included and name is not null) over (partition by ckey) as insertable, \
             max(id) filter (where included) over (partition by ckey) as processed_id \
           from k order by ckey, id desc \
         ), ins as ( \
           insert into companies (uen, name, industry_code, industry_norm, industry, incorporation_year, status) \
           select a.uen, a.name, a.industry_code, coalesce(r.title, a.ssic_desc), coalesce(r.title, a.ssic_desc), \
             a.year, a.status \
           from agg a left join ssic_ref r on r.code = a.industry_code \
           where a.insertable \
           on conflict (uen) do update set name = excluded.name, status = excluded.status \
           returning company_id, uen, name, incorporation_year \
         ) \
         insert into company_enrichment_runs (company_id, source_lsn, source_seq, staging_id, status) \
         select i.company_id, '0/0', a.processed_id, a.processed_id, 'ok' \
         from ins i join agg a on a.ckey = coalesce(i.uen, md5(lower(i.name)) || '/' || coalesce(i.incorporation_year, 0)) \
         where a.processed_id is not null",
        uen = clean("uen"),
        name = clean("entity_name"),
        status = clean("entity_status_description"),
        desc = clean("primary_ssic_description"),
        date = clean("registration_incorporation_date"),
        excluded = excluded.join(", "),
        max_name = crate::registry::MAX_NAME_CHARS,
    )
}
