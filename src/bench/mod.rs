//! `acraflow bench backfill`: the registry pipeline's throughput against the set-based ceiling, measured in
//! the same run on the same data, so the figure is a ratio and machine noise mostly cancels.
//!
//! The ceiling is what Postgres does alone: one `INSERT ... SELECT ... ON CONFLICT` applying the same rules
//! in SQL (and writing the same history rows), with no bytes leaving the server. The pipeline side runs
//! the real `acraflow backfill` binary as a child process, so its peak RSS is the CLI's own (`wait4`).
//! Both sides start from empty target tables, alternate `--repeat` times, and must produce the same
//! `companies` (checked by a fingerprint), or the bench fails.

use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, UsageWho};

use crate::cli::BenchBackfillArgs;
use crate::db;
use crate::error::{Error, ErrorKind, Result};
use crate::fixture_web::{FixtureWeb, SiteSpec};
use crate::ops::filter::DEFAULT_EXCLUDED_STATUSES;
use crate::seed;

mod enrich;
mod queue;
pub use enrich::enrich;
pub use queue::workers;

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

/// The registry rules as one set-based statement (see `registry` for the rules themselves), written to be
/// as fast as we can make it, so the ratio is against the strongest reference:
/// - each staging column is trimmed once (a lateral subquery kept apart with `offset 0`), and `na` is
///   tested by equality on its four spellings rather than through `lower()`;
/// - dates and SSIC codes are checked with `translate`/`substr` and integer arithmetic; a regex runs only
///   for a code that is not already all digits;
/// - the exclusion patterns are matched once per distinct status, not once per row;
/// - only groups (UEN, or name and year) holding an eligible row are sorted, and keys sort in "C".
///
/// `EXPLAIN ANALYZE` on 400k rows: trimming and dates 1.1 s, statuses 0.5 s, group keys 0.5 s, the window
/// sort 0.45 s, the `companies` insert 0.95 s, the history rows 0.5 s.
pub fn ceiling_sql() -> String {
    let ws = r"E' \t\n\r\f'";
    let clean =
        |c: &str| format!("nullif(nullif(nullif(nullif(nullif(btrim(st.{c}, {ws}), ''), 'na'), 'NA'), 'Na'), 'nA')");
    let excluded: Vec<String> = DEFAULT_EXCLUDED_STATUSES.iter().map(|s| format!("'{s}%'")).collect();
    format!(
        "set work_mem = '256MB'; \
         with s as ( \
           select st.id, t.u, t.n, t.s, t.sd, t.code, p.year \
           from staging_acra_companies st \
           cross join lateral ( \
             select {uen} as u, {name} as n, {status} as s, {desc} as sd, \
               btrim(st.registration_incorporation_date, {ws}) as d, st.primary_ssic_code as code offset 0 \
           ) t \
           cross join lateral ( \
             select case when y between 1800 and extract(year from current_date)::int and mo between 1 and 12 \
                 and dd between 1 and case when mo = 2 then \
                     case when y % 4 = 0 and (y % 100 <> 0 or y % 400 = 0) then 29 else 28 end \
                   when mo in (4, 6, 9, 11) then 30 else 31 end then y end as year \
             from ( \
               select case when ok then substr(t.d, 1, 4)::int end as y, \
                 case when ok then substr(t.d, 6, 2)::int end as mo, case when ok then substr(t.d, 9, 2)::int end as dd \
               from (select length(t.d) = 10 and translate(t.d, '0123456789', '') = '--' \
                       and substr(t.d, 5, 1) = '-' and substr(t.d, 8, 1) = '-' as ok) o offset 0 \
             ) q offset 0 \
           ) p \
           where (t.u is not null or t.n is not null) and coalesce(char_length(t.n), 0) <= {max_name} \
         ), statuses as ( \
           select raw, not coalesce(lower(raw) like any (array[{excluded}]), false) as included \
           from (select distinct s from s) x(raw) \
         ), k0 as ( \
           select s.*, coalesce(upper(s.u), md5(lower(s.n)) || '/' || coalesce(s.year, 0)) collate \"C\" as ckey, \
             coalesce(x.included, true) as included \
           from s left join statuses x on x.raw = s.s \
         ), k as ( \
           select id, ckey, u, n as name, s as status, sd as ssic_desc, year, included, \
             case when code is null then null \
               when translate(code, '0123456789', '') = '' and length(code) between 1 and 5 then lpad(code, 5, '0') \
               else (select case when length(x) between 1 and 5 then lpad(x, 5, '0') end \
                     from regexp_replace(code, '[^0-9]', '', 'g') x) end as industry_code \
           from k0 where ckey in (select ckey from k0 where included and n is not null) \
         ), agg as ( \
           select distinct on (ckey) ckey, upper(u) as uen, status, industry_code, ssic_desc, year, \
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
        excluded = excluded.join(", "),
        max_name = crate::registry::MAX_NAME_CHARS,
    )
}

