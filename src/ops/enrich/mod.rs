//! The enrich operator: for each processed change, find the company's website, crawl a few pages politely,
//! extract firmographics, optionally ask an LLM and a contacts endpoint, and attach the result to the event
//! for the sink to persist in its transaction.
//!
//! Shape (the invariants of DESIGN.md, "Effectively-once" 4):
//! ```text
//! batches -> units (one per event, in source order) -> try_buffered(window) -> ready_chunks -> batches
//!                                    |
//!                     each unit spawns its company's work, which waits for one of `concurrency` permits
//! ```
//! - `try_buffered` runs up to `window` units at once and yields them **in source order**, so a batch that
//!   leaves this operator is always a completed prefix of the input: its checkpoint is the low watermark
//!   (the position below which everything is done), never past a company still in flight. Companies
//!   complete out of order inside the window; `concurrency` of them do network work at a time.
//! - A prefix cut inside a source batch carries the checkpoint just after its last change
//!   ([`Checkpoint::after`]); only the unit that completes a source batch carries that batch's `ack_lsn`, so
//!   the slot is never acknowledged past a transaction with changes still in flight. An output batch
//!   carries at most one `ack_lsn`: the source counts committed batches against the ones it sent, and an
//!   idle slot is acknowledged only when the two agree.
//! - Bounds: at most one source batch plus `window` (16 x concurrency) events are held here; the channels around the
//!   operators stage are bounded, so slow websites slow the source.
//! - The daily cap is taken in source order when a unit is created, so a capped run stops at a clean prefix
//!   (backfill: the run ends there and resumes from it; stream: later companies are deferred, their registry
//!   fields still applied).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{NaiveDate, Utc};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use tokio::sync::Semaphore;
use tokio_postgres::Client;
use tracing::Instrument;
use url::Url;

use crate::change::{Batch, Event, Fate};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::ops::{BatchStream, Operator};
use crate::telemetry::alerts::PauseGate;
use crate::telemetry::metrics::metrics;

pub mod contacts;
pub mod discover;
pub mod extract;
pub mod http;
pub mod llm;

use extract::{Extracted, PageKind};
use http::{FetchError, Http, HttpSettings, RobotsCache};

/// Events held in source order per concurrency slot. A company slower than the rest (retries, a hanging
/// site) holds the head of the window while the others go on completing behind it; the window is what
/// keeps the slots busy meanwhile: with W = 16 x concurrency, a straggler stalls the run only if it takes
/// longer than the others need to finish W companies. Waiting events are small (no page bodies).
const WINDOW_PER_SLOT: usize = 16;
/// Events per batch handed to the sink at most (what is ready is handed over at once).
const OUT_CHUNK: usize = 5_000;
/// Pages tried at well-known paths when the homepage does not link that kind of page.
const SEEDED_PATHS: &[(PageKind, &str)] =
    &[(PageKind::About, "/about-us"), (PageKind::Contact, "/contact-us"), (PageKind::Careers, "/careers")];

#[derive(Debug, Clone)]
pub struct EnrichSettings {
    /// `ACRA_DIRECT_CONCURRENCY`: companies doing network work at once.
    pub concurrency: usize,
    /// `ACRA_DIRECT_DAILY_CAP`: enrichments per UTC day, across runs.
    pub daily_cap: Option<u64>,
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
            concurrency: spec.concurrency,
            daily_cap: spec.daily_cap,
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

    fn fail(&mut self, why: impl Into<String>) {
        self.status = Status::Failed;
        self.error = Some(why.into());
    }
}

/// A count per UTC day with a cap, shared by concurrent workers (enrichments, LLM tokens).
pub struct DailyBudget {
    cap: Option<u64>,
    state: Mutex<(NaiveDate, u64)>,
}

impl DailyBudget {
    pub fn new(cap: Option<u64>, used_today: u64) -> Self {
        DailyBudget { cap, state: Mutex::new((Utc::now().date_naive(), used_today)) }
    }

