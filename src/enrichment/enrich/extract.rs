//! Deterministic extraction from HTML: about text, public emails, Singapore phone numbers, the LinkedIn
//! company page, the HQ address, tech-stack fingerprints, the careers page's job count, and the same-site
//! links worth crawling.
//!
//! Pure functions over a decoded page; they never fail and never panic on malformed HTML (html5ever
//! recovers like a browser does). Everything found is normalised so merging pages is a set union.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use regex::Regex;
use scraper::{ElementRef, Html, Node, Selector};
use url::Url;

/// Text kept per page for the about paragraph and the LLM corpus.
const MAX_PAGE_TEXT: usize = 20_000;
const MAX_ABOUT_CHARS: usize = 1_000;

/// What the crawler looks for beyond the homepage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageKind {
    Home,
    About,
    Contact,
    Careers,
}

impl PageKind {
    /// The kind a same-site link points to, judged by its path (`/about-us`, `/contact`, `/careers/`...).
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
        if ["about", "company", "who-we-are", "our-story"].iter().any(|k| seg.contains(k)) {
            Some(PageKind::About)
        } else if ["contact", "reach-us", "enquir"].iter().any(|k| seg.contains(k)) {
            Some(PageKind::Contact)
        } else if ["career", "jobs", "join-us", "vacanc"].iter().any(|k| seg.contains(k)) {
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
    pub emails: BTreeSet<String>,
    pub phones: BTreeSet<String>,
    pub linkedin_url: Option<String>,
    pub hq_city: Option<String>,
    pub hq_country: Option<String>,
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
selector!(PARAGRAPHS, "p");
selector!(CLASSED, "li[class], article[class], div[class], tr[class]");

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b[a-z0-9][a-z0-9._%+-]{0,63}@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,24}\b").unwrap()
});
/// `info [at] acme [dot] com`, `info(at)acme.com`, `info {at} acme . com`.
static OBFUSCATED_AT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?i)\s*[\[\(\{<]\s*at\s*[\]\)\}>]\s*").unwrap());
static OBFUSCATED_DOT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)\s*[\[\(\{<]\s*dot\s*[\]\)\}>]\s*").unwrap());
/// Singapore numbers: 8 digits starting 3, 6, 8 or 9, optionally after +65 / (65) / 65, in 4+4 groups.
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?:^|[^0-9A-Za-z+])(?:(?:\+\s?65|\(\s?\+?65\s?\)|65)[\s.-]?)?([3689]\d{3})[\s.-]?(\d{4})(?:$|[^0-9A-Za-z])",
    )
    .unwrap()
});
static TOLL_FREE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:^|[^0-9])(1800)[\s.-]?(\d{3})[\s.-]?(\d{4})(?:$|[^0-9])").unwrap());
static SG_ADDRESS: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?i)\bSingapore[\s,]*\(?\s*(\d{6})\b").unwrap());
static LINKEDIN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^https?://(?:[a-z]{2,3}\.)?linkedin\.com/company/([A-Za-z0-9_.%-]+)").unwrap());

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
    let doc = Html::parse_document(html);
    let title = doc.select(&TITLE).next().map(|t| squash(&t.text().collect::<String>())).filter(|t| !t.is_empty());
    let mut out = Extracted { title, ..Default::default() };
    for m in doc.select(&META) {
        let attr = |n: &str| m.value().attr(n).map(str::trim);
        let key = attr("name").or_else(|| attr("property")).unwrap_or("").to_ascii_lowercase();
        let Some(content) = attr("content").filter(|c| !c.is_empty()) else { continue };
        match key.as_str() {
            "description" | "og:description" if out.description.is_none() => out.description = Some(squash(content)),
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
            phones_in(tel, &mut out.phones);
            continue;
        }
        let Ok(url) = base.join(href) else { continue };
        if out.linkedin_url.is_none() {
            if let Some(c) = LINKEDIN.captures(url.as_str()) {
                out.linkedin_url = Some(format!("https://www.linkedin.com/company/{}", c[1].trim_end_matches('/')));
            }
        }
        if same_site(&url, base) && matches!(url.scheme(), "http" | "https") {
            if let Some(k) = PageKind::of_path(url.path()) {
                let mut clean = url.clone();
                clean.set_fragment(None);
                if seen.insert(clean.to_string()) {
                    out.links.push((k, clean));
                }
            }
        }
    }

    let visible = visible_text(&doc);
    let deobfuscated = OBFUSCATED_DOT.replace_all(&OBFUSCATED_AT.replace_all(&visible, "@"), ".").into_owned();
    for m in EMAIL.find_iter(&deobfuscated) {
        add_email(m.as_str(), &mut out.emails);
    }
    phones_in(&visible, &mut out.phones);
    if SG_ADDRESS.is_match(&visible) {
        out.hq_city = Some("Singapore".into());
        out.hq_country = Some("Singapore".into());
    }

    let paragraphs: Vec<String> = doc
        .select(&PARAGRAPHS)
        .filter(|p| !inside(p, &["nav", "footer", "header", "script", "style"]))
        .map(|p| squash(&p.text().collect::<String>()))
        .filter(|t| t.chars().count() >= 40)
        .collect();
    out.text = truncate_chars(&paragraphs.join("\n"), MAX_PAGE_TEXT);
    if kind == PageKind::Careers {
        out.jobs_count = Some(count_jobs(&doc, base));
    }
    out
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

/// Text of every text node outside script/style/noscript/template, whitespace squashed.
fn visible_text(doc: &Html) -> String {
    let mut out = String::new();
    for node in doc.tree.nodes() {
        let Node::Text(t) = node.value() else { continue };
        let hidden = node.ancestors().any(|a| {
            a.value().as_element().is_some_and(|e| matches!(e.name(), "script" | "style" | "noscript" | "template"))
        });
        if !hidden {
            out.push_str(t);
            out.push(' ');
        }
        if out.len() > 4 * MAX_PAGE_TEXT {
            break;
        }
    }
    squash(&out)
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
    let classed: Vec<ElementRef<'_>> = doc.select(&CLASSED).filter(is_job).collect();
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
    let e = raw.trim_matches(|c: char| c == '.' || c == '-').to_ascii_lowercase();
    let asset = [".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".css", ".js"].iter().any(|x| e.ends_with(x));
    let placeholder = ["example.com", "domain.com", "email.com", "sentry.io"].iter().any(|d| e.ends_with(d));
    if !asset && !placeholder && e.contains('@') {
        out.insert(e);
    }
}

/// Adds every Singapore number in `text`, normalised to `+65 XXXX XXXX` (toll-free: `1800 XXX XXXX`).
pub fn phones_in(text: &str, out: &mut BTreeSet<String>) {
    // Matches consume their delimiters; scan again from each match's digits so adjacent numbers are found.
    let mut at = 0;
    while let Some(c) = PHONE.captures_at(text, at) {
        out.insert(format!("+65 {} {}", &c[1], &c[2]));
        at = c.get(2).map_or(text.len(), |m| m.end());
    }
    for c in TOLL_FREE.captures_iter(text) {
        out.insert(format!("{} {} {}", &c[1], &c[2], &c[3]));
    }
}

/// Same site: equal hosts, ignoring a leading `www.`.
pub fn same_site(a: &Url, b: &Url) -> bool {
    let h = |u: &Url| u.host_str().map(|h| h.trim_start_matches("www.").to_ascii_lowercase());
    h(a).is_some() && h(a) == h(b)
}

/// The registrable part of a host, good enough for Singapore sites: `www.shop.acme.com.sg` -> `acme.com.sg`.
pub fn registrable(host: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    let second_level = ["com", "edu", "gov", "net", "org", "per", "co"];
    let keep = if labels.len() >= 3 && second_level.contains(&labels[labels.len() - 2]) { 3 } else { 2 };
    labels[labels.len().saturating_sub(keep)..].join(".")
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
        assert_eq!(phones, ["+65 6123 4567", "+65 6123 4568", "+65 9876 5432", "1800 123 4567"]);
        assert_eq!(x.linkedin_url.as_deref(), Some("https://www.linkedin.com/company/acme-logistics"));
        assert_eq!((x.hq_city.as_deref(), x.hq_country.as_deref()), (Some("Singapore"), Some("Singapore")));
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
    fn phone_formats() {
        let mut p = BTreeSet::new();
        phones_in("+6562345678, 65-8123-4567; (+65) 3158 1234 call 6345 6789.", &mut p);
        let got: Vec<&str> = p.iter().map(String::as_str).collect();
        assert_eq!(got, ["+65 3158 1234", "+65 6234 5678", "+65 6345 6789", "+65 8123 4567"]);
        let mut none = BTreeSet::new();
        phones_in("UEN 201912345K, postal code Singapore 079903, order 12345678901, 5123 4567", &mut none);
        assert!(none.is_empty(), "{none:?}");
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
    }
}