/// `acraflow bench stream`: `acraflow run` (a child process, so its RSS is its own) against live writers.
///
/// 1. latency: one writer at a steady `rate` rows/s for `seconds`; each row's commit-to-visible latency is
///    `companies.created_at` (the upsert's transaction start) minus the row's commit-time stamp;
/// 2. sustained: `writers` connections insert `rows` rows (a third eligible, as in the registry) in
///    transactions of `txn_rows` as fast as they can; the clock stops when a sentinel row written after them
///    is visible in `companies` (changes are applied in commit order, so everything before it is too);
/// 3. reference: a second slot, created before phase 2, is read over the same WAL by a bare client that only
///    receives and decodes (the same pgoutput decoder), in this same run;
/// 4. memory: one transaction of `big_txn` rows goes through; peak RSS is the engine's maximum over the run.
pub async fn stream(admin_dsn: &str, args: &crate::cli::BenchStreamArgs) -> Result<()> {
    const DB: &str = "acraflow_bench_stream";
    let (dsn, client) = scratch_database(admin_dsn, DB).await?;

    let exe = std::env::current_exe().map_err(|e| Error::io("locating the acraflow binary", e))?;
    let mut engine = tokio::process::Command::new(exe)
        .arg("run")
        .env("POSTGRES_DSN", &dsn)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::io("starting acraflow run", e))?;
    wait_for(&client, "select count(*) from pg_stat_activity where application_name = 'acraflow-replication'", 60)
        .await?;

    // 1. Latency at a steady rate (first, so it measures a steady state, not the wake of the burst below).
    let hist = steady_latency(&client, args.rate, args.seconds, "LAT_", 0).await?;

    // 2. Sustained throughput. The reference slot sees exactly the WAL the engine's slot sees from here on.
    client
        .execute("select pg_create_logical_replication_slot('bench_raw', 'pgoutput')", &[])
        .await
        .map_err(|e| Error::db("creating the reference slot", e))?;
    let per_writer = args.rows / u64::from(args.writers.max(1));
    let cpu_before = CpuSample::take(&client, engine.id()).await;
    let t = Instant::now();
    let mut writers = Vec::new();
    for w in 0..args.writers.max(1) {
        let dsn = dsn.clone();
        let txn_rows = args.txn_rows.max(1);
        writers.push(tokio::spawn(async move {
            let c = db::connect_named(&dsn, "acraflow-bench-writer").await?;
            let mut next = 0u64;
            while next < per_writer {
                let n = txn_rows.min(per_writer - next);
                insert(&c, &format!("W{w}_"), next as i64, n as i64, true).await?;
                next += n;
            }
            // The backend's CPU, read before it exits (it was started for this writer).
            let pid: i32 = c.query_one("select pg_backend_pid()", &[]).await.map_err(|e| Error::db("bench", e))?.get(0);
            Ok::<_, Error>(proc_ticks(pid as u32).unwrap_or(0))
        }));
    }
    let mut writer_ticks = 0;
    for w in writers {
        writer_ticks += w.await.map_err(|e| Error::new(ErrorKind::Io, format!("writer task: {e}")))??;
    }
    let written = t.elapsed().as_secs_f64();
    insert(&client, "SENTINEL_", 1, 1, false).await?;
    wait_for(&client, "select count(*) from companies where uen = 'SENTINEL_00000001'", 600).await?;
    let sustained_secs = t.elapsed().as_secs_f64();
    let cpu = CpuSample::take(&client, engine.id()).await.since(&cpu_before, writer_ticks);
    let total = per_writer * u64::from(args.writers.max(1));

    // 3. Reference: receive and decode the same WAL, nothing else.
    let (raw_rows, raw_secs) = raw_decode(&dsn, total + 1).await?;
    // The reference client's walsender may take a moment to exit after it disconnects.
    let mut tries = 0;
    loop {
        match client.execute("select pg_drop_replication_slot('bench_raw')", &[]).await {
            Ok(_) => break,
            Err(e) if tries < 50 => {
                tries += 1;
                tracing::debug!(error = %e, "bench_raw still active; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(Error::db("dropping bench_raw", e)),
        }
    }

    // 4. One large transaction.
    let t = Instant::now();
    insert(&client, "BIG_", 0, args.big_txn as i64, true).await?;
    insert(&client, "SENTINEL_", 2, 1, false).await?;
    wait_for(&client, "select count(*) from companies where uen = 'SENTINEL_00000002'", 1800).await?;
    let big_secs = t.elapsed().as_secs_f64();

    if let Some(pid) = engine.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    }
    let status = engine.wait().await.map_err(|e| Error::io("waiting for acraflow run", e))?;
    let rss_mb = getrusage(UsageWho::RUSAGE_CHILDREN).map(|u| u.max_rss()).unwrap_or(0) as f64 / 1024.0;
    // An idle slot left behind would pin WAL on this server.
    let _ = client
        .execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where database = $1", &[&DB])
        .await;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!("bench stream: {} writers, {} rows in transactions of {}", args.writers, total, args.txn_rows);
    println!("  writers alone            {:>10.0} rows/s", total as f64 / written);
    println!(
        "  pipeline sustained       {:>10.0} rows/s   (target >= 50000; written to visible)",
        total as f64 / sustained_secs
    );
    println!("  cpu while sustained      {}", cpu.describe(total));
    println!("  wal while sustained      {}", cpu.describe_wal(total));
    println!("  receive+decode only      {:>10.0} rows/s   (same WAL, bare client)", raw_rows as f64 / raw_secs);
    println!("  pipeline / raw           {:>10.2}", (total as f64 / sustained_secs) / (raw_rows as f64 / raw_secs));
    println!(
        "  latency at {} rows/s    p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} rows; target p99 <= 100 ms)",
        args.rate,
        ms(0.50),
        ms(0.95),
        ms(0.99),
        hist.max() as f64 / 1000.0,
        hist.len()
    );
    println!(
        "  {}-row transaction      {:>10.1} s     ({:.0} rows/s)",
        args.big_txn,
        big_secs,
        args.big_txn as f64 / big_secs
    );
    println!("  engine peak RSS          {:>10.1} MB    (target <= 100, over the whole run)", rss_mb);
    println!("  engine exit              {status}");
    Ok(())
}