    fn with<R>(&self, f: impl FnOnce(&mut u64) -> R) -> R {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let today = Utc::now().date_naive();
        if s.0 != today {
            *s = (today, 0);
        }
        f(&mut s.1)
    }

    /// Takes `n` if that stays within the cap.
    pub fn try_take(&self, n: u64) -> bool {
        let cap = self.cap;
        self.with(|used| {
            let ok = cap.is_none_or(|c| *used + n <= c);
            if ok {
                *used += n;
            }
            ok
        })
    }

    pub fn force_take(&self, n: u64) {
        self.with(|used| *used += n)
    }

    pub fn give_back(&self, n: u64) {
        self.with(|used| *used = used.saturating_sub(n))
    }

    pub fn used(&self) -> u64 {
        self.with(|used| *used)
    }
}

/// Enrichments and LLM tokens spent so far in the current UTC day, across runs: what the daily caps
/// (`ACRA_DIRECT_DAILY_CAP`, `OPENAI_DAILY_TOKENS_CAP`) count against.
pub async fn used_today(client: &Client) -> Result<(i64, i64)> {
    let row = client
        .query_one(
            "select count(*), coalesce(sum(llm_tokens), 0)::int8 from company_enrichment_runs \
             where enriched and updated_at >= date_trunc('day', now() at time zone 'utc') at time zone 'utc'",
            &[],
        )
        .await
        .map_err(|e| Error::db("reading today's enrichments (ACRA_DIRECT_DAILY_CAP)", e))?;
    Ok((row.get(0), row.get(1)))
}

struct Ctx {
    settings: EnrichSettings,
    /// Closed by the failure monitor (`telemetry::alerts`): companies are deferred while it is.
    pause: Arc<PauseGate>,
    http: Http,
    permits: Semaphore,
    enrichments: DailyBudget,
    tokens: DailyBudget,
}

pub struct Enrich {
    client: Arc<Client>,
    ctx: Arc<Ctx>,
    /// Backfill: end the run at the cap (it resumes there tomorrow). Stream: defer and go on.
    stop_at_cap: bool,
}

/// Why a unit was deferred: the daily cap ends a backfill there; a pause lets the run go on.
const PAUSED: &str = "enrichment paused by the failure monitor (ACRA_DIRECT_ERROR_ALERT_THRESHOLD)";

impl Enrich {
    pub async fn new(
        client: Arc<Client>,
        settings: EnrichSettings,
        stop_at_cap: bool,
        pause: Arc<PauseGate>,
    ) -> Result<Self> {
        let http = Http::new(settings.http.clone())?;
        let (done, tokens) = used_today(&client).await?;
        tracing::info!(
            concurrency = settings.concurrency, enriched_today = done, daily_cap = ?settings.daily_cap,
            llm = settings.llm.is_some(), "enrichment ready"
        );
        let ctx = Ctx {
            pause,
            permits: Semaphore::new(settings.concurrency.max(1)),
            enrichments: DailyBudget::new(settings.daily_cap, done as u64),
            tokens: DailyBudget::new(settings.llm_daily_tokens, tokens as u64),
            http,
            settings,
        };
        Ok(Enrich { client, ctx: Arc::new(ctx), stop_at_cap })
    }
}

/// One event on its way through the window, and the checkpoint/ack that hold once it and all before it are done.
struct Unit {
    event: Option<Event>,
    /// Deferred because the daily cap is reached.
    at_cap: bool,
    checkpoint: Checkpoint,
    ack_lsn: Option<u64>,
}

type UnitFuture = BoxFuture<'static, Result<Unit>>;

