//! The enrichment dataflow: the slow edge of the chain, behind a durable queue.
//!
//! ```text
//! registry sink --(same txn as the checkpoint)--> enrichment_jobs <-- refresh --uen / stale sweeper / retries
//!                                                      |
//!                      lease (SKIP LOCKED) --> enrich --> sink (fields + history + job removal, one txn)
//! ```
//! - [`queue`]: the job table: enqueue (coalescing into one job per company), lease, renew, release,
//!   express refreshes, the stale sweeper, what `status` shows. Its module doc holds the invariants: what a
//!   lease guarantees, when a job is removed, what is at-least-once and what exactly-once.
//! - [`worker`]: leases what its concurrency can hold, runs [`enrich`] on each job, commits through
//!   [`sink`], renews leases while work is in flight and gives them back on shutdown.
//! - [`enrich`]: one company's crawl and extraction (find_domain, crawl, extract, llm, contacts).
//! - [`sink`]: commits a job's effects and its removal together, fenced by the lease; retries and parks.
//! - [`export`]: leads into Odoo CRM, from durable jobs (`odoo_exports`), idempotent by UEN.
//! - [`leads`]: the steps after enrich: email verification (cached, capped per day) and the lead score.
//! - [`usage`]: spend per UTC day in the database, so caps hold across workers.
//!
//! The registry dataflow (`pipeline`) runs at registry speed whatever enrichment does: its only tie to
//! this one is the enqueue in its sink's transaction. `acraflow run` runs both dataflows in one process;
//! `acraflow worker` runs only this one, on any machine that reaches the database.

pub mod enrich;
pub mod export;
pub mod leads;
pub mod queue;
pub mod sink;
pub mod usage;
pub mod worker;
