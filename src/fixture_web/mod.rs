//! A local web to enrich against: tests, `acraflow bench enrich` and `acraflow demo` use it, since our
//! machines have no internet.
//!
//! One server on 127.0.0.1 plays every part:
//! - an HTTP proxy (`ENRICH_HTTP_PROXY`) in front of deterministic synthetic company websites, one per
//!   [`SiteSpec`] (homepage, about, contact, careers, robots.txt), addressed by hostname;
//! - a search engine answering in DuckDuckGo's HTML format (`/search?q=`), listing directory sites first;
//! - an OpenAI-compatible `/v1/chat/completions`, a reader (`/reader/<url>`) and a contacts endpoint;
//! - per-site latency and faults ([`Fault`]): slow bodies, hangs, 500, 429 with Retry-After, 50 MB pages,
//!   redirect loops, redirects to private addresses, 403, non-HTML, invalid UTF-8; robots.txt disallow.
//!
//! Every request is logged ([`Hit`]) so tests can check robots and per-host spacing from the server's side.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::enrichment::enrich::discover::{candidate_domains, name_tokens};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The homepage body arrives in 10 pieces, this far apart.
    SlowBody(Duration),
    /// Connections are accepted and never answered.
    Hang,
    /// Every request answers 500.
    ServerError,
    /// The first `n` requests for each path answer 429 with `Retry-After: 1`.
    RateLimited(u32),
    /// The homepage is 50 MB of HTML.
    Huge,
    /// `/` redirects to `/a`, which redirects to `/`.
    RedirectLoop,
    /// The homepage redirects to the cloud metadata address.
    RedirectToPrivate,
    /// Every page answers 403 (the reader endpoint still reads it).
    Forbidden,
    /// The homepage is a PDF.
    NotHtml,
    /// The homepage is HTML in Latin-1 bytes with stray 0xFF bytes: not UTF-8.
    InvalidUtf8,
    /// The homepage is 2 MB of nested tags (a parser that is quadratic in depth takes minutes on it).
    Deep,
}

impl Fault {
    pub const ALL: [Fault; 11] = [
        Fault::SlowBody(Duration::from_millis(50)),
        Fault::Hang,
        Fault::ServerError,
        Fault::RateLimited(1),
        Fault::Huge,
        Fault::RedirectLoop,
        Fault::RedirectToPrivate,
        Fault::Forbidden,
        Fault::NotHtml,
        Fault::InvalidUtf8,
        Fault::Deep,
    ];
}

/// One company's website.
#[derive(Debug, Clone)]
pub struct SiteSpec {
    pub host: String,
    pub company: String,
    pub uen: Option<String>,
    /// Listed by the search endpoint; otherwise only the heuristic probe finds it.
    pub in_search: bool,
    pub robots_disallow: bool,
    pub fault: Option<Fault>,
    /// What kind of site it is (the formats of [`trust`]); `Plain` for the standard templates.
    pub kind: SiteKind,
    /// The address printed: the registered postal code and street when known.
    pub postal: Option<String>,
    pub street: Option<String>,
    /// Search lists lower ranks first.
    pub rank: u32,
    /// The search listing's title and snippet, when not the company's name.
    pub listing: Option<(String, String)>,
    /// Search lists the site as `https://`.
    pub https: bool,
    /// robots.txt asks for this many seconds between requests.
    pub crawl_delay: Option<u32>,
}

impl SiteSpec {
    pub fn new(host: &str, company: &str, uen: Option<&str>) -> Self {
        SiteSpec {
            host: host.to_ascii_lowercase(),
            company: company.to_owned(),
            uen: uen.map(str::to_owned),
            in_search: true,
            robots_disallow: false,
            fault: None,
            kind: SiteKind::Plain,
            postal: None,
            street: None,
            rank: 10,
            listing: None,
            https: false,
            crawl_delay: None,
        }
    }

    fn seed(&self) -> u64 {
        hash(&self.host)
    }

    /// The registrable domain acraflow should store (the host without `www.`).
    pub fn domain(&self) -> String {
        self.host.trim_start_matches("www.").to_owned()
    }

