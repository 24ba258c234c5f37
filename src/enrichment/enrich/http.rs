//! The crawler's HTTP: politeness, robots.txt, the SSRF guard, retries, and bounded bodies.
//!
//! - **Politeness**: every request to a crawled site (robots.txt, pages, retries, redirects) first takes a
//!   slot from a GCRA limiter keyed by the registrable domain (`x.sg` and `www.x.sg` are one site): at
//!   most one request per site per `host_spacing`, whatever the concurrency. Configured endpoints (LLM,
//!   contacts) are services with their own quotas: they are not spaced, but their 429s are honoured;
//!   search and reader have budgets of their own (`providers`).
//! - **robots.txt** is fetched once per origin per company and obeyed for every page and redirect target.
//!   Unreachable (5xx, timeout) counts as a failure of the site, as RFC 9309 says to assume full disallow.
//! - **SSRF**: crawled URLs come from data (search results, links, redirects), so they may not reach
//!   private, loopback or link-local addresses: IP literals are checked before each hop, and names are
//!   checked after DNS resolution by the client's own resolver, so a name cannot resolve to a public
//!   address for a check and a private one for the connection. With `ENRICH_HTTP_PROXY`, the proxy
//!   resolves names (IP literals and `localhost` are still refused here).
//! - **Retries**: timeouts, connection errors, 408, 429 (honouring Retry-After) and 5xx, at most
//!   `attempts` tries with exponential backoff and jitter. Anything else fails at once.
//! - **Bounds**: redirects are followed by hand (each hop guarded and robots-checked) up to a limit; bodies
//!   are read up to `max_bytes` and cut there; only HTML is read; a whole request (body included) has a
//!   deadline.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use reqwest::header::{CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::{Client, RequestBuilder, Response, StatusCode};
use url::{Host, Url};

/// What a fetch can end in. Messages name the cause, never a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("refused to fetch {0}")]
    Refused(String),
    #[error("robots.txt disallows {0}")]
    Robots(String),
    #[error("HTTP {status} from {url}")]
    Status { status: u16, url: String },
    #[error("timed out fetching {0}")]
    Timeout(String),
    #[error("could not connect to {0}")]
    Connect(String),
    #[error("more than {0} redirects")]
    Redirects(usize),
    #[error("not HTML ({content_type}) at {url}")]
    NotHtml { content_type: String, url: String },
    /// A provider (search, reader) refused for now: a rate limit or a bot check. Retried later.
    #[error("{0}")]
    Provider(String),
    #[error("{0}")]
    Other(String),
}

