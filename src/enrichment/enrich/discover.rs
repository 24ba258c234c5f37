//! find_domain's decisions: reading a DuckDuckGo HTML result page, scoring results against the company
//! name, and the candidate domains the heuristic probe tries. Pure; the fetching is in the parent module.

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
}

static RESULT_LINK: LazyLock<Selector> = LazyLock::new(|| Selector::parse("a.result__a").expect("valid selector"));

/// Parses DuckDuckGo's HTML results (`a.result__a`, whose href is either the target or a
/// `//duckduckgo.com/l/?uddg=<target>` redirect). Anything unparsable is skipped.
pub fn parse_search(html: &str) -> Vec<SearchResult> {
    let doc = Html::parse_document(html);
    let ddg = Url::parse("https://duckduckgo.com/").expect("valid url");
    doc.select(&RESULT_LINK)
        .filter_map(|a| {
            let href = ddg.join(a.value().attr("href")?.trim()).ok()?;
            let target = match href.query_pairs().find(|(k, _)| k == "uddg") {
                Some((_, v)) if href.host_str().is_some_and(|h| h.ends_with("duckduckgo.com")) => {
                    Url::parse(&v).ok()?
                }
                _ => href,
            };
            matches!(target.scheme(), "http" | "https")
                .then(|| SearchResult { url: target, title: super::extract::squash(&a.text().collect::<String>()) })
        })
        .collect()
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

/// The best non-directory result whose domain matches at least half the name.
pub fn best_result(results: &[SearchResult], name: &str) -> Option<Url> {
    let tokens = name_tokens(name);
    results
        .iter()
        .filter_map(|r| {
            let host = r.url.host_str()?.to_ascii_lowercase();
            (!is_directory(&host)).then(|| (score(&host, &tokens), r))
        })
        .filter(|(s, _)| *s >= 0.5)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, r)| {
            let mut u = r.url.clone();
            u.set_path("/");
            u.set_query(None);
            u.set_fragment(None);
            u
        })
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

/// Whether a page is about the company: its UEN appears, or most of its name tokens do.
pub fn mentions(text: &str, name: &str, uen: Option<&str>) -> bool {
    let lower = text.to_lowercase();
    if uen.is_some_and(|u| !u.is_empty() && lower.contains(&u.to_lowercase())) {
        return true;
    }
    let tokens = name_tokens(name);
    !tokens.is_empty() && tokens.iter().filter(|t| lower.contains(t.as_str())).count() * 3 >= tokens.len() * 2
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

    #[test]
    fn parses_duckduckgo_and_skips_directories() {
        let results = parse_search(DDG);
        assert_eq!(results.len(), 4);
        assert_eq!(results[0].url.host_str(), Some("www.sgpbusiness.com"));
        assert_eq!(results[2].url.as_str(), "http://www.acmelogistics.com.sg/about?ref=ddg");
        assert_eq!(results[3].title, "News");
        let best = best_result(&results, "ACME LOGISTICS PTE. LTD.").unwrap();
        assert_eq!(best.as_str(), "http://www.acmelogistics.com.sg/");
        assert_eq!(best_result(&results[..2], "ACME LOGISTICS PTE. LTD."), None, "directories only");
        assert_eq!(best_result(&results, "ZENITH BAKERY PTE LTD"), None, "nothing matches the name");
        assert_eq!(score("www.straitstimes.com", &name_tokens("STRAITS ELECTRICAL PTE. LTD.")), 0.0);
        assert!(score("acme.com.sg", &name_tokens("ACME LOGISTICS PTE LTD")) >= 0.5);
        assert!(parse_search("<html><a class='result__a' href='javascript:alert(1)'>x</a>").is_empty());
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

    #[test]
    fn mentions_need_the_uen_or_most_of_the_name() {
        assert!(mentions("Welcome to ACME Logistics", "ACME LOGISTICS PTE LTD", None));
        assert!(mentions("reg. no 199801234K", "ZENITH PTE LTD", Some("199801234K")));
        assert!(!mentions("Parked domain for sale", "ACME LOGISTICS PTE LTD", Some("199801234K")));
        assert!(!mentions("acme", "ACME GLOBAL LOGISTICS PTE LTD", None));
    }
}
