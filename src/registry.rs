//! The registry rules of PRD 20: how one ACRA staging row maps to a `companies` record.
//!
//! Pure and synchronous, so every rule is unit-tested without a database. The filter, dedupe and upsert
//! operators all read the [`CompanyRecord`] this produces; none of them re-parses the staging row.
//!
//! ACRA publishes every field as text and writes a missing value as the literal `na`; [`clean`] turns
//! `na` and blank into `None` for every field.

use chrono::{Datelike, NaiveDate};

use crate::change::StagingRow;

/// Names longer than this are not real ACRA names (the registry caps them far lower); such a row is
/// dead-lettered rather than written into `companies`, where it would also be useless to a sales team.
pub const MAX_NAME_CHARS: usize = 500;

/// The identity of a company: its UEN, or `(lower(name), incorporation_year)` when the UEN is missing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CompanyKey {
    Uen(String),
    NameYear { lower_name: String, year: Option<i32> },
}

/// The registry fields of one staging row, normalized by the PRD's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompanyRecord {
    pub key: CompanyKey,
    /// `upper(trim(uen))`; `None` when `na` or empty.
    pub uen: Option<String>,
    /// `trim(entity_name)`; `None` when `na` or empty (then the row can only refresh an existing company).
    pub name: Option<String>,
    /// Digits of `primary_ssic_code`, zero-padded to 5 when 1–4 digits; `None` for no digits or more than 5.
    pub industry_code: Option<String>,
    /// `trim(primary_ssic_description)`, the fallback for `industry_norm` when the code is not in `ssic_ref`.
    pub ssic_description: Option<String>,
    pub incorporation_date: Option<NaiveDate>,
    /// Year of a valid `YYYY-MM-DD` incorporation date between 1800 and the current year.
    pub incorporation_year: Option<i32>,
    /// `trim(entity_status_description)`.
    pub status: Option<String>,
}

/// Why a row cannot become a company record; the reason names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub field: &'static str,
    pub reason: String,
}

/// Trims ASCII white space and maps ACRA's `na` (any case) and blank to `None`.
pub fn clean(value: Option<&str>) -> Option<&str> {
    let v = value?.trim_matches(|c: char| c.is_ascii_whitespace());
    (!v.is_empty() && !v.eq_ignore_ascii_case("na")).then_some(v)
}

/// Maps a staging row to its company record; `current_year` bounds valid incorporation years.
pub fn map(row: &StagingRow, current_year: i32) -> Result<CompanyRecord, Rejection> {
    let uen = clean(row.uen.as_deref()).map(str::to_uppercase);
    let name = clean(row.entity_name.as_deref()).map(str::to_owned);
    if let Some(n) = &name {
        let chars = n.chars().count();
        if chars > MAX_NAME_CHARS {
            return Err(Rejection {
                field: "entity_name",
                reason: format!(
                    "entity_name is {chars} characters long; names over {MAX_NAME_CHARS} are not ACRA names \
                     (fix the row in staging_acra_companies and replay it)"
                ),
            });
        }
    }
    let incorporation_date = parse_date(row.registration_incorporation_date.as_deref());
    let incorporation_year = incorporation_date.map(|d| d.year()).filter(|y| (1800..=current_year).contains(y));
    let key = match (&uen, &name) {
        (Some(u), _) => CompanyKey::Uen(u.clone()),
        (None, Some(n)) => CompanyKey::NameYear { lower_name: n.to_lowercase(), year: incorporation_year },
        (None, None) => {
            return Err(Rejection {
                field: "uen",
                reason: "neither uen nor entity_name is present (both are 'na' or empty), \
                         so the row cannot be matched to a company"
                    .into(),
            })
        }
    };
    Ok(CompanyRecord {
        key,
        uen,
        name,
        industry_code: industry_code(row.primary_ssic_code.as_deref()),
        ssic_description: clean(row.primary_ssic_description.as_deref()).map(str::to_owned),
        incorporation_date,
        incorporation_year,
        status: clean(row.entity_status_description.as_deref()).map(str::to_owned),
    })
}

/// The digits of an SSIC code, left-padded to 5 when there are 1–4 of them; otherwise `None`.
pub fn industry_code(raw: Option<&str>) -> Option<String> {
    let digits: String = raw?.chars().filter(char::is_ascii_digit).collect();
    match digits.len() {
        1..=4 => Some(format!("{digits:0>5}")),
        5 => Some(digits),
        _ => None,
    }
}