impl FetchError {
    pub fn is_retryable(&self) -> bool {
        match self {
            FetchError::Timeout(_) | FetchError::Connect(_) | FetchError::Provider(_) => true,
            FetchError::Status { status, .. } => *status == 408 || *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub user_agent: String,
    pub timeout: Duration,
    pub host_spacing: Duration,
    pub max_bytes: usize,
    pub max_redirects: usize,
    pub attempts: u32,
    pub allow_private: bool,
    pub proxy: Option<String>,
    /// A Retry-After longer than this fails the request instead of stalling a worker.
    pub max_retry_after: Duration,
    /// The first backoff delay (doubling, with jitter).
    pub backoff: Duration,
}

/// A fetched page.
#[derive(Debug, Clone)]
pub struct Page {
    /// The final URL, after redirects.
    pub url: Url,
    pub body: String,
    /// Cut at `max_bytes`.
    pub truncated: bool,
}

pub struct Http {
    /// For crawled sites: guarded resolver, no automatic redirects.
    site: Client,
    /// For configured endpoints.
    api: Client,
    spacing: DefaultKeyedRateLimiter<String>,
    /// Sites whose robots.txt asks for a longer `Crawl-delay`: when their next request may go.
    delayed: std::sync::Mutex<HashMap<String, tokio::time::Instant>>,
    acquired: AtomicU64,
    settings: HttpSettings,
    robots_agent: String,
}

/// Origins' robots.txt rules, kept for one company's crawl (a few hosts at most).
#[derive(Default)]
pub struct RobotsCache {
    rules: HashMap<String, Option<Arc<texting_robots::Robot>>>,
}

impl Http {
    pub fn new(settings: HttpSettings) -> crate::Result<Http> {
        let err = |what: &str, e: reqwest::Error| crate::Error::config(format!("{what}: {}", e.without_url()));
        // `honour_no_proxy`: only for the API client (search, LLM, reader). Crawled URLs come from data: a
        // host listed in NO_PROXY would be fetched directly, past the proxy and unchecked.
        let builder = |honour_no_proxy: bool| {
            let mut b = Client::builder()
                .user_agent(settings.user_agent.clone())
                .timeout(settings.timeout)
                .connect_timeout(settings.timeout)
                .pool_idle_timeout(Duration::from_secs(15))
                .redirect(reqwest::redirect::Policy::none());
            if let Some(p) = &settings.proxy {
                let proxy = reqwest::Proxy::all(p)
                    .map_err(|e| crate::Error::config(format!("ENRICH_HTTP_PROXY is not a proxy URL ({e})")))?
                    .no_proxy(if honour_no_proxy { reqwest::NoProxy::from_env() } else { None });
                b = b.proxy(proxy);
            } else {
                b = b.no_proxy();
            }
            Ok::<_, crate::Error>(b)
        };
        let mut site = builder(false)?;
        if !settings.allow_private && settings.proxy.is_none() {
            site = site.dns_resolver(Arc::new(PublicOnly));
        }
        let period = settings.host_spacing.max(Duration::from_millis(1));
        Ok(Http {
            site: site.build().map_err(|e| err("building the HTTP client", e))?,
            api: builder(true)?.build().map_err(|e| err("building the HTTP client", e))?,
            spacing: RateLimiter::keyed(Quota::with_period(period).expect("a non-zero period")),
            delayed: std::sync::Mutex::new(HashMap::new()),
            acquired: AtomicU64::new(0),
            robots_agent: settings.user_agent.split(['/', ' ']).next().unwrap_or("acraflow").to_owned(),
            settings,
        })
    }

    /// Settings of this client.
    pub fn settings(&self) -> &HttpSettings {
        &self.settings
    }

    /// Fetches an HTML page of a crawled site: guarded, robots-checked, spaced, retried, redirects followed.
    pub async fn page(&self, url: &Url, robots: &mut RobotsCache) -> Result<Page, FetchError> {
        let mut url = url.clone();
        for _ in 0..=self.settings.max_redirects {
            self.guard(&url)?;
            let delay = self.check_robots(&url, robots).await?;
            let resp = self.send(&url, Some(delay), || self.site.get(url.clone())).await?;
            if let Some(next) = redirect_target(&url, &resp)? {
                url = next;
                continue;
            }
            let content_type = header(&resp, CONTENT_TYPE);
            let html = content_type.is_empty() || content_type.contains("html");
            if !html {
                return Err(FetchError::NotHtml { content_type, url: url.to_string() });
            }
            let (body, truncated) = self.read_capped(&url, resp).await?;
            return Ok(Page { url, body: String::from_utf8_lossy(&body).into_owned(), truncated });
        }
        Err(FetchError::Redirects(self.settings.max_redirects))
    }

    /// GETs a configured endpoint (search, reader): retried, capped, redirects followed by the client rules.
    pub async fn get_text(&self, url: &Url) -> Result<String, FetchError> {
        let resp = self.send(url, None, || self.api.get(url.clone())).await?;
        let (body, _) = self.read_capped(url, resp).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// One GET of a configured endpoint, no retries: its status, Retry-After and body (capped). For
    /// providers whose refusals (202, 403, challenge pages) only the caller can recognise.
    pub async fn get_once(&self, url: &Url) -> Result<(u16, Option<Duration>, String), FetchError> {
        let resp = self.api.get(url.clone()).send().await.map_err(|e| transport_error(url, &e))?;
        let status = resp.status().as_u16();
        let wait = retry_after(&resp);
        let (body, _) = self.read_capped(url, resp).await?;
        Ok((status, wait, String::from_utf8_lossy(&body).into_owned()))
    }

    /// POSTs JSON to a configured endpoint (LLM, contacts) with an optional bearer token; returns the JSON.
    pub async fn post_json(
        &self,
        url: &Url,
        bearer: Option<&str>,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, FetchError> {
        let resp = self
            .send(url, None, || {
                let r = self.api.post(url.clone()).json(body);
                match bearer {
                    Some(token) => r.bearer_auth(token),
                    None => r,
                }
            })
            .await?;
        let (bytes, truncated) = self.read_capped(url, resp).await?;
        if truncated {
            return Err(FetchError::Other(format!("response from {} is larger than the body cap", strip(url))));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| FetchError::Other(format!("response from {} is not JSON ({e})", strip(url))))
    }

    /// Sends with retries. `spacing`: a crawled site's request, which takes a politeness slot for the site
    /// before every attempt (and waits out the site's `Crawl-delay`, when it has one); `None` for a
    /// configured endpoint.
    async fn send(
        &self,
        url: &Url,
        spacing: Option<Option<Duration>>,
        request: impl Fn() -> RequestBuilder,
    ) -> Result<Response, FetchError> {
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(self.settings.backoff)
            .with_max_delay(Duration::from_secs(10))
            .with_max_times(self.settings.attempts.saturating_sub(1) as usize)
            .with_jitter()
            .build();
        loop {
            if let Some(crawl_delay) = spacing {
                self.space(url, crawl_delay).await;
            }
            let (error, retry_after) = match request().send().await {
                Ok(resp) if resp.status().is_success() || resp.status().is_redirection() => return Ok(resp),
                Ok(resp) => (status_error(url, resp.status()), retry_after(&resp)),
                Err(e) => (transport_error(url, &e), None),
            };
            if !error.is_retryable() {
                return Err(error);
            }
            let Some(backoff) = delays.next() else { return Err(error) };
            let wait = match retry_after {
                Some(ra) if ra > self.settings.max_retry_after => return Err(error),
                Some(ra) => ra.max(backoff),
                None => backoff,
            };
            tracing::debug!(url = %strip(url), error = %error, wait_ms = wait.as_millis() as u64, "retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// Waits for the site's politeness slot. A site is its registrable domain: `x.sg` and `www.x.sg` are
    /// one server, one spacing.
    async fn space(&self, url: &Url, crawl_delay: Option<Duration>) {
        let site = super::extract::registrable(url.host_str().unwrap_or(""));
        self.spacing.until_key_ready(&site).await;
        // Keep the limiter's memory to recently seen hosts.
        if self.acquired.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            self.spacing.retain_recent();
            let now = tokio::time::Instant::now();
            self.delayed.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, next| *next > now);
        }
        // A longer Crawl-delay than our spacing: the site's next slot, reserved under the lock.
        if let Some(delay) = crawl_delay.filter(|d| *d > self.settings.host_spacing) {
            let wait_until = {
                let mut next = self.delayed.lock().unwrap_or_else(|p| p.into_inner());
                let now = tokio::time::Instant::now();
                let slot = next.get(&site).copied().filter(|t| *t > now).unwrap_or(now);
                next.insert(site, slot + delay);
                slot
            };
            tokio::time::sleep_until(wait_until).await;
        }
    }

    async fn read_capped(&self, url: &Url, mut resp: Response) -> Result<(Vec<u8>, bool), FetchError> {
        let max = self.settings.max_bytes;
        let mut body = Vec::with_capacity(resp.content_length().unwrap_or(0).min(max as u64) as usize);
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let take = chunk.len().min(max - body.len());
                    body.extend_from_slice(&chunk[..take]);
                    if body.len() >= max {
                        return Ok((body, true));
                    }
                }
                Ok(None) => return Ok((body, false)),
                Err(e) => return Err(transport_error(url, &e)),
            }
        }
    }

    /// Refuses URLs that are not http(s), IP literals that are not public, and `localhost`.
    pub fn guard(&self, url: &Url) -> Result<(), FetchError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(FetchError::Refused(format!("{} (only http and https)", strip(url))));
        }
        if self.settings.allow_private {
            return Ok(());
        }
        let private = match url.host() {
            Some(Host::Ipv4(ip)) => !is_public(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => !is_public(IpAddr::V6(ip)),
            Some(Host::Domain(d)) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                d == "localhost" || d.ends_with(".localhost")
            }
            None => true,
        };
        if private {
            return Err(FetchError::Refused(format!(
                "{} (a private, loopback or link-local address; set ENRICH_ALLOW_PRIVATE=true to allow)",
                strip(url)
            )));
        }
        Ok(())
    }

