//! Sample data: ACRA-shaped rows for `staging_acra_companies`, for the demo, tests and benchmarks.
//!
//! Real parts: UENs, registration years, SSIC divisions and postal codes come from the shipped ACRA extract
//! (`data/acra_sg_corp_info_2017_2019.csv`, 149,070 rows); 5-digit SSIC codes are real SSIC 2020 sub-classes
//! of the row's division. Synthetic parts: names, dates within the year, and the status, drawn with the
//! registry's real frequencies for the five largest statuses (the tail is approximate). Beyond 149,070 rows
//! the UENs are synthetic: ROC format (`YYYYNNNNNC`) with a valid check letter, years 1975–2025, never equal
//! to a real one. Every other column holds ACRA's `na`. The same `--seed` gives the same rows.

use std::collections::{HashMap, HashSet};

use futures::pin_mut;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use crate::error::{Error, ErrorKind, Result};

const CORP_CSV: &str = include_str!("../data/acra_sg_corp_info_2017_2019.csv");
const SSIC_CSV: &str = include_str!("../data/ssic2020_classification_structure.csv");
pub const MAX_ROWS: u64 = 5_000_000;

/// The 53 text columns of ACRA's "Information on Corporate Entities", in the dataset's order.
pub const STAGING_COLUMNS: [&str; 53] = [
    "uen",
    "issuance_agency_id",
    "entity_name",
    "entity_type_description",
    "business_constitution_description",
    "company_type_description",
    "paf_constitution_description",
    "entity_status_description",
    "registration_incorporation_date",
    "uen_issue_date",
    "address_type",
    "block",
    "street_name",
    "level_no",
    "unit_no",
    "building_name",
    "postal_code",
    "other_address_line1",
    "other_address_line2",
    "account_due_date",
    "annual_return_date",
    "primary_ssic_code",
    "primary_ssic_description",
    "primary_user_described_activity",
    "secondary_ssic_code",
    "secondary_ssic_description",
    "secondary_user_described_activity",
    "no_of_officers",
    "former_entity_name1",
    "former_entity_name2",
    "former_entity_name3",
    "former_entity_name4",
    "former_entity_name5",
    "former_entity_name6",
    "former_entity_name7",
    "former_entity_name8",
    "former_entity_name9",
    "former_entity_name10",
    "former_entity_name11",
    "former_entity_name12",
    "former_entity_name13",
    "former_entity_name14",
    "former_entity_name15",
    "uen_of_audit_firm1",
    "uen_of_audit_firm2",
    "uen_of_audit_firm3",
    "uen_of_audit_firm4",
    "uen_of_audit_firm5",
    "name_of_audit_firm1",
    "name_of_audit_firm2",
    "name_of_audit_firm3",
    "name_of_audit_firm4",
    "name_of_audit_firm5",
];

/// Statuses and their weights in thousands of entities. The first five are the registry's real counts.
const STATUSES: &[(&str, u32)] = &[
    ("Struck Off", 517),
    ("Live Company", 463),
    ("Terminated", 355),
    ("Cancelled", 303),
    ("Live", 155),
    ("Dissolved - Members' Voluntary Winding Up", 45),
    ("Dissolved - Compulsory Winding Up", 30),
    ("Gazetted to be Struck Off", 12),
    ("In Liquidation - Members' Voluntary Winding Up", 6),
    ("In Liquidation - Compulsory Winding Up", 4),
    ("Amalgamated", 5),
    ("Converted to LLP", 2),
    ("Cancellation in progress", 1),
];

const WORDS_A: &[&str] = &[
    "ORCHID",
    "MERLION",
    "HARBOUR",
    "STRAITS",
    "JADE",
    "LION",
    "PACIFIC",
    "EVERGREEN",
    "GOLDEN",
    "SUMMIT",
    "RAFFLES",
    "MARINA",
    "KAMPONG",
    "BLUE OCEAN",
    "RED DOT",
    "SILVER",
    "PRIME",
    "UNITY",
    "NOVA",
    "ZENITH",
    "LOTUS",
    "BAMBOO",
    "TEMASEK",
    "CRESCENT",
    "HORIZON",
    "KEPPEL",
    "SENTOSA",
    "BUKIT",
    "CEDAR",
    "ASIA LINK",
];
const WORDS_B: &[&str] = &[
    "TRADING",
    "ENGINEERING",
    "LOGISTICS",
    "TECHNOLOGIES",
    "CONSULTING",
    "HOLDINGS",
    "FOODS",
    "CONSTRUCTION",
    "CAPITAL",
    "MARINE",
    "SOLUTIONS",
    "DESIGN",
    "VENTURES",
    "SERVICES",
    "RESOURCES",
    "INTERNATIONAL",
    "MEDICAL",
    "ELECTRICAL",
    "PROPERTIES",
    "EDUCATION",
];
const STREETS: &[&str] = &[
    "ANG MO KIO AVENUE 3",
    "BEDOK NORTH ROAD",
    "JURONG WEST STREET 41",
    "ORCHARD ROAD",
    "TAMPINES STREET 92",
    "UBI AVENUE 1",
    "WOODLANDS DRIVE 14",
    "CECIL STREET",
    "SHENTON WAY",
    "KALLANG BAHRU",
    "TOA PAYOH LORONG 6",
];