    /// What the site says, for tests to compare with what was persisted.
    pub fn expected(&self) -> Expected {
        let s = self.seed();
        let slug = self.domain().split('.').next().unwrap_or("x").to_owned();
        let phone = format!("+656{:03}{:04}", s % 1000, (s / 1000) % 10_000);
        let mut phones = vec![phone.clone()];
        match self.kind {
            SiteKind::WhatsApp => phones.push(trust::mobile(self)),
            SiteKind::FaxAndAbroad => phones.push(trust::london(self)),
            _ => {}
        }
        let mut emails = vec![format!("hello@{}", self.domain()), format!("sales@{}", self.domain())];
        if self.kind == SiteKind::JsonLd {
            emails.remove(0);
        }
        Expected {
            emails,
            phone,
            phones,
            linkedin_url: format!("https://www.linkedin.com/company/{slug}"),
            jobs: (s % 6) as i32,
            hq_postal: Some(self.postal.clone().unwrap_or_else(|| format!("{:06}", 10_000 + s % 800_000))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub emails: Vec<String>,
    /// The main line (E.164).
    pub phone: String,
    /// Every phone the site gives (E.164), faxes excluded.
    pub phones: Vec<String>,
    pub linkedin_url: String,
    pub jobs: i32,
    pub hq_postal: Option<String>,
}

pub mod odoo;
pub mod trust;
pub use trust::SiteKind;

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Hit {
    pub at: Instant,
    pub host: String,
    pub path: String,
    pub status: u16,
}

struct State {
    sites: HashMap<String, SiteSpec>,
    /// Search index: a name's tokens joined by spaces -> hosts.
    by_tokens: HashMap<String, Vec<String>>,
    latency: Duration,
    own: String,
    hits: Mutex<Vec<Hit>>,
    seen: Mutex<HashMap<(String, String), u32>>,
    llm_fail: AtomicBool,
    /// The reader answers 429 (its rate limit) to everything.
    reader_refuses: AtomicBool,
    /// The search endpoint's budget: past it, HTTP 202 with DuckDuckGo's bot-check page.
    search_limit: Mutex<Limiter>,
    llm_calls: AtomicU64,
    /// Every site answers 500 (an outage on our side of the network, as far as acraflow can tell).
    sites_fail: AtomicBool,
    /// Bodies posted to `/webhook` (a Slack incoming webhook).
    webhooks: Mutex<Vec<serde_json::Value>>,
    /// Every email the verification endpoint was asked about (what a ZeroBounce account is billed for).
    verified: Mutex<Vec<String>>,
    /// The verification endpoint answers 500 (an outage).
    verify_fail: AtomicBool,
    /// The verification endpoint's and Odoo's rate limits (429 past them).
    verify_limit: Mutex<Limiter>,
    odoo_limit: Mutex<Limiter>,
    contacts_limit: Mutex<Limiter>,
    /// The Odoo external API (`/jsonrpc`), its outage switch and a delay before each answer.
    odoo: Mutex<odoo::OdooDb>,
    odoo_down: AtomicBool,
    odoo_delay_ms: AtomicU64,
    log_hits: bool,
}

/// A provider's published rate limit: a call past `limit.0` answered within any sliding `limit.1` is
/// refused. Every call is logged with its verdict.
#[derive(Default)]
struct Limiter {
    limit: Option<(usize, Duration)>,
    admitted: std::collections::VecDeque<Instant>,
    /// Every call: when, and whether it was admitted.
    log: Vec<(Instant, bool)>,
}

impl Limiter {
    /// Logs a call; false when it is past the limit.
    fn admit(&mut self) -> bool {
        let now = Instant::now();
        let admitted = match self.limit {
            None => true,
            Some((calls, window)) => {
                while self.admitted.front().is_some_and(|t| now.duration_since(*t) >= window) {
                    self.admitted.pop_front();
                }
                let admitted = self.admitted.len() < calls;
                if admitted {
                    self.admitted.push_back(now);
                }
                admitted
            }
        };
        self.log.push((now, admitted));
        admitted
    }

    /// Calls received, and how many of them were refused.
    fn counts(&self) -> (usize, usize) {
        (self.log.len(), self.log.iter().filter(|(_, admitted)| !admitted).count())
    }
}

pub struct FixtureWeb {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FixtureWeb {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FixtureWeb {
    /// Serves `sites` on 127.0.0.1 (an ephemeral port); every site request waits `latency` first.
    pub async fn start(sites: Vec<SiteSpec>, latency: Duration) -> std::io::Result<FixtureWeb> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut by_tokens: HashMap<String, Vec<String>> = HashMap::new();
        for s in &sites {
            by_tokens.entry(name_tokens(&s.company).join(" ")).or_default().push(s.host.clone());
        }
        let state = Arc::new(State {
            // A `www.` site that links to its bare host answers there too (one server).
            sites: sites
                .into_iter()
                .flat_map(|s| {
                    let bare = (s.kind == SiteKind::WwwAndBare).then(|| (s.domain(), s.clone()));
                    std::iter::once((s.host.clone(), s)).chain(bare)
                })
                .collect(),
            by_tokens,
            latency,
            own: addr.to_string(),
            hits: Mutex::new(Vec::new()),
            seen: Mutex::new(HashMap::new()),
            llm_fail: AtomicBool::new(false),
            reader_refuses: AtomicBool::new(false),
            search_limit: Mutex::new(Limiter::default()),
            llm_calls: AtomicU64::new(0),
            sites_fail: AtomicBool::new(false),
            webhooks: Mutex::new(Vec::new()),
            verified: Mutex::new(Vec::new()),
            verify_fail: AtomicBool::new(false),
            verify_limit: Mutex::new(Limiter::default()),
            odoo_limit: Mutex::new(Limiter::default()),
            contacts_limit: Mutex::new(Limiter::default()),
            odoo: Mutex::new(odoo::OdooDb::default()),
            odoo_down: AtomicBool::new(false),
            odoo_delay_ms: AtomicU64::new(0),
            log_hits: true,
        });
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let _ = serve(&state, stream).await;
                });
            }
        });
        Ok(FixtureWeb { addr, state, task })
    }

    /// The proxy to give acraflow (`ENRICH_HTTP_PROXY`).
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn search_url(&self) -> String {
        format!("http://{}/search?q={{query}}", self.addr)
    }

    pub fn llm_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn reader_url(&self) -> String {
        format!("http://{}/reader/{{url}}", self.addr)
    }

    pub fn contacts_url(&self) -> String {
        format!("http://{}/contacts", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    /// Gives the search endpoint a budget of `calls` per sliding `per`, as DuckDuckGo has: above it, it
    /// answers HTTP 202 with its bot-check page.
    pub fn set_search_budget(&self, calls: usize, per: Duration) {
        self.state.search_limit.lock().unwrap_or_else(|p| p.into_inner()).limit = Some((calls, per));
    }

    /// Every search request: when it arrived and whether it was answered (false: refused).
    pub fn searches(&self) -> Vec<(Instant, bool)> {
        self.state.search_limit.lock().unwrap_or_else(|p| p.into_inner()).log.clone()
    }

    /// Makes the reader answer 429 to everything, or stops it.
    pub fn set_reader_refusing(&self, refusing: bool) {
        self.state.reader_refuses.store(refusing, Ordering::SeqCst);
    }

    pub fn set_llm_failing(&self, failing: bool) {
        self.state.llm_fail.store(failing, Ordering::SeqCst);
    }

    /// Makes every site answer 500 (robots.txt included), or stops it.
    pub fn set_sites_failing(&self, failing: bool) {
        self.state.sites_fail.store(failing, Ordering::SeqCst);
    }

    /// A Slack-style incoming webhook (`SLACK_WEBHOOK_URL`); see [`FixtureWeb::webhooks`].
    pub fn webhook_url(&self) -> String {
        format!("http://{}/webhook", self.addr)
    }

    /// The JSON bodies posted to the webhook, in order.
    pub fn webhooks(&self) -> Vec<serde_json::Value> {
        self.state.webhooks.lock().unwrap().clone()
    }

    /// A ZeroBounce-compatible email verification API (`ZEROBOUNCE_URL`): `POST /validatebatch`.
    /// Answers by address: `info@`, `sales@`, `enquiry@` and `contact@` are `valid`, `hello@` and `admin@`
    /// are `catch-all`, an address with `noreply` or `bounce` is `invalid`, any other `unknown`.
    pub fn zerobounce_url(&self) -> String {
        format!("http://{}/zerobounce/v2", self.addr)
    }

    /// Every email sent for verification, in order (repeats included: each one a charge).
    pub fn verified_emails(&self) -> Vec<String> {
        self.state.verified.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_verify_failing(&self, failing: bool) {
        self.state.verify_fail.store(failing, Ordering::SeqCst);
    }

    /// The verification API answers 429 to a call past `calls` within any `window` (ZeroBounce's
    /// `validatebatch`: 5 a minute).
    pub fn set_verify_rate_limit(&self, calls: usize, window: Duration) {
        self.state.verify_limit.lock().unwrap_or_else(|p| p.into_inner()).limit = Some((calls, window));
    }

    /// `validatebatch` calls received, and how many of them were refused with 429.
    pub fn verify_calls(&self) -> (usize, usize) {
        self.state.verify_limit.lock().unwrap_or_else(|p| p.into_inner()).counts()
    }

    /// The contacts endpoint answers 429 to a lookup past `calls` within any `window`.
    pub fn set_contacts_rate_limit(&self, calls: usize, window: Duration) {
        self.state.contacts_limit.lock().unwrap_or_else(|p| p.into_inner()).limit = Some((calls, window));
    }

    /// Lookups the contacts endpoint received, and how many of them were refused with 429.
    pub fn contacts_calls(&self) -> (usize, usize) {
        self.state.contacts_limit.lock().unwrap_or_else(|p| p.into_inner()).counts()
    }

    /// Odoo answers 429 to a request past `calls` within any `window`.
    pub fn set_odoo_rate_limit(&self, calls: usize, window: Duration) {
        self.state.odoo_limit.lock().unwrap_or_else(|p| p.into_inner()).limit = Some((calls, window));
    }

    /// Requests Odoo received, and how many of them were refused with 429.
    pub fn odoo_requests(&self) -> (usize, usize) {
        self.state.odoo_limit.lock().unwrap_or_else(|p| p.into_inner()).counts()
    }

    /// An Odoo whose external API is at `{odoo_url}/jsonrpc`; see [`odoo`] for what it accepts.
    pub fn odoo_url(&self) -> String {
        format!("http://{}/odoo", self.addr)
    }

    /// The Odoo records of `model` (`res.partner`, `crm.lead`).
    pub fn odoo_records(&self, model: &str) -> Vec<serde_json::Value> {
        self.state.odoo.lock().unwrap_or_else(|p| p.into_inner()).records(model)
    }

    /// Every `execute_kw` call Odoo received, as `model.method`.
    pub fn odoo_calls(&self) -> Vec<String> {
        self.state.odoo.lock().unwrap_or_else(|p| p.into_inner()).calls.clone()
    }

    /// Odoo answers 503 to everything (an outage), or stops.
    pub fn set_odoo_down(&self, down: bool) {
        self.state.odoo_down.store(down, Ordering::SeqCst);
    }

    /// Odoo applies each call at once but answers only after `delay` (a slow server: a client killed in
    /// between never learns what was created).
    pub fn set_odoo_delay(&self, delay: Duration) {
        self.state.odoo_delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn llm_calls(&self) -> u64 {
        self.state.llm_calls.load(Ordering::SeqCst)
    }

    pub fn site(&self, host: &str) -> Option<&SiteSpec> {
        self.state.sites.get(host)
    }
}

/// A realistic mix for a list of companies `(name, uen)`: about 12% have no website, 4% disallow all
/// robots, 2% answer 500, 2% are slow; two thirds of the rest are found by search, the others only by
/// the probe (their host is the probe's first candidate). Deterministic for the same companies.
pub fn realistic_sites(companies: &[(String, Option<String>)]) -> Vec<SiteSpec> {
    let mut taken = std::collections::HashSet::new();
    let mut sites = Vec::new();
    for (name, uen) in companies {
        let h = hash(&(name, uen));
        let candidates = candidate_domains(name);
        let Some(first) = candidates.first() else { continue };
        if h % 100 < 12 {
            continue;
        }
        let joined = first.trim_end_matches(".com.sg").to_owned();
        let (host, in_search) = match h % 3 {
            0 => (first.clone(), false),
            1 => (format!("www.{joined}.sg"), true),
            _ => (format!("{}.com", name_tokens(name).join("-")), true),
        };
        let mut spec = SiteSpec::new(&host, name, uen.as_deref());
        spec.in_search = in_search;
        match h % 100 {
            12..=15 => spec.robots_disallow = true,
            16..=17 => spec.fault = Some(Fault::ServerError),
            18..=19 => spec.fault = Some(Fault::SlowBody(Duration::from_millis(50))),
            _ => {}
        }
        if spec.robots_disallow || spec.fault.is_some() {
            spec.in_search = true;
        }
        // One site per name: two companies that search alike would make "the right domain" ambiguous.
        if !taken.insert(spec.host.clone()) || !taken.insert(name_tokens(name).join(" ")) {
            continue;
        }
        sites.push(spec);
    }
    sites
}

fn hash<T: Hash>(t: &T) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

pub(crate) enum Body {
    Bytes(Vec<u8>),
    Slow(Vec<u8>, Duration),
    Huge(usize),
    Hang,
}

pub(crate) struct Response {
    status: u16,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Body,
}

impl Response {
    pub(crate) fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response { status, content_type, headers: Vec::new(), body: Body::Bytes(body.into()) }
    }
    pub(crate) fn html(body: String) -> Self {
        Self::new(200, "text/html; charset=utf-8", body)
    }
    fn redirect(status: u16, to: String) -> Self {
        let mut r = Self::new(status, "text/html", "");
        r.headers.push(("Location", to));
        r
    }
    pub(crate) fn not_found() -> Self {
        Self::new(404, "text/html", "<html><body><h1>Not found</h1></body></html>")
    }
}

async fn serve(state: &State, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk)).await??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, target) = (first.next().unwrap_or("").to_owned(), first.next().unwrap_or("/").to_owned());
    let mut host_header = String::new();
    let mut length = 0usize;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "host" => host_header = v.trim().to_ascii_lowercase(),
                "content-length" => length = v.trim().parse().unwrap_or(0).min(4 * 1024 * 1024),
                _ => {}
            }
        }
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; 16 * 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    if method == "CONNECT" {
        return write(&mut stream, Response::new(501, "text/plain", "no TLS here")).await;
    }
    // A proxied request names its target in full; a direct one has a path and a Host header.
    let (authority, path) = match target.strip_prefix("http://") {
        Some(rest) => match rest.find('/') {
            Some(i) => (rest[..i].to_ascii_lowercase(), rest[i..].to_owned()),
            None => (rest.to_ascii_lowercase(), "/".to_owned()),
        },
        None => (host_header, target),
    };
    let host = authority.split(':').next().unwrap_or("").to_owned();
    let at = Instant::now();
    let response = if (authority == state.own || host == "localhost") && path == "/odoo/jsonrpc" && method == "POST" {
        if state.odoo_down.load(Ordering::SeqCst) {
            Response::new(503, "text/html", "<h1>503 Service Unavailable</h1>")
        } else if !state.odoo_limit.lock().unwrap_or_else(|p| p.into_inner()).admit() {
            Response::new(429, "text/html", "<h1>429 Too Many Requests</h1>")
        } else {
            let answer = odoo::handle(&mut state.odoo.lock().unwrap_or_else(|p| p.into_inner()), &body);
            let delay = state.odoo_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            Response::new(200, "application/json", answer.to_string())
        }
    } else if authority == state.own || host == "localhost" {
        endpoint(state, &method, &path, &body)
    } else {
        match state.sites.get(&host) {
            Some(site) => {
                tokio::time::sleep(state.latency).await;
                site_response(state, site, &path)
            }
            None if host == "127.0.0.1" || host == "169.254.169.254" => {
                Response::html("<html><body>internal secrets</body></html>".into())
            }
            None => Response::new(502, "text/plain", format!("proxy: cannot resolve {host}")),
        }
    };
    if state.log_hits {
        state.hits.lock().unwrap().push(Hit { at, host, path, status: response.status });
    }
    write(&mut stream, response).await
}

