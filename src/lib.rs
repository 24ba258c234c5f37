//! acraflow: a streaming dataflow engine that keeps an enriched `companies` table fresh from Singapore's
//! ACRA registry (`staging_acra_companies`), over PostgreSQL.
//!
//! - [`change`]: the one event type every operator sees (staging row + source position) and its batches
//! - [`registry`]: PRD 20's mapping rules, staging row -> company record (pure)
//! - [`source`]: where changes come from: [`source::backfill`] (the table replayed in one snapshot),
//!   [`source::replication`] (the slot's stream, acknowledged only after commit), [`source::pgoutput`] (its decoder),
//!   [`source::plan`] (which source a run reads, from the slot and the checkpoint)
//! - [`ops`]: the registry operators (filter, dedupe, upsert), each a `Stream` adapter over batches
//! - [`enrichment`]: the enrichment dataflow behind the durable queue: [`enrichment::queue`] (the job table),
//!   [`enrichment::worker`] (lease, enrich, commit), [`enrichment::enrich`] (one company's crawl),
//!   [`enrichment::sink`], [`enrichment::usage`] (daily caps counted in the database)
//! - [`fixture_web`]: a local web (sites, search, LLM, faults) for tests, benchmarks and the demo
//! - [`sink`]: the registry's transactional sink (history, dead letters, enrichment jobs and checkpoint in one
//!   transaction)
//! - [`checkpoint`]: where the engine's position lives and how it advances
//! - [`pipeline`]: pipeline file -> the registry stream graph (and the enrichment worker beside it); backfill,
//!   or hand-over to the stream; run to the end or a shutdown
//! - [`run`]: a run's header and summary
//! - [`config`]: pipeline files, the env overlay and validation
//! - [`db`]: connections, migrations, schema facts; [`pgtls`]: TLS to PostgreSQL (`sslmode`, `sslrootcert`)
//! - [`embedded`]: the private PostgreSQL used when `POSTGRES_DSN` is unset
//! - [`seed`]: ACRA-shaped sample rows from real reference data
//! - [`mod@bench`]: throughput benchmarks with a same-run reference
//! - [`demo`]: the demo and its report; [`import`]: ACRA's published CSV files into staging
//! - [`admin`]: `acraflow slots` and `acraflow checkpoints`
//! - [`check`]: `acraflow check`, settings and database readiness
//! - [`commands`]: what each CLI command does; [`cli`]: its flags
//! - [`telemetry`]: logs, Prometheus metrics and endpoints, progress, failure alerts with the pause of enrichment
//! - [`error`]: the one error type

pub mod admin;
pub mod bench;
pub mod change;
pub mod check;
pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod config;
pub mod db;
pub mod demo;
pub mod embedded;
pub mod enrichment;
pub mod error;
pub mod fixture_web;
pub mod import;
pub mod ops;
pub mod pgtls;
pub mod pipeline;
pub mod registry;
pub mod run;
pub mod seed;
pub mod sink;
pub mod source;
pub mod telemetry;

pub use error::{Error, ErrorKind, Result};
