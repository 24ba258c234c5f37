//! From an enriched company to a lead: email verification (`verify`) and a lead score (`score`), the two
//! steps after `enrich` in the enrichment dataflow. Both are optional and run inside the worker, so their
//! results commit in the enrichment's own transaction (`lead_features`, `lead_scores`, each email's status).
//!
//! **Verify** (on when `ZEROBOUNCE_API_KEY` is set): a company's emails are looked up in
//! `email_verification_cache` first; only those not checked within `ZEROBOUNCE_RECHECK_DAYS` go to the
//! provider in a ZeroBounce v2 `validatebatch` call (200 at most) that a worker's batcher fills with every
//! waiting company's emails while it waits for its turn (`ZEROBOUNCE_BATCH_RATE`, 5 a minute by default,
//! paced across all workers in `provider_pacing`: ZeroBounce blocks a key past that for 10 minutes). The
//! answers are cached at once, so no email is paid for twice. `ZEROBOUNCE_MAX_VERIFICATIONS` caps the
//! emails verified per UTC day across runs and workers (reserved in the database before the call, like the
//! other daily caps). Past the cap, or when the provider keeps refusing, emails stay `unverified`: the
//! company is never failed for it. A company waiting for its batch holds no crawl slot (see the worker).
//!
//! **Score**: a deterministic score in [0, 1], the weighted mean of features the pipeline already has, each
//! in [0, 1]; weights and the High / Medium cut-offs come from the pipeline file. The rationale names the
//! features that moved it and those missing.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio_postgres::Client;

use crate::enrichment::usage::{Pacing, Usage};
use crate::error::{Error, Result};
use crate::telemetry::metrics::{metrics, ProviderLabel, ProviderNameLabel};

/// What the `score` step weighs (pipeline file: `[operator.score]` under the enrich operator).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreSpec {
    pub weights: Weights,
    /// A score at or above this is High.
    pub high: f64,
    /// At or above this (and below `high`) is Medium; below is Low.
    pub medium: f64,
    /// SSIC code prefixes of the industries sales targets (the `industry` feature).
    pub target_industries: Vec<String>,
}

impl Default for ScoreSpec {
    fn default() -> Self {
        ScoreSpec {
            weights: Weights::default(),
            high: 0.66,
            medium: 0.33,
            // Information and communications (58-63), professional, scientific and technical services (69-75).
            target_industries: ["58", "59", "60", "61", "62", "63", "69", "70", "71", "72", "73", "74", "75"]
                .map(str::to_owned)
                .to_vec(),
        }
    }
}

/// The weight of each feature; the score is `sum(weight × feature) / sum(weight)`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    /// 1 for a verified (valid) email, 0.5 for an email not verified (or catch-all, unknown), 0 for none.
    pub email: f64,
    /// 1 with a phone number.
    pub phone: f64,
    /// The website's verification confidence (0 without a website).
    pub website: f64,
    /// About text: its length up to 300 characters.
    pub about: f64,
    /// 1 with a LinkedIn page.
    pub linkedin: f64,
    /// Estimated employees on a log scale: 1 employee ~0.13, 10 ~0.45, 200 and more 1.
    pub size: f64,
    /// Years since incorporation, up to 10.
    pub age: f64,
    /// Open jobs (hiring), up to 5.
    pub hiring: f64,
    /// 1 when the SSIC code starts with one of `target_industries`.
    pub industry: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            email: 0.20,
            phone: 0.10,
            website: 0.15,
            about: 0.05,
            linkedin: 0.10,
            size: 0.10,
            age: 0.10,
            hiring: 0.10,
            industry: 0.10,
        }
    }
}

impl ScoreSpec {
    pub fn validate(&self) -> Result<()> {
        let w = &self.weights;
        let all = [w.email, w.phone, w.website, w.about, w.linkedin, w.size, w.age, w.hiring, w.industry];
        if all.iter().any(|v| !v.is_finite() || *v < 0.0) || all.iter().sum::<f64>() <= 0.0 {
            return Err(Error::config("score.weights: every weight must be 0 or more, and one more than 0"));
        }
        if !(0.0..=1.0).contains(&self.medium) || !(0.0..=1.0).contains(&self.high) || self.medium > self.high {
            return Err(Error::config("score: the cut-offs must satisfy 0 <= medium <= high <= 1"));
        }
        Ok(())
    }
}

