//! Sources: where changes come from. Each emits [`Batch`](crate::change::Batch)es of the same event type,
//! so every operator downstream is shared between a backfill and the replication stream.

pub mod backfill;
pub mod pgoutput;
pub mod plan;
pub mod replication;

/// Quotes a possibly schema-qualified table name from configuration as SQL identifiers.
pub fn quote_table(name: &str) -> String {
    name.split('.').map(|part| format!("\"{}\"", part.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    #[test]
    fn quotes_identifiers() {
        assert_eq!(super::quote_table("staging_acra_companies"), "\"staging_acra_companies\"");
        assert_eq!(super::quote_table("acra.staging"), "\"acra\".\"staging\"");
        assert_eq!(super::quote_table("x\"; drop table y; --"), "\"x\"\"; drop table y; --\"");
    }
}
