//! Deterministic extraction from HTML: about text, public emails (plain, obfuscated, Cloudflare-protected,
//! JSON-LD), phone numbers (E.164, faxes skipped), the LinkedIn company page, the HQ postal code,
//! tech-stack fingerprints, the careers page's job count, the same-site links worth crawling (by path and
//! by link text, English and Chinese), and what the site verifier needs: the visible text, UENs on the
//! page, parked-domain markers, Singapore and foreign signals.
//!
//! Bounded: the markup is first cut to [`MAX_DEPTH`] levels of nesting by a linear scan, so the parser and
//! every walk over the tree stay linear in the page; text, emails and phones are capped per page. Pure
//! functions over a decoded page; they never fail and never panic on malformed HTML (html5ever recovers
//! like a browser does). Run them off the async runtime (`spawn_blocking`): a big page is milliseconds
//! of CPU.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use ego_tree::iter::Edge;
use regex::Regex;
use scraper::{ElementRef, Html, Node, Selector};
use url::Url;

use super::phones;

/// Text kept per page for the about paragraph and the LLM corpus.
const MAX_PAGE_TEXT: usize = 20_000;
/// Visible text kept per page for verification (UEN, name, address).
const MAX_VISIBLE: usize = 80_000;
pub const MAX_ABOUT_CHARS: usize = 1_000;
/// Nesting kept before parsing; deeper tags are dropped (their text is kept).
pub const MAX_DEPTH: usize = 256;
/// Emails kept from one page.
const MAX_EMAILS_PER_PAGE: usize = 50;
/// JSON-LD read per page, and per block.
const MAX_JSON_LD: usize = 256 * 1024;

/// What the crawler looks for beyond the homepage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageKind {
    Home,
    About,
    Contact,
    Careers,
}

impl PageKind {
    /// The kind a same-site link points to, judged by its path (`/about-us`, `/contact`, `/careers/`,
    /// `/lxwm.html`...).
    pub fn of_path(path: &str) -> Option<PageKind> {
        let p = path.to_ascii_lowercase();
        let seg = p.trim_matches('/');
        if seg.is_empty() {
            return None;
        }
        // Only the first two segments: /careers/123/apply is a posting, not the careers page.
        if seg.split('/').count() > 2 {
            return None;
        }
        let has = |words: &[&str]| words.iter().any(|k| seg.contains(k));
        if has(&["about", "company", "who-we-are", "our-story", "gywm", "guanyu"]) {
            Some(PageKind::About)
        } else if has(&["contact", "reach-us", "enquir", "get-in-touch", "findus", "find-us", "lxwm", "lianxi"]) {
            Some(PageKind::Contact)
        } else if has(&["career", "jobs", "join-us", "vacanc", "zhaopin"]) {
            Some(PageKind::Careers)
        } else {
            None
        }
    }

    /// The kind a link's text names (`About us`, `Get in touch`, `关于我们`, `联系我们`, `招聘`).
    pub fn of_text(text: &str) -> Option<PageKind> {
        let t = text.to_lowercase();
        let t = t.trim();
        if t.is_empty() || t.chars().count() > 40 {
            return None;
        }
        let has = |words: &[&str]| words.iter().any(|k| t.contains(k));
        if has(&["about", "who we are", "our story", "关于", "公司简介", "公司介绍"]) {
            Some(PageKind::About)
        } else if has(&["contact", "get in touch", "find us", "reach us", "enquir", "联系", "聯繫", "聯絡"]) {
            Some(PageKind::Contact)
        } else if has(&["career", "jobs", "join us", "join our team", "vacanc", "招聘", "加入我们"]) {
            Some(PageKind::Careers)
        } else {
            None
        }
    }
}

/// Everything extracted from one page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    pub title: Option<String>,
    pub description: Option<String>,
    /// The page's main paragraphs (script, style and navigation excluded), capped.
    pub text: String,
    /// All visible text, whitespace squashed, capped: what the verifier reads.
    pub visible: String,
    /// Names, identifiers and addresses from JSON-LD, for the verifier.
    pub structured: String,
    pub emails: BTreeSet<String>,
    /// E.164.
    pub phones: BTreeSet<String>,
    pub linkedin_url: Option<String>,
    /// A Singapore postal code written as an address (`Singapore 123456`, `S(123456)`, `SG 123456`,
    /// `新加坡 123456`, or JSON-LD's `postalCode`).
    pub hq_postal: Option<String>,
    /// UENs printed on the page.
    pub uens: BTreeSet<String>,
    /// A parked, for-sale or placeholder page.
    pub parked: bool,
    /// A Singapore address or +65 number.
    pub singapore: bool,
    /// Another country's address or number.
    pub foreign: bool,
    /// `<meta http-equiv="refresh">` target.
    pub refresh: Option<Url>,
    pub tech: BTreeSet<&'static str>,
    pub jobs_count: Option<u32>,
    /// Same-site links to about/contact/careers pages, in page order, without duplicates.
    pub links: Vec<(PageKind, Url)>,
}