/// What a company is scored on, each in [0, 1] (the `lead_features` row).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Features {
    pub email: f64,
    pub phone: f64,
    pub website: f64,
    pub about: f64,
    pub linkedin: f64,
    pub size: f64,
    pub age: f64,
    pub hiring: f64,
    pub industry: f64,
}

/// The facts features are computed from.
#[derive(Debug, Clone, Default)]
pub struct Facts<'a> {
    /// Each email's verification status (`unverified` when not verified).
    pub emails: &'a [(String, String)],
    pub phones: usize,
    pub website_confidence: Option<f64>,
    pub about_chars: usize,
    pub linkedin: bool,
    pub employees: Option<i32>,
    pub incorporation_year: Option<i32>,
    pub jobs: Option<i32>,
    pub industry_code: Option<&'a str>,
}

impl Features {
    pub fn of(facts: &Facts<'_>, spec: &ScoreSpec, this_year: i32) -> Features {
        let email = facts
            .emails
            .iter()
            .map(|(_, s)| match s.as_str() {
                "valid" => 1.0,
                "invalid" | "spamtrap" | "abuse" | "do_not_mail" => 0.0,
                _ => 0.5,
            })
            .fold(0.0, f64::max);
        let unit = |v: f64| v.clamp(0.0, 1.0);
        Features {
            email,
            phone: if facts.phones > 0 { 1.0 } else { 0.0 },
            website: unit(facts.website_confidence.unwrap_or(0.0)),
            about: unit(facts.about_chars as f64 / 300.0),
            linkedin: if facts.linkedin { 1.0 } else { 0.0 },
            size: facts.employees.map_or(0.0, |e| unit((1.0 + f64::from(e.max(0))).ln() / 201f64.ln())),
            age: facts.incorporation_year.map_or(0.0, |y| unit(f64::from(this_year - y) / 10.0)),
            hiring: facts.jobs.map_or(0.0, |j| unit(f64::from(j) / 5.0)),
            industry: match facts.industry_code {
                Some(code) if spec.target_industries.iter().any(|p| code.starts_with(p.as_str())) => 1.0,
                _ => 0.0,
            },
        }
    }