    /// Checks `url` against its origin's robots.txt; returns the site's `Crawl-delay` (capped).
    async fn check_robots(&self, url: &Url, cache: &mut RobotsCache) -> Result<Option<Duration>, FetchError> {
        let origin = url.origin().ascii_serialization();
        if !cache.rules.contains_key(&origin) {
            let rules = self.fetch_robots(url).await?;
            cache.rules.insert(origin.clone(), rules.map(Arc::new));
        }
        match &cache.rules[&origin] {
            Some(robot) if !robot.allowed(url.as_str()) => Err(FetchError::Robots(url.path().to_owned())),
            Some(robot) => Ok(robot
                .delay
                .filter(|d| d.is_finite() && *d > 0.0)
                .map(|d| Duration::from_secs_f32(d.min(MAX_CRAWL_DELAY.as_secs_f32())))),
            None => Ok(None),
        }
    }

    /// `None`: no rules (404 and other 4xx, or an unparsable file) - everything is allowed.
    async fn fetch_robots(&self, page: &Url) -> Result<Option<texting_robots::Robot>, FetchError> {
        let mut url = page.join("/robots.txt").map_err(|e| FetchError::Other(e.to_string()))?;
        for _ in 0..=self.settings.max_redirects {
            self.guard(&url)?;
            let resp = match self.send(&url, Some(None), || self.site.get(url.clone())).await {
                Ok(resp) => resp,
                Err(FetchError::Status { status, .. }) if (400..500).contains(&status) && status != 429 => {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            };
            if let Some(next) = redirect_target(&url, &resp)? {
                url = next;
                continue;
            }
            let (body, _) = self.read_capped(&url, resp).await?;
            return Ok(Some(parse_robots(&self.robots_agent, &body)));
        }
        Ok(None)
    }
}

/// The longest `Crawl-delay` honoured: a site asking for more is crawled at this pace (ENRICH_COMPANY_TIMEOUT
/// bounds the whole company anyway).
pub const MAX_CRAWL_DELAY: Duration = Duration::from_secs(20);

/// A robots.txt as the site meant it. The parser refuses a whole file over one rule it cannot read; such a
/// rule is dropped instead, and when a dropped rule was a `Disallow` the site is treated as disallowing
/// everything (fail closed: we cannot tell what it meant to keep us from).
pub fn parse_robots(agent: &str, body: &[u8]) -> texting_robots::Robot {
    let deny_all = || texting_robots::Robot::new(agent, b"User-agent: *\nDisallow: /\n").expect("a valid robots.txt");
    if let Ok(robot) = texting_robots::Robot::new(agent, body) {
        return robot;
    }
    let text = String::from_utf8_lossy(body);
    let mut kept = String::with_capacity(text.len());
    for line in text.lines() {
        let field = line.split(':').next().unwrap_or("").trim().to_ascii_lowercase();
        if matches!(field.as_str(), "allow" | "disallow") {
            let alone = format!("User-agent: *\n{line}\n");
            if texting_robots::Robot::new(agent, alone.as_bytes()).is_err() {
                if field == "disallow" {
                    return deny_all();
                }
                continue;
            }
        }
        kept.push_str(line);
        kept.push('\n');
    }
    texting_robots::Robot::new(agent, kept.as_bytes()).unwrap_or_else(|_| deny_all())
}

fn redirect_target(from: &Url, resp: &Response) -> Result<Option<Url>, FetchError> {
    if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
        return Ok(None);
    }
    let location = header(resp, LOCATION);
    from.join(&location)
        .map(Some)
        .map_err(|_| FetchError::Other(format!("redirect from {} to an invalid location '{location}'", strip(from))))
}

