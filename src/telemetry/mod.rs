//! What a running engine tells its operators: logs ([`init`]), Prometheus metrics ([`metrics`]), progress
//! ([`progress`]), and failure alerts with the automatic pause of enrichment ([`alerts`]).
//!
//! Logs are human-readable text on a terminal, or JSON lines (`--log-format json`). `RUST_LOG` filters as
//! usual (default `info`). Logs go to stderr so stdout stays for results.

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

pub mod alerts;
pub mod metrics;
pub mod progress;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal; files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(|| progress::Stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
    };
}