/// A date in exactly `YYYY-MM-DD` form that exists in the calendar.
pub fn parse_date(raw: Option<&str>) -> Option<NaiveDate> {
    let s = clean(raw)?.as_bytes();
    let digits_at = |r: std::ops::Range<usize>| s[r].iter().all(u8::is_ascii_digit);
    if s.len() != 10 || s[4] != b'-' || s[7] != b'-' || !digits_at(0..4) || !digits_at(5..7) || !digits_at(8..10) {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s[r].iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    NaiveDate::from_ymd_opt(num(0..4) as i32, num(5..7), num(8..10))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(uen: &str, name: &str) -> StagingRow {
        StagingRow {
            id: 1,
            uen: Some(uen.into()),
            entity_name: Some(name.into()),
            entity_status_description: Some(" Live Company ".into()),
            registration_incorporation_date: Some("2019-03-14".into()),
            primary_ssic_code: Some("62011".into()),
            primary_ssic_description: Some("DEVELOPMENT OF SOFTWARE".into()),
        }
    }

    #[test]
    fn normalizes_uen_name_and_status() {
        let r = map(&row(" 201908808k ", "  Acme Pte. Ltd.\t"), 2026).unwrap();
        assert_eq!(r.uen.as_deref(), Some("201908808K"));
        assert_eq!(r.key, CompanyKey::Uen("201908808K".into()));
        assert_eq!(r.name.as_deref(), Some("Acme Pte. Ltd."));
        assert_eq!(r.status.as_deref(), Some("Live Company"));
        assert_eq!(r.incorporation_year, Some(2019));
    }

    #[test]
    fn missing_uen_falls_back_to_name_and_year() {
        let r = map(&row("na", "Acme Pte. Ltd."), 2026).unwrap();
        assert_eq!(r.uen, None);
        assert_eq!(r.key, CompanyKey::NameYear { lower_name: "acme pte. ltd.".into(), year: Some(2019) });
        let r = map(&row("  ", "ÄÖÜ Trading 株式会社"), 2026).unwrap();
        assert_eq!(r.key, CompanyKey::NameYear { lower_name: "äöü trading 株式会社".into(), year: Some(2019) });
    }

    #[test]
    fn neither_uen_nor_name_is_rejected_naming_the_field() {
        let err = map(&row("NA", "na"), 2026).unwrap_err();
        assert_eq!(err.field, "uen");
        assert!(err.reason.contains("neither uen nor entity_name"), "{}", err.reason);
    }

    #[test]
    fn overlong_names_are_rejected() {
        let err = map(&row("201908808K", &"X".repeat(10_000)), 2026).unwrap_err();
        assert_eq!(err.field, "entity_name");
        assert!(err.reason.contains("10000 characters"), "{}", err.reason);
        // Length is counted in characters, not bytes.
        assert!(map(&row("201908808K", &"株".repeat(MAX_NAME_CHARS)), 2026).is_ok());
    }

    #[test]
    fn industry_code_rules() {
        assert_eq!(industry_code(Some("62011")).as_deref(), Some("62011"));
        assert_eq!(industry_code(Some(" 62.011 ")).as_deref(), Some("62011"));
        assert_eq!(industry_code(Some("4711")).as_deref(), Some("04711"));
        assert_eq!(industry_code(Some("1")).as_deref(), Some("00001"));
        assert_eq!(industry_code(Some("9999999")), None);
        assert_eq!(industry_code(Some("na")), None);
        assert_eq!(industry_code(Some("")), None);
        assert_eq!(industry_code(None), None);
    }

    #[test]
    fn dates_must_be_iso_and_real() {
        assert_eq!(parse_date(Some("2019-12-31")), NaiveDate::from_ymd_opt(2019, 12, 31));
        assert_eq!(parse_date(Some(" 2019-12-31 ")), NaiveDate::from_ymd_opt(2019, 12, 31));
        assert_eq!(parse_date(Some("31/12/2019")), None);
        assert_eq!(parse_date(Some("2019-13-45")), None);
        assert_eq!(parse_date(Some("2019-02-29")), None);
        assert_eq!(parse_date(Some("2019-1-5")), None);
        assert_eq!(parse_date(Some("２０１９-01-05")), None);
        assert_eq!(parse_date(Some("na")), None);
    }

    #[test]
    fn years_outside_1800_to_now_are_dropped() {
        let mut r = row("201908808K", "Acme");
        r.registration_incorporation_date = Some("1799-12-31".into());
        assert_eq!(map(&r, 2026).unwrap().incorporation_year, None);
        r.registration_incorporation_date = Some("2027-01-01".into());
        assert_eq!(map(&r, 2026).unwrap().incorporation_year, None);
        r.registration_incorporation_date = Some("1800-01-01".into());
        assert_eq!(map(&r, 2026).unwrap().incorporation_year, Some(1800));
    }

    #[test]
    fn na_anywhere_is_missing() {
        let r = StagingRow {
            id: 7,
            uen: Some("201908808K".into()),
            entity_name: Some("Acme".into()),
            entity_status_description: Some("na".into()),
            registration_incorporation_date: Some("NA".into()),
            primary_ssic_code: Some("na".into()),
            primary_ssic_description: Some(" na ".into()),
        };
        let m = map(&r, 2026).unwrap();
        assert_eq!((m.status, m.industry_code, m.ssic_description, m.incorporation_year), (None, None, None, None));
    }
}