fn header(resp: &Response, name: reqwest::header::HeaderName) -> String {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").trim().to_ascii_lowercase()
}

fn retry_after(resp: &Response) -> Option<Duration> {
    header(resp, RETRY_AFTER).parse::<u64>().ok().map(Duration::from_secs)
}

fn status_error(url: &Url, status: StatusCode) -> FetchError {
    FetchError::Status { status: status.as_u16(), url: strip(url) }
}

fn transport_error(url: &Url, e: &reqwest::Error) -> FetchError {
    if let Some(refusal) = find_source::<PrivateAddress>(e) {
        return FetchError::Refused(format!("{} ({refusal})", strip(url)));
    }
    if e.is_timeout() {
        FetchError::Timeout(strip(url))
    } else if e.is_connect() || e.is_request() || e.is_body() {
        // The cause chain says why (DNS, TLS, refused): what an operator acts on.
        let why: String = e.without_url_ref().chars().take(300).collect();
        FetchError::Connect(format!("{} ({why})", strip(url)))
    } else {
        FetchError::Other(format!("fetching {}: {}", strip(url), e.without_url_ref()))
    }
}

/// A URL for messages: no userinfo, no query (either may hold a credential).
pub fn strip(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.to_string()
}

fn find_source<'a, T: std::error::Error + 'static>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<T>() {
            return Some(t);
        }
        cur = c.source();
    }
    None
}