macro_rules! selector {
    ($name:ident, $css:expr) => {
        static $name: LazyLock<Selector> = LazyLock::new(|| Selector::parse($css).expect("a valid selector"));
    };
}
selector!(TITLE, "title");
selector!(META, "meta");
selector!(ANCHOR, "a[href]");
selector!(SCRIPT_SRC, "script[src], link[href]");
selector!(JSON_LD, r#"script[type="application/ld+json"]"#);
selector!(CF_EMAIL, "[data-cfemail]");
selector!(PARAGRAPHS, "p");
selector!(CLASSED, "li[class], article[class], div[class], tr[class]");

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b[a-z0-9][a-z0-9._%+-]{0,63}@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,24}\b").unwrap()
});
/// `info [at] acme [dot] com`, `info(at)acme.com`, `info {at} acme . com`.
static OBFUSCATED_AT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?i)\s*[\[\(\{<]\s*at\s*[\]\)\}>]\s*").unwrap());
static OBFUSCATED_DOT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)\s*[\[\(\{<]\s*dot\s*[\]\)\}>]\s*").unwrap());
/// A Singapore postal code as addresses write it.
static SG_POSTAL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:(?i:\bSingapore)[\s,]*\(?\s*|\bS\s?\(\s?|\bS\s|\bSG\s?|新加坡\s*)(\d{6})\b").unwrap()
});
static FOREIGN_PLACE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(?:united kingdom|london|manchester|england|india|mumbai|new delhi|delhi|bangalore|chennai|australia|sydney|melbourne|hong kong|kowloon|malaysia|kuala lumpur|johor bahru|china|shanghai|beijing|shenzhen|guangzhou|united states|new york|california|indonesia|jakarta)\b",
    )
    .unwrap()
});
static UEN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(?:(?:19|20)\d{7}[A-Z]|\d{8}[A-Z]|[TSR]\d{2}[A-Z]{2}\d{4}[A-Z])\b").unwrap());
/// Markers of a parked or for-sale domain, whatever the page's length.
static PARKED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)domain(?: name)?(?: \S+)? (?:is|may be) for sale|buy this domain|this domain is parked|parked (?:free|domain)|domain parking|make an offer on this domain|hugedomains|\bsedo\b|\bdan\.com\b|afternic").unwrap()
});
/// Markers of a placeholder page, on a short page only.
static PLACEHOLDER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)coming soon|under construction|default web page|\bit works!|index of /|welcome to nginx|site is not configured").unwrap()
});
static LINKEDIN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^https?://(?:[a-z]{2,3}\.)?linkedin\.com/company/([A-Za-z0-9_.%-]+)").unwrap());
static REFRESH_URL: LazyLock<Regex> = LazyLock::new(|| Regex::new(r#"(?i)url\s*=\s*['"]?([^'"\s>]+)"#).unwrap());

/// Fingerprints: a needle in a script/link URL or the generator meta, and the technology it reveals.
const TECH: &[(&str, &str)] = &[
    ("wp-content", "WordPress"),
    ("wp-includes", "WordPress"),
    ("wordpress", "WordPress"),
    ("cdn.shopify.com", "Shopify"),
    ("shopify", "Shopify"),
    ("wixstatic.com", "Wix"),
    ("wix.com", "Wix"),
    ("squarespace", "Squarespace"),
    ("joomla", "Joomla"),
    ("drupal", "Drupal"),
    ("webflow", "Webflow"),
    ("googletagmanager.com", "Google Analytics"),
    ("google-analytics.com", "Google Analytics"),
    ("hs-scripts.com", "HubSpot"),
    ("hubspot", "HubSpot"),
    ("connect.facebook.net", "Meta Pixel"),
    ("hotjar", "Hotjar"),
    ("intercom", "Intercom"),
    ("zendesk", "Zendesk"),
    ("js.stripe.com", "Stripe"),
    ("recaptcha", "reCAPTCHA"),
    ("jquery", "jQuery"),
    ("/_next/", "Next.js"),
    ("cloudflare", "Cloudflare"),
];

/// Extracts what one page says. `base` is the page's final URL (after redirects).
pub fn page(html: &str, base: &Url, kind: PageKind) -> Extracted {
    let limited = limit_depth(html, MAX_DEPTH);
    let doc = Html::parse_document(&limited);
    let title = doc
        .select(&TITLE)
        .next()
        .map(|t| truncate_chars(&squash(&t.text().collect::<String>()), 300))
        .filter(|t| !t.is_empty());
    let mut out = Extracted { title, ..Default::default() };
    for m in doc.select(&META) {
        let attr = |n: &str| m.value().attr(n).map(str::trim);
        let key = attr("name").or_else(|| attr("property")).unwrap_or("").to_ascii_lowercase();
        let Some(content) = attr("content").filter(|c| !c.is_empty()) else { continue };
        if attr("http-equiv").is_some_and(|h| h.eq_ignore_ascii_case("refresh")) {
            if let Some(c) = REFRESH_URL.captures(content) {
                out.refresh = out.refresh.take().or_else(|| base.join(&c[1]).ok());
            }
            continue;
        }
        match key.as_str() {
            "description" | "og:description" if out.description.is_none() => {
                out.description = Some(truncate_chars(&squash(content), MAX_ABOUT_CHARS))
            }
            "generator" => fingerprint(content, &mut out.tech),
            _ => {}
        }
    }
    for s in doc.select(&SCRIPT_SRC) {
        if let Some(src) = s.value().attr("src").or_else(|| s.value().attr("href")) {
            fingerprint(src, &mut out.tech);
        }
    }
    if html.contains("__NEXT_DATA__") {
        out.tech.insert("Next.js");
    }
    let mut ld_budget = MAX_JSON_LD;
    for script in doc.select(&JSON_LD) {
        let text: String = script.text().collect();
        if text.len() > ld_budget {
            break;
        }
        ld_budget -= text.len();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(text.trim()) {
            let mut nodes = 0;
            json_ld(&v, 0, &mut nodes, &mut out);
        }
    }
    for e in doc.select(&CF_EMAIL) {
        if let Some(mail) = e.value().attr("data-cfemail").and_then(cloudflare_email) {
            add_email(&mail, &mut out.emails);
        }
    }

    let mut seen = BTreeSet::new();
    for a in doc.select(&ANCHOR) {
        let href = a.value().attr("href").unwrap_or("").trim();
        if let Some(mail) = href.strip_prefix("mailto:") {
            let mail = mail.split('?').next().unwrap_or("");
            let decoded = percent_decode(mail);
            for m in EMAIL.find_iter(&decoded) {
                add_email(m.as_str(), &mut out.emails);
            }
            continue;
        }
        if let Some(tel) = href.strip_prefix("tel:") {
            phones::in_tel_link(&percent_decode(tel), &mut out.phones);
            continue;
        }
        let Ok(url) = base.join(href) else { continue };
        if let Some((_, hex)) = url.as_str().split_once("/cdn-cgi/l/email-protection#") {
            if let Some(mail) = cloudflare_email(hex) {
                add_email(&mail, &mut out.emails);
            }
            continue;
        }
        phones::in_whatsapp_link(&url, &mut out.phones);
        if out.linkedin_url.is_none() {
            out.linkedin_url = linkedin_company(url.as_str());
        }
        if same_site(&url, base) && matches!(url.scheme(), "http" | "https") && !url.path().trim_matches('/').is_empty()
        {
            let kind = PageKind::of_path(url.path()).or_else(|| {
                let text: String = a.text().take(8).collect();
                PageKind::of_text(&text).filter(|_| url.path().trim_matches('/').split('/').count() <= 2)
            });
            if let Some(k) = kind {
                let mut clean = url.clone();
                clean.set_fragment(None);
                if seen.insert(clean.to_string()) {
                    out.links.push((k, clean));
                }
            }
        }
    }

    out.visible = visible_text(&doc);
    let deobfuscated = OBFUSCATED_DOT.replace_all(&OBFUSCATED_AT.replace_all(&out.visible, "@"), ".").into_owned();
    for m in EMAIL.find_iter(&deobfuscated) {
        add_email(m.as_str(), &mut out.emails);
    }
    phones::in_text(&out.visible, &mut out.phones);
    if let Some(c) = SG_POSTAL.captures(&out.visible) {
        out.hq_postal = out.hq_postal.take().or_else(|| Some(c[1].to_owned()));
    }
    for m in UEN.find_iter(&out.visible).take(100) {
        out.uens.insert(m.as_str().to_owned());
    }
    let short = out.visible.chars().count() < 600;
    out.parked = PARKED.is_match(&out.visible) || (short && PLACEHOLDER.is_match(&out.visible));
    out.singapore = out.hq_postal.is_some() || out.phones.iter().any(|p| phones::is_singapore(p));
    out.foreign = out.phones.iter().any(|p| !phones::is_singapore(p)) || FOREIGN_PLACE.is_match(&out.visible);

    let paragraphs: Vec<String> = doc
        .select(&PARAGRAPHS)
        .filter(|p| !inside(p, &["nav", "footer", "header", "script", "style"]))
        .map(|p| squash(&p.text().collect::<String>()))
        .filter(|t| t.chars().count() >= 40)
        .take(500)
        .collect();
    out.text = truncate_chars(&paragraphs.join("\n"), MAX_PAGE_TEXT);
    if kind == PageKind::Careers {
        out.jobs_count = Some(count_jobs(&doc, base));
    }
    out
}

/// Cuts markup to `max` levels of nesting in one pass: tags that would open deeper are dropped (with
/// their closing tags); text, comments and raw-text elements are copied. Void elements and self-closing
/// tags do not nest. The result is what a browser would show of a sane page; a pathological page (100k
/// nested `<div>`) loses only its structure.
pub fn limit_depth(html: &str, max: usize) -> std::borrow::Cow<'_, str> {
    const VOID: &[&str] = &[
        "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr", "param",
    ];
    let b = html.as_bytes();
    let mut out: Option<String> = None;
    let mut depth = 0usize;
    let mut i = 0;
    let mut copied = 0; // bytes of `html` already in `out` (when cutting)
    while let Some(off) = memchr(b'<', &b[i..]) {
        let lt = i + off;
        let rest = &html[lt..];
        if rest.starts_with("<!--") {
            i = rest.find("-->").map_or(html.len(), |e| lt + e + 3);
            continue;
        }
        let closing = rest.as_bytes().get(1) == Some(&b'/');
        let name_start = lt + 1 + usize::from(closing);
        let name_len = html[name_start..].bytes().take_while(|c| c.is_ascii_alphanumeric()).count();
        if name_len == 0 {
            i = lt + 1;
            continue;
        }
        let name = html[name_start..name_start + name_len].to_ascii_lowercase();
        let Some(gt) = html[lt..].find('>').map(|e| lt + e) else { break };
        let self_closing = html[..gt].ends_with('/');
        let mut end = gt + 1;
        if !closing && matches!(name.as_str(), "script" | "style" | "textarea" | "title") {
            // Raw text: skip to its end tag; markup inside is not markup.
            let close = format!("</{name}");
            end = find_ascii_ci(&html[end..], &close).map_or(html.len(), |e| end + e);
            // The end tag itself is handled by the next iteration.
        }
        let drop = if closing {
            let was = depth;
            depth = depth.saturating_sub(1);
            was > max
        } else if VOID.contains(&name.as_str()) || self_closing {
            depth >= max
        } else {
            depth += 1;
            depth > max
        };
        if drop {
            let o = out.get_or_insert_with(|| String::with_capacity(html.len()));
            o.push_str(&html[copied..lt]);
            copied = gt + 1;
            end = gt + 1;
        }
        i = end;
    }
    match out {
        None => std::borrow::Cow::Borrowed(html),
        Some(mut o) => {
            o.push_str(&html[copied..]);
            std::borrow::Cow::Owned(o)
        }
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&c| c == needle)
}

fn find_ascii_ci(hay: &str, needle: &str) -> Option<usize> {
    let n = needle.as_bytes();
    hay.as_bytes().windows(n.len()).position(|w| w.eq_ignore_ascii_case(n))
}

/// Cloudflare's email protection: hex bytes, the first the XOR key of the rest.
pub fn cloudflare_email(hex: &str) -> Option<String> {
    let hex = hex.trim();
    if hex.len() < 4 || !hex.len().is_multiple_of(2) || hex.len() > 512 {
        return None;
    }
    let bytes: Vec<u8> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect::<Option<_>>()?;
    let key = bytes[0];
    let decoded: Vec<u8> = bytes[1..].iter().map(|b| b ^ key).collect();
    String::from_utf8(decoded).ok().filter(|s| s.contains('@'))
}

/// Reads a JSON-LD value: any object with `email`, `telephone`, `address`, `sameAs`, `name`, `taxID` or
/// `identifier`, in `@graph` arrays and nested objects. Bounded in depth and nodes.
fn json_ld(v: &serde_json::Value, depth: usize, nodes: &mut usize, out: &mut Extracted) {
    use serde_json::Value;
    *nodes += 1;
    if depth > 8 || *nodes > 2_000 {
        return;
    }
    match v {
        Value::Array(items) => items.iter().for_each(|i| json_ld(i, depth + 1, nodes, out)),
        Value::Object(map) => {
            let strings = |key: &str| -> Vec<String> {
                match map.get(key) {
                    Some(Value::String(s)) => vec![s.clone()],
                    Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
                    _ => Vec::new(),
                }
            };
            for e in strings("email") {
                let e = percent_decode(e.trim_start_matches("mailto:"));
                for m in EMAIL.find_iter(&e) {
                    add_email(m.as_str(), &mut out.emails);
                }
            }
            for t in strings("telephone") {
                phones::in_tel_link(&t, &mut out.phones);
            }
            for s in strings("sameAs").iter().chain(strings("url").iter()) {
                if out.linkedin_url.is_none() {
                    out.linkedin_url = linkedin_company(s);
                }
            }
            for key in ["name", "legalName", "alternateName", "taxID", "identifier", "vatID", "streetAddress"] {
                for s in strings(key) {
                    if out.structured.len() < 4_096 {
                        out.structured.push_str(&truncate_chars(&s, 300));
                        out.structured.push('\n');
                    }
                }
            }
            if let Some(postal) = map.get("postalCode").and_then(|p| p.as_str()) {
                let country = map.get("addressCountry").map(|c| match c {
                    Value::String(s) => s.to_ascii_lowercase(),
                    other => other.get("name").and_then(|n| n.as_str()).unwrap_or("").to_ascii_lowercase(),
                });
                let digits: String = postal.chars().filter(char::is_ascii_digit).collect();
                let singapore = matches!(country.as_deref(), None | Some("sg" | "sgp" | "singapore"));
                if singapore && digits.len() == 6 && postal.trim().len() <= 12 {
                    out.hq_postal.get_or_insert(digits.clone());
                    out.structured.push_str(&format!("Singapore {digits}\n"));
                } else if !singapore {
                    out.foreign = true;
                }
            }
            for (k, child) in map {
                if matches!(child, Value::Object(_) | Value::Array(_)) && k != "sameAs" {
                    json_ld(child, depth + 1, nodes, out);
                }
            }
        }
        _ => {}
    }
}

/// `https://www.linkedin.com/company/<slug>` for a LinkedIn company URL.
fn linkedin_company(url: &str) -> Option<String> {
    LINKEDIN
        .captures(url)
        .map(|c| format!("https://www.linkedin.com/company/{}", truncate_chars(c[1].trim_end_matches('/'), 100)))
}

/// The about paragraph: the about page's opening paragraphs, else the homepage's description.
pub fn about_text(about_page: Option<&Extracted>, home: Option<&Extracted>) -> Option<String> {
    let from_page = about_page.map(|p| truncate_chars(&p.text, MAX_ABOUT_CHARS)).filter(|t| t.len() >= 40);
    from_page
        .or_else(|| about_page.and_then(|p| p.description.clone()))
        .or_else(|| home.and_then(|h| h.description.clone()))
        .or_else(|| home.map(|h| truncate_chars(&h.text, MAX_ABOUT_CHARS)).filter(|t| t.len() >= 40))
}

/// Emails ordered for a sales team: the site's own domain first, then the rest, each group sorted.
pub fn rank_emails(emails: &BTreeSet<String>, domain: &str) -> Vec<String> {
    let site = registrable(domain);
    let (mut own, mut other): (Vec<String>, Vec<String>) =
        emails.iter().cloned().partition(|e| e.rsplit_once('@').is_some_and(|(_, d)| registrable(d) == site));
    own.append(&mut other);
    own
}

/// Text of every text node outside script/style/noscript/template, whitespace squashed, capped. One walk
/// over the tree (linear: no ancestor look-ups).
fn visible_text(doc: &Html) -> String {
    let mut out = String::new();
    let mut hidden = 0usize;
    let is_hidden =
        |n: &Node| n.as_element().is_some_and(|e| matches!(e.name(), "script" | "style" | "noscript" | "template"));
    for edge in doc.tree.root().traverse() {
        match edge {
            Edge::Open(n) if is_hidden(n.value()) => hidden += 1,
            Edge::Close(n) if is_hidden(n.value()) => hidden = hidden.saturating_sub(1),
            Edge::Open(n) => {
                if let (Node::Text(t), 0) = (n.value(), hidden) {
                    out.push_str(t);
                    out.push(' ');
                } else if n.value().as_element().is_some_and(|e| matches!(e.name(), "br" | "p" | "div" | "li" | "td")) {
                    out.push(' ');
                }
                if out.len() > 2 * MAX_VISIBLE {
                    break;
                }
            }
            Edge::Close(_) => {}
        }
    }
    truncate_chars(&squash(&out), MAX_VISIBLE)
}

fn inside(e: &ElementRef<'_>, names: &[&str]) -> bool {
    e.ancestors().any(|a| a.value().as_element().is_some_and(|el| names.contains(&el.name())))
}

/// Job postings on a careers page: the innermost elements whose class says job/position/opening/vacancy,
/// else links to postings under the careers path.
fn count_jobs(doc: &Html, base: &Url) -> u32 {
    let is_job = |e: &ElementRef<'_>| {
        e.value().attr("class").is_some_and(|c| {
            let c = c.to_ascii_lowercase();
            ["job", "position", "opening", "vacanc"].iter().any(|k| c.contains(k))
        })
    };
    let classed: Vec<ElementRef<'_>> = doc.select(&CLASSED).filter(is_job).take(1_000).collect();
    let innermost = classed
        .iter()
        .filter(|e| !e.descendants().skip(1).any(|d| ElementRef::wrap(d).is_some_and(|de| is_job(&de))))
        .count();
    if innermost > 0 {
        return innermost as u32;
    }
    let mut postings = BTreeSet::new();
    for a in doc.select(&ANCHOR) {
        let Ok(url) = base.join(a.value().attr("href").unwrap_or("")) else { continue };
        let p = url.path().to_ascii_lowercase();
        let segs: Vec<&str> = p.trim_matches('/').split('/').collect();
        if same_site(&url, base) && segs.len() >= 2 && ["careers", "jobs", "career", "job"].contains(&segs[0]) {
            postings.insert(p);
        }
    }
    postings.len() as u32
}

