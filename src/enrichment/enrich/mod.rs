//! The enrich stage: for one company, find its website, crawl a few pages politely, extract firmographics,
//! optionally ask an LLM and a contacts endpoint, and return what was found as an [`Enrichment`] for the
//! enrichment sink to persist.
//!
//! It holds no queue, no checkpoint and no database writes of its own: the worker (`enrichment::worker`)
//! decides which companies to enrich and how many at once, the sink (`enrichment::sink`) commits the
//! result. Its only shared state is the crawler's per-host politeness and the LLM token budget, which is
//! counted in the database so that it holds across workers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;
use url::Url;

use crate::enrichment::usage::Usage;
use crate::error::{Error, Result};
use crate::telemetry::metrics::{metrics, ProviderLabel, ProviderNameLabel};

pub mod contacts;
pub mod discover;
pub mod extract;
pub mod http;
pub mod llm;
pub mod phones;
pub mod providers;
pub mod verify;

use extract::{Extracted, PageKind};
use http::{FetchError, Http, HttpSettings, RobotsCache};
use providers::{Provider, Waited};
use verify::Registered;

/// Pages tried at well-known paths when the homepage does not link that kind of page.
const SEEDED_PATHS: &[(PageKind, &str)] =
    &[(PageKind::About, "/about-us"), (PageKind::Contact, "/contact-us"), (PageKind::Careers, "/careers")];

#[derive(Debug, Clone)]
pub struct EnrichSettings {
    /// `CRAWL_MAX_PAGES`, the homepage included.
    pub max_pages: usize,
    /// `ENRICH_SEARCH_URL`: a URL with `{query}`, answering in DuckDuckGo's HTML format.
    pub search_url: Option<String>,
    /// `ENRICH_READER_URL`: a URL with `{url}` returning a page's text, used when a site refuses us (403).
    pub reader_url: Option<String>,
    /// Try `<name>.com.sg`, `.sg`, `.com` when search finds nothing.
    pub probe: bool,
    /// `PERSIST_CRAWL_CORPUS`: keep the merged page text in the history row.
    pub persist_corpus: bool,
    pub corpus_chars: usize,
    pub http: HttpSettings,
    pub llm: Option<llm::LlmSettings>,
    pub llm_daily_tokens: Option<u64>,
    pub contacts: Option<contacts::ContactsSettings>,
    /// `ENRICH_SEARCH_RATE`, `ENRICH_READER_RATE`.
    pub search_rate: Option<crate::config::Rate>,
    pub reader_rate: Option<crate::config::Rate>,
    /// `ENRICH_MIN_CONFIDENCE`.
    pub min_confidence: f64,
    /// `ENRICH_COMPANY_TIMEOUT`.
    pub company_timeout: Duration,
    /// `ENRICH_MAX_CANDIDATES`.
    pub max_candidates: usize,
    /// The `verify` step (`ZEROBOUNCE_*`; on when `ZEROBOUNCE_API_KEY` is set).
    pub verify: Option<crate::enrichment::leads::VerifySettings>,
    /// The `score` step.
    pub score: Option<crate::enrichment::leads::ScoreSpec>,
    /// The `export` step (`ODOO_*`).
    pub export: Option<crate::enrichment::export::OdooSettings>,
}