trait WithoutUrlRef {
    fn without_url_ref(&self) -> String;
}
impl WithoutUrlRef for reqwest::Error {
    fn without_url_ref(&self) -> String {
        let mut s = String::new();
        let mut cur = std::error::Error::source(self);
        while let Some(c) = cur {
            if !s.is_empty() {
                s.push_str(": ");
            }
            s.push_str(&c.to_string());
            cur = c.source();
        }
        if s.is_empty() {
            "request failed".into()
        } else {
            s
        }
    }
}

/// Whether an address is publicly routable (not private, loopback, link-local, CGNAT, multicast, ...).
/// IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4) are judged by that address;
/// special-purpose ranges (IANA's registries) are not public.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (18..20).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
                || (o[0] == 192 && o[1] == 88 && o[2] == 99) // 6to4 relay anycast
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded =
                |hi: u16, lo: u16| IpAddr::V4(std::net::Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
            if v6.is_loopback() || v6.is_unspecified() {
                return false;
            }
            // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible)
            if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) {
                return is_public(embedded(s[6], s[7]));
            }
            // NAT64, well-known prefix 64:ff9b::/96
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public(embedded(s[6], s[7]));
            }
            // 6to4, 2002::/16: the IPv4 address follows the prefix
            if s[0] == 0x2002 {
                return is_public(embedded(s[1], s[2]));
            }
            !(v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // local-use NAT64, 64:ff9b:1::/48
                || (s[0] == 0x2001 && s[1] == 0) // Teredo, 2001::/32
                || (s[0] == 0x2001 && s[1] == 0xdb8) // documentation, 2001:db8::/32
                || (s[0] & 0xfff0) == 0x3ff0 // documentation, 3fff::/20
                || s[..4] == [0x100, 0, 0, 0]) // discard, 100::/64
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to the non-public address {addr}; set ENRICH_ALLOW_PRIVATE=true to allow")]
struct PrivateAddress {
    host: String,
    addr: IpAddr,
}

/// The crawler's DNS resolver: the system's, refusing any name that resolves to a non-public address.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
                return Err(
                    Box::new(PrivateAddress { host, addr: bad.ip() }) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_addresses() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::1",
            "2001::1",
            "fec0::1",
            "100::1",
            "2001:db8::1",
            "3fff::1",
            "192.0.0.8",
            "192.88.99.1",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in
            ["8.8.8.8", "203.116.1.1", "2001:4860:4860::8888", "64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8"]
        {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn robots_rules_the_parser_cannot_read_fail_closed() {
        let url = |p: &str| format!("https://x.sg{p}");
        // A rule the parser refuses (a pattern past its regex size limit) beside `Disallow: /`.
        let odd = format!("User-agent: *\nDisallow: /\nDisallow: /{}$\n", "*a".repeat(5_000));
        assert!(texting_robots::Robot::new("acraflow", odd.as_bytes()).is_err(), "the parser refuses the file");
        let r = parse_robots("acraflow", odd.as_bytes());
        assert!(!r.allowed(&url("/about")), "one unreadable Disallow must not open the site");
        let allow_odd = format!("User-agent: *\nDisallow: /private/\nAllow: /{}$\n", "*a".repeat(5_000));
        assert!(texting_robots::Robot::new("acraflow", allow_odd.as_bytes()).is_err());
        let r = parse_robots("acraflow", allow_odd.as_bytes());
        assert!(r.allowed(&url("/about")) && !r.allowed(&url("/private/x")), "the readable rules still hold");
        let delay = parse_robots("acraflow", b"User-agent: *\nCrawl-delay: 5\nDisallow: /tmp/\n");
        assert_eq!(delay.delay, Some(5.0));
    }

    #[test]
    fn urls_in_messages_lose_credentials() {
        let u = Url::parse("https://user:secret@api.example.com/v1/x?key=sk-123").unwrap();
        assert_eq!(strip(&u), "https://api.example.com/v1/x");
    }
}