fn fingerprint(text: &str, tech: &mut BTreeSet<&'static str>) {
    let t = text.to_ascii_lowercase();
    for (needle, name) in TECH {
        if t.contains(needle) {
            tech.insert(name);
        }
    }
}

fn add_email(raw: &str, out: &mut BTreeSet<String>) {
    if out.len() >= MAX_EMAILS_PER_PAGE {
        return;
    }
    let e = raw.trim_matches(|c: char| c == '.' || c == '-').to_ascii_lowercase();
    let asset = [".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".css", ".js"].iter().any(|x| e.ends_with(x));
    let placeholder = ["example.com", "domain.com", "email.com", "sentry.io", "yourdomain.com", "wixpress.com"]
        .iter()
        .any(|d| e.ends_with(d));
    if !asset && !placeholder && e.contains('@') && e.len() <= 254 {
        out.insert(e);
    }
}

/// Same site: the same registrable domain (`x.sg` and `www.x.sg`, not `x.wixsite.com` and `y.wixsite.com`).
pub fn same_site(a: &Url, b: &Url) -> bool {
    match (a.host_str(), b.host_str()) {
        (Some(x), Some(y)) => registrable(x) == registrable(y),
        _ => false,
    }
}

/// The registrable domain of a host by the public suffix list: `www.shop.acme.com.sg` -> `acme.com.sg`,
/// `acme.wixsite.com` -> `acme.wixsite.com` (a private suffix). An IP address or a bare suffix is itself.
pub fn registrable(host: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        return host;
    }
    psl::domain_str(&host).map(str::to_owned).unwrap_or(host)
}

