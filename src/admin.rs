//! `acraflow slots` and `acraflow checkpoints`: list what piles up over time (replication slots, which pin
//! WAL on the server; checkpoints of old runs) and drop or reset them, after a confirmation.

use std::io::{BufRead, IsTerminal, Write};

use crate::cli::{CheckpointsCommand, SlotsCommand};
use crate::db;
use crate::error::{Error, ErrorKind, Result};

/// Asks `question` on the terminal unless `yes`; without a terminal, refuses and says to pass `--yes`.
fn confirm(question: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Error::config(format!("{question}: not confirmed (no terminal to ask); pass --yes")));
    }
    print!("{question} [y/N] ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(Error::new(ErrorKind::Config, "not confirmed; nothing changed"))
    }
}

pub fn human_bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    match n {
        n if n >= 1e9 => format!("{:.1} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.1} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.0} kB", n / 1e3),
        n => format!("{n:.0} B"),
    }
}

pub async fn slots(dsn: &str, cmd: &SlotsCommand) -> Result<()> {
    let client = db::connect(dsn).await?;
    let q = |e| Error::db("reading the replication slots", e);
    match cmd {
        SlotsCommand::List => {
            let rows = client
                .query(
                    "select slot_name::text, plugin::text, active, \
                       coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8, \
                       coalesce(wal_status, ''), database::text = current_database() \
                     from pg_replication_slots where slot_type = 'logical' order by slot_name",
                    &[],
                )
                .await
                .map_err(q)?;
            if rows.is_empty() {
                println!("no logical replication slots on this server");
            }
            println!("{:<24} {:<8} {:>10}  {:<10} database", "slot", "state", "WAL held", "wal_status");
            for r in &rows {
                println!(
                    "{:<24} {:<8} {:>10}  {:<10} {}",
                    r.get::<_, String>(0),
                    if r.get::<_, bool>(2) { "active" } else { "idle" },
                    human_bytes(r.get(3)),
                    r.get::<_, String>(4),
                    if r.get::<_, bool>(5) { "this one" } else { "another" }
                );
            }
            println!("\nan idle slot keeps WAL on the server until it is read or dropped: `acraflow slots drop NAME`");
        }
        SlotsCommand::Drop { name, yes } => {
            let row = client
                .query_opt(
                    "select active, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8 \
                     from pg_replication_slots where slot_name = $1 and database = current_database()",
                    &[name],
                )
                .await
                .map_err(q)?
                .ok_or_else(|| {
                    Error::config(format!("no replication slot {name} in this database (`acraflow slots`)"))
                })?;
            if row.get::<_, bool>(0) {
                return Err(Error::config(format!(
                    "slot {name} is in use by a running process: stop that `acraflow run` first"
                )));
            }
            confirm(
                &format!(
                    "drop slot {name} (holding {})? The next `acraflow run` on it backfills staging again",
                    human_bytes(row.get(1))
                ),
                *yes,
            )?;
            client
                .execute("select pg_drop_replication_slot($1)", &[name])
                .await
                .map_err(|e| Error::db(format!("dropping slot {name}"), e))?;
            println!("dropped slot {name}");
        }
    }
    Ok(())
}

pub async fn checkpoints(dsn: &str, cmd: &CheckpointsCommand) -> Result<()> {
    let client = db::connect(dsn).await?;
    db::schema_facts(&client).await?;
    match cmd {
        CheckpointsCommand::List => {
            let rows = client
                .query(
                    "select key, coalesce(cursor, 'id'), coalesce(last_id::text, ''), coalesce(last_uen, ''), \
                       coalesce(last_lsn::text, ''), updated_at::text, \
                       extract(epoch from now() - updated_at)::int8 \
                     from service_progress order by updated_at desc",
                    &[],
                )
                .await
                .map_err(|e| Error::db("reading the checkpoints", e))?;
            if rows.is_empty() {
                println!("no checkpoints (the first `acraflow backfill` or `acraflow run` writes one)");
                return Ok(());
            }
            println!("{:<20} {:<6} {:<34} updated", "key", "cursor", "position");
            for r in &rows {
                let cursor: String = r.get(1);
                let at = match cursor.as_str() {
                    "lsn" => r.get::<_, String>(4),
                    "uen" => format!("uen {} (id {})", r.get::<_, String>(3), r.get::<_, String>(2)),
                    _ => format!("id {}", r.get::<_, String>(2)),
                };
                let days = r.get::<_, i64>(6) / 86_400;
                println!(
                    "{:<20} {:<6} {:<34} {}{}",
                    r.get::<_, String>(0),
                    cursor,
                    at,
                    r.get::<_, String>(5),
                    if days >= 7 { format!("  ({days} days ago)") } else { String::new() }
                );
            }
        }
        CheckpointsCommand::Reset { key, yes } => {
            let exists = client
                .query_opt("select 1 from service_progress where key = $1", &[key])
                .await
                .map_err(|e| Error::db("reading the checkpoints", e))?
                .is_some();
            if !exists {
                return Err(Error::config(format!("no checkpoint {key} (`acraflow checkpoints`)")));
            }
            confirm(
                &format!(
                    "reset checkpoint {key}? The next run with ACRA_DIRECT_CHECKPOINT_KEY={key} replays staging from \
                     the start (dedupe skips companies already up to date)"
                ),
                *yes,
            )?;
            client
                .execute("delete from service_progress where key = $1", &[key])
                .await
                .map_err(|e| Error::db(format!("resetting checkpoint {key}"), e))?;
            println!("reset checkpoint {key}");
        }
    }
    Ok(())
}
