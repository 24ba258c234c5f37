//! find_domain's decisions: reading a DuckDuckGo HTML result page (results, or a refusal), choosing the
//! results worth verifying, and the candidate domains the heuristic probe tries. Pure; the fetching is in the parent module.

use std::sync::LazyLock;

use scraper::{Html, Selector};
use url::Url;

use super::extract::registrable;

/// Results on these sites are about the company, not the company's own site.
pub const DIRECTORIES: &[&str] = &[
    "linkedin.com",
    "facebook.com",
    "instagram.com",
    "twitter.com",
    "x.com",
    "youtube.com",
    "tiktok.com",
    "sgpbusiness.com",
    "opencorporates.com",
    "bizfile.gov.sg",
    "acra.gov.sg",
    "recordowl.com",
    "sgbizfile.com",
    "companies.sg",
    "yellowpages.com.sg",
    "streetdirectory.com",
    "glassdoor.com",
    "glassdoor.sg",
    "jobstreet.com.sg",
    "indeed.com",
    "crunchbase.com",
    "bloomberg.com",
    "dnb.com",
    "zoominfo.com",
    "wikipedia.org",
    "google.com",
    "duckduckgo.com",
];

/// Words in registered names that say nothing about the company.
const LEGAL_WORDS: &[&str] = &[
    "pte",
    "ltd",
    "limited",
    "private",
    "llp",
    "llc",
    "inc",
    "corp",
    "corporation",
    "company",
    "co",
    "the",
    "and",
    "sdn",
    "bhd",
    "plc",
    "holdings",
    "group",
    "singapore",
    "sg",
    "s",
    "pl",
];

/// A search result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchResult {
    pub url: Url,
    pub title: String,
    pub snippet: String,
}

/// A result page that is not results: DuckDuckGo's rate-limit and bot-check pages (`anomaly-modal`, a
/// `/wr.do` form, `anomalyDetectionBlock`), or any page without its results markup. Never "no website".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the search provider answered with {0} instead of results (a rate limit or a bot check)")]
pub struct Refused(pub &'static str);

static RESULT: LazyLock<Selector> = LazyLock::new(|| Selector::parse(".result").expect("valid selector"));
static RESULT_LINK: LazyLock<Selector> = LazyLock::new(|| Selector::parse("a.result__a").expect("valid selector"));
static SNIPPET: LazyLock<Selector> = LazyLock::new(|| Selector::parse(".result__snippet").expect("valid selector"));

/// Parses DuckDuckGo's HTML results (`.result` blocks with `a.result__a`, whose href is either the target or
/// a `//duckduckgo.com/l/?uddg=<target>` redirect, and `.result__snippet`). A page with neither results
/// nor DuckDuckGo's "no results" markup is a refusal. Anything unparsable in a result is skipped.
pub fn parse_search(html: &str) -> Result<Vec<SearchResult>, Refused> {
    let doc = Html::parse_document(&super::extract::limit_depth(html, super::extract::MAX_DEPTH));
    let ddg = Url::parse("https://duckduckgo.com/").expect("valid url");
    let mut out = Vec::new();
    let mut links = 0;
    let blocks: Vec<_> = doc.select(&RESULT).collect();
    let mut read = |a: scraper::ElementRef<'_>, snippet: String| {
        links += 1;
        let Some(href) = a.value().attr("href").and_then(|h| ddg.join(h.trim()).ok()) else { return };
        let target = match href.query_pairs().find(|(k, _)| k == "uddg") {
            Some((_, v)) if href.host_str().is_some_and(|h| h.ends_with("duckduckgo.com")) => match Url::parse(&v) {
                Ok(u) => u,
                Err(_) => return,
            },
            _ => href,
        };
        if matches!(target.scheme(), "http" | "https") && out.len() < 30 {
            let title = super::extract::truncate_chars(&super::extract::squash(&a.text().collect::<String>()), 300);
            out.push(SearchResult { url: target, title, snippet: super::extract::truncate_chars(&snippet, 500) });
        }
    };
    if blocks.is_empty() {
        doc.select(&RESULT_LINK).for_each(|a| read(a, String::new()));
    } else {
        for b in blocks {
            let Some(a) = b.select(&RESULT_LINK).next() else { continue };
            let snippet = b.select(&SNIPPET).next().map(|s| super::extract::squash(&s.text().collect::<String>()));
            read(a, snippet.unwrap_or_default());
        }
    }
    if links > 0 {
        return Ok(out);
    }
    if html.contains("anomaly-modal") || html.contains("anomalyDetectionBlock") || html.contains("/wr.do") {
        return Err(Refused("a bot check (anomaly page)"));
    }
    if html.contains("no-results") || html.contains("No results.") {
        return Ok(out);
    }
    Err(Refused("a page without results markup"))
}

