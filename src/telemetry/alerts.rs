//! The failure monitor: alerts to a Slack incoming webhook and the automatic pause of enrichment.
//!
//! Fed after every committed batch with its outcomes (processed + dead-lettered changes) and failures
//! (failed enrichments + dead-lettered changes), it keeps a sliding window of per-second buckets (at most
//! `window` seconds of them, whatever the throughput):
//! - when the failure ratio over the window exceeds the threshold (and the window holds at least
//!   `min_events` outcomes), it posts one alert, and no other until a window's length has passed;
//! - when the ratio stays above the threshold for `min_events` further outcomes, it pauses enrichment for
//!   `cooldown`: workers lease no job meanwhile (registry fields are still applied, jobs wait in the queue and
//!   the checkpoint moves); then enrichment resumes on its own, with a fresh window;
//! - both transitions are logged and posted.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::AlertSpec;
use crate::telemetry::metrics::metrics;

/// Whether enrichment is paused now; shared by the monitor and the enrichment worker.
#[derive(Debug, Default)]
pub struct PauseGate {
    until: Mutex<Option<Instant>>,
}

impl PauseGate {
    pub fn is_paused(&self) -> bool {
        self.until.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|u| Instant::now() < u)
    }

    fn set(&self, until: Option<Instant>) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = until;
        metrics().paused.set(i64::from(until.is_some()));
    }
}

#[derive(Default)]
struct State {
    /// (second, outcomes, failures), oldest first.
    buckets: VecDeque<(Instant, u64, u64)>,
    outcomes_total: u64,
    last_alert: Option<Instant>,
    /// Outcomes counted when the ratio was first seen above the threshold in this episode.
    above_since: Option<u64>,
    paused_until: Option<Instant>,
}

pub struct Monitor {
    spec: AlertSpec,
    pipeline: String,
    gate: Arc<PauseGate>,
    state: Mutex<State>,
    notify: Option<mpsc::Sender<String>>,
}

/// What one observation decided (returned for the caller's tests and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    pub alerted: bool,
    pub paused: bool,
}

impl Monitor {
    /// A monitor for one run; with a webhook URL, a task posts its messages in order.
    pub fn new(spec: AlertSpec, pipeline: &str, gate: Arc<PauseGate>) -> (Arc<Monitor>, Option<Notifier>) {
        let (notify, notifier) = match spec.webhook.as_ref() {
            Some(url) => {
                let (tx, rx) = mpsc::channel(64);
                (Some(tx), Some(Notifier::spawn(url.expose().to_owned(), rx)))
            }
            None => (None, None),
        };
        let monitor = Monitor { spec, pipeline: pipeline.to_owned(), gate, state: Mutex::default(), notify };
        (Arc::new(monitor), notifier)
    }

    pub fn gate(&self) -> Arc<PauseGate> {
        Arc::clone(&self.gate)
    }

    /// Records a committed batch's outcomes and failures, and acts on the window.
    pub fn observe(&self, outcomes: u64, failures: u64) -> Decision {
        self.observe_at(Instant::now(), outcomes, failures)
    }

    fn observe_at(&self, now: Instant, outcomes: u64, failures: u64) -> Decision {
        let mut decision = Decision::default();
        if outcomes == 0 {
            return decision;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.paused_until.is_some() {
            // Companies still in flight when the pause began: not part of the next window.
            return decision;
        }
        s.outcomes_total += outcomes;
        match s.buckets.back_mut() {
            Some((at, n, f)) if now.duration_since(*at) < Duration::from_secs(1) => {
                *n += outcomes;
                *f += failures;
            }
            _ => s.buckets.push_back((now, outcomes, failures)),
        }
        while s.buckets.front().is_some_and(|(at, _, _)| now.duration_since(*at) > self.spec.window) {
            s.buckets.pop_front();
        }
        let (n, f) = s.buckets.iter().fold((0, 0), |(n, f), b| (n + b.1, f + b.2));
        if n < self.spec.min_events {
            return decision;
        }
        let ratio = 100.0 * f as f64 / n as f64;
        if ratio <= self.spec.threshold_pct {
            s.above_since = None;
            return decision;
        }
        let total = s.outcomes_total;
        let since = *s.above_since.get_or_insert(total);
        if s.last_alert.is_none_or(|at| now.duration_since(at) >= self.spec.window) {
            s.last_alert = Some(now);
            decision.alerted = true;
            let text = format!(
                ":rotating_light: acraflow {}: failure rate {ratio:.0}% ({f} of {n}) over the last {} is above \
                 ACRA_DIRECT_ERROR_ALERT_THRESHOLD={}%",
                self.pipeline,
                humantime::format_duration(self.spec.window),
                self.spec.threshold_pct
            );
            tracing::warn!(alert = "failure_rate", failures = f, outcomes = n, ratio_pct = ratio, "{text}");
            self.post(text);
        }
        if self.spec.auto_pause && total - since >= self.spec.min_events {
            let until = now + self.spec.cooldown;
            s.paused_until = Some(until);
            self.gate.set(Some(until));
            decision.paused = true;
            let text = format!(
                ":double_vertical_bar: acraflow {}: enrichment paused for {} (failure rate {ratio:.0}%, {f} of {n}, \
                 stayed above {}%); registry sync and the checkpoint keep moving",
                self.pipeline,
                humantime::format_duration(self.spec.cooldown),
                self.spec.threshold_pct
            );
            tracing::warn!(alert = "paused", failures = f, outcomes = n, ratio_pct = ratio, "{text}");
            self.post(text);
        }
        decision
    }

    /// Resumes enrichment once the cool-down has passed (called on a timer, so an idle stream resumes too).
    pub fn tick(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.paused_until {
            Some(until) if Instant::now() >= until => {
                s.paused_until = None;
                s.buckets.clear();
                s.above_since = None;
                self.gate.set(None);
                let text = format!(
                    ":arrow_forward: acraflow {}: enrichment resumed after a {} pause",
                    self.pipeline,
                    humantime::format_duration(self.spec.cooldown)
                );
                tracing::warn!(alert = "resumed", "{text}");
                self.post(text);
                true
            }
            _ => false,
        }
    }

    /// Runs [`Monitor::tick`] every 250 ms until the returned task is aborted.
    pub fn spawn_ticker(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(250));
            loop {
                every.tick().await;
                me.tick();
            }
        })
    }

    fn post(&self, text: String) {
        if let Some(tx) = &self.notify {
            if tx.try_send(text).is_err() {
                tracing::warn!("SLACK_WEBHOOK_URL: too many alerts queued; this one is only logged");
            }
        }
    }
}