/// CPU time (clock ticks, from `/proc`) of each part of the pipeline and of the whole machine, so a
/// throughput figure says where the time went. Postgres backends are found by `application_name`; this
/// only means something when the server runs on this machine (the embedded default), and reads 0 otherwise.
#[derive(Debug, Default)]
struct CpuSample {
    /// (part, ticks): the engine process, and the engine's sessions and walsender by application_name.
    parts: Vec<(String, u64)>,
    /// Busy, total and stolen ticks of the whole machine (`/proc/stat`; steal is time a virtual machine
    /// was ready to run but the hypervisor ran something else).
    busy: u64,
    total: u64,
    steal: u64,
    /// The server's WAL records, full-page images and bytes (`pg_stat_wal`).
    wal: [i64; 3],
}

impl CpuSample {
    async fn take(client: &tokio_postgres::Client, engine: Option<u32>) -> CpuSample {
        let mut parts = vec![("engine".to_owned(), engine.and_then(proc_ticks).unwrap_or(0))];
        let sessions = client
            .query(
                "select pid, application_name from pg_stat_activity \
                 where application_name like 'acraflow-%' and application_name <> 'acraflow-bench-writer'",
                &[],
            )
            .await
            .unwrap_or_default();
        for r in &sessions {
            let (pid, name): (i32, String) = (r.get(0), r.get(1));
            parts.push((name.trim_start_matches("acraflow-").to_owned(), proc_ticks(pid as u32).unwrap_or(0)));
        }
        let (busy, total, steal) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let t: Vec<u64> = s.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
                let idle = t.get(3)? + t.get(4)?;
                let steal = *t.get(7)?;
                let total: u64 = t.iter().take(8).sum();
                Some((total - idle - steal, total, steal))
            })
            .unwrap_or((0, 0, 0));
        let wal = client
            .query_one("select wal_records, wal_fpi, wal_bytes::int8 from pg_stat_wal", &[])
            .await
            .map(|r| [r.get(0), r.get(1), r.get(2)])
            .unwrap_or_default();
        CpuSample { parts, busy, total, steal, wal }
    }

    /// The difference from `before`, with the writers' backends added as one part.
    fn since(mut self, before: &CpuSample, writer_ticks: u64) -> CpuSample {
        for (name, ticks) in &mut self.parts {
            let prior = before.parts.iter().find(|(n, _)| n == name).map_or(0, |(_, t)| *t);
            *ticks = ticks.saturating_sub(prior);
        }
        self.parts.push(("writers".to_owned(), writer_ticks));
        self.busy = self.busy.saturating_sub(before.busy);
        self.total = self.total.saturating_sub(before.total);
        self.steal = self.steal.saturating_sub(before.steal);
        for (now, prior) in self.wal.iter_mut().zip(before.wal) {
            *now -= prior;
        }
        self
    }

    /// WAL written per staging row: records, full-page images, bytes.
    fn describe_wal(&self, rows: u64) -> String {
        let per = |v: i64| v as f64 / rows.max(1) as f64;
        format!(
            "per row: {:.2} records, {:.3} full-page images, {:.0} bytes",
            per(self.wal[0]),
            per(self.wal[1]),
            per(self.wal[2])
        )
    }

    /// "part ms/1k rows, ..." and how busy the machine was.
    fn describe(&self, rows: u64) -> String {
        // `/proc` counts in USER_HZ, which Linux fixes at 100 for user space: a tick is 10 ms.
        let per_k = |ticks: u64| ticks as f64 * 10.0 / (rows.max(1) as f64 / 1000.0);
        let mut parts: Vec<_> = self.parts.iter().filter(|(_, t)| *t > 0).collect();
        parts.sort_by_key(|p| std::cmp::Reverse(p.1));
        let listed: Vec<String> = parts.iter().map(|(n, t)| format!("{n} {:.1}", per_k(*t))).collect();
        let accounted: u64 = parts.iter().map(|(_, t)| t).sum();
        format!(
            "ms per 1k rows: {}, other {:.1}; machine {:.0}% busy, {:.0}% stolen",
            listed.join(", "),
            per_k(self.busy.saturating_sub(accounted)),
            100.0 * self.busy as f64 / self.total.max(1) as f64,
            100.0 * self.steal as f64 / self.total.max(1) as f64
        )
    }
}