    fn named(&self, w: &Weights) -> [(&'static str, f64, f64); 9] {
        [
            ("verified email", self.email, w.email),
            ("phone", self.phone, w.phone),
            ("website", self.website, w.website),
            ("about text", self.about, w.about),
            ("LinkedIn", self.linkedin, w.linkedin),
            ("size", self.size, w.size),
            ("years in business", self.age, w.age),
            ("hiring", self.hiring, w.hiring),
            ("target industry", self.industry, w.industry),
        ]
    }
}

/// A company's score (the `lead_scores` row).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Lead {
    pub features: Features,
    pub score: f64,
    pub bucket: &'static str,
    /// e.g. "High 0.78: verified email +0.20, website +0.15, phone +0.10; missing: hiring, LinkedIn".
    pub rationale: String,
    /// Each feature's contribution to the score, by name.
    pub contributions: Vec<(&'static str, f64)>,
}

pub fn score(features: Features, spec: &ScoreSpec) -> Lead {
    let named = features.named(&spec.weights);
    let total: f64 = named.iter().map(|(_, _, w)| w).sum::<f64>().max(f64::MIN_POSITIVE);
    let contributions: Vec<(&'static str, f64)> = named.iter().map(|(n, v, w)| (*n, v * w / total)).collect();
    let score = (contributions.iter().map(|(_, c)| c).sum::<f64>() * 1e4).round() / 1e4;
    let bucket = if score >= spec.high {
        "High"
    } else if score >= spec.medium {
        "Medium"
    } else {
        "Low"
    };
    let mut moved: Vec<&(&str, f64)> = contributions.iter().filter(|(_, c)| *c > 0.0).collect();
    moved.sort_by(|a, b| b.1.total_cmp(&a.1));
    let missing: Vec<&str> = named.iter().filter(|(_, v, w)| *v == 0.0 && *w > 0.0).map(|(n, _, _)| *n).collect();
    let mut rationale = format!(
        "{bucket} {score:.2}: {}",
        if moved.is_empty() {
            "nothing known".to_owned()
        } else {
            moved.iter().take(4).map(|(n, c)| format!("{n} +{c:.2}")).collect::<Vec<_>>().join(", ")
        }
    );
    if !missing.is_empty() {
        rationale.push_str(&format!("; missing: {}", missing.join(", ")));
    }
    Lead { features, score, bucket, rationale, contributions }
}

/// The `verify` step's settings (environment: `ZEROBOUNCE_*`).
#[derive(Debug, Clone)]
pub struct VerifySettings {
    /// The provider's v2 base URL (`ZEROBOUNCE_URL`); `validatebatch` is called under it.
    pub base_url: url::Url,
    pub api_key: crate::config::Secret,
    /// `ZEROBOUNCE_MAX_VERIFICATIONS`: emails verified per UTC day at most, across runs and workers.
    pub daily_cap: Option<u64>,
    /// `ZEROBOUNCE_RECHECK_DAYS`: a cached answer younger than this is used instead of paying again.
    pub recheck_days: u32,
    /// `ZEROBOUNCE_BATCH_RATE`: `validatebatch` calls across every worker (`None`: unpaced).
    pub batch_rate: Option<crate::config::Rate>,
    pub timeout: Duration,
}

/// Emails a `validatebatch` call takes at most (the provider's limit).
pub const BATCH_MAX: usize = 200;
pub const VERIFICATIONS: &str = "email_verifications";
/// How long the provider may take over a batch (ZeroBounce: "up to 70 seconds"; it answers `unknown` for
/// what it could not check in time), sent as its `timeout` parameter.
const PROVIDER_TIMEOUT_S: u64 = 60;
/// A company waits this long for its batch at most; then its emails stay unverified.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// How long a key is left alone after a 429 without `Retry-After` (ZeroBounce blocks it for 10 minutes).
const BLOCKED_FOR: Duration = Duration::from_secs(600);

/// What a company's emails come back with: `(email, status)` pairs, or why none were verified.
type Answer = std::result::Result<Vec<(String, String)>, String>;

/// One company's emails waiting for a batch: lower case, distinct, not in the cache, and already reserved
/// against the daily cap (the batcher gives back what it does not pay for).
struct Request {
    emails: Vec<String>,
    reply: tokio::sync::oneshot::Sender<Answer>,
}

/// The `verify` step of a worker: a company's emails are looked up in the cache, and the rest join the
/// next `validatebatch` call of the worker's batcher task, which gathers every company's emails while it
/// waits for its turn (`ZEROBOUNCE_BATCH_RATE`, across all workers), so the provider sees a few large
/// batches rather than a call per company.
pub struct Verifier {
    recheck_days: u32,
    client: Arc<Client>,
    usage: Usage,
    batches: tokio::sync::mpsc::Sender<Request>,
    batcher: tokio::task::JoinHandle<()>,
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.batcher.abort();
    }
}

impl Verifier {
    /// Starts the batcher task (so it must be called inside the runtime).
    pub fn new(settings: VerifySettings, client: Arc<Client>) -> Result<Verifier> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout.max(Duration::from_secs(PROVIDER_TIMEOUT_S + 20)))
            .build()
            .map_err(|e| Error::config(format!("building the verification client: {e}")))?;
        let usage = Usage::new(Arc::clone(&client), VERIFICATIONS, settings.daily_cap);
        let pacing = settings.batch_rate.map(|r| Pacing::new("zerobounce", r.interval()));
        let (batches, rx) = tokio::sync::mpsc::channel(4096);
        let recheck_days = settings.recheck_days;
        let batcher = Batcher {
            settings,
            http,
            usage: usage.clone(),
            pacing,
            rx,
            pending: std::collections::VecDeque::new(),
            blocked_until: None,
        };
        let batcher = tokio::spawn(batcher.run());
        Ok(Verifier { recheck_days, client, usage, batches, batcher })
    }

    /// Each email with its status: cached, verified now, or `unverified` (past the daily cap, the provider
    /// refused after its retries, or the batch did not come within [`MAX_WAIT`]). Never fails the company.
    pub async fn verify(&self, emails: &[String]) -> Vec<(String, String)> {
        if emails.is_empty() {
            return Vec::new();
        }
        let lower: Vec<String> = emails.iter().map(|e| e.to_lowercase()).collect();
        let mut known: std::collections::HashMap<String, String> = match self
            .client
            .query(
                "select email, status from email_verification_cache \
                 where email = any($1) and checked_at > now() - make_interval(days => $2)",
                &[&lower, &(self.recheck_days.min(36_500) as i32)],
            )
            .await
        {
            Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "email verification: could not read the cache; leaving emails unverified");
                return emails.iter().map(|e| (e.clone(), "unverified".to_owned())).collect();
            }
        };
        let mut todo: Vec<String> = lower.iter().filter(|e| !known.contains_key(*e)).cloned().collect();
        todo.sort();
        todo.dedup();
        todo.truncate(BATCH_MAX);
        if !todo.is_empty() {
            match self.usage.try_take(todo.len() as u64).await {
                Ok(true) => {
                    let n = todo.len() as i64;
                    let (reply, answer) = tokio::sync::oneshot::channel();
                    if self.batches.send(Request { emails: todo, reply }).await.is_err() {
                        self.usage.adjust(-n).await;
                    } else {
                        match tokio::time::timeout(MAX_WAIT, answer).await {
                            Ok(Ok(Ok(answers))) => known.extend(answers),
                            Ok(Ok(Err(e))) => {
                                tracing::warn!(target: crate::telemetry::COMPANY, stage = "verify_email", error = %e,
                                    "email verification refused; emails stay unverified");
                            }
                            // The batcher is gone (the worker is stopping).
                            Ok(Err(_)) => {}
                            Err(_) => {
                                tracing::warn!(target: crate::telemetry::COMPANY, stage = "verify_email",
                                    waited_s = MAX_WAIT.as_secs(), "no verification batch in time; emails stay unverified");
                            }
                        }
                    }
                }
                Ok(false) => {
                    tracing::info!(target: crate::telemetry::COMPANY, stage = "verify_email", emails = todo.len(),
                        "ZEROBOUNCE_MAX_VERIFICATIONS reached today; emails stay unverified");
                }
                Err(e) => tracing::warn!(error = %e, "email verification: could not count today's use"),
            }
        }
        emails
            .iter()
            .zip(&lower)
            .map(|(e, l)| (e.clone(), known.get(l).cloned().unwrap_or_else(|| "unverified".to_owned())))
            .collect()
    }
}

