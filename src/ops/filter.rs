//! Filter: maps each staging row to its registry record and excludes dissolved and too-young entities.
//!
//! An excluded row is not dropped here: it still refreshes an existing company's registry fields (a company
//! the registry struck off must not keep showing "Live Company"), so it travels on as
//! [`Fate::Filtered`] and upsert updates, never inserts, its company. It is never enriched.

use chrono::{Datelike, NaiveDate};
use futures::TryStreamExt;

use crate::change::{Batch, Fate, Op};
use crate::ops::{BatchStream, Operator};
use crate::registry::{self, CompanyRecord};

/// Statuses excluded when `ACRA_DIRECT_EXCLUDE_STATUS` is not set (matched as case-insensitive prefixes
/// of the trimmed status).
pub const DEFAULT_EXCLUDED_STATUSES: &[&str] = &[
    "dissolved",
    "struck off",
    "cancelled",
    "terminated",
    "ceased registration",
    "amalgamated",
    "converted to llp",
    "removed",
    "revoked",
    "registration expired",
    "in liquidation",
    "gazetted to be struck off",
    "cancellation in progress",
    "to be ceased",
];

#[derive(Debug, Clone)]
pub struct Filter {
    excluded: Vec<String>,
    min_age_days: u32,
    today: NaiveDate,
}

impl Filter {
    /// `excluded`: status prefixes (any case); `min_age_days`: 0 disables the age rule.
    pub fn new(excluded: &[String], min_age_days: u32, today: NaiveDate) -> Self {
        Filter {
            excluded: excluded.iter().map(|s| s.trim().to_lowercase()).filter(|s| !s.is_empty()).collect(),
            min_age_days,
            today,
        }
    }

    /// Why `record` is excluded, or `None` when it is eligible.
    pub fn exclusion(&self, record: &CompanyRecord) -> Option<String> {
        if let Some(status) = &record.status {
            let lower = status.to_lowercase();
            if let Some(p) = self.excluded.iter().find(|p| lower.starts_with(p.as_str())) {
                return Some(format!("status '{status}' matches excluded '{p}'"));
            }
        }
        if self.min_age_days > 0 {
            // An unknown incorporation date cannot prove the entity young, so it does not exclude.
            if let Some(date) = record.incorporation_date {
                let age = (self.today - date).num_days();
                if age < i64::from(self.min_age_days) {
                    return Some(format!("incorporated {date}, {age} days ago (minimum {} days)", self.min_age_days));
                }
            }
        }
        None
    }

    /// Maps and judges every event of the batch in place.
    pub fn apply(&self, batch: &mut Batch) {
        for event in &mut batch.events {
            if matches!(event.change.op, Op::Delete | Op::Truncate) {
                event.fate = Fate::Ignored;
                continue;
            }
            match registry::map(&event.change.row, self.today.year()) {
                Err(rejection) => {
                    event.dead_letter("filter", format!("{}: {}", rejection.field, rejection.reason));
                }
                Ok(record) => {
                    if let Some(reason) = self.exclusion(&record) {
                        event.fate = Fate::Filtered { reason };
                    }
                    event.record = Some(record);
                }
            }
        }
    }
}

impl Operator for Filter {
    fn apply(self: Box<Self>, input: BatchStream) -> BatchStream {
        Box::pin(input.map_ok(move |mut batch| {
            Filter::apply(&self, &mut batch);
            batch
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::StagingRow;

    fn record(status: &str, date: &str) -> CompanyRecord {
        let row = StagingRow {
            id: 1,
            uen: Some("201908808K".into()),
            entity_name: Some("Acme".into()),
            entity_status_description: Some(status.into()),
            registration_incorporation_date: Some(date.into()),
            ..Default::default()
        };
        registry::map(&row, 2026).unwrap()
    }

    fn default_filter(min_age: u32) -> Filter {
        let list: Vec<String> = DEFAULT_EXCLUDED_STATUSES.iter().map(|s| s.to_string()).collect();
        Filter::new(&list, min_age, NaiveDate::from_ymd_opt(2026, 11, 22).unwrap())
    }

    #[test]
    fn excludes_by_case_insensitive_status_prefix() {
        let f = default_filter(0);
        for s in [
            "Struck Off",
            "  struck off - section 344",
            "Dissolved - Members' Voluntary Winding Up",
            "CANCELLED",
            "Gazetted to be Struck Off",
            "In Liquidation - Compulsory Winding Up",
            "Converted to LLP",
        ] {
            assert!(f.exclusion(&record(s, "2019-01-01")).is_some(), "{s} should be excluded");
        }
        for s in ["Live Company", "Live", "Registered", "na"] {
            assert!(f.exclusion(&record(s, "2019-01-01")).is_none(), "{s} should pass");
        }
    }

    #[test]
    fn custom_list_replaces_the_default() {
        let f = Filter::new(&["live".to_string()], 0, NaiveDate::from_ymd_opt(2026, 11, 22).unwrap());
        assert!(f.exclusion(&record("Live Company", "2019-01-01")).is_some());
        assert!(f.exclusion(&record("Struck Off", "2019-01-01")).is_none());
    }

    #[test]
    fn min_age_excludes_young_entities_only() {
        let f = default_filter(30);
        assert!(f.exclusion(&record("Live", "2026-11-01")).is_some());
        assert!(f.exclusion(&record("Live", "2026-10-23")).is_none());
        assert!(f.exclusion(&record("Live", "31/12/2026")).is_none(), "unknown dates are not proof of youth");
    }
}