struct CorpRow {
    uen: String,
    year: i32,
    division: String,
    postal: String,
}

/// Inserts `rows` sample rows into `table` (quoted) with one binary COPY; returns the number written.
pub async fn seed(client: &Client, table: &str, rows: u64, seed: u64) -> Result<u64> {
    let mut rows_of = Generator::new(rows, seed)?;
    let cols = STAGING_COLUMNS.join(", ");
    let sink = client
        .copy_in(&format!("copy {table} ({cols}) from stdin (format binary)"))
        .await
        .map_err(|e| Error::db(format!("seed: starting COPY into {table}"), e))?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::TEXT; 53]);
    pin_mut!(writer);
    while let Some(values) = rows_of.next_row() {
        let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        writer.as_mut().write(&refs).await.map_err(|e| Error::db("seed: writing a row", e))?;
    }
    let n = writer.finish().await.map_err(|e| Error::db("seed: finishing COPY", e))?;
    Ok(n)
}

/// Writes `rows` sample rows to `path` as a CSV file in ACRA's published format (data.gov.sg's
/// "Information on Corporate Entities": a header of the staging columns, `na` for a missing value), the
/// input `acraflow import` reads. Returns the number written.
pub fn seed_csv(path: &std::path::Path, rows: u64, seed: u64) -> Result<u64> {
    let mut rows_of = Generator::new(rows, seed)?;
    let file = std::fs::File::create(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let mut out = csv::Writer::from_writer(std::io::BufWriter::new(file));
    let failed = |e: csv::Error| Error::new(crate::ErrorKind::Io, format!("writing {}: {e}", path.display()));
    out.write_record(STAGING_COLUMNS).map_err(failed)?;
    let mut n = 0;
    while let Some(values) = rows_of.next_row() {
        out.write_record(&values).map_err(failed)?;
        n += 1;
    }
    out.flush().map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(n)
}

/// ACRA-shaped sample rows: real UENs (then synthetic ones with valid check letters), years, SSIC codes and
/// postal codes, in a deterministic order for a seed.
struct Generator {
    corp: Vec<CorpRow>,
    subclasses: HashMap<String, Vec<(String, String)>>,
    real: HashSet<String>,
    rng: SmallRng,
    order: Vec<usize>,
    status_total: u32,
    synthetic: u64,
    next: u64,
    rows: u64,
}

impl Generator {
    fn new(rows: u64, seed: u64) -> Result<Generator> {
        if rows > MAX_ROWS {
            return Err(Error::config(format!(
                "--rows {rows} is more than the {MAX_ROWS} the sample generator can make"
            )));
        }
        let corp = load_corp()?;
        let subclasses = load_subclasses()?;
        let real = corp.iter().map(|c| c.uen.clone()).collect();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..corp.len()).collect();
        order.shuffle(&mut rng);
        let status_total: u32 = STATUSES.iter().map(|s| s.1).sum();
        Ok(Generator { corp, subclasses, real, rng, order, status_total, synthetic: 0, next: 0, rows })
    }

    /// The next row's 53 values, in [`STAGING_COLUMNS`] order.
    fn next_row(&mut self) -> Option<[String; 53]> {
        if self.next >= self.rows {
            return None;
        }
        let i = self.next;
        self.next += 1;
        let rng = &mut self.rng;
        let corp = &self.corp;
        let (uen, year, base) = if (i as usize) < corp.len() {
            let c = &corp[self.order[i as usize]];
            (c.uen.clone(), c.year, c)
        } else {
            let base = &corp[rng.gen_range(0..corp.len())];
            let uen = loop {
                let year = 1975 + (self.synthetic % 51) as i32;
                let serial = self.synthetic / 51;
                self.synthetic += 1;
                let u = roc_uen(year, serial as u32);
                if !self.real.contains(u.as_str()) {
                    break (u, year);
                }
            };
            (uen.0, uen.1, base)
        };
        let kind = uen_kind(&uen);
        let (entity_type, company_type, suffix) = match kind {
            UenKind::Roc => ("Local Company", "Exempt Private Company Limited by Shares", " PTE. LTD."),
            UenKind::Business => ("Sole Proprietorship/ Partnership", "na", ""),
            UenKind::Other => ("Limited Liability Partnership", "na", " LLP"),
        };
        let name = format!(
            "{} {}{}",
            WORDS_A[rng.gen_range(0..WORDS_A.len())],
            WORDS_B[rng.gen_range(0..WORDS_B.len())],
            suffix
        );
        let mut pick = rng.gen_range(0..self.status_total);
        let status = STATUSES
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map_or("Live", |s| s.0);
        let date = format!("{year:04}-{:02}-{:02}", rng.gen_range(1..=12), rng.gen_range(1..=28));
        let (code, title) = self
            .subclasses
            .get(base.division.as_str())
            .and_then(|v| v.get(rng.gen_range(0..v.len())).cloned())
            .unwrap_or_else(|| (base.division.clone(), "na".into()));
        let block = rng.gen_range(1..=999).to_string();
        let officers = rng.gen_range(1..=6).to_string();
        let street = STREETS[rng.gen_range(0..STREETS.len())];
        let mut values: [String; 53] = std::array::from_fn(|_| "na".to_owned());
        values[0] = uen;
        values[1] = "ACRA".into();
        values[2] = name;
        values[3] = entity_type.into();
        values[5] = company_type.into();
        values[7] = status.into();
        values[8].clone_from(&date);
        values[9] = date;
        values[10] = "LOCAL".into();
        values[11] = block;
        values[12] = street.into();
        values[16].clone_from(&base.postal);
        values[21] = code;
        values[22] = title;
        values[27] = officers;
        Some(values)
    }
}