/// How one `validatebatch` call went.
enum Call {
    /// `(email, status, sub_status)` for each address the provider answered.
    Answered(Vec<(String, String, String)>),
    /// Worth another try (5xx, a timeout, no connection).
    Retry(String),
    /// No retry helps (a bad key, no credits, a 4xx).
    Refused(String),
    /// HTTP 429: the key is blocked for this long.
    Blocked(Duration),
}

/// The worker's batcher task: see [`Verifier`].
struct Batcher {
    settings: VerifySettings,
    http: reqwest::Client,
    usage: Usage,
    pacing: Option<Pacing>,
    rx: tokio::sync::mpsc::Receiver<Request>,
    /// Requests in arrival order; a batch is taken from the front.
    pending: std::collections::VecDeque<Request>,
    blocked_until: Option<std::time::Instant>,
}

impl Batcher {
    async fn run(mut self) {
        loop {
            if self.pending.is_empty() {
                match self.rx.recv().await {
                    Some(r) => self.pending.push_back(r),
                    None => return,
                }
            }
            if let Some(left) = self.blocked_until.and_then(|u| u.checked_duration_since(std::time::Instant::now())) {
                let why = format!(
                    "the verification provider blocked the key after a 429; calls resume in {}",
                    humantime::format_duration(Duration::from_secs(left.as_secs()))
                );
                let all: Vec<Request> = self.pending.drain(..).collect();
                self.refuse(all, &why).await;
                continue;
            }
            self.batch().await;
        }
    }

