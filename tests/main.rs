//! Integration tests: one binary, against a real PostgreSQL (wal_level=logical) that the harness starts.
mod support;

mod backfill;
mod bad_input;
mod cli;
mod enrich;
mod first_hour;
mod leads;
mod ops;
mod queue;
mod replication;
mod schema;
mod tls;