pub fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Url {
        Url::parse("https://www.acme-logistics.com.sg/").unwrap()
    }

    const HOME: &str = r#"<!doctype html><html><head>
        <title> Acme Logistics Pte Ltd | Freight forwarding </title>
        <meta name="generator" content="WordPress 6.4.2">
        <meta property="og:description" content="Acme Logistics moves sea and air freight across Asia since 1998.">
        <script src="https://www.googletagmanager.com/gtag/js?id=G-XYZ"></script>
        <script src="//js.hs-scripts.com/123.js"></script>
        <link rel="stylesheet" href="/wp-content/themes/acme/style.css">
        <script>var fake = "noreply@tracking.js"; var phone = "6999 9999";</script>
        </head><body>
        <nav><a href="/about-us/">About</a> <a href="/contact">Contact</a> <a href="/careers">Careers</a>
             <a href="https://other.example.org/about">elsewhere</a> <a href="/services/air">Air</a></nav>
        <p>Acme Logistics Pte. Ltd. is a Singapore freight forwarder serving 40 ports across Asia.</p>
        <footer>
          <p>10 Anson Road, #12-01 International Plaza, Singapore 079903</p>
          <p>Tel: +65 6123 4567 &middot; Fax: (65) 6123-4568 &middot; Mobile 9876.5432 &middot; Toll-free 1800 123 4567</p>
          <p>Email: sales [at] acme-logistics [dot] com.sg or hr(at)acme-logistics.com.sg</p>
          <a href="mailto:info@acme-logistics.com.sg?subject=Hello">Write to us</a>
          <a href="mailto:acme.sg@gmail.com">Gmail</a>
          <a href="https://sg.linkedin.com/company/acme-logistics/">LinkedIn</a>
          <img src="logo@2x.png"> UEN 199801234K
        </footer></body></html>"#;

    #[test]
    fn homepage_fields() {
        let x = page(HOME, &base(), PageKind::Home);
        assert_eq!(x.title.as_deref(), Some("Acme Logistics Pte Ltd | Freight forwarding"));
        assert_eq!(x.description.as_deref(), Some("Acme Logistics moves sea and air freight across Asia since 1998."));
        let emails: Vec<&str> = x.emails.iter().map(String::as_str).collect();
        assert_eq!(
            emails,
            [
                "acme.sg@gmail.com",
                "hr@acme-logistics.com.sg",
                "info@acme-logistics.com.sg",
                "sales@acme-logistics.com.sg"
            ]
        );
        let phones: Vec<&str> = x.phones.iter().map(String::as_str).collect();
        assert_eq!(phones, ["+6518001234567", "+6561234567", "+6598765432"], "the fax is not a phone");
        assert_eq!(x.linkedin_url.as_deref(), Some("https://www.linkedin.com/company/acme-logistics"));
        assert_eq!(x.hq_postal.as_deref(), Some("079903"));
        assert!(x.uens.contains("199801234K"));
        let tech: Vec<&str> = x.tech.iter().copied().collect();
        assert_eq!(tech, ["Google Analytics", "HubSpot", "WordPress"]);
        let links: Vec<(PageKind, &str)> = x.links.iter().map(|(k, u)| (*k, u.path())).collect();
        assert_eq!(
            links,
            [(PageKind::About, "/about-us/"), (PageKind::Contact, "/contact"), (PageKind::Careers, "/careers")]
        );
        assert!(x.text.contains("Singapore freight forwarder"), "{}", x.text);
        assert!(!x.text.contains("Anson Road"), "footer paragraphs are not main text");
    }

    #[test]
    fn emails_rank_the_sites_own_first() {
        let x = page(HOME, &base(), PageKind::Home);
        let ranked = rank_emails(&x.emails, "www.acme-logistics.com.sg");
        assert_eq!(ranked.last().map(String::as_str), Some("acme.sg@gmail.com"));
        assert_eq!(ranked[0], "hr@acme-logistics.com.sg");
    }

    #[test]
    fn cloudflare_protected_emails_are_decoded() {
        // "info@acme.sg" XOR 0x42, as Cloudflare writes it.
        let hex: String = std::iter::once(0x42u8)
            .chain("info@acme.sg".bytes().map(|b| b ^ 0x42))
            .map(|b| format!("{b:02x}"))
            .collect();
        let html = format!(
            r#"<html><body><a href="/cdn-cgi/l/email-protection#{hex}">[email&#160;protected]</a>
            <span class="__cf_email__" data-cfemail="{hex}">[email&#160;protected]</span></body></html>"#
        );
        let x = page(&html, &base(), PageKind::Contact);
        assert_eq!(x.emails.iter().collect::<Vec<_>>(), ["info@acme.sg"]);
        assert_eq!(cloudflare_email("zz"), None);
        assert_eq!(cloudflare_email("4243"), None, "no @: not an email");
    }

    #[test]
    fn json_ld_organisation() {
        let html = r#"<html><head><script type="application/ld+json">
            {"@context": "https://schema.org", "@graph": [{"@type": "LocalBusiness", "name": "Acme Logistics Pte. Ltd.",
              "taxID": "199801234K", "email": "mailto:sales@acme-logistics.com.sg", "telephone": "+65 6123 4567",
              "faxNumber": "+65 6123 4568",
              "address": {"@type": "PostalAddress", "streetAddress": "10 Anson Road #12-01", "postalCode": "079903",
                          "addressCountry": "SG"},
              "sameAs": ["https://www.facebook.com/acme", "https://sg.linkedin.com/company/acme-logistics/"]}]}
            </script></head><body><h1>Acme</h1></body></html>"#;
        let x = page(html, &base(), PageKind::Home);
        assert_eq!(x.emails.iter().collect::<Vec<_>>(), ["sales@acme-logistics.com.sg"]);
        assert_eq!(x.phones.iter().collect::<Vec<_>>(), ["+6561234567"], "the fax is not a phone");
        assert_eq!(x.linkedin_url.as_deref(), Some("https://www.linkedin.com/company/acme-logistics"));
        assert_eq!(x.hq_postal.as_deref(), Some("079903"));
        assert!(x.structured.contains("199801234K") && x.structured.contains("Acme Logistics"), "{}", x.structured);
        assert!(x.singapore && !x.foreign);
        let broken = r#"<script type="application/ld+json">{"@type": "Organization", "email": </script>"#;
        assert!(page(broken, &base(), PageKind::Home).emails.is_empty());
    }

    #[test]
    fn tel_and_whatsapp_links_and_faxes() {
        let html = r#"<html><body><a href="tel:+6561234567">Call</a> <a href="https://wa.me/6591234567">WhatsApp</a>
            <p>Fax: 6123 4568 &middot; 传真 6123 4569</p><p>UK office +44 20 7946 0958</p></body></html>"#;
        let x = page(html, &base(), PageKind::Contact);
        assert_eq!(x.phones.iter().collect::<Vec<_>>(), ["+442079460958", "+6561234567", "+6591234567"]);
        assert!(x.singapore && x.foreign);
    }

    #[test]
    fn hq_in_the_ways_singapore_writes_it() {
        for (text, postal) in [
            ("10 Anson Road, Singapore 079903", "079903"),
            ("Blk 3 Ubi Ave 1 S(408868)", "408868"),
            ("Blk 3 Ubi Ave 1, S 408868", "408868"),
            ("3 Ubi Avenue 1 SG 408868", "408868"),
            ("新加坡 408868 邮编", "408868"),
        ] {
            let x = page(&format!("<html><body><p>{text}</p></body></html>"), &base(), PageKind::Contact);
            assert_eq!(x.hq_postal.as_deref(), Some(postal), "{text}");
            assert!(x.singapore, "{text}");
        }
        let x = page("<html><body><p>1 King St, London EC2V 8AU</p></body></html>", &base(), PageKind::Home);
        assert_eq!(x.hq_postal, None);
        assert!(x.foreign && !x.singapore);
    }

    #[test]
    fn pages_found_by_link_text_and_meta_refresh() {
        let html = r#"<html><head><meta http-equiv="Refresh" content="0; URL='/home.html'"></head><body>
            <a href="/get-in-touch/">Get in touch</a> <a href="/lxwm.html">联系我们</a> <a href="/gsjj.html">关于我们</a>
            <a href="/p/123.html">Our Story</a> <a href="/zp.html">招聘信息</a> <a href="/">About</a></body></html>"#;
        let x = page(html, &base(), PageKind::Home);
        assert_eq!(x.refresh.as_ref().map(|u| u.path()), Some("/home.html"));
        let links: Vec<(PageKind, &str)> = x.links.iter().map(|(k, u)| (*k, u.path())).collect();
        assert_eq!(
            links,
            [
                (PageKind::Contact, "/get-in-touch/"),
                (PageKind::Contact, "/lxwm.html"),
                (PageKind::About, "/gsjj.html"),
                (PageKind::About, "/p/123.html"),
                (PageKind::Careers, "/zp.html"),
            ]
        );
    }

    #[test]
    fn parked_pages_uens_and_directories() {
        let parked = page(
            "<html><body><h1>acmelogistics.com.sg</h1><p>This domain is for sale! Make an offer.</p></body></html>",
            &base(),
            PageKind::Home,
        );
        assert!(parked.parked);
        let soon = page("<html><body><h1>Coming soon</h1></body></html>", &base(), PageKind::Home);
        assert!(soon.parked);
        let x = page(
            "<html><body><ul><li>ACME PTE LTD 199801234K</li><li>ZEN LLP T08LL1234A</li><li>BOB 53123456X</li></ul></body></html>",
            &base(),
            PageKind::Home,
        );
        assert_eq!(x.uens.iter().collect::<Vec<_>>(), ["199801234K", "53123456X", "T08LL1234A"]);
        assert!(!x.parked);
    }

    #[test]
    fn nesting_is_cut_in_linear_time() {
        let deep =
            "<div>".repeat(100_000) + "<p>deep text about Acme Logistics in Singapore</p>" + &"</div>".repeat(100_000);
        let cut = limit_depth(&deep, MAX_DEPTH);
        assert!(cut.len() < 3 * MAX_DEPTH * 6 + 200, "{} bytes left", cut.len());
        let started = std::time::Instant::now();
        let x = page(&deep, &base(), PageKind::Home);
        assert!(x.visible.contains("deep text"), "text is kept");
        // Not a timing assertion on the CI machine's speed: quadratic work on this page takes minutes.
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        assert_eq!(limit_depth("<p>plain <b>page</b><br/></p>", 4), "<p>plain <b>page</b><br/></p>");
        let sane = "<html><body><div><script>if (a<b) {}</script><p>x</p></div></body></html>";
        assert!(matches!(limit_depth(sane, MAX_DEPTH), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn careers_page_counts_postings() {
        let html = r#"<html><body><h1>Careers</h1><ul class="jobs-list">
            <li class="job"><a href="/careers/driver">Driver</a></li>
            <li class="job"><a href="/careers/clerk">Clerk</a></li>
            <li class="job"><a href="/careers/analyst">Analyst</a></li></ul></body></html>"#;
        let x = page(html, &base(), PageKind::Careers);
        assert_eq!(x.jobs_count, Some(3));
        let by_links = r#"<html><body><a href="/jobs/1">A</a><a href="/jobs/2">B</a><a href="/jobs/2">B</a>
            <a href="/about">about</a></body></html>"#;
        assert_eq!(page(by_links, &base(), PageKind::Careers).jobs_count, Some(2));
        let none = "<html><body><p>No openings at the moment, check back soon please.</p></body></html>";
        assert_eq!(page(none, &base(), PageKind::Careers).jobs_count, Some(0));
    }

    #[test]
    fn about_prefers_the_about_page() {
        let about = page(
            "<html><body><p>Founded in 1998, Acme Logistics is a family-owned freight forwarder in Singapore.</p></body></html>",
            &base(),
            PageKind::About,
        );
        let home = page(HOME, &base(), PageKind::Home);
        assert!(about_text(Some(&about), Some(&home)).unwrap().starts_with("Founded in 1998"));
        assert!(about_text(None, Some(&home)).unwrap().starts_with("Acme Logistics moves"));
    }

    #[test]
    fn broken_html_and_odd_text_do_not_panic() {
        for html in ["", "<", "<html><body><p>unclosed <a href='mailto:'>x", "\u{fffd}\u{fffd}<meta name=generator>"] {
            let _ = page(html, &base(), PageKind::Home);
        }
        let long = "é".repeat(100_000);
        assert_eq!(page(&format!("<p>{long}</p>"), &base(), PageKind::About).text.chars().count(), MAX_PAGE_TEXT);
    }

    #[test]
    fn paths_and_domains() {
        assert_eq!(PageKind::of_path("/About-Us"), Some(PageKind::About));
        assert_eq!(PageKind::of_path("/careers/123/apply"), None);
        assert_eq!(PageKind::of_path("/"), None);
        assert_eq!(registrable("www.shop.acme.com.sg"), "acme.com.sg");
        assert_eq!(registrable("acme.sg"), "acme.sg");
        assert_eq!(registrable("blog.acme.com"), "acme.com");
        assert_eq!(registrable("acme.wixsite.com"), "acme.wixsite.com");
        assert_eq!(registrable("www.acme.blogspot.com"), "acme.blogspot.com");
        assert_eq!(registrable("127.0.0.1"), "127.0.0.1");
        let a = Url::parse("http://x.sg/a").unwrap();
        assert!(same_site(&a, &Url::parse("https://www.x.sg/").unwrap()));
        assert!(!same_site(
            &Url::parse("http://a.wixsite.com/").unwrap(),
            &Url::parse("http://b.wixsite.com/").unwrap()
        ));
    }
}
