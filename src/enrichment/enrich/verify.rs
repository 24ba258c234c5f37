//! Site verification: is this website the registered company's own? Every candidate (the known domain,
//! a search result, a probe's guess) is fetched and scored against what the registry says before it is
//! accepted, and the score and its evidence are stored with the domain.
//!
//! Evidence and weights (the confidence is their sum, clamped to [0, 1]):
//!
//! | evidence | weight | what |
//! |---|---|---|
//! | `uen` | +0.60 | the company's UEN printed on the site (or in its JSON-LD) |
//! | `postal` | +0.30 | the registered postal code, as a 6-digit number on the site |
//! | `street`, `building` | +0.10 each | the registered street or building name |
//! | `name` | +0.35 | the registered name's distinctive words, as a phrase, in the visible text |
//! | `former_name` | +0.30 | a former registered name, as a phrase (when the current one is absent) |
//! | `name_words` | +0.10 | most of the name's words, not as a phrase |
//! | `domain_name` | +0.15 | the hostname is made of the name's words |
//! | `search_listing` | +0.10 | the search result's title or snippet names the company or shows its UEN |
//! | `singapore` | +0.10 | a Singapore address or +65 number |
//! | `abroad` | -0.40 | another country's address or number, and nothing in Singapore |
//! | `other_uen` | -0.50 | another company's UEN, and not this one's |
//!
//! Rejected whatever the score: parked, for-sale and placeholder pages (`parked`), and directories, pages
//! that print three or more other UENs (`directory`). The name counts only in the page's text, never in
//! its URL: a parked page that prints its own domain does not name the company.

use std::collections::BTreeSet;

use super::discover::name_tokens;
use super::extract::Extracted;

/// What the registry says about a company, to check a website against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registered {
    pub name: String,
    pub uen: Option<String>,
    pub postal_code: Option<String>,
    pub street: Option<String>,
    pub building: Option<String>,
    pub former_names: Vec<String>,
}

/// A candidate's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// 0.0 to 1.0, two decimals.
    pub confidence: f64,
    pub evidence: Vec<&'static str>,
    /// Why the site can never be the company's (`parked`, `directory`).
    pub rejected: Option<&'static str>,
}

impl Verdict {
    pub fn passes(&self, threshold: f64) -> bool {
        self.rejected.is_none() && self.confidence >= threshold
    }
}

/// Scores the pages of one site against the registry. `domain_name`: the hostname matches the name;
/// `search_listing`: a search result for this site named the company.
pub fn verify(reg: &Registered, pages: &[&Extracted], domain_name: bool, search_listing: bool) -> Verdict {
    let mut text = String::new();
    let mut uens = BTreeSet::new();
    let (mut parked, mut singapore, mut foreign) = (false, false, false);
    for p in pages {
        text.push_str(&p.visible);
        text.push('\n');
        text.push_str(&p.structured);
        text.push('\n');
        if let Some(t) = &p.title {
            text.push_str(t);
            text.push('\n');
        }
        uens.extend(p.uens.iter().cloned());
        parked |= p.parked;
        singapore |= p.singapore;
        foreign |= p.foreign;
    }
    let words = normalise(&text);
    let mut evidence = Vec::new();
    let mut score = 0.0;
    let mut add = |what: &'static str, weight: f64, evidence: &mut Vec<&'static str>| {
        evidence.push(what);
        score += weight;
    };

    let uen = reg.uen.as_deref().map(|u| u.trim().to_ascii_uppercase()).filter(|u| !u.is_empty());
    let ours = uen.as_ref().is_some_and(|u| uens.contains(u) || contains_word(&words, &u.to_lowercase()));
    let others = uens.iter().filter(|u| Some(*u) != uen.as_ref()).count();
    if parked {
        return Verdict { confidence: 0.0, evidence: vec!["parked"], rejected: Some("parked") };
    }
    if others >= 3 {
        return Verdict { confidence: 0.0, evidence: vec!["directory"], rejected: Some("directory") };
    }
    if ours {
        add("uen", 0.60, &mut evidence);
    } else if others > 0 {
        add("other_uen", -0.50, &mut evidence);
    }
    if let Some(postal) = reg.postal_code.as_deref().map(str::trim).filter(|p| p.len() == 6) {
        if contains_word(&words, postal) {
            add("postal", 0.30, &mut evidence);
        }
    }
    // `normalise` pads with spaces: a match is whole words.
    if let Some(street) = reg.street.as_deref().map(normalise).filter(|s| s.len() >= 7) {
        if words.contains(&street) {
            add("street", 0.10, &mut evidence);
        }
    }
    if let Some(building) = reg.building.as_deref().map(normalise).filter(|s| s.len() >= 7) {
        if words.contains(&building) {
            add("building", 0.10, &mut evidence);
        }
    }
    let tokens = name_tokens(&reg.name);
    if names_phrase(&words, &tokens) {
        add("name", 0.35, &mut evidence);
    } else if reg.former_names.iter().any(|f| names_phrase(&words, &name_tokens(f))) {
        add("former_name", 0.30, &mut evidence);
    } else if !tokens.is_empty() && tokens.iter().filter(|t| contains_word(&words, t)).count() * 3 >= tokens.len() * 2 {
        add("name_words", 0.10, &mut evidence);
    }
    if domain_name {
        add("domain_name", 0.15, &mut evidence);
    }
    if search_listing {
        add("search_listing", 0.10, &mut evidence);
    }
    if singapore {
        add("singapore", 0.10, &mut evidence);
    } else if foreign {
        add("abroad", -0.40, &mut evidence);
    }
    let confidence = (score.clamp(0.0, 1.0) * 100.0).round() / 100.0;
    Verdict { confidence, evidence, rejected: None }
}