/// The distinctive lowercase words of a registered name: `"ACME LOGISTICS PTE. LTD."` -> `["acme", "logistics"]`.
pub fn name_tokens(name: &str) -> Vec<String> {
    name.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && !LEGAL_WORDS.contains(w))
        .map(str::to_owned)
        .collect()
}

pub fn is_directory(host: &str) -> bool {
    let site = registrable(host);
    DIRECTORIES.iter().any(|d| site == *d || host.ends_with(&format!(".{d}")) || host == *d)
}

/// How well a host matches the name: the share of name tokens found in the host's registrable label,
/// 0.0 to 1.0, with a small bonus for Singapore domains. 0 when the matched tokens cover less than 60% of
/// the label: `straitstimes.com` is not the site of STRAITS ELECTRICAL.
pub fn score(host: &str, tokens: &[String]) -> f64 {
    if tokens.is_empty() {
        return 0.0;
    }
    let site = registrable(host);
    let label: String = site.split('.').next().unwrap_or("").chars().filter(|c| c.is_alphanumeric()).collect();
    let matched: Vec<&String> = tokens.iter().filter(|t| t.len() >= 2 && label.contains(t.as_str())).collect();
    let hit = matched.len();
    let covered: usize = matched.iter().map(|t| t.len()).sum();
    if hit > 0 && covered * 10 < label.len() * 6 {
        return 0.0;
    }
    // Abbreviations: "asia pacific trading" -> "apt".
    let initials: String = tokens.iter().filter_map(|t| t.chars().next()).collect();
    let share = if hit == 0 && initials.len() >= 3 && label.starts_with(&initials) {
        0.5
    } else {
        hit as f64 / tokens.len() as f64
    };
    share + if site.ends_with(".sg") { 0.05 } else { 0.0 }
}

/// A search result worth fetching: its homepage, whether its host is made of the name's words, and
/// whether its title or snippet names the company.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub home: Url,
    pub rank: usize,
    pub domain_name: bool,
    pub listing: bool,
}

/// The results worth verifying, in the order to try them: those whose host matches the name or whose
/// listing names the company (a brand domain), not directories, one per site, best evidence first and
/// rank breaking ties; at most `max`.
pub fn candidates(results: &[SearchResult], reg: &super::verify::Registered, max: usize) -> Vec<Candidate> {
    let tokens = name_tokens(&reg.name);
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<Candidate> = results
        .iter()
        .enumerate()
        .filter_map(|(rank, r)| {
            let host = r.url.host_str()?.to_ascii_lowercase();
            if is_directory(&host) || !seen.insert(registrable(&host)) {
                return None;
            }
            let domain_name = score(&host, &tokens) >= 0.5;
            let listing = super::verify::listing_names(reg, &format!("{} {}", r.title, r.snippet));
            (domain_name || listing).then(|| {
                let mut home = r.url.clone();
                home.set_path("/");
                home.set_query(None);
                home.set_fragment(None);
                Candidate { home, rank, domain_name, listing }
            })
        })
        .collect();
    out.sort_by_key(|c| (!(c.domain_name && c.listing), c.rank));
    out.truncate(max);
    out
}