/// utime + stime of a process, in clock ticks.
fn proc_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields after it are space-separated (utime is the 14th field).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A scratch database `name`, dropped and created again (with its slots) and migrated: its DSN and a client.
async fn scratch_database(admin_dsn: &str, name: &str) -> Result<(String, tokio_postgres::Client)> {
    let admin = db::connect(admin_dsn).await?;
    let _ = admin
        .execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where database = $1", &[&name])
        .await;
    for sql in [format!("drop database if exists {name} with (force)"), format!("create database {name}")] {
        admin.batch_execute(&sql).await.map_err(|e| Error::db(format!("recreating {name}"), e))?;
    }
    let dsn = db::with_dbname(admin_dsn, name);
    let mut client = db::connect(&dsn).await?;
    db::migrate(&mut client).await?;
    Ok((dsn, client))
}

/// An `acraflow` child process pointed at `dsn` and the fixture web (its search and reader are ours: no
/// budgets), spacing `host_spacing`, its stdout dropped.
fn child_on_fixture_web(dsn: &str, web: &FixtureWeb, host_spacing: Duration) -> Result<tokio::process::Command> {
    let exe = std::env::current_exe().map_err(|e| Error::io("locating the acraflow binary", e))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.env("POSTGRES_DSN", dsn)
        .env("RUST_LOG", std::env::var("BENCH_CHILD_LOG").unwrap_or_else(|_| "warn".into()))
        .env("ENRICH_HTTP_PROXY", web.proxy_url())
        .env("ENRICH_SEARCH_URL", web.search_url())
        .env("ENRICH_SEARCH_RATE", "off")
        .env("ENRICH_READER_RATE", "off")
        .env("ENRICH_HOST_SPACING", format!("{}ms", host_spacing.as_millis()))
        .stdout(std::process::Stdio::null());
    Ok(cmd)
}

