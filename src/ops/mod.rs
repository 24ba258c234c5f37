//! Operators: `futures::Stream` adapters over batches of [`Event`](crate::change::Event)s.
//!
//! Each keeps its decision in a pure, synchronous core (unit-tested and benched without a database) and
//! wraps it in a thin adapter. Database-touching operators make one round trip per batch.

use std::pin::Pin;

use futures::Stream;

use crate::change::Batch;
use crate::error::Result;

pub mod dedupe;
pub mod filter;
pub mod upsert;

/// The stream every operator consumes and produces.
pub type BatchStream = Pin<Box<dyn Stream<Item = Result<Batch>> + Send>>;

/// A pipeline stage. One method: turn the upstream into a downstream.
pub trait Operator: Send {
    fn apply(self: Box<Self>, input: BatchStream) -> BatchStream;
}