/// Domains the heuristic probe tries, most likely first: the joined name tokens under .com.sg, .sg, .com.
pub fn candidate_domains(name: &str) -> Vec<String> {
    let tokens = name_tokens(name);
    let joined: String = tokens.iter().flat_map(|t| t.chars()).filter(|c| c.is_ascii_alphanumeric()).collect();
    if joined.len() < 3 || joined.len() > 63 {
        return Vec::new();
    }
    ["com.sg", "sg", "com"].iter().map(|tld| format!("{joined}.{tld}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DDG: &str = r#"<html><body><div class="serp__results"><div id="links" class="results">
      <div class="result results_links results_links_deep web-result"><div class="links_main links_deep result__body">
        <h2 class="result__title"><a rel="nofollow" class="result__a"
          href="//duckduckgo.com/l/?uddg=https%3A%2F%2Fwww.sgpbusiness.com%2Fcompany%2FAcme-Logistics-Pte-Ltd&amp;rut=1">Acme Logistics Pte Ltd - SGPBusiness</a></h2>
        <a class="result__snippet" href="x">UEN 199801234K</a></div></div>
      <div class="result results_links web-result"><div class="links_main result__body">
        <h2 class="result__title"><a rel="nofollow" class="result__a"
          href="//duckduckgo.com/l/?uddg=https%3A%2F%2Fsg.linkedin.com%2Fcompany%2Facme-logistics&amp;rut=2">Acme Logistics | LinkedIn</a></h2></div></div>
      <div class="result results_links web-result"><div class="links_main result__body">
        <h2 class="result__title"><a rel="nofollow" class="result__a"
          href="//duckduckgo.com/l/?uddg=http%3A%2F%2Fwww.acmelogistics.com.sg%2Fabout%3Fref%3Dddg&amp;rut=3">Acme Logistics - Freight</a></h2></div></div>
      <div class="result results_links web-result"><div class="links_main result__body">
        <h2 class="result__title"><a class="result__a" href="https://logistics-news.com/acme">News</a></h2></div></div>
    </div></div></body></html>"#;

    fn reg(name: &str) -> super::super::verify::Registered {
        super::super::verify::Registered { name: name.into(), ..Default::default() }
    }

    #[test]
    fn parses_duckduckgo_and_skips_directories() {
        let results = parse_search(DDG).unwrap();
        assert_eq!(results.len(), 4);
        assert_eq!(results[0].url.host_str(), Some("www.sgpbusiness.com"));
        assert_eq!(results[0].snippet, "UEN 199801234K");
        assert_eq!(results[2].url.as_str(), "http://www.acmelogistics.com.sg/about?ref=ddg");
        assert_eq!(results[3].title, "News");
        let found = candidates(&results, &reg("ACME LOGISTICS PTE. LTD."), 3);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].home.as_str(), "http://www.acmelogistics.com.sg/", "host and listing name it: first");
        assert!(found[0].domain_name && found[0].listing);
        assert!(candidates(&results[..2], &reg("ACME LOGISTICS PTE. LTD."), 3).is_empty(), "directories only");
        assert!(candidates(&results, &reg("ZENITH BAKERY PTE LTD"), 3).is_empty(), "nothing matches the name");
        assert_eq!(score("www.straitstimes.com", &name_tokens("STRAITS ELECTRICAL PTE. LTD.")), 0.0);
        assert!(score("acme.com.sg", &name_tokens("ACME LOGISTICS PTE LTD")) >= 0.5);
        assert!(parse_search("<html><div class='result'><a class='result__a' href='javascript:alert(1)'>x</a></div>")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_brand_domain_is_a_candidate_by_its_listing() {
        let html = r#"<div class="results"><div class="result"><a class="result__a" href="https://www.bluewhale.sg/">Blue Whale | Movers</a>
            <a class="result__snippet">Acme Logistics Pte Ltd trading as Blue Whale, UEN 199801234K</a></div></div>"#;
        let found = candidates(&parse_search(html).unwrap(), &reg("ACME LOGISTICS PTE. LTD."), 3);
        assert_eq!(found.len(), 1);
        assert!(found[0].listing && !found[0].domain_name);
    }

    #[test]
    fn rate_limit_and_bot_check_pages_are_refusals_not_empty_results() {
        let anomaly = r#"<html><body><div class="anomaly-modal__title">Unfortunately, bots use DuckDuckGo too.</div></body></html>"#;
        assert!(parse_search(anomaly).is_err());
        assert!(parse_search("<html><body>Ratelimit</body></html>").is_err());
        assert_eq!(parse_search(r#"<html><body><div class="no-results">No results.</div></body></html>"#), Ok(vec![]));
    }

    #[test]
    fn names_become_tokens_and_candidates() {
        assert_eq!(name_tokens("ACME LOGISTICS PTE. LTD."), ["acme", "logistics"]);
        assert_eq!(
            candidate_domains("Acme Logistics Private Limited"),
            ["acmelogistics.com.sg", "acmelogistics.sg", "acmelogistics.com"]
        );
        assert!(candidate_domains("S PTE LTD").is_empty());
    }
}