/// `total` seeded staging rows, each an eligible, distinct company named `{word} <id> TRADING PTE. LTD.`
/// with UEN `{letter}<id>`, and a healthy fixture site for each at `www.{host}<id>trading.com.sg`.
async fn companies_with_sites(
    client: &tokio_postgres::Client,
    total: u64,
    seed: u64,
    word: &str,
    latency: Duration,
    tweak: impl Fn(usize, &mut SiteSpec),
) -> Result<(FixtureWeb, usize)> {
    seed::seed(client, "staging_acra_companies", total, seed).await?;
    let letter = &word[..1];
    let host = word.to_lowercase();
    client
        .execute(
            "update staging_acra_companies set entity_status_description = 'Live Company', \
               registration_incorporation_date = '2012-01-01', uen = $1 || lpad(id::text, 9, '0'), \
               entity_name = $2 || ' ' || id || ' TRADING PTE. LTD.'",
            &[&letter, &word],
        )
        .await
        .map_err(|e| Error::db("preparing bench rows", e))?;
    let rows = client
        .query("select id, entity_name, uen from staging_acra_companies order by id", &[])
        .await
        .map_err(|e| Error::db("reading bench rows", e))?;
    let sites: Vec<SiteSpec> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut site =
                SiteSpec::new(&format!("www.{host}{}trading.com.sg", r.get::<_, i64>(0)), r.get(1), r.get(2));
            tweak(i, &mut site);
            site
        })
        .collect();
    let web = FixtureWeb::start(sites, latency).await.map_err(|e| Error::io("starting the fixture web", e))?;
    Ok((web, rows.len()))
}