    /// One batch from the front of the queue, retried (each try taking its turn) until answered, refused
    /// or out of tries.
    async fn batch(&mut self) {
        let mut backoff = Duration::from_millis(500);
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            if let Err(e) = self.turn().await {
                let all: Vec<Request> = self.pending.drain(..).collect();
                self.refuse(all, &e.to_string()).await;
                return;
            }
            while let Ok(r) = self.rx.try_recv() {
                self.pending.push_back(r);
            }
            // Companies that stopped waiting: never paid for.
            let (waiting, gone): (Vec<Request>, Vec<Request>) =
                self.pending.drain(..).partition(|r| !r.reply.is_closed());
            self.pending.extend(waiting);
            self.refuse(gone, "").await;
            let batch = take_batch(&mut self.pending);
            if batch.is_empty() {
                return;
            }
            let mut emails: Vec<String> = batch.iter().flat_map(|r| r.emails.iter().cloned()).collect();
            emails.sort();
            emails.dedup();
            let reserved: usize = batch.iter().map(|r| r.emails.len()).sum();
            match self.call(&emails).await {
                Call::Answered(answers) => {
                    self.count("ok");
                    // Paid for: cached at once, whatever happens to the companies.
                    cache(&self.usage.client(), &answers).await;
                    self.usage.adjust(answers.len() as i64 - reserved as i64).await;
                    let statuses: std::collections::HashMap<String, String> =
                        answers.into_iter().map(|(e, s, _)| (e, s)).collect();
                    for r in batch {
                        let mine = r.emails.iter().filter_map(|e| Some((e.clone(), statuses.get(e)?.clone())));
                        let _ = r.reply.send(Ok(mine.collect()));
                    }
                    return;
                }
                Call::Retry(why) if attempt < 2 => {
                    self.count("error");
                    tracing::debug!(error = %why, attempt, "verification batch failed; retrying");
                    // Back in front, in order, for the next try.
                    for r in batch.into_iter().rev() {
                        self.pending.push_front(r);
                    }
                }
                Call::Retry(why) => {
                    self.count("error");
                    self.refuse(batch, &why).await;
                    return;
                }
                Call::Refused(why) => {
                    self.count("refused");
                    self.refuse(batch, &why).await;
                    return;
                }
                Call::Blocked(d) => {
                    self.count("refused");
                    tracing::warn!(
                        blocked_s = d.as_secs(),
                        "the verification provider answered 429 (its rate limit): \
                        no calls until it lifts; emails stay unverified meanwhile (ZEROBOUNCE_BATCH_RATE)"
                    );
                    self.blocked_until = Some(std::time::Instant::now() + d);
                    self.refuse(batch, "the verification provider answered 429 (rate limited)").await;
                    return;
                }
            }
        }
    }

    /// Waits for this worker's next turn at the provider, gathering the requests that arrive meanwhile.
    async fn turn(&mut self) -> Result<()> {
        let Some(pacing) = &self.pacing else { return Ok(()) };
        let started = std::time::Instant::now();
        let wait = pacing.take(&self.usage.client()).await?;
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                r = self.rx.recv() => match r {
                    Some(r) => self.pending.push_back(r),
                    None => (&mut sleep).await,
                },
            }
        }
        metrics()
            .provider_wait
            .get_or_create(&ProviderNameLabel { provider: "zerobounce" })
            .inc_by(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Answers `why` to requests that will not be verified, and gives their reservations back.
    async fn refuse(&self, requests: Vec<Request>, why: &str) {
        let reserved: usize = requests.iter().map(|r| r.emails.len()).sum();
        self.usage.adjust(-(reserved as i64)).await;
        for r in requests {
            let _ = r.reply.send(Err(why.to_owned()));
        }
    }

    fn count(&self, outcome: &'static str) {
        metrics().provider_calls.get_or_create(&ProviderLabel { provider: "zerobounce", outcome }).inc();
    }

    /// One `validatebatch` call.
    async fn call(&self, emails: &[String]) -> Call {
        let url = format!("{}/validatebatch", self.settings.base_url.as_str().trim_end_matches('/'));
        let body = serde_json::json!({
            "api_key": self.settings.api_key.expose(),
            "email_batch": emails.iter().map(|e| serde_json::json!({"email_address": e, "ip_address": ""})).collect::<Vec<_>>(),
            "timeout": PROVIDER_TIMEOUT_S,
        });
        let resp = match self.http.post(&url).json(&body).send().await {
            Ok(r) => r,
            Err(e) => {
                return Call::Retry(format!(
                    "could not reach the verification provider ({})",
                    if e.is_timeout() { "timeout" } else { "connection" }
                ))
            }
        };
        let status = resp.status().as_u16();
        if status == 429 {
            let after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                .map_or(BLOCKED_FOR, |s| Duration::from_secs(s.min(3600)));
            return Call::Blocked(after);
        }
        if status >= 500 {
            return Call::Retry(format!("the verification provider answered HTTP {status}"));
        }
        if status != 200 {
            return Call::Refused(format!("the verification provider answered HTTP {status}"));
        }
        let v: serde_json::Value = match resp.json().await {
            Ok(v) => v,
            Err(_) => return Call::Retry("the verification provider's answer is not JSON".to_owned()),
        };
        if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
            // ZeroBounce answers 200 with an error for a bad key or no credits: no retry helps.
            return Call::Refused(format!(
                "the verification provider refused: {}",
                err.chars().take(200).collect::<String>()
            ));
        }
        let rows = v.get("email_batch").and_then(|b| b.as_array()).cloned().unwrap_or_default();
        let wanted: std::collections::HashSet<&str> = emails.iter().map(String::as_str).collect();
        let mut answers: Vec<(String, String, String)> = rows
            .iter()
            .filter_map(|r| {
                let address = r.get("address")?.as_str()?.to_lowercase();
                let status = r.get("status")?.as_str()?.to_lowercase();
                let sub = r.get("sub_status").and_then(|s| s.as_str()).unwrap_or("").to_owned();
                wanted.contains(address.as_str()).then_some((address, status, sub))
            })
            .collect();
        answers.sort();
        answers.dedup_by(|a, b| a.0 == b.0);
        Call::Answered(answers)
    }
}