async fn write(stream: &mut TcpStream, r: Response) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        202 => "Accepted",
        301 => "Moved Permanently",
        302 => "Found",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "Status",
    };
    let len = match &r.body {
        Body::Bytes(b) | Body::Slow(b, _) => b.len(),
        Body::Huge(n) => *n,
        Body::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return Ok(());
        }
    };
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {len}\r\nConnection: close\r\n",
        r.status, r.content_type
    );
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    match r.body {
        Body::Bytes(b) => stream.write_all(&b).await?,
        Body::Slow(b, delay) => {
            for piece in b.chunks(b.len().div_ceil(10).max(1)) {
                stream.write_all(piece).await?;
                stream.flush().await?;
                tokio::time::sleep(delay).await;
            }
        }
        Body::Huge(n) => {
            let filler = "<p>filler text that goes on and on for the whole page</p>\n".repeat(1024);
            let mut sent = 0;
            stream.write_all(b"<html><body>").await?;
            sent += 12;
            while sent < n {
                let take = filler.len().min(n - sent);
                stream.write_all(&filler.as_bytes()[..take]).await?;
                sent += take;
            }
        }
        Body::Hang => {}
    }
    stream.shutdown().await
}

fn site_response(state: &State, site: &SiteSpec, path: &str) -> Response {
    let path = if path.is_empty() { "/" } else { path };
    let path = path.split('?').next().unwrap_or("/");
    let count = {
        let mut seen = state.seen.lock().unwrap();
        let c = seen.entry((site.host.clone(), path.to_owned())).or_insert(0);
        *c += 1;
        *c
    };
    if state.sites_fail.load(Ordering::SeqCst) {
        return Response::new(500, "text/html", "<h1>Internal Server Error</h1>");
    }
    match site.fault {
        Some(Fault::Hang) => return Response { body: Body::Hang, ..Response::not_found() },
        Some(Fault::ServerError) => return Response::new(500, "text/html", "<h1>Internal Server Error</h1>"),
        Some(Fault::RateLimited(n)) if count <= n => {
            let mut r = Response::new(429, "text/plain", "slow down");
            r.headers.push(("Retry-After", "1".into()));
            return r;
        }
        Some(Fault::Forbidden) if path != "/robots.txt" => {
            return Response::new(403, "text/html", "<h1>Forbidden</h1>")
        }
        _ => {}
    }
    if path == "/robots.txt" {
        return if site.robots_disallow {
            Response::new(200, "text/plain", "User-agent: *\nDisallow: /\n")
        } else if let Some(d) = site.crawl_delay {
            Response::new(200, "text/plain", format!("User-agent: *\nCrawl-delay: {d}\nDisallow: /private/\n"))
        } else if site.seed().is_multiple_of(2) {
            Response::new(200, "text/plain", "User-agent: *\nDisallow: /private/\n\nUser-agent: BadBot\nDisallow: /\n")
        } else {
            Response::not_found()
        };
    }
    let home = path == "/" || path.is_empty();
    match (site.fault, home) {
        (Some(Fault::RedirectLoop), _) if home => return Response::redirect(302, "/a".into()),
        (Some(Fault::RedirectLoop), _) if path == "/a" => return Response::redirect(302, "/".into()),
        (Some(Fault::RedirectToPrivate), true) => {
            return Response::redirect(302, "http://169.254.169.254/latest/meta-data/".into())
        }
        (Some(Fault::Huge), true) => {
            return Response { body: Body::Huge(50 * 1024 * 1024), ..Response::html(String::new()) }
        }
        (Some(Fault::NotHtml), true) => return Response::new(200, "application/pdf", b"%PDF-1.4 fake".to_vec()),
        (Some(Fault::InvalidUtf8), true) => {
            let mut page = pages::home(site).into_bytes();
            page.extend_from_slice(b"<p>Caf\xe9 \xff\xfe menu</p></body></html>");
            return Response::new(200, "text/html", page);
        }
        (Some(Fault::Deep), true) => return Response::html(pages::deep(site)),
        (Some(Fault::SlowBody(d)), true) => {
            return Response { body: Body::Slow(pages::home(site).into_bytes(), d), ..Response::html(String::new()) }
        }
        _ => {}
    }
    if let Some(r) = trust::page(site, path) {
        return r;
    }
    match path.trim_end_matches('/') {
        "" => Response::html(pages::home(site)),
        p if p == pages::about_path(site).trim_end_matches('/') => Response::html(pages::about(site)),
        p if p == pages::contact_path(site).trim_end_matches('/') => Response::html(pages::contact(site)),
        "/contact-us" if site.kind != SiteKind::OddPaths => Response::html(pages::contact(site)),
        "/careers" => Response::html(pages::careers(site)),
        _ => Response::not_found(),
    }
}