impl Operator for Enrich {
    fn apply(self: Box<Self>, input: BatchStream) -> BatchStream {
        let Enrich { client, ctx, stop_at_cap } = *self;
        let window = ctx.settings.concurrency.saturating_mul(WINDOW_PER_SLOT).clamp(64, 16_384);
        let units = async_stream::stream! {
            let mut input = input;
            while let Some(batch) = input.next().await {
                match async { prepare(Arc::clone(&client), Arc::clone(&ctx), batch?).await }.await {
                    Ok(units) => {
                        for unit in units {
                            yield Ok::<UnitFuture, Error>(unit);
                        }
                    }
                    Err(e) => {
                        yield Err(e);
                        break;
                    }
                }
            }
        };
        let mut done = Box::pin(units).try_buffered(window).ready_chunks(OUT_CHUNK);
        Box::pin(async_stream::try_stream! {
            while let Some(items) = done.next().await {
                let (mut events, mut checkpoint, mut ack_lsn, mut capped) = (Vec::with_capacity(items.len()), None, None, false);
                for item in items {
                    let unit = item?;
                    if stop_at_cap && unit.at_cap {
                        capped = true;
                        break;
                    }
                    // One acknowledgement per batch: the source counts the batches the sink committed against
                    // those it sent, so two source batches completing here must leave as two.
                    if unit.ack_lsn.is_some() && ack_lsn.is_some() {
                        if let Some(cp) = checkpoint.take() {
                            yield Batch { events: std::mem::take(&mut events), checkpoint: cp, ack_lsn: ack_lsn.take() };
                        }
                    }
                    events.extend(unit.event);
                    checkpoint = Some(unit.checkpoint);
                    ack_lsn = unit.ack_lsn.or(ack_lsn);
                }
                if let Some(checkpoint) = checkpoint {
                    yield Batch { events, checkpoint, ack_lsn };
                }
                if capped {
                    tracing::warn!("ACRA_DIRECT_DAILY_CAP reached: the backfill stops here and resumes from its checkpoint");
                    break;
                }
            }
        })
    }
}

/// Splits a batch into units, in order: processed companies get a future doing their enrichment, the rest
/// are ready at once. One query per batch reads the companies' known domains.
async fn prepare(client: Arc<Client>, ctx: Arc<Ctx>, batch: Batch) -> Result<Vec<UnitFuture>> {
    let ids: Vec<i64> = batch.events.iter().filter(|e| e.fate == Fate::Process).filter_map(|e| e.company_id).collect();
    let mut known: HashMap<i64, (String, Option<String>, Option<String>)> = HashMap::new();
    if !ids.is_empty() {
        let rows = client
            .query("select company_id, name, uen, website_domain from companies where company_id = any($1)", &[&ids])
            .await
            .map_err(|e| Error::db("enrich: reading companies' known domains", e))?;
        for r in rows {
            known.insert(r.get(0), (r.get(1), r.get(2), r.get(3)));
        }
    }
    let Batch { events, checkpoint, ack_lsn } = batch;
    if events.is_empty() {
        return Ok(vec![ready(Unit { event: None, at_cap: false, checkpoint, ack_lsn })]);
    }
    let n = events.len();
    let mut units = Vec::with_capacity(n);
    for (i, mut event) in events.into_iter().enumerate() {
        let (cp, ack) =
            if i + 1 == n { (checkpoint.clone(), ack_lsn) } else { (checkpoint.after(&event.change), None) };
        let company = event.company_id.filter(|_| event.fate == Fate::Process).and_then(|id| {
            let (name, uen, domain) = known.remove(&id)?;
            Some(Company { id, name, uen, known_domain: domain })
        });
        let Some(company) = company else {
            units.push(ready(Unit { event: Some(event), at_cap: false, checkpoint: cp, ack_lsn: ack }));
            continue;
        };
        if ctx.pause.is_paused() {
            event.fate = Fate::Deferred { reason: PAUSED.into() };
            units.push(ready(Unit { event: Some(event), at_cap: false, checkpoint: cp, ack_lsn: ack }));
            continue;
        }
        if !ctx.enrichments.try_take(1) {
            event.fate = Fate::Deferred { reason: "ACRA_DIRECT_DAILY_CAP reached".into() };
            units.push(ready(Unit { event: Some(event), at_cap: true, checkpoint: cp, ack_lsn: ack }));
            continue;
        }
        let ctx = Arc::clone(&ctx);
        let selected = Selected {
            staging_id: event.change.row.id,
            position: event.change.pos.to_string(),
            claimed: event.claim.is_some(),
        };
        units.push(
            async move {
                let work = AbortOnDrop(tokio::spawn(enrich_company(ctx, company, selected)));
                let enrichment = match work.await {
                    Ok(e) => e,
                    Err(_) => Enrichment {
                        status: Status::Failed,
                        error: Some("internal error: the enrichment task ended abnormally".into()),
                        ..Default::default()
                    },
                };
                event.enrichment = Some(Box::new(enrichment));
                Ok(Unit { event: Some(event), at_cap: false, checkpoint: cp, ack_lsn: ack })
            }
            .boxed(),
        );
    }
    Ok(units)
}

