//! `acraflow import FILE...`: ACRA's published "Information on Corporate Entities" CSV files (data.gov.sg
//! publishes one per starting letter of the entity name) into `staging_acra_companies`.
//!
//! - Each file's header is checked before a row is loaded: every column must be one of the staging table's
//!   (the published names), and none may be missing; the error names the file and the columns.
//! - Rows go in by binary COPY, all files in one transaction, so a bad row (a wrong field count, bytes
//!   that are not UTF-8) loads nothing and its error names the file and line. Empty fields are NULL;
//!   `na` is kept as published (the registry rules read it as missing).
//! - `--replace` empties staging in the same transaction: readers see the old rows or all the new ones.
//! - Progress: a bar of bytes read on a terminal, else a line per file.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use crate::config::DEFAULT_TABLE;
use crate::error::{Error, ErrorKind, Result};
use crate::seed::STAGING_COLUMNS;

/// Rows and files loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    pub files: usize,
    pub rows: u64,
}

/// The header of `path`, checked against the staging columns: their indexes in [`STAGING_COLUMNS`], in file
/// order.
pub fn check_header(path: &Path, header: &csv::StringRecord) -> Result<Vec<usize>> {
    let mut seen = Vec::new();
    let mut unknown = Vec::new();
    for name in header.iter() {
        let name = name.trim_start_matches('\u{feff}').trim().to_ascii_lowercase();
        match STAGING_COLUMNS.iter().position(|c| *c == name) {
            Some(i) if seen.contains(&i) => {
                return Err(Error::new(ErrorKind::Data, format!("{}: column {name} appears twice", path.display())))
            }
            Some(i) => seen.push(i),
            None => unknown.push(name),
        }
    }
    let missing: Vec<&str> =
        STAGING_COLUMNS.iter().enumerate().filter(|(i, _)| !seen.contains(i)).map(|(_, c)| *c).collect();
    if !unknown.is_empty() || !missing.is_empty() {
        let mut problems = Vec::new();
        if !unknown.is_empty() {
            problems.push(format!("unknown column(s) {}", unknown.join(", ")));
        }
        if !missing.is_empty() {
            problems.push(format!("missing column(s) {}", missing.join(", ")));
        }
        return Err(Error::new(
            ErrorKind::Data,
            format!(
                "{}: not ACRA's published format ({}); the header must name the {} columns of {DEFAULT_TABLE}, \
                 e.g. uen, entity_name, entity_status_description, ...",
                path.display(),
                problems.join("; "),
                STAGING_COLUMNS.len()
            ),
        ));
    }
    Ok(seen)
}

pub async fn import(client: &mut tokio_postgres::Client, files: &[PathBuf], replace: bool) -> Result<Imported> {
    // Every header first: a wrong file is named before anything is loaded.
    let mut total_bytes = 0;
    for path in files {
        let mut reader = open(path)?;
        let header = reader.headers().map_err(|e| csv_error(path, &e))?.clone();
        check_header(path, &header)?;
        total_bytes += std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    }
    let bar = progress_bar(total_bytes);
    let tx = client.transaction().await.map_err(|e| Error::db("import: starting the transaction", e))?;
    if replace {
        tx.batch_execute(&format!("truncate {DEFAULT_TABLE}"))
            .await
            .map_err(|e| Error::db(format!("import --replace: emptying {DEFAULT_TABLE}"), e))?;
    }
    let mut done = Imported { files: 0, rows: 0 };
    let mut bytes_before = 0;
    for path in files {
        let mut reader = open(path)?;
        let header = reader.headers().map_err(|e| csv_error(path, &e))?.clone();
        let order = check_header(path, &header)?;
        let cols: Vec<&str> = order.iter().map(|&i| STAGING_COLUMNS[i]).collect();
        let sink = tx
            .copy_in(&format!("copy {DEFAULT_TABLE} ({}) from stdin (format binary)", cols.join(", ")))
            .await
            .map_err(|e| Error::db(format!("import: starting COPY of {}", path.display()), e))?;
        let types = vec![Type::TEXT; cols.len()];
        let writer = BinaryCopyInWriter::new(sink, &types);
        pin_mut!(writer);
        let mut record = csv::ByteRecord::new();
        let mut rows = 0u64;
        loop {
            match reader.read_byte_record(&mut record) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => return Err(csv_error(path, &e)),
            }
            let line = record.position().map_or(0, |p| p.line());
            let mut values: Vec<Option<&str>> = Vec::with_capacity(cols.len());
            for (field, name) in record.iter().zip(&cols) {
                let text = std::str::from_utf8(field).map_err(|_| {
                    Error::new(
                        ErrorKind::Data,
                        format!("{} line {line}: column {name} is not UTF-8 text", path.display()),
                    )
                })?;
                values.push((!text.is_empty()).then_some(text));
            }
            let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            writer
                .as_mut()
                .write(&refs)
                .await
                .map_err(|e| Error::db(format!("import: {} line {line}", path.display()), e))?;
            rows += 1;
            if rows.is_multiple_of(10_000) {
                bar.set_position(bytes_before + record.position().map_or(0, |p| p.byte()));
            }
        }
        writer.finish().await.map_err(|e| Error::db(format!("import: finishing {}", path.display()), e))?;
        bytes_before += std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        bar.set_position(bytes_before);
        bar.println(format!("{}: {rows} rows", path.display()));
        done.files += 1;
        done.rows += rows;
    }
    tx.commit().await.map_err(|e| Error::db("import: committing", e))?;
    bar.finish_and_clear();
    Ok(done)
}

fn open(path: &Path) -> Result<csv::Reader<std::fs::File>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    Ok(csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(file))
}

fn csv_error(path: &Path, e: &csv::Error) -> Error {
    let at = e.position().map(|p| format!(" line {}", p.line())).unwrap_or_default();
    let what = match e.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("{len} fields where the header has {expected_len}")
        }
        csv::ErrorKind::Utf8 { .. } => "the header is not UTF-8 text".to_owned(),
        _ => e.to_string(),
    };
    Error::new(ErrorKind::Data, format!("{}{at}: {what}", path.display()))
}

/// Bytes read of all files, on a terminal; hidden otherwise (each file's line still prints).
fn progress_bar(total: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::hidden();
        bar.set_length(total);
        return bar;
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("importing [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_must_name_every_staging_column_and_no_other() {
        let path = Path::new("A.csv");
        let good = csv::StringRecord::from(STAGING_COLUMNS.to_vec());
        assert_eq!(check_header(path, &good).unwrap().len(), 53);
        let mut renamed = STAGING_COLUMNS.to_vec();
        renamed[2] = "company_name";
        let err = check_header(path, &csv::StringRecord::from(renamed)).unwrap_err().to_string();
        assert!(err.contains("A.csv") && err.contains("unknown column(s) company_name"), "{err}");
        assert!(err.contains("missing column(s) entity_name"), "{err}");
        // The published files' BOM and capitals are accepted.
        let mut shouting: Vec<String> = STAGING_COLUMNS.iter().map(|c| c.to_uppercase()).collect();
        shouting[0] = format!("\u{feff}{}", shouting[0]);
        assert!(check_header(path, &csv::StringRecord::from(shouting)).is_ok());
    }
}