fn load_corp() -> Result<Vec<CorpRow>> {
    let mut out = Vec::with_capacity(150_000);
    for (i, rec) in csv::Reader::from_reader(CORP_CSV.as_bytes()).records().enumerate() {
        let rec =
            rec.map_err(|e| Error::with_source(ErrorKind::Data, format!("acra_sg_corp_info record {}", i + 1), e))?;
        out.push(CorpRow {
            uen: rec[0].to_owned(),
            year: rec[1].parse().unwrap_or(2019),
            division: rec[2].to_owned(),
            postal: rec[3].to_owned(),
        });
    }
    Ok(out)
}

/// 5-digit SSIC 2020 sub-classes by their 2-digit division.
fn load_subclasses() -> Result<HashMap<String, Vec<(String, String)>>> {
    let mut out: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for (i, rec) in csv::Reader::from_reader(SSIC_CSV.as_bytes()).records().enumerate() {
        let rec = rec.map_err(|e| Error::with_source(ErrorKind::Data, format!("ssic2020 record {}", i + 1), e))?;
        if &rec[2] == "subclass" && rec[0].len() == 5 {
            out.entry(rec[0][..2].to_owned()).or_default().push((rec[0].to_owned(), rec[1].to_owned()));
        }
    }
    Ok(out)
}

#[derive(Debug, PartialEq, Eq)]
enum UenKind {
    Roc,
    Business,
    Other,
}

fn uen_kind(uen: &str) -> UenKind {
    let digits = uen.bytes().take_while(u8::is_ascii_digit).count();
    match (uen.len(), digits) {
        (10, 9) => UenKind::Roc,
        (9, 8) => UenKind::Business,
        _ => UenKind::Other,
    }
}

/// A ROC-format UEN (`YYYY` + 5-digit serial + check letter), per ACRA's check-letter rule.
pub fn roc_uen(year: i32, serial: u32) -> String {
    let body = format!("{year:04}{serial:05}");
    let sum: u32 = body.bytes().zip([10, 8, 6, 4, 9, 7, 5, 3, 1]).map(|(d, w)| u32::from(d - b'0') * w).sum();
    let check = b"ZKCMDNERGWH"[(sum % 11) as usize] as char;
    format!("{body}{check}")
}

/// True when a 10-character ROC-format UEN carries the right check letter.
pub fn roc_check_ok(uen: &str) -> bool {
    uen.len() == 10
        && uen[..9].bytes().all(|b| b.is_ascii_digit())
        && roc_uen(uen[..4].parse().unwrap_or(0), uen[4..9].parse().unwrap_or(0)) == uen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_letter_rule_agrees_with_every_real_roc_uen() {
        let corp = load_corp().unwrap();
        let roc: Vec<&CorpRow> = corp.iter().filter(|c| uen_kind(&c.uen) == UenKind::Roc).collect();
        assert!(roc.len() > 100_000);
        assert!(roc.iter().all(|c| roc_check_ok(&c.uen)), "a real UEN failed the check-letter rule");
        assert!(!roc_check_ok("201908808A"));
    }

    #[test]
    fn subclasses_cover_the_extract_divisions() {
        let subs = load_subclasses().unwrap();
        assert_eq!(subs.values().map(Vec::len).sum::<usize>(), 1023);
        let corp = load_corp().unwrap();
        let missing = corp.iter().filter(|c| !subs.contains_key(&c.division)).count();
        assert_eq!(missing, 0);
    }
}
