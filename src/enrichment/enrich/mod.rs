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
use crate::telemetry::metrics::metrics;

pub mod contacts;
pub mod discover;
pub mod extract;
pub mod http;
pub mod llm;

use extract::{Extracted, PageKind};
use http::{FetchError, Http, HttpSettings, RobotsCache};

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
}

impl Enricher {
    /// `tokens` counts LLM tokens against `OPENAI_DAILY_TOKENS_CAP`, in the database.
    pub fn new(settings: EnrichSettings, tokens: Usage) -> Result<Arc<Self>> {
        let http = Http::new(settings.http.clone())?;
        Ok(Arc::new(Enricher { settings, http, tokens }))
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
            run_stages(&self, &company, options, &mut out).await;
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

#[derive(Debug, Clone)]
pub struct Company {
    pub id: i64,
    pub name: String,
    pub uen: Option<String>,
    pub known_domain: Option<String>,
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

async fn run_stages(ctx: &Enricher, company: &Company, options: JobOptions, out: &mut Enrichment) {
    let mut robots = RobotsCache::default();
    let Some((home_url, home_page)) = find_domain(ctx, company, options.force, out, &mut robots).await else {
        out.degrade("no website found");
        return;
    };
    out.website_domain = home_url.host_str().map(|h| h.trim_start_matches("www.").to_ascii_lowercase());

    // crawl: the homepage, then about/contact/careers (linked from the homepage, else at seeded paths).
    let home = match home_page {
        Some(page) => Ok(page),
        None => fetch_counted(ctx, &home_url, &mut robots, out).await,
    };
    let home = match home {
        Ok(page) => page,
        Err(e @ FetchError::Robots(_)) => {
            out.degrade(e.to_string());
            return;
        }
        Err(e) => match read_via_reader(ctx, &home_url, &e, out).await {
            Some(text) => {
                out.about_text = Some(extract::truncate_chars(&text, 1_000));
                return;
            }
            None => {
                out.fail(&e);
                return;
            }
        },
    };
    let home_x = extract::page(&home.body, &home.url, PageKind::Home);
    tracing::info!(stage = "crawl", page = "home", url = %http::strip(&home.url), links = home_x.links.len(), truncated = home.truncated, "fetched");
    let mut pages: Vec<(PageKind, Extracted)> = vec![(PageKind::Home, home_x)];
    for (kind, url) in crawl_plan(&home.url, &pages[0].1, options.max_pages.unwrap_or(ctx.settings.max_pages)) {
        match fetch_counted(ctx, &url, &mut robots, out).await {
            Ok(page) => {
                let x = extract::page(&page.body, &page.url, kind);
                tracing::info!(stage = "crawl", page = ?kind, url = %http::strip(&page.url), "fetched");
                pages.push((kind, x));
            }
            Err(FetchError::Status { status: 404 | 410, .. }) | Err(FetchError::Robots(_)) => {}
            Err(e) => out.degrade(format!("{kind:?} page: {e}")),
        }
    }

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
        if out.hq_city.is_none() {
            out.hq_city.clone_from(&x.hq_city);
            out.hq_country.clone_from(&x.hq_country);
        }
    }
    let domain = out.website_domain.clone().unwrap_or_default();
    out.public_emails = extract::rank_emails(&emails, &domain);
    out.phones = phones.into_iter().collect();
    out.tech_stack = tech.into_iter().collect();
    out.jobs_count = by_kind(PageKind::Careers).and_then(|x| x.jobs_count).map(|n| n as i32);
    out.about_text = extract::about_text(by_kind(PageKind::About), by_kind(PageKind::Home));
    let corpus = extract::truncate_chars(
        &pages.iter().map(|(_, x)| x.text.as_str()).filter(|t| !t.is_empty()).collect::<Vec<_>>().join("\n\n"),
        ctx.settings.corpus_chars,
    );
    tracing::info!(
        stage = "extract",
        emails = out.public_emails.len(),
        phones = out.phones.len(),
        tech = out.tech_stack.len(),
        corpus_chars = corpus.len(),
        "extracted"
    );

    if let Some(settings) = ctx.settings.llm.as_ref().filter(|_| options.llm != Some(false)) {
        let pieces = llm::chunks(&corpus, settings.max_chunks, settings.corpus_chars);
        tracing::info!(stage = "chunks", chunks = pieces.len(), chars = corpus.len(), "corpus chunked");
        match llm::extract(&ctx.http, settings, &ctx.tokens, &company.name, &corpus).await {
            Ok(answer) => {
                tracing::info!(stage = "llm_extract", chunks = answer.chunks, tokens = answer.tokens, "answered");
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
        match contacts::fetch(&ctx.http, settings, &company.name, Some(&domain), out.linkedin_url.as_deref()).await {
            Ok(people) => {
                tracing::info!(stage = "contacts", contacts = people.len(), "found");
                out.contacts = people;
            }
            Err(why) => out.degrade(why),
        }
    }
    if ctx.settings.persist_corpus {
        out.corpus = Some(corpus);
    }
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

/// find_domain: the known domain, else search, else the heuristic probe. Returns the homepage URL and,
/// when the probe already fetched it, the page.
async fn find_domain(
    ctx: &Enricher,
    company: &Company,
    force: bool,
    out: &mut Enrichment,
    robots: &mut RobotsCache,
) -> Option<(Url, Option<http::Page>)> {
    if let Some(domain) = company.known_domain.as_deref().filter(|d| !force && !d.trim().is_empty()) {
        let text = if domain.contains("://") { domain.to_owned() } else { format!("http://{}/", domain.trim()) };
        if let Ok(url) = Url::parse(&text) {
            out.domain_source = Some("known");
            tracing::info!(stage = "find_domain", source = "known", domain, "found");
            return Some((url, None));
        }
    }
    if let Some(template) = &ctx.settings.search_url {
        let query = format!("{} singapore", discover::name_tokens(&company.name).join(" "));
        let encoded: String = url::form_urlencoded::byte_serialize(query.as_bytes()).collect();
        match Url::parse(&template.replace("{query}", &encoded)) {
            Ok(search) => match ctx.http.get_text(&search).await {
                Ok(html) => {
                    let results = discover::parse_search(&html);
                    if let Some(url) = discover::best_result(&results, &company.name) {
                        match ctx.http.guard(&url) {
                            Ok(()) => {
                                out.domain_source = Some("search");
                                tracing::info!(
                                    stage = "find_domain",
                                    source = "search",
                                    results = results.len(),
                                    domain = url.host_str().unwrap_or(""),
                                    "found"
                                );
                                return Some((url, None));
                            }
                            Err(e) => {
                                tracing::warn!(stage = "find_domain", error = %e, "search result refused");
                                out.degrade(e.to_string());
                            }
                        }
                    }
                }
                Err(e) => out.degrade(format!("search: {e}")),
            },
            Err(e) => out.degrade(format!("ENRICH_SEARCH_URL does not make a URL ({e})")),
        }
    }
    if ctx.settings.probe {
        for candidate in discover::candidate_domains(&company.name) {
            let Ok(url) = Url::parse(&format!("http://{candidate}/")) else { continue };
            match fetch_counted(ctx, &url, robots, out).await {
                Ok(page) if discover::mentions(&page.body, &company.name, company.uen.as_deref()) => {
                    out.domain_source = Some("probe");
                    tracing::info!(stage = "find_domain", source = "probe", domain = %candidate, "found");
                    return Some((page.url.clone(), Some(page)));
                }
                Ok(_) => {
                    tracing::debug!(stage = "find_domain", domain = %candidate, "probe: page does not mention the company")
                }
                Err(e) => tracing::debug!(stage = "find_domain", domain = %candidate, error = %e, "probe failed"),
            }
        }
    }
    tracing::info!(stage = "find_domain", "no website found");
    None
}

/// The reader fallback for a site that refuses us (401/403): its text through `ENRICH_READER_URL`.
async fn read_via_reader(ctx: &Enricher, url: &Url, error: &FetchError, out: &mut Enrichment) -> Option<String> {
    let template = ctx.settings.reader_url.as_deref()?;
    if !matches!(error, FetchError::Status { status: 401 | 403, .. }) {
        return None;
    }
    let reader = Url::parse(&template.replace("{url}", url.as_str())).ok()?;
    match ctx.http.get_text(&reader).await {
        Ok(text) if !text.trim().is_empty() => {
            out.degrade(format!("{error}; read through ENRICH_READER_URL"));
            out.pages_fetched += 1;
            Some(extract::squash(&text))
        }
        _ => None,
    }
}
