//! Progress of a run: a bar on a terminal (indicatif: rows done of total, rows/s, ETA), or a log line every
//! few seconds when stderr is not a terminal (a service, a pipe, CI).
//!
//! Logs written while the bar is shown go through [`Stderr`], which lifts the bar, writes the line and
//! draws the bar again, so the two never garble each other.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::sink::Counters;

/// How a run reports progress (`ACRA_DIRECT_PROGRESS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal and the total is known, else log lines.
    #[default]
    Auto,
    Bar,
    Log,
    Off,
}

static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn active() -> Option<ProgressBar> {
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The log writer: stderr, around the progress bar when one is shown.
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match active() {
            Some(bar) => bar.suspend(|| std::io::stderr().write(buf)),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

pub struct Reporter {
    bar: Option<ProgressBar>,
    total: Option<u64>,
    every: Duration,
    log: bool,
    started: Instant,
    last: Instant,
}

impl Reporter {
    /// `total`: the rows the run is expected to read, when known (a backfill).
    pub fn new(mode: ProgressMode, total: Option<u64>, every: Duration) -> Self {
        let want_bar = match mode {
            ProgressMode::Bar => true,
            ProgressMode::Auto => total.is_some() && std::io::stderr().is_terminal(),
            ProgressMode::Log | ProgressMode::Off => false,
        };
        let bar = want_bar.then(|| {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr_with_hz(4));
            let template = "{spinner} {msg} [{bar:30}] {human_pos}/{human_len} rows  {per_sec}  ETA {eta}  ({elapsed})";
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message("backfill");
            *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar.clone());
            bar
        });
        let now = Instant::now();
        Reporter { bar, total, every, log: mode != ProgressMode::Off, started: now, last: now }
    }

    /// After each committed batch.
    pub fn update(&mut self, c: &Counters) {
        if let Some(bar) = &self.bar {
            if self.total.is_none_or(|t| c.rows_in < t) {
                bar.set_position(c.rows_in);
                return;
            }
            // The backfill is done (`run` goes on streaming): the bar ends full and log lines take over.
            bar.finish();
            *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.bar = None;
        }
        if !self.log || self.last.elapsed() < self.every {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = c.rows_in as f64 / secs;
        let eta_s = match self.total {
            Some(total) if rate > 0.0 => Some((total.saturating_sub(c.rows_in) as f64 / rate).round() as u64),
            _ => None,
        };
        tracing::info!(
            rows_done = c.rows_in,
            rows_total = self.total,
            rows_per_second = rate as u64,
            eta_seconds = eta_s,
            processed = c.processed,
            filtered = c.filtered,
            skipped = c.skipped,
            failed = c.failed,
            dead_lettered = c.dead_lettered,
            "progress"
        );
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            // Interrupted or cut short: the bar stays where the run stopped, never jumps to 100%.
            bar.abandon();
            *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}