/// The front requests whose distinct emails fit one call (the first always does: a company sends
/// [`BATCH_MAX`] at most).
fn take_batch(pending: &mut std::collections::VecDeque<Request>) -> Vec<Request> {
    let mut seen = std::collections::HashSet::new();
    let mut batch = Vec::new();
    while let Some(r) = pending.front() {
        let new = r.emails.iter().filter(|e| !seen.contains(*e)).count();
        if !batch.is_empty() && seen.len() + new > BATCH_MAX {
            break;
        }
        seen.extend(r.emails.iter().cloned());
        batch.extend(pending.pop_front());
    }
    batch
}

async fn cache(client: &Client, answers: &[(String, String, String)]) {
    if answers.is_empty() {
        return;
    }
    let e: Vec<&str> = answers.iter().map(|a| a.0.as_str()).collect();
    let s: Vec<&str> = answers.iter().map(|a| a.1.as_str()).collect();
    let ss: Vec<&str> = answers.iter().map(|a| a.2.as_str()).collect();
    let done = client
        .execute(
            "insert into email_verification_cache (email, status, sub_status, checked_at) \
             select * , now() from unnest($1::text[], $2::text[], $3::text[]) \
             on conflict (email) do update set status = excluded.status, sub_status = excluded.sub_status, \
               checked_at = now()",
            &[&e, &s, &ss],
        )
        .await;
    if let Err(e) = done {
        tracing::warn!(error = %e, "could not cache email verifications");
    }
}