/// Posts messages to the webhook one at a time, in order, with a few retries.
pub struct Notifier {
    task: tokio::task::JoinHandle<()>,
}

impl Notifier {
    fn spawn(url: String, mut rx: mpsc::Receiver<String>) -> Notifier {
        let task = tokio::spawn(async move {
            let client = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "SLACK_WEBHOOK_URL: cannot build an HTTP client; alerts are only logged");
                    return;
                }
            };
            let host = url::Url::parse(&url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
            while let Some(text) = rx.recv().await {
                let body = serde_json::json!({ "text": text });
                let mut delay = Duration::from_millis(500);
                for attempt in 1..=3 {
                    match client.post(&url).json(&body).send().await.and_then(|r| r.error_for_status()) {
                        Ok(_) => break,
                        Err(e) => {
                            // The URL holds the webhook's secret: name only its host.
                            let e = e.without_url();
                            tracing::warn!(webhook_host = %host, attempt, error = %e, "posting an alert failed");
                            if attempt < 3 {
                                tokio::time::sleep(delay).await;
                                delay *= 2;
                            }
                        }
                    }
                }
            }
        });
        Notifier { task }
    }

    /// Waits (up to `timeout`) for queued messages to be posted; call after the monitor is dropped.
    pub async fn flush(self, timeout: Duration) {
        let mut task = self.task;
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            task.abort();
            tracing::warn!("SLACK_WEBHOOK_URL: gave up posting queued alerts at exit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn spec() -> AlertSpec {
        AlertSpec {
            webhook: None::<Secret>,
            threshold_pct: 30.0,
            window: Duration::from_secs(60),
            min_events: 10,
            auto_pause: true,
            cooldown: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn alerts_once_per_window_then_pauses_when_the_ratio_stays_above() {
        let (m, _) = Monitor::new(spec(), "t", Arc::default());
        let t0 = Instant::now();
        // Below the minimum sample: nothing.
        assert_eq!(m.observe_at(t0, 5, 5), Decision::default());
        // 10 outcomes, 5 failed (50%): one alert.
        assert_eq!(m.observe_at(t0, 5, 0), Decision { alerted: true, paused: false });
        // Still above, within the window: no second alert; not yet min_events more outcomes.
        assert_eq!(m.observe_at(t0 + Duration::from_secs(2), 5, 5), Decision::default());
        // 10 outcomes since the alert and still above: pause.
        assert_eq!(m.observe_at(t0 + Duration::from_secs(3), 5, 5), Decision { alerted: false, paused: true });
        assert!(m.gate().is_paused());
        // While paused, outcomes are ignored.
        assert_eq!(m.observe_at(t0 + Duration::from_secs(4), 100, 100), Decision::default());
    }

    #[tokio::test]
    async fn a_healthy_ratio_never_alerts_and_old_failures_leave_the_window() {
        let (m, _) = Monitor::new(spec(), "t", Arc::default());
        let t0 = Instant::now();
        assert_eq!(m.observe_at(t0, 100, 20), Decision::default());
        // 20 failures of 100 then a minute later all good: the old bucket leaves the window.
        assert_eq!(m.observe_at(t0 + Duration::from_secs(61), 10, 3), Decision::default());
        assert_eq!(m.observe_at(t0 + Duration::from_secs(62), 10, 10), Decision { alerted: true, paused: false });
    }
}
