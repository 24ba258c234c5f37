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

/// The target of the per-company stage logs (select, find_domain, crawl, verify, extract, ..., summary).
/// Services and JSON logs get them at `info`; a person at a terminal sees only their warnings unless
/// `RUST_LOG` asks (`RUST_LOG=info,acraflow::company=info`).
pub const COMPANY: &str = "acraflow::company";

static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// A command's final summary: on stdout as text, or with `--log-format json` as the last JSON log event on
/// stderr (`"message":"run summary"`, every field of the summary at the top level) and nothing on stdout.
pub fn summary<T: serde::Serialize + std::fmt::Display>(summary: &T) {
    if FORMAT.get() != Some(&LogFormat::Json) {
        println!("{summary}");
        return;
    }
    let mut event = serde_json::Map::new();
    event.insert("timestamp".into(), chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true).into());
    event.insert("level".into(), "INFO".into());
    event.insert("message".into(), "run summary".into());
    event.insert("target".into(), "acraflow::summary".into());
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(summary) {
        event.extend(fields);
    }
    let line = serde_json::Value::Object(event).to_string() + "\n";
    let _ = std::io::Write::write_all(&mut progress::Stderr, line.as_bytes());
}

pub fn init(format: LogFormat) {
    init_with(format, None);
}

/// As [`init`]; with `file`, everything at `info` (or `RUST_LOG`) goes to that file, and the terminal
/// gets only errors, so a command whose output is a report (the demo) is not buried under per-company
/// lines. The report names the file.
pub fn init_with(format: LogFormat, file: Option<std::fs::File>) {
    init_quiet(format, file, false)
}

/// As [`init_with`]; `quiet` shows only warnings and errors unless `RUST_LOG` says otherwise (a command
/// whose output belongs to another program, as `acraflow psql`'s to psql).
pub fn init_quiet(format: LogFormat, file: Option<std::fs::File>, quiet: bool) {
    let _ = FORMAT.set(format);
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    // Colours only for a person at a terminal; files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let default = if quiet {
        "warn".to_owned()
    } else if ansi && format == LogFormat::Text && file.is_none() {
        format!("info,{COMPANY}=warn")
    } else {
        "info".to_owned()
    };
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&default));
    let Some(file) = file else {
        let builder =
            tracing_subscriber::fmt().with_env_filter(filter()).with_ansi(ansi).with_writer(|| progress::Stderr);
        let _ = match format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => {
                builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
            }
        };
        return;
    };
    let file = std::sync::Arc::new(file);
    let to_file = tracing_subscriber::fmt::layer().with_ansi(false).with_writer(file);
    let to_file = match format {
        LogFormat::Text => to_file.with_filter(filter()).boxed(),
        LogFormat::Json => to_file
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter())
            .boxed(),
    };
    let to_terminal = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(|| progress::Stderr)
        .with_filter(tracing_subscriber::filter::LevelFilter::ERROR)
        .boxed();
    let _ = tracing_subscriber::registry().with(vec![to_file, to_terminal]).try_init();
}
