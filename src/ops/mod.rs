//! Operators: `futures::Stream` adapters over batches of [`Event`](crate::change::Event)s.
//!
//! Each keeps its decision in a pure, synchronous core (unit-tested and benched without a database) and
//! wraps it in a thin adapter. Database-touching operators make one round trip per batch.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, TryStreamExt};

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

/// The adapter of an operator whose step is one async call per batch: batches pass one at a time, in order.
pub fn per_batch<T, F, Fut>(op: T, input: BatchStream, step: F) -> BatchStream
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>, Batch) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Batch>> + Send + 'static,
{
    let op = Arc::new(op);
    Box::pin(input.and_then(move |batch| step(Arc::clone(&op), batch)))
}