fn ready(unit: Unit) -> UnitFuture {
    futures::future::ready(Ok(unit)).boxed()
}

/// What the earlier operators did for a company, for its log span.
struct Selected {
    staging_id: i64,
    position: String,
    claimed: bool,
}

/// Aborts the company's task if the pipeline is dropped (shutdown, a fatal error) before it finishes.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

#[derive(Debug, Clone)]
pub struct Company {
    pub id: i64,
    pub name: String,
    pub uen: Option<String>,
    pub known_domain: Option<String>,
}

/// One company's enrichment, in its `company` span. The span's stage events follow PRD 20: `select` and
/// `upsert` (what the batch operators before this one decided), then `find_domain`, `crawl`, `extract`,
/// `chunks`, `llm_extract`, `contacts`; the sink adds `persist` and `summary` after its commit.
async fn enrich_company(ctx: Arc<Ctx>, company: Company, selected: Selected) -> Enrichment {
    let span = tracing::info_span!("company", company_id = company.id, uen = company.uen.as_deref().unwrap_or(""));
    async move {
        tracing::info!(stage = "select", staging_id = selected.staging_id, position = %selected.position, name = %company.name, "selected");
        tracing::info!(stage = "upsert", company_id = company.id, claimed = selected.claimed, "registry fields upserted");
        let _permit = ctx.permits.acquire().await.expect("the semaphore is never closed");
        let _in_flight = InFlight::start();
        let started = Instant::now();
        let mut out = Enrichment::default();
        run_stages(&ctx, &company, &mut out).await;
        out.duration = started.elapsed();
        tracing::info!(
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

async fn run_stages(ctx: &Ctx, company: &Company, out: &mut Enrichment) {
    let mut robots = RobotsCache::default();
    let Some((home_url, home_page)) = find_domain(ctx, company, out, &mut robots).await else {
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
                out.fail(e.to_string());
                return;
            }
        },
    };
    let home_x = extract::page(&home.body, &home.url, PageKind::Home);
    tracing::info!(stage = "crawl", page = "home", url = %http::strip(&home.url), links = home_x.links.len(), truncated = home.truncated, "fetched");
    let mut pages: Vec<(PageKind, Extracted)> = vec![(PageKind::Home, home_x)];
    for (kind, url) in crawl_plan(&home.url, &pages[0].1, ctx.settings.max_pages) {
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

    if let Some(settings) = &ctx.settings.llm {
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
    ctx: &Ctx,
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
    ctx: &Ctx,
    company: &Company,
    out: &mut Enrichment,
    robots: &mut RobotsCache,
) -> Option<(Url, Option<http::Page>)> {
    if let Some(domain) = company.known_domain.as_deref().filter(|d| !d.trim().is_empty()) {
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
async fn read_via_reader(ctx: &Ctx, url: &Url, error: &FetchError, out: &mut Enrichment) -> Option<String> {
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