fn endpoint(state: &State, method: &str, path: &str, body: &[u8]) -> Response {
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    match (method, route) {
        ("GET", "/search") => {
            if !state.search_limit.lock().unwrap_or_else(|p| p.into_inner()).admit() {
                return Response::new(
                    202,
                    "text/html",
                    r#"<html><body><div class="anomaly-modal__title">Unfortunately, bots use DuckDuckGo too.</div><form action="/anomaly.js"></form></body></html>"#,
                );
            }
            let q = url::form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "q")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let key = q.split_whitespace().filter(|w| *w != "singapore").collect::<Vec<_>>().join(" ");
            let hosts: Vec<&SiteSpec> = state
                .by_tokens
                .get(&key)
                .map(|hs| hs.iter().filter_map(|h| state.sites.get(h)).filter(|s| s.in_search).collect())
                .unwrap_or_default();
            Response::html(pages::search(&hosts))
        }
        ("POST", "/v1/chat/completions") => {
            state.llm_calls.fetch_add(1, Ordering::SeqCst);
            if state.llm_fail.load(Ordering::SeqCst) {
                return Response::new(500, "application/json", r#"{"error": {"message": "model overloaded"}}"#);
            }
            let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let text = req.pointer("/messages/1/content").and_then(|c| c.as_str()).unwrap_or("");
            let company = text.lines().next().unwrap_or("").trim_start_matches("Company: ").to_owned();
            let h = hash(&company);
            let bucket = ["<1M", "1M-10M", "10M-50M"][(h % 3) as usize];
            let content = serde_json::json!({
                "employees_est": 5 + h % 300,
                "revenue_bucket": bucket,
                "about": format!("{company} is a Singapore company described by its website."),
            });
            let answer = serde_json::json!({
                "id": "chatcmpl-fixture", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content.to_string()}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": text.len() / 4, "completion_tokens": 40, "total_tokens": text.len() / 4 + 40},
            });
            Response::new(200, "application/json", answer.to_string())
        }
        ("POST", "/webhook") => match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) if v.get("text").is_some_and(|t| t.is_string()) => {
                state.webhooks.lock().unwrap().push(v);
                Response::new(200, "text/plain", "ok")
            }
            _ => Response::new(400, "text/plain", "invalid_payload"),
        },
        ("POST", "/zerobounce/v2/validatebatch") => {
            if state.verify_fail.load(Ordering::SeqCst) {
                return Response::new(500, "application/json", r#"{"error": "Internal Server Error"}"#);
            }
            if !state.verify_limit.lock().unwrap_or_else(|p| p.into_inner()).admit() {
                return Response::new(429, "application/json", r#"{"error": "Rate limit exceeded."}"#);
            }
            let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            if req.get("api_key").and_then(|k| k.as_str()).is_none_or(str::is_empty) {
                return Response::new(200, "application/json", r#"{"error": "Missing parameter: api_key."}"#);
            }
            let emails: Vec<String> = req
                .get("email_batch")
                .and_then(|b| b.as_array())
                .map(|b| b.iter().filter_map(|e| e.get("email_address")?.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            if emails.len() > 200 {
                return Response::new(400, "application/json", r#"{"error": "Too many emails: 200 at most."}"#);
            }
            state.verified.lock().unwrap_or_else(|p| p.into_inner()).extend(emails.iter().cloned());
            let rows: Vec<serde_json::Value> = emails
                .iter()
                .map(|e| {
                    let local = e.split('@').next().unwrap_or("").to_ascii_lowercase();
                    let (status, sub) = match local.as_str() {
                        "info" | "sales" | "enquiry" | "contact" => ("valid", ""),
                        "hello" | "admin" => ("catch-all", ""),
                        l if l.contains("noreply") || l.contains("bounce") => ("invalid", "mailbox_not_found"),
                        _ => ("unknown", "mail_server_did_not_respond"),
                    };
                    serde_json::json!({"address": e, "status": status, "sub_status": sub, "free_email": false,
                        "did_you_mean": null, "domain": e.split('@').nth(1), "processed_at": "2026-11-30 00:00:00.000"})
                })
                .collect();
            Response::new(200, "application/json", serde_json::json!({"email_batch": rows, "errors": []}).to_string())
        }
        ("POST", "/contacts") if !state.contacts_limit.lock().unwrap_or_else(|p| p.into_inner()).admit() => {
            Response::new(429, "application/json", r#"{"error": {"type": "rate-limit-exceeded"}}"#)
        }
        ("POST", "/contacts") => {
            let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let company = req.get("companyName").and_then(|c| c.as_str()).unwrap_or("");
            let people = serde_json::json!([
                {"fullName": "Tan Mei Ling", "headline": format!("Director at {company}"), "profileUrl": "https://www.linkedin.com/in/tan-mei-ling"},
                {"fullName": "Rajesh Kumar", "headline": "Head of Sales", "profileUrl": "https://www.linkedin.com/in/rajesh-kumar"},
            ]);
            Response::new(200, "application/json", people.to_string())
        }
        ("GET", r) if r.starts_with("/reader/") && state.reader_refuses.load(Ordering::SeqCst) => {
            Response::new(429, "text/plain", "rate limited")
        }
        ("GET", r) if r.starts_with("/reader/") => {
            let target = url::Url::parse(&path["/reader/".len()..]).ok();
            match target.as_ref().and_then(|u| u.host_str()).and_then(|h| state.sites.get(h)) {
                Some(site) => Response::new(
                    200,
                    "text/plain",
                    format!(
                        "Title: {}\n\n{} provides services to customers across Singapore and the region.",
                        site.company, site.company
                    ),
                ),
                None => Response::not_found(),
            }
        }
        _ => Response::not_found(),
    }
}

pub(crate) mod pages {
    use super::{trust, SiteKind, SiteSpec};

    pub fn about_path(site: &SiteSpec) -> &'static str {
        match site.kind {
            SiteKind::OddPaths => "/gsjj.html",
            _ => ["/about-us", "/about", "/company"][(site.seed() % 3) as usize],
        }
    }

    pub fn contact_path(site: &SiteSpec) -> &'static str {
        match site.kind {
            SiteKind::OddPaths => ["/get-in-touch/", "/findus.html", "/lxwm.html"][(site.seed() % 3) as usize],
            _ => "/contact",
        }
    }

    /// Where the site's links point: the bare host for a `www.` site that links without it.
    fn base(site: &SiteSpec) -> String {
        match site.kind {
            SiteKind::WwwAndBare => format!("http://{}", site.domain()),
            _ => String::new(),
        }
    }

    fn nav(site: &SiteSpec) -> String {
        let b = base(site);
        let (about, contact) = match (site.kind, site.seed() % 2) {
            (SiteKind::OddPaths, 0) => ("关于我们", "联系我们"),
            (SiteKind::OddPaths, _) => ("Our story", "Get in touch"),
            _ => ("About us", "Contact"),
        };
        format!(
            r#"<nav><a href="{b}/">Home</a> <a href="{b}{}">{about}</a> <a href="{b}/services">Services</a> <a href="{b}{}">{contact}</a> <a href="{b}/careers">Careers</a> <a href="https://www.facebook.com/x">Facebook</a></nav>"#,
            about_path(site),
            contact_path(site)
        )
    }

    /// The address line in the site's own way of writing it.
    fn address(site: &SiteSpec) -> String {
        let s = site.seed();
        let street = site.street.clone().unwrap_or_else(|| {
            format!("{} Road", ["Anson", "Ubi", "Kallang", "Jurong East", "Tampines"][(s % 5) as usize])
        });
        let postal = site.expected().hq_postal.unwrap_or_default();
        let unit = format!("{} {street}, #{:02}-{:02}", 1 + s % 200, s % 30, s % 90);
        match site.kind {
            SiteKind::HqVariants => match s % 4 {
                0 => format!("{unit} S({postal})"),
                1 => format!("{unit}, S {postal}"),
                2 => format!("{unit} SG {postal}"),
                _ => format!("新加坡 {postal} {unit}"),
            },
            _ => format!("{unit}, Singapore {postal}"),
        }
    }

    /// The contact lines: phone(s) and emails, in the kind's format.
    fn contact_lines(site: &SiteSpec) -> String {
        let e = site.expected();
        let s = site.seed();
        let domain = site.domain();
        let (local, rest) = e.phone[3..].split_at(4);
        let phone = match s % 3 {
            0 => format!("+65 {local} {rest}"),
            1 => format!("(65) {local}-{rest}"),
            _ => format!("+65{local}{rest}"),
        };
        let sales = match s % 2 {
            0 => {
                let (label, rest) = domain.split_once('.').unwrap_or((domain.as_str(), "sg"));
                format!("sales [at] {label} [dot] {rest}")
            }
            _ => format!("sales(at){domain}"),
        };
        let hello = format!(r#"<a href="mailto:hello@{domain}">hello@{domain}</a>"#);
        match site.kind {
            SiteKind::CloudflareEmail => format!(
                r#"<p>Tel: {phone} | Email: <a href="/cdn-cgi/l/email-protection#{}">[email&#160;protected]</a></p>
                <span class="__cf_email__" data-cfemail="{}">[email&#160;protected]</span>"#,
                trust::cf_encode(&format!("sales@{domain}"), s),
                trust::cf_encode(&format!("hello@{domain}"), s / 7),
            ),
            SiteKind::JsonLd => String::new(),
            SiteKind::WhatsApp => format!(
                r#"<p>Email: {sales}</p>{hello} <a href="tel:{}">Call us</a> <a href="https://wa.me/{}">WhatsApp us</a>"#,
                e.phone,
                trust::mobile(site).trim_start_matches('+')
            ),
            SiteKind::FaxAndAbroad => {
                let fax = format!("+65 {local} {:04}", (rest.parse::<u32>().unwrap_or(0) + 1) % 10_000);
                let london = trust::london(site);
                format!(
                    "<p>Tel: {phone} | Fax: {fax} | Email: {sales}</p><p>London office: +44 20 {} {}</p>{hello}",
                    &london[5..9],
                    &london[9..]
                )
            }
            _ => format!("<p>Tel: {phone} | Email: {sales}</p>{hello}"),
        }
    }

    fn footer(site: &SiteSpec) -> String {
        let e = site.expected();
        let uen = site.uen.as_deref().unwrap_or("-");
        match site.kind {
            SiteKind::JsonLd => format!("<footer><p>&copy; 2024 {}</p></footer>", site.company),
            // Contact details on the contact page only.
            SiteKind::OddPaths => {
                format!("<footer><p>{}</p><p>&copy; 2024 {}. UEN {uen}</p></footer>", address(site), site.company)
            }
            _ => format!(
                r#"<footer><p>{}</p>{}<a href="{}">LinkedIn</a><p>&copy; 2024 {}. UEN {uen}</p></footer>"#,
                address(site),
                contact_lines(site),
                e.linkedin_url,
                site.company,
            ),
        }
    }

    fn head(site: &SiteSpec, title: &str) -> String {
        let s = site.seed();
        let generator = match s % 4 {
            0 => {
                r#"<meta name="generator" content="WordPress 6.4.2"><link rel="stylesheet" href="/wp-content/themes/x/style.css">"#
            }
            1 => r#"<script src="https://static.wixstatic.com/x.js"></script>"#,
            2 => r#"<script src="https://cdn.shopify.com/s/x.js"></script>"#,
            _ => "",
        };
        let ld = if site.kind == SiteKind::JsonLd { trust::json_ld(site) } else { String::new() };
        format!(
            r#"<!doctype html><html><head><meta charset="utf-8"><title>{title} | {}</title>
            <meta name="description" content="{} provides trusted services to businesses in Singapore and across Asia.">
            {generator}{ld}<script async src="https://www.googletagmanager.com/gtag/js?id=G-{s}"></script></head>"#,
            site.company, site.company
        )
    }

    pub(crate) fn home(site: &SiteSpec) -> String {
        format!(
            "{}<body>{}<h1>Welcome to {}</h1><p>{} has served customers in Singapore for many years with a team that cares about quality.</p>{}</body></html>",
            head(site, "Home"),
            nav(site),
            site.company,
            site.company,
            footer(site)
        )
    }

    /// 2 MB of nested `<div>`s (and unclosed `<b>`s) after a normal opening: the company is named, then
    /// the markup goes 200,000 levels deep.
    pub fn deep(site: &SiteSpec) -> String {
        let mut page = format!(
            "{}<body>{}<h1>Welcome to {}</h1><p>UEN {}</p>",
            head(site, "Home"),
            nav(site),
            site.company,
            site.uen.as_deref().unwrap_or("-")
        );
        while page.len() < 2 * 1024 * 1024 - 64 {
            page.push_str("<div><b>x");
        }
        page
    }

    pub(crate) fn about(site: &SiteSpec) -> String {
        format!(
            "{}<body>{}<h1>About us</h1><p>Founded in {}, {} (UEN {}) is a Singapore company serving clients across the region.</p><p>Our people are our strength.</p>{}</body></html>",
            head(site, "About"),
            nav(site),
            1980 + site.seed() % 40,
            site.company,
            site.uen.as_deref().unwrap_or("-"),
            footer(site)
        )
    }

    pub(crate) fn contact(site: &SiteSpec) -> String {
        let details = match site.kind {
            SiteKind::OddPaths => {
                format!("{}<a href=\"{}\">LinkedIn</a>", contact_lines(site), site.expected().linkedin_url)
            }
            SiteKind::CloudflareEmail | SiteKind::JsonLd => String::new(),
            _ => format!("<a href=\"mailto:sales@{}\">our sales team</a>", site.domain()),
        };
        format!(
            "{}<body>{}<h1>Contact</h1><p>Write to us or call us on weekdays between 9am and 6pm.</p>{details}{}</body></html>",
            head(site, "Contact"),
            nav(site),
            footer(site)
        )
    }

    pub(crate) fn careers(site: &SiteSpec) -> String {
        let jobs: String = (0..site.expected().jobs)
            .map(|i| format!(r#"<li class="job-opening"><a href="/careers/role-{i}">Role {i}</a></li>"#))
            .collect();
        format!(
            "{}<body>{}<h1>Careers</h1><p>Join a growing team in Singapore; we hire for attitude and train for skill.</p><ul class=\"openings\">{jobs}</ul>{}</body></html>",
            head(site, "Careers"),
            nav(site),
            footer(site)
        )
    }

    pub fn search(sites: &[&SiteSpec]) -> String {
        let result = |url: &str, title: &str, snippet: &str| {
            let enc: String = url::form_urlencoded::byte_serialize(url.as_bytes()).collect();
            format!(
                r#"<div class="result results_links results_links_deep web-result"><div class="links_main links_deep result__body"><h2 class="result__title"><a rel="nofollow" class="result__a" href="//duckduckgo.com/l/?uddg={enc}&amp;rut=f">{title}</a></h2><a class="result__snippet" href="x">{snippet}</a></div></div>"#
            )
        };
        let slug = sites.first().map(|s| super::name_tokens(&s.company).join("-")).unwrap_or_default();
        let mut out = String::from(r#"<html><body><div class="serp__results"><div id="links" class="results">"#);
        out.push_str(&result(&format!("https://www.sgpbusiness.com/company/{slug}"), "SGPBusiness", ""));
        out.push_str(&result(&format!("https://sg.linkedin.com/company/{slug}"), "LinkedIn", ""));
        let mut listed: Vec<&&SiteSpec> = sites.iter().collect();
        listed.sort_by_key(|s| s.rank);
        for s in listed {
            let scheme = if s.https { "https" } else { "http" };
            let path = if s.kind == SiteKind::Directory { format!("company/{slug}") } else { String::new() };
            let (title, snippet) = s.listing.clone().unwrap_or_else(|| (s.company.clone(), s.company.clone()));
            out.push_str(&result(&format!("{scheme}://{}/{path}", s.host), &title, &snippet));
        }
        out.push_str(&result("https://www.straitstimes.com/business/economy", "Business news", ""));
        if sites.is_empty() {
            out = r#"<html><body><div class="serp__results"><div id="links" class="results"><div class="no-results">No results.</div>"#.into();
        }
        out.push_str("</div></div></body></html>");
        out
    }
}