/// Whether a search listing (title and snippet) names the company: its name as a phrase, or its UEN.
pub fn listing_names(reg: &Registered, listing: &str) -> bool {
    let words = normalise(listing);
    names_phrase(&words, &name_tokens(&reg.name))
        || reg.uen.as_deref().is_some_and(|u| !u.trim().is_empty() && contains_word(&words, &u.trim().to_lowercase()))
}

/// Lowercase words separated by single spaces, with a space at each end: `" acme logistics pte ltd "`.
fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push(' ');
    for w in text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        for c in w.chars().flat_map(char::to_lowercase) {
            out.push(c);
        }
        out.push(' ');
    }
    out
}

fn contains_word(words: &str, word: &str) -> bool {
    !word.is_empty() && words.contains(&format!(" {word} "))
}

/// The name's distinctive words as a phrase. A one-word name must be at least 4 letters long, or any
/// page with that word would do.
fn names_phrase(words: &str, tokens: &[String]) -> bool {
    match tokens {
        [] => false,
        [one] if one.chars().count() < 4 => false,
        _ => words.contains(&format!(" {} ", tokens.join(" "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrichment::enrich::extract::{page, PageKind};

    fn reg() -> Registered {
        Registered {
            name: "ACME LOGISTICS PTE. LTD.".into(),
            uen: Some("199801234K".into()),
            postal_code: Some("408868".into()),
            street: Some("UBI AVENUE 1".into()),
            building: None,
            former_names: vec!["ACME FREIGHT PTE. LTD.".into()],
        }
    }

    fn x(html: &str) -> Extracted {
        page(html, &url::Url::parse("http://x.sg/").unwrap(), PageKind::Home)
    }

    #[test]
    fn the_companys_own_site_is_verified_with_its_evidence() {
        let own = x("<html><body><h1>Acme Logistics</h1><footer>3 Ubi Avenue 1, Singapore 408868. UEN 199801234K</footer></body></html>");
        let v = verify(&reg(), &[&own], true, false);
        assert_eq!(v.evidence, ["uen", "postal", "street", "name", "domain_name", "singapore"]);
        assert_eq!(v.confidence, 1.0);
        assert!(v.passes(0.5));
        let renamed = x("<html><body><h1>Acme Freight</h1><p>Singapore 408868</p></body></html>");
        let v = verify(&reg(), &[&renamed], false, true);
        assert_eq!(v.evidence, ["postal", "former_name", "search_listing", "singapore"]);
        assert!(v.passes(0.5), "{v:?}");
    }

    #[test]
    fn namesakes_abroad_parked_pages_and_directories_are_not() {
        let london = x(
            "<html><body><h1>Acme Logistics Ltd</h1><p>1 King St, London EC2V 8AU. +44 20 7946 0958</p></body></html>",
        );
        let v = verify(&reg(), &[&london], true, false);
        assert_eq!(v.evidence, ["name", "domain_name", "abroad"]);
        assert!(!v.passes(0.5), "{v:?}");
        let parked = x("<html><body><h1>acmelogistics.com.sg</h1><p>The domain acmelogistics.com.sg is for sale.</p></body></html>");
        assert_eq!(verify(&reg(), &[&parked], true, false).rejected, Some("parked"));
        let directory = x("<html><body><li>Acme Logistics Pte Ltd 199801234K</li><li>B 200012345A</li><li>C 200112345B</li><li>D 200212345C</li></body></html>");
        assert_eq!(verify(&reg(), &[&directory], false, true).rejected, Some("directory"));
        let other = x("<html><body><h1>Acme Logistics</h1><p>UEN 201512345Z Singapore 123456</p></body></html>");
        assert!(!verify(&reg(), &[&other], true, false).passes(0.5), "another company's UEN");
        let words = x("<html><body><p>Logistics news: acme of the industry</p></body></html>");
        assert!(!verify(&reg(), &[&words], false, false).passes(0.5));
    }

    #[test]
    fn listings() {
        assert!(listing_names(&reg(), "Acme Logistics - Freight forwarding in Singapore"));
        assert!(listing_names(&reg(), "Freight | reg. 199801234K"));
        assert!(!listing_names(&reg(), "Logistics Acme"));
    }
}