impl EnrichSettings {
    /// The operator's settings from its pipeline spec; credentials from the environment only.
    pub fn from_spec(spec: &crate::config::EnrichSpec) -> Result<Self> {
        let secret = |names: &[&str]| names.iter().find_map(|n| std::env::var(n).ok()).filter(|v| !v.trim().is_empty());
        let parse =
            |what: &str, v: &str| Url::parse(v).map_err(|e| Error::config(format!("{what} is not a URL ({e})")));
        let llm = match &spec.llm_base_url {
            Some(base) => Some(llm::LlmSettings {
                base_url: parse("LLM_BASE_URL", base)?,
                api_key: secret(&["LLM_API_KEY", "OPENAI_API_KEY"]),
                model: spec.llm_model.clone(),
                max_chunks: spec.llm_max_chunks,
                corpus_chars: spec.corpus_chars,
            }),
            None => None,
        };
        let contacts = match (&spec.contacts_url, spec.contacts) {
            (Some(u), true) => Some(contacts::ContactsSettings {
                url: parse("APIFY_LINKEDIN_URL", u)?,
                token: secret(&["APIFY_TOKEN"]),
                rate: spec.contacts_rate,
                daily_cap: spec.contacts_daily_cap,
            }),
            _ => None,
        };
        Ok(EnrichSettings {
            max_pages: spec.max_pages,
            search_url: spec.search_url.clone(),
            reader_url: spec.reader_url.clone(),
            probe: spec.probe,
            persist_corpus: spec.persist_corpus,
            corpus_chars: spec.corpus_chars,
            http: HttpSettings {
                user_agent: spec.user_agent.clone(),
                timeout: spec.timeout,
                host_spacing: spec.host_spacing,
                max_bytes: spec.max_bytes,
                max_redirects: spec.max_redirects,
                attempts: spec.attempts,
                allow_private: spec.allow_private,
                proxy: spec.proxy.clone(),
                max_retry_after: spec.max_retry_after,
                backoff: Duration::from_millis(200),
            },
            llm,
            llm_daily_tokens: spec.llm_daily_tokens,
            contacts,
            search_rate: spec.search_rate,
            reader_rate: spec.reader_rate,
            min_confidence: spec.min_confidence,
            company_timeout: spec.company_timeout,
            max_candidates: spec.max_candidates,
            verify: match spec
                .zerobounce_api_key
                .clone()
                .or_else(|| secret(&["ZEROBOUNCE_API_KEY"]).map(crate::config::Secret::new))
            {
                Some(api_key) => Some(crate::enrichment::leads::VerifySettings {
                    base_url: parse("ZEROBOUNCE_URL", &spec.zerobounce_url)?,
                    api_key,
                    daily_cap: spec.zerobounce_max_verifications,
                    recheck_days: spec.zerobounce_recheck_days,
                    batch_rate: spec.zerobounce_batch_rate,
                    timeout: spec.timeout,
                }),
                None => None,
            },
            score: spec.score.clone(),
            export: match &spec.odoo_url {
                Some(u) => {
                    let key =
                        spec.odoo_api_key.clone().or_else(|| secret(&["ODOO_API_KEY"]).map(crate::config::Secret::new));
                    let Some(api_key) = key else {
                        return Err(Error::config("ODOO_URL is set but ODOO_API_KEY is not (environment only)"));
                    };
                    Some(crate::enrichment::export::OdooSettings {
                        url: parse("ODOO_URL", u)?,
                        db: spec.odoo_db.clone().unwrap_or_default(),
                        username: spec.odoo_username.clone().unwrap_or_default(),
                        api_key,
                        min_score: spec.score_min_export,
                        create_leads: spec.odoo_create_leads,
                        backoff: spec.odoo_retry_backoff,
                        max_attempts: spec.odoo_max_attempts,
                        timeout: spec.timeout.max(Duration::from_secs(10)),
                        poll: spec.poll_interval,
                        lease: spec.lease,
                        rate: spec.odoo_rate,
                    })
                }
                None => None,
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Status {
    #[default]
    Ok,
    /// Finished with less than the full result (no website, robots, a fallback, the LLM failed).
    Degraded,
    /// The website could not be read.
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Degraded => "degraded",
            Status::Failed => "failed",
        }
    }
}

/// One company's enrichment, persisted by the sink (companies fields + one history row).
#[derive(Debug, Clone, Default)]
pub struct Enrichment {
    pub status: Status,
    /// Why it is degraded or failed; never holds a credential.
    pub error: Option<String>,
    /// A failure that may pass (a timeout, a refused connection, HTTP 429 or 5xx): the job is retried.
    /// Other failures (not HTML, refused by the guard, a redirect loop) are final.
    pub transient: bool,
    pub website_domain: Option<String>,
    /// known, search or probe.
    pub domain_source: Option<&'static str>,
    /// How sure the verifier is that the website is the company's (0 to 1), and why.
    pub domain_confidence: Option<f64>,
    pub domain_evidence: Vec<&'static str>,
    /// The HQ postal code the site gives.
    pub hq_postal: Option<String>,
    /// What the crawl had to work around (an https site read over http, a meta refresh, the reader).
    pub notes: Vec<String>,
    pub about_text: Option<String>,
    pub public_emails: Vec<String>,
    pub phones: Vec<String>,
    pub linkedin_url: Option<String>,
    pub hq_city: Option<String>,
    pub hq_country: Option<String>,
    pub tech_stack: Vec<String>,
    pub jobs_count: Option<i32>,
    pub employees_est: Option<i32>,
    pub revenue_bucket: Option<String>,
    pub pages_fetched: i32,
    pub llm_tokens: i64,
    pub corpus: Option<String>,
    pub contacts: Vec<contacts::Contact>,
    pub duration: Duration,
    /// Each email with its verification status (`unverified` without the `verify` step).
    pub email_status: Vec<(String, String)>,
    /// The `score` step's result.
    pub lead: Option<crate::enrichment::leads::Lead>,
}

impl Enrichment {
    fn degrade(&mut self, why: impl Into<String>) {
        if self.status == Status::Ok {
            self.status = Status::Degraded;
        }
        let why = why.into();
        self.error = Some(match self.error.take() {
            Some(prev) => format!("{prev}; {why}"),
            None => why,
        });
    }

    fn fail(&mut self, error: &FetchError) {
        self.status = Status::Failed;
        self.error = Some(error.to_string());
        self.transient = error.is_retryable();
    }
}

/// PRD 02's per-job overrides, carried by a job (`acraflow refresh --force --max-pages N --no-llm`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobOptions {
    /// Find the website again, ignoring the domain the company already has.
    pub force: bool,
    /// Pages to fetch at most, the homepage included (instead of `CRAWL_MAX_PAGES`).
    pub max_pages: Option<usize>,
    /// `Some(false)`: no LLM call for this job.
    pub llm: Option<bool>,
}

/// The enrich stage, shared by a worker's concurrent jobs.
pub struct Enricher {
    settings: EnrichSettings,
    http: Http,
    tokens: Usage,
    search: Provider,
    reader: Provider,
    verifier: Option<crate::enrichment::leads::Verifier>,
    /// The contacts provider's daily cap and pace (both across workers).
    lookups: Usage,
    contacts_pace: Option<crate::enrichment::usage::Pacing>,
}

impl Enricher {
    /// `tokens` counts LLM tokens against `OPENAI_DAILY_TOKENS_CAP`, in the database.
    pub fn new(settings: EnrichSettings, tokens: Usage) -> Result<Arc<Self>> {
        let http = Http::new(settings.http.clone())?;
        let search = Provider::new("search", settings.search_rate, tokens.client());
        let reader = Provider::new("reader", settings.reader_rate, tokens.client());
        let verifier = match &settings.verify {
            Some(v) => Some(crate::enrichment::leads::Verifier::new(v.clone(), tokens.client())?),
            None => None,
        };
        let contacts = settings.contacts.as_ref();
        let lookups = Usage::new(tokens.client(), contacts::LOOKUPS, contacts.and_then(|c| c.daily_cap));
        let contacts_pace =
            contacts.and_then(|c| c.rate).map(|r| crate::enrichment::usage::Pacing::new("contacts", r.interval()));
        Ok(Arc::new(Enricher { settings, http, tokens, search, reader, verifier, lookups, contacts_pace }))
    }

    /// One contacts lookup's place in the budget: today's cap, then its turn in the pace (a wait that moves
    /// the company's deadline). `Err` says why there is no lookup.
    async fn contacts_turn(&self, waited: &Waited) -> std::result::Result<(), String> {
        match self.lookups.try_take(1).await {
            Ok(true) => {}
            Ok(false) => return Err("contacts: APIFY_MAX_LOOKUPS reached for today".into()),
            Err(e) => return Err(format!("contacts: {e}")),
        }
        if let Some(pace) = &self.contacts_pace {
            let started = Instant::now();
            let turn = pace.wait_turn(&self.tokens.client()).await;
            waited.add(started.elapsed());
            metrics()
                .provider_wait
                .get_or_create(&ProviderNameLabel { provider: "contacts" })
                .inc_by(started.elapsed().as_secs_f64());
            if let Err(e) = turn {
                self.lookups.adjust(-1).await;
                return Err(format!("contacts: {e}"));
            }
        }
        Ok(())
    }

    /// Whether the steps after the crawl wait on anything (the email verifier's batches).
    pub fn verifies(&self) -> bool {
        self.verifier.is_some()
    }

    /// The steps after `enrich`: each email's verification status (sales-facing order: verified first),
    /// then the lead score. A failed enrichment gets neither. The worker runs them apart from the crawl:
    /// a company waiting for the verifier's next batch holds no crawl slot.
    pub async fn leads(self: Arc<Self>, company: Company, mut out: Enrichment) -> Enrichment {
        let span = tracing::info_span!("company", company_id = company.id, uen = company.uen.as_deref().unwrap_or(""));
        async {
            if let (Some(v), false) = (&self.verifier, out.status == Status::Failed) {
                out.email_status = v.verify(&out.public_emails).await;
                out.public_emails = crate::enrichment::leads::prefer_verified(&out.email_status);
                tracing::info!(target: crate::telemetry::COMPANY, stage = "verify_email",
                    verified = out.email_status.iter().filter(|(_, s)| s == "valid").count(),
                    emails = out.email_status.len(), "verified");
            }
            self.score(&company, &mut out);
        }
        .instrument(span)
        .await;
        out
    }

    /// The `score` step (no I/O): emails not verified are `unverified`.
    pub fn score(&self, company: &Company, out: &mut Enrichment) {
        use crate::enrichment::leads;
        if out.status == Status::Failed {
            return;
        }
        if self.verifier.is_none() {
            out.email_status = out.public_emails.iter().map(|e| (e.clone(), "unverified".to_owned())).collect();
        }
        if let Some(spec) = &self.settings.score {
            let facts = leads::Facts {
                emails: &out.email_status,
                phones: out.phones.len(),
                website_confidence: out.website_domain.as_ref().and(out.domain_confidence),
                about_chars: out.about_text.as_deref().map_or(0, |a| a.chars().count()),
                linkedin: out.linkedin_url.is_some(),
                employees: out.employees_est,
                incorporation_year: company.incorporation_year,
                jobs: out.jobs_count,
                industry_code: company.industry_code.as_deref(),
            };
            let this_year = chrono::Datelike::year(&chrono::Utc::now());
            let lead = leads::score(leads::Features::of(&facts, spec, this_year), spec);
            tracing::info!(target: crate::telemetry::COMPANY, stage = "score", score = lead.score,
                bucket = lead.bucket, "scored");
            out.lead = Some(lead);
        }
    }

    /// One company's enrichment, in its `company` span. The span's stage events follow PRD 20:
    /// `find_domain`, `crawl`, `extract`, `chunks`, `llm_extract`, `contacts`; the worker logs `select`
    /// before and the sink `persist` and `summary` after its commit.
    pub async fn enrich(self: Arc<Self>, company: Company, options: JobOptions) -> Enrichment {
        let span = tracing::info_span!("company", company_id = company.id, uen = company.uen.as_deref().unwrap_or(""));
        async move {
            let _in_flight = InFlight::start();
            let started = Instant::now();
            let mut out = Enrichment::default();
            let waited = Waited::default();
            let limit = self.settings.company_timeout;
            let over = {
                let stages = run_stages(&self, &company, options, &mut out, &waited);
                tokio::pin!(stages);
                loop {
                    // The deadline moves by the time spent waiting for providers' budgets.
                    let until = started + limit + waited.get();
                    tokio::select! {
                        () = &mut stages => break false,
                        () = tokio::time::sleep_until(until.into()) => {
                            if Instant::now() >= started + limit + waited.get() {
                                break true;
                            }
                        }
                    }
                }
            };
            if over {
                tracing::warn!(stage = "enriched", timeout_ms = limit.as_millis() as u64, "company deadline passed");
                out = Enrichment {
                    status: Status::Failed,
                    error: Some(format!(
                        "gave up after ENRICH_COMPANY_TIMEOUT ({}) with the crawl unfinished",
                        humantime::format_duration(limit)
                    )),
                    transient: true,
                    pages_fetched: out.pages_fetched,
                    ..Default::default()
                };
            }
            out.duration = started.elapsed();
            tracing::debug!(
                stage = "enriched",
                status = out.status.as_str(),
                pages = out.pages_fetched,
                duration_ms = out.duration.as_millis() as u64,
                "done"
            );
            out
        }
        .instrument(span)
        .await
    }
}

#[derive(Debug, Clone, Default)]
pub struct Company {
    pub id: i64,
    pub name: String,
    pub uen: Option<String>,
    pub known_domain: Option<String>,
    /// From the company's latest staging row: what a website is verified against.
    pub postal_code: Option<String>,
    pub street: Option<String>,
    pub building: Option<String>,
    pub former_names: Vec<String>,
    /// From `companies`: what the lead score weighs.
    pub incorporation_year: Option<i32>,
    pub industry_code: Option<String>,
}

impl Company {
    pub fn registered(&self) -> Registered {
        Registered {
            name: self.name.clone(),
            uen: self.uen.clone(),
            postal_code: self.postal_code.clone(),
            street: self.street.clone(),
            building: self.building.clone(),
            former_names: self.former_names.clone(),
        }
    }
}

/// Counts an enrichment in `acra_direct_enrichments_in_flight` while it lives (also when it is aborted).
struct InFlight;

impl InFlight {
    fn start() -> Self {
        metrics().in_flight.inc();
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics().in_flight.dec();
    }
}

/// Emails and phones kept per company at most (the site's own domain first).
const MAX_EMAILS: usize = 20;
const MAX_PHONES: usize = 10;
/// A candidate this sure needs no rival checked.
const CERTAIN: f64 = 0.9;

async fn run_stages(ctx: &Enricher, company: &Company, options: JobOptions, out: &mut Enrichment, waited: &Waited) {
    let mut robots = RobotsCache::default();
    let reg = company.registered();
    let site = match find_site(ctx, company, &reg, options.force, out, &mut robots, waited).await {
        Ok(site) => site,
        Err(e) => {
            tracing::info!(target: crate::telemetry::COMPANY, stage = "find_domain", error = %e, "failed");
            out.fail(&e);
            return;
        }
    };
    let Some(site) = site else { return };

    // crawl: the rest of the site (about/contact/careers, linked from the homepage by path or text, else
    // at seeded paths).
    tracing::info!(target: crate::telemetry::COMPANY,
        stage = "find_domain",
        source = site.source,
        domain = site.home.host_str().unwrap_or(""),
        confidence = site.verdict.confidence,
        "candidate"
    );
    tracing::info!(target: crate::telemetry::COMPANY, stage = "crawl", page = "home", url = %http::strip(&site.home), links = site.home_x.links.len(), "fetched");
    let mut pages: Vec<(PageKind, Extracted)> = vec![(PageKind::Home, site.home_x)];
    if let Some(why) = &site.via_reader {
        out.degrade(why.clone());
    } else {
        for (kind, url) in crawl_plan(&site.home, &pages[0].1, options.max_pages.unwrap_or(ctx.settings.max_pages)) {
            match fetch_counted(ctx, &url, &mut robots, out).await {
                Ok(page) => {
                    let x = extract_off_runtime(page.body, page.url.clone(), kind).await;
                    tracing::info!(target: crate::telemetry::COMPANY, stage = "crawl", page = %format!("{kind:?}").to_lowercase(), url = %http::strip(&page.url), "fetched");
                    pages.push((kind, x));
                }
                Err(FetchError::Status { status: 404 | 410, .. }) | Err(FetchError::Robots(_)) => {}
                Err(e) => out.degrade(format!("{kind:?} page: {e}")),
            }
        }
    }

    // verify again over every page read: the evidence may sit on the contact page.
    let host = site.home.host_str().unwrap_or("").to_ascii_lowercase();
    let all: Vec<&Extracted> = pages.iter().map(|(_, x)| x).collect();
    let verdict = verify::verify(&reg, &all, site.domain_name, site.listing);
    let domain = host.trim_start_matches("www.").to_owned();
    if !verdict.passes(ctx.settings.min_confidence) {
        tracing::info!(target: crate::telemetry::COMPANY, stage = "verify", domain, confidence = verdict.confidence, "not verified");
        out.degrade(format!(
            "no website verified: {domain} scored {:.2} ({}) below ENRICH_MIN_CONFIDENCE {}",
            verdict.confidence,
            evidence_text(&verdict),
            ctx.settings.min_confidence
        ));
        return;
    }
    tracing::info!(target: crate::telemetry::COMPANY, stage = "verify", source = site.source, domain, confidence = verdict.confidence, evidence = %verdict.evidence.join(","), "verified");
    out.website_domain = Some(domain.clone());
    out.domain_source = Some(site.source);
    out.domain_confidence = Some(verdict.confidence);
    out.domain_evidence = verdict.evidence;

    // extract: merge what the pages say.
    let by_kind = |k: PageKind| pages.iter().find(|(pk, _)| *pk == k).map(|(_, x)| x);
    let mut emails = std::collections::BTreeSet::new();
    let mut phones = std::collections::BTreeSet::new();
    let mut tech = std::collections::BTreeSet::new();
    for (_, x) in &pages {
        emails.extend(x.emails.iter().cloned());
        phones.extend(x.phones.iter().cloned());
        tech.extend(x.tech.iter().map(|t| t.to_string()));
        out.linkedin_url = out.linkedin_url.take().or_else(|| x.linkedin_url.clone());
        out.hq_postal = out.hq_postal.take().or_else(|| x.hq_postal.clone());
    }
    if out.hq_postal.is_some() {
        out.hq_city = Some("Singapore".into());
        out.hq_country = Some("Singapore".into());
    }
    out.public_emails = extract::rank_emails(&emails, &domain);
    out.public_emails.truncate(MAX_EMAILS);
    // Singapore numbers first, then the rest, each in order.
    let (mut sg, mut abroad): (Vec<String>, Vec<String>) = phones.into_iter().partition(|p| phones::is_singapore(p));
    sg.append(&mut abroad);
    sg.truncate(MAX_PHONES);
    out.phones = sg;
    out.tech_stack = tech.into_iter().collect();
    out.jobs_count = by_kind(PageKind::Careers).and_then(|x| x.jobs_count).map(|n| n as i32);
    out.about_text = extract::about_text(by_kind(PageKind::About), by_kind(PageKind::Home));
    let corpus = extract::truncate_chars(
        &pages.iter().map(|(_, x)| x.text.as_str()).filter(|t| !t.is_empty()).collect::<Vec<_>>().join("\n\n"),
        ctx.settings.corpus_chars,
    );
    tracing::info!(target: crate::telemetry::COMPANY,
        stage = "extract",
        emails = out.public_emails.len(),
        phones = out.phones.len(),
        tech = out.tech_stack.len(),
        corpus_chars = corpus.len(),
        "extracted"
    );

    if let Some(settings) = ctx.settings.llm.as_ref().filter(|_| options.llm != Some(false)) {
        let pieces = llm::chunks(&corpus, settings.max_chunks, settings.corpus_chars);
        tracing::info!(target: crate::telemetry::COMPANY, stage = "chunks", chunks = pieces.len(), chars = corpus.len(), "corpus chunked");
        match llm::extract(&ctx.http, settings, &ctx.tokens, &company.name, &corpus).await {
            Ok(answer) => {
                tracing::info!(target: crate::telemetry::COMPANY, stage = "llm_extract", chunks = answer.chunks, tokens = answer.tokens, "answered");
                out.employees_est = answer.employees_est;
                out.revenue_bucket = answer.revenue_bucket;
                out.llm_tokens = answer.tokens as i64;
                if answer.about.is_some() {
                    out.about_text = answer.about;
                }
            }
            Err(why) => {
                tracing::warn!(stage = "llm_extract", error = %why, "degraded");
                out.degrade(why);
            }
        }
    }
    if let Some(settings) = &ctx.settings.contacts {
        let found = match ctx.contacts_turn(waited).await {
            Ok(()) => {
                let found =
                    contacts::fetch(&ctx.http, settings, &company.name, Some(&domain), out.linkedin_url.as_deref())
                        .await;
                let outcome = if found.is_ok() { "ok" } else { "error" };
                metrics().provider_calls.get_or_create(&ProviderLabel { provider: "contacts", outcome }).inc();
                if found.is_err() {
                    // Not answered, so not spent.
                    ctx.lookups.adjust(-1).await;
                }
                found
            }
            Err(why) => Err(why),
        };
        match found {
            Ok(people) => {
                tracing::info!(target: crate::telemetry::COMPANY, stage = "contacts", contacts = people.len(), "found");
                out.contacts = people;
            }
            Err(why) => out.degrade(why),
        }
    }
    if ctx.settings.persist_corpus {
        out.corpus = Some(corpus);
    }
}

fn evidence_text(v: &verify::Verdict) -> String {
    if v.evidence.is_empty() {
        "no evidence".into()
    } else {
        v.evidence.join(", ")
    }
}

/// Extraction is CPU work: it runs on the blocking pool, never on the async runtime's workers.
async fn extract_off_runtime(body: String, url: Url, kind: PageKind) -> Extracted {
    let started = Instant::now();
    let x = tokio::task::spawn_blocking(move || extract::page(&body, &url, kind)).await.unwrap_or_default();
    metrics().extract_pages.inc();
    metrics().extract_seconds.inc_by(started.elapsed().as_secs_f64());
    x
}

/// The pages after the homepage: for each kind, its first link on the homepage, else its seeded path.
fn crawl_plan(home: &Url, x: &Extracted, max_pages: usize) -> Vec<(PageKind, Url)> {
    let mut plan = Vec::new();
    for (kind, seeded) in SEEDED_PATHS {
        let linked = x.links.iter().find(|(k, _)| k == kind).map(|(_, u)| u.clone());
        if let Some(url) = linked.or_else(|| home.join(seeded).ok()) {
            if url.path() != home.path() && !plan.iter().any(|(_, u)| *u == url) {
                plan.push((*kind, url));
            }
        }
    }
    plan.truncate(max_pages.saturating_sub(1));
    plan
}

async fn fetch_counted(
    ctx: &Enricher,
    url: &Url,
    robots: &mut RobotsCache,
    out: &mut Enrichment,
) -> std::result::Result<http::Page, FetchError> {
    let page = ctx.http.page(url, robots).await;
    if page.is_ok() {
        out.pages_fetched += 1;
    }
    page
}

/// A candidate site, fetched and verified on its homepage.
struct Site {
    /// The homepage's final URL (after redirects, a meta refresh, or https -> http).
    home: Url,
    home_x: Extracted,
    source: &'static str,
    domain_name: bool,
    listing: bool,
    verdict: verify::Verdict,
    /// Read through the reader (the site refused us: why): there is nothing more to crawl.
    via_reader: Option<String>,
}

/// find_domain: the known domain, then search results, then the probe's guesses, each fetched and
/// verified against the registry; the best verified one wins (rank breaks ties) and the search stops at
/// a certain one, the probe at the first verified one. `Ok(None)`: no website, with the reason recorded
/// on `out`. `Err`: a failure that may pass (the search provider refused, the only candidate timed out).
async fn find_site(
    ctx: &Enricher,
    company: &Company,
    reg: &Registered,
    force: bool,
    out: &mut Enrichment,
    robots: &mut RobotsCache,
    waited: &Waited,
) -> std::result::Result<Option<Site>, FetchError> {
    let threshold = ctx.settings.min_confidence;
    let tokens = discover::name_tokens(&company.name);
    let mut best: Option<Site> = None;
    let mut tried: Vec<String> = Vec::new();
    let mut failure: Option<FetchError> = None;
    let consider = |site: Site, best: &mut Option<Site>, tried: &mut Vec<String>| {
        let host = site.home.host_str().unwrap_or("").to_owned();
        tried.push(match site.verdict.rejected {
            Some(why) => format!("{host} ({why})"),
            None => format!("{host} ({:.2})", site.verdict.confidence),
        });
        if site.verdict.rejected.is_none()
            && best.as_ref().is_none_or(|b| site.verdict.confidence > b.verdict.confidence)
        {
            *best = Some(site);
        }
    };

    if let Some(domain) = company.known_domain.as_deref().filter(|d| !force && !d.trim().is_empty()) {
        let text = if domain.contains("://") { domain.to_owned() } else { format!("http://{}/", domain.trim()) };
        if let Ok(url) = Url::parse(&text) {
            let domain_name = discover::score(url.host_str().unwrap_or(""), &tokens) >= 0.5;
            // The stored domain has no `www.`: a site that answers only at `www.` is tried there too.
            let www = url.host_str().filter(|h| !h.starts_with("www.")).and_then(|h| {
                let mut u = url.clone();
                u.set_host(Some(&format!("www.{h}"))).ok().map(|()| u)
            });
            match (try_site(ctx, &url, "known", domain_name, false, reg, robots, out, waited).await, &www) {
                (Ok(site), _) => consider(site, &mut best, &mut tried),
                (Err(e @ (FetchError::Connect(_) | FetchError::Status { .. })), Some(www)) => {
                    match try_site(ctx, www, "known", domain_name, false, reg, robots, out, waited).await {
                        Ok(site) => consider(site, &mut best, &mut tried),
                        Err(_) => unreadable(&url, e, &mut tried, &mut failure),
                    }
                }
                (Err(e), _) => unreadable(&url, e, &mut tried, &mut failure),
            }
            if best.as_ref().is_some_and(|b| b.verdict.passes(threshold)) {
                return Ok(best);
            }
        }
    }
    if let Some(template) = &ctx.settings.search_url {
        let query = format!("{} singapore", tokens.join(" "));
        let encoded: String = url::form_urlencoded::byte_serialize(query.as_bytes()).collect();
        match Url::parse(&template.replace("{query}", &encoded)) {
            Ok(search) => {
                // A refusal that outlasts the retries fails the company for now: never "no website".
                let results = ctx.search.search(&ctx.http, &search, waited).await?;
                let found = discover::candidates(&results, reg, ctx.settings.max_candidates);
                tracing::debug!(stage = "find_domain", results = results.len(), candidates = found.len(), "searched");
                for c in found {
                    if let Err(e) = ctx.http.guard(&c.home) {
                        tracing::warn!(stage = "find_domain", error = %e, "search result refused");
                        unreadable(&c.home, e, &mut tried, &mut failure);
                        continue;
                    }
                    match try_site(ctx, &c.home, "search", c.domain_name, c.listing, reg, robots, out, waited).await {
                        Ok(site) => consider(site, &mut best, &mut tried),
                        Err(e) => unreadable(&c.home, e, &mut tried, &mut failure),
                    }
                    if best.as_ref().is_some_and(|b| b.verdict.confidence >= CERTAIN) {
                        break;
                    }
                }
            }
            Err(e) => out.degrade(format!("ENRICH_SEARCH_URL does not make a URL ({e})")),
        }
        if best.as_ref().is_some_and(|b| b.verdict.passes(threshold)) {
            return Ok(best);
        }
    }
    if ctx.settings.probe {
        for candidate in discover::candidate_domains(&company.name) {
            let Ok(url) = Url::parse(&format!("http://{candidate}/")) else { continue };
            // A guess that does not answer says nothing: its errors are not the company's.
            match try_site(ctx, &url, "probe", true, false, reg, robots, out, waited).await {
                Ok(site) => consider(site, &mut best, &mut tried),
                Err(e) => tracing::debug!(stage = "find_domain", domain = %candidate, error = %e, "probe failed"),
            }
            if best.as_ref().is_some_and(|b| b.verdict.passes(threshold)) {
                return Ok(best);
            }
        }
    }
    // The best candidate short of the threshold gets its other pages read: the evidence may be there.
    if let Some(site) = best.filter(|b| b.verdict.confidence >= threshold / 2.0) {
        return Ok(Some(site));
    }
    // The candidates that could not be read decide: the company failed (retried when it may pass).
    if let Some(e) = failure {
        return Err(e);
    }
    let reason = if tried.is_empty() {
        "no website found".to_owned()
    } else {
        format!("no website verified; tried {}", tried.join(", "))
    };
    tracing::info!(target: crate::telemetry::COMPANY, stage = "find_domain", reason, "no website");
    out.degrade(reason);
    Ok(None)
}

/// Records a candidate that could not be read. A host with nothing at `/` (404, 410) or whose robots.txt
/// refuses us is simply not a site we can use; any other failure (a timeout or 5xx, retried; a page that is
/// not HTML, an address the guard refuses) fails the company with its cause.
fn unreadable(url: &Url, e: FetchError, tried: &mut Vec<String>, failure: &mut Option<FetchError>) {
    tried.push(format!("{} ({e})", url.host_str().unwrap_or("")));
    let not_a_site = matches!(e, FetchError::Robots(_) | FetchError::Status { status: 404 | 410, .. });
    if !not_a_site {
        failure.get_or_insert(e);
    }
}

/// Fetches a candidate's homepage (https falling back to http once when the connection itself fails,
/// then a `<meta http-equiv="refresh">`, the reader when the site refuses us) and verifies it.
#[allow(clippy::too_many_arguments)]
async fn try_site(
    ctx: &Enricher,
    url: &Url,
    source: &'static str,
    domain_name: bool,
    listing: bool,
    reg: &Registered,
    robots: &mut RobotsCache,
    out: &mut Enrichment,
    waited: &Waited,
) -> std::result::Result<Site, FetchError> {
    let page = match fetch_counted(ctx, url, robots, out).await {
        Err(FetchError::Connect(_)) if url.scheme() == "https" => {
            let mut plain = url.clone();
            let _ = plain.set_scheme("http");
            let page = fetch_counted(ctx, &plain, robots, out).await?;
            out.notes.push(format!("could not connect to {} over https; read over http", http::strip(url)));
            page
        }
        Err(e @ FetchError::Status { status: 401 | 403, .. }) => {
            // A reader that refuses for now (its budget, a bot check) fails the company for now too.
            let Some(text) = read_via_reader(ctx, url, waited).await? else { return Err(e) };
            out.pages_fetched += 1;
            let why = format!("{e}; read through ENRICH_READER_URL");
            out.notes.push(why.clone());
            let paragraphs: String = text.lines().map(|l| format!("<p>{}</p>", escape(l))).collect();
            let html = format!("<html><body>{paragraphs}</body></html>");
            let home_x = extract_off_runtime(html, url.clone(), PageKind::Home).await;
            let verdict = verify::verify(reg, &[&home_x], domain_name, listing);
            let via_reader = Some(why);
            return Ok(Site { home: url.clone(), home_x, source, domain_name, listing, verdict, via_reader });
        }
        other => other?,
    };
    let mut home = page.url.clone();
    let mut home_x = extract_off_runtime(page.body, page.url, PageKind::Home).await;
    for _ in 0..2 {
        let Some(target) = home_x.refresh.take().filter(|t| *t != home) else { break };
        let next = fetch_counted(ctx, &target, robots, out).await?;
        out.notes.push(format!("{} refreshes to {}", http::strip(&home), http::strip(&next.url)));
        home = next.url.clone();
        home_x = extract_off_runtime(next.body, next.url, PageKind::Home).await;
    }
    // The final host is what is judged (a redirect may lead elsewhere).
    let tokens = discover::name_tokens(&reg.name);
    let domain_name = domain_name && discover::score(home.host_str().unwrap_or(""), &tokens) >= 0.5;
    let verdict = verify::verify(reg, &[&home_x], domain_name, listing);
    tracing::debug!(stage = "find_domain", source, url = %http::strip(&home), confidence = verdict.confidence, evidence = %verdict.evidence.join(","), "candidate");
    Ok(Site { home, home_x, source, domain_name, listing, verdict, via_reader: None })
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The reader fallback for a site that refuses us (401/403): its text through `ENRICH_READER_URL`.
/// `Ok(None)`: no reader, or it has no text for the page; `Err`: it refused for a reason that may pass.
async fn read_via_reader(
    ctx: &Enricher,
    url: &Url,
    waited: &Waited,
) -> std::result::Result<Option<String>, FetchError> {
    let Some(template) = ctx.settings.reader_url.as_deref() else { return Ok(None) };
    let Ok(reader) = Url::parse(&template.replace("{url}", url.as_str())) else { return Ok(None) };
    match ctx.reader.read(&ctx.http, &reader, waited).await {
        Ok(text) if !text.trim().is_empty() => Ok(Some(text)),
        Err(e) if e.is_retryable() => Err(e),
        _ => Ok(None),
    }
}