/// Writes eligible staging rows `{prefix}…` at a steady `rate` rows/s for `seconds` (a statement every
/// 10 ms), then a sentinel row `SENTINEL_{sentinel}`, and waits for it in `companies`. Returns each row's
/// commit-to-visible latency in microseconds: `companies.created_at` (the upsert's transaction start) minus
/// the row's commit-time stamp.
async fn steady_latency(
    client: &tokio_postgres::Client,
    rate: u64,
    seconds: u64,
    prefix: &str,
    sentinel: i64,
) -> Result<hdrhistogram::Histogram<u64>> {
    let tick = Duration::from_millis(10);
    let per_tick = (rate as f64 * tick.as_secs_f64()).round().max(1.0) as i64;
    let ticks = seconds * 1000 / tick.as_millis() as u64;
    let mut interval = tokio::time::interval(tick);
    for i in 0..ticks as i64 {
        interval.tick().await;
        insert(client, prefix, i * per_tick, per_tick, false).await?;
    }
    insert(client, "SENTINEL_", sentinel, 1, false).await?;
    wait_for(client, &format!("select count(*) from companies where uen = 'SENTINEL_{sentinel:08}'"), 600).await?;
    let rows = client
        .query(
            "select (extract(epoch from c.created_at - s.ingested_at) * 1e6)::bigint \
             from staging_acra_companies s join companies c on c.uen = s.uen where s.uen like $1 || '%'",
            &[&prefix.replace('_', "\\_")],
        )
        .await
        .map_err(|e| Error::db("reading latencies", e))?;
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| Error::new(ErrorKind::Data, e.to_string()))?;
    for r in &rows {
        let _ = hist.record(r.get::<_, i64>(0).max(0) as u64);
    }
    Ok(hist)
}

/// Inserts `n` staging rows `{prefix}{from..}` in one statement (one transaction), stamped at commit time.
/// `mixed`: a third of them eligible, as in the registry (about 618k live of 1.8M); otherwise all eligible.
async fn insert(c: &tokio_postgres::Client, prefix: &str, from: i64, n: i64, mixed: bool) -> Result<()> {
    c.execute(
        "insert into staging_acra_companies (uen, entity_name, entity_status_description, \
           registration_incorporation_date, primary_ssic_code, primary_ssic_description, ingested_at) \
         select $1 || lpad(g::text, 8, '0'), 'BENCH CO ' || g || ' PTE. LTD.', \
           case when not $4 or g % 3 = 0 then 'Live Company' else 'Struck Off' end, '2016-05-17', '62011', 'na', \
           clock_timestamp() \
         from generate_series($2::bigint, $2 + $3 - 1) g",
        &[&prefix, &from, &n, &mixed],
    )
    .await
    .map_err(|e| Error::db("bench writer", e))?;
    Ok(())
}

async fn wait_for(c: &tokio_postgres::Client, count_sql: &str, seconds: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let n: i64 = c.query_one(count_sql, &[]).await.map_err(|e| Error::db("bench poll", e))?.get(0);
        if n > 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::new(ErrorKind::Io, format!("timed out after {seconds}s waiting for: {count_sql}")));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads slot `bench_raw`, decoding every message, until `expected` inserts were seen; returns (rows, seconds).
async fn raw_decode(dsn: &str, expected: u64) -> Result<(u64, f64)> {
    use pgwire_replication::{ReplicationClient, ReplicationEvent};
    let cfg = crate::source::replication::connection_config(
        dsn,
        "bench_raw",
        crate::config::DEFAULT_PUBLICATION,
        Duration::from_secs(1),
    )?;
    let t = Instant::now();
    let mut client = ReplicationClient::connect(cfg)
        .await
        .map_err(|e| Error::with_source(ErrorKind::Connect, "bench: reference replication client", e))?;
    let mut rows = 0u64;
    while rows < expected {
        let event = client.recv().await.map_err(|e| Error::with_source(ErrorKind::Connect, "bench: receiving", e))?;
        let Some(event) = event else { break };
        if let ReplicationEvent::XLogData { data, .. } = event {
            if let Ok(crate::source::pgoutput::Message::Insert { .. }) = crate::source::pgoutput::decode(&data) {
                rows += 1;
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let _ = client.shutdown().await;
    Ok((rows, secs))
}