/// Sales-facing order: verified first, then unknown or not verified, and addresses the provider says not
/// to mail dropped.
pub fn prefer_verified(emails: &[(String, String)]) -> Vec<String> {
    let rank = |s: &str| match s {
        "valid" => 0,
        "catch-all" | "catch_all" => 1,
        "unknown" | "unverified" => 2,
        _ => 3,
    };
    let mut kept: Vec<&(String, String)> = emails.iter().filter(|(_, s)| rank(s) < 3).collect();
    kept.sort_by_key(|(_, s)| rank(s));
    kept.into_iter().map(|(e, _)| e.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(emails: &'a [(String, String)], industry: Option<&'a str>) -> Facts<'a> {
        Facts {
            emails,
            phones: 1,
            website_confidence: Some(0.9),
            about_chars: 150,
            linkedin: false,
            employees: Some(10),
            incorporation_year: Some(2021),
            jobs: Some(2),
            industry_code: industry,
        }
    }

    /// The example in docs/leads.md, by hand: with the default weights (sum 1.0), features
    /// email 1, phone 1, website 0.9, about 0.5, LinkedIn 0, size ln(11)/ln(201) = 0.4522, age 5/10,
    /// hiring 2/5, industry 1 give 0.20 + 0.10 + 0.135 + 0.025 + 0 + 0.04522 + 0.05 + 0.04 + 0.10 = 0.6952.
    #[test]
    fn a_hand_computed_example() {
        let spec = ScoreSpec::default();
        let emails = vec![("sales@acme.sg".to_owned(), "valid".to_owned())];
        let lead = score(Features::of(&facts(&emails, Some("62011")), &spec, 2026), &spec);
        assert!((lead.score - 0.6952).abs() < 1e-4, "{lead:?}");
        assert_eq!(lead.bucket, "High");
        assert!(lead.rationale.starts_with("High 0.70: verified email +0.20, website +0.14"), "{}", lead.rationale);
        assert!(lead.rationale.ends_with("missing: LinkedIn"), "{}", lead.rationale);
    }

    #[test]
    fn a_feature_that_changes_moves_the_score_and_bucket() {
        let spec = ScoreSpec::default();
        let valid = vec![("a@x.sg".to_owned(), "valid".to_owned())];
        let unverified = vec![("a@x.sg".to_owned(), "unverified".to_owned())];
        let high = score(Features::of(&facts(&valid, Some("62011")), &spec, 2026), &spec);
        let lower = score(Features::of(&facts(&unverified, Some("62011")), &spec, 2026), &spec);
        assert!((high.score - lower.score - 0.10).abs() < 1e-4, "{high:?} {lower:?}");
        assert_eq!(lower.bucket, "Medium");
        let other_industry = score(Features::of(&facts(&valid, Some("47111")), &spec, 2026), &spec);
        assert!((high.score - other_industry.score - 0.10).abs() < 1e-4);
    }

    #[test]
    fn nothing_known_is_low_and_says_so() {
        let spec = ScoreSpec::default();
        let lead = score(Features::of(&Facts::default(), &spec, 2026), &spec);
        assert_eq!((lead.score, lead.bucket), (0.0, "Low"));
        assert!(lead.rationale.starts_with("Low 0.00: nothing known; missing: verified email"), "{}", lead.rationale);
    }

    #[test]
    fn bad_weights_and_cutoffs_are_refused() {
        let mut spec = ScoreSpec::default();
        spec.weights.size = -1.0;
        assert!(spec.validate().is_err());
        let spec = ScoreSpec { medium: 0.8, high: 0.5, ..Default::default() };
        assert!(spec.validate().is_err());
    }

    #[test]
    fn a_batch_takes_whole_companies_up_to_200_distinct_emails() {
        let request = |range: std::ops::Range<usize>| {
            let (reply, _) = tokio::sync::oneshot::channel();
            Request { emails: range.map(|i| format!("e{i}@x.sg")).collect(), reply }
        };
        // 150, then 100 of which 50 are shared with the first (200 distinct together), then 10 more.
        let mut pending: std::collections::VecDeque<Request> =
            [request(0..150), request(100..200), request(200..210)].into_iter().collect();
        let first = take_batch(&mut pending);
        assert_eq!(first.iter().map(|r| r.emails.len()).collect::<Vec<_>>(), [150, 100]);
        let second = take_batch(&mut pending);
        assert_eq!(second.len(), 1);
        assert!(pending.is_empty() && take_batch(&mut pending).is_empty());
        // A company with 200 emails goes alone.
        let mut pending: std::collections::VecDeque<Request> =
            [request(0..200), request(300..301)].into_iter().collect();
        assert_eq!(take_batch(&mut pending).len(), 1);
    }

    #[test]
    fn verified_addresses_come_first_and_undeliverable_ones_go() {
        let e = |a: &str, s: &str| (a.to_owned(), s.to_owned());
        let list = [e("a@x.sg", "unverified"), e("b@x.sg", "invalid"), e("c@x.sg", "valid"), e("d@x.sg", "catch-all")];
        assert_eq!(prefer_verified(&list), ["c@x.sg", "d@x.sg", "a@x.sg"]);
    }
}
