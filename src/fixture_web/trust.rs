//! The kinds of site a realistic Singapore SME web holds, and a web of them with ground truth
//! ([`trust_web`]): brand domains, Cloudflare-protected emails, JSON-LD, WhatsApp and `tel:` links, faxes
//! and offices abroad, meta refreshes, contact pages at paths found only by their link text (English and
//! Chinese), HQ written the local ways, `www.` sites that link to their bare host, sites on a hosting
//! platform's subdomain, https listings whose TLS fails, and the traps: a namesake abroad ranked above the
//! right site, a parked "for sale" page at the probe's guess, a foreign namesake at another guess, and a
//! directory listing the company with its UEN.

use super::{hash, name_tokens, pages, Response, SiteSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SiteKind {
    /// The standard templates.
    Plain,
    /// Emails only behind Cloudflare's email protection.
    CloudflareEmail,
    /// Contact details only in schema.org JSON-LD.
    JsonLd,
    /// Phones only in `tel:` and `https://wa.me/` links.
    WhatsApp,
    /// A fax number next to the phone, and an office abroad.
    FaxAndAbroad,
    /// `/` is a `<meta http-equiv="refresh">` to `/home.html`.
    MetaRefresh,
    /// About and contact pages at paths the crawler does not guess, linked by text (English or Chinese);
    /// contact details on the contact page only.
    OddPaths,
    /// HQ written `S(123456)`, `S 123456`, `SG 123456` or `新加坡 123456`.
    HqVariants,
    /// A `www.` site whose links go to its bare host (one server).
    WwwAndBare,
    /// Not the company's: a parked, for-sale page.
    Parked,
    /// Not the company's: a business of the same name abroad.
    NamesakeAbroad,
    /// Not the company's: a directory listing many companies with their UENs.
    Directory,
}

/// What a company's enrichment should find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truth {
    pub uen: String,
    pub name: String,
    /// The kind of case, for reports.
    pub case: &'static str,
    /// `None`: the company has no website.
    pub domain: Option<String>,
    pub emails: Vec<String>,
    pub phones: Vec<String>,
    pub linkedin_url: Option<String>,
    pub hq_postal: Option<String>,
}

/// A registered company, as the trust web is built for.
#[derive(Debug, Clone)]
pub struct Registered {
    pub name: String,
    pub uen: String,
    pub postal: Option<String>,
    pub street: Option<String>,
}

/// The cases, in the order companies are dealt to them.
pub const CASES: [&str; 18] = [
    "plain",
    "probe only",
    "brand domain",
    "cloudflare email",
    "json-ld",
    "whatsapp and tel links",
    "fax and office abroad",
    "meta refresh",
    "pages by link text",
    "hq variants",
    "www and bare host",
    "hosting platform",
    "https that fails",
    "namesake ranked first",
    "no site: parked guess",
    "no site: namesake abroad",
    "no site: directory only",
    "no site",
];

/// Sites and ground truth for `companies` (one site per distinct name; companies whose name's words
/// repeat an earlier one's are left out). Every company's search also lists a directory page with its UEN.
pub fn trust_web(companies: &[Registered]) -> (Vec<SiteSpec>, Vec<Truth>) {
    let mut sites = Vec::new();
    let mut truth = Vec::new();
    let mut names = std::collections::HashSet::new();
    for c in companies {
        let tokens = name_tokens(&c.name);
        let joined: String = tokens.concat().chars().filter(char::is_ascii_alphanumeric).collect();
        if joined.len() < 4 || joined.len() > 40 || !names.insert(tokens.join(" ")) {
            continue;
        }
        let case = CASES[truth.len() % CASES.len()];
        let own = |host: String| {
            let mut s = SiteSpec::new(&host, &c.name, Some(&c.uen));
            s.postal.clone_from(&c.postal);
            s.street = c.street.as_ref().map(|st| title_case(st));
            s
        };
        let decoy = |host: String, kind: SiteKind| {
            let mut s = SiteSpec::new(&host, &c.name, None);
            s.kind = kind;
            s
        };
        let mut site = match case {
            "plain" => Some(own(format!("www.{joined}.sg"))),
            "probe only" => Some(SiteSpec { in_search: false, ..own(format!("{joined}.com.sg")) }),
            "brand domain" => {
                let brand = format!(
                    "{}{}",
                    ["bluewhale", "sunrise", "kopi", "lighthouse", "orchid"][truth.len() % 5],
                    truth.len()
                );
                let mut s = own(format!("www.{brand}.sg"));
                s.listing = Some((
                    format!("{} | Official site", title_case(&brand)),
                    format!("{} (UEN {}) - trusted since 1998.", c.name, c.uen),
                ));
                Some(s)
            }
            "cloudflare email" => Some(SiteSpec { kind: SiteKind::CloudflareEmail, ..own(format!("{joined}.com.sg")) }),
            "json-ld" => Some(SiteSpec { kind: SiteKind::JsonLd, ..own(format!("www.{joined}.sg")) }),
            "whatsapp and tel links" => Some(SiteSpec { kind: SiteKind::WhatsApp, ..own(format!("{joined}.sg")) }),
            "fax and office abroad" => {
                Some(SiteSpec { kind: SiteKind::FaxAndAbroad, ..own(format!("www.{joined}.com.sg")) })
            }
            "meta refresh" => Some(SiteSpec { kind: SiteKind::MetaRefresh, ..own(format!("{joined}.com.sg")) }),
            "pages by link text" => Some(SiteSpec { kind: SiteKind::OddPaths, ..own(format!("www.{joined}.sg")) }),
            "hq variants" => Some(SiteSpec { kind: SiteKind::HqVariants, ..own(format!("{joined}.sg")) }),
            "www and bare host" => Some(SiteSpec { kind: SiteKind::WwwAndBare, ..own(format!("www.{joined}.sg")) }),
            "hosting platform" => Some(own(format!("{joined}.wixsite.com"))),
            // Not at a name the probe guesses: only the https listing leads there.
            "https that fails" => Some(SiteSpec { https: true, ..own(format!("{joined}sg.com")) }),
            "namesake ranked first" => {
                let mut london = decoy(format!("{joined}.co.uk"), SiteKind::NamesakeAbroad);
                london.rank = 0;
                sites.push(london);
                Some(own(format!("www.{joined}.com.sg")))
            }
            "no site: parked guess" => {
                sites.push(SiteSpec { in_search: false, ..decoy(format!("{joined}.com.sg"), SiteKind::Parked) });
                None
            }
            "no site: namesake abroad" => {
                sites.push(SiteSpec { in_search: false, ..decoy(format!("{joined}.com"), SiteKind::NamesakeAbroad) });
                sites.push(decoy(format!("{joined}.in"), SiteKind::NamesakeAbroad));
                None
            }
            _ => None,
        };
        // Every company is listed by a directory, with its UEN, above its own site.
        let mut directory = decoy(format!("www.sgbiz{}.net", truth.len()), SiteKind::Directory);
        directory.rank = 1;
        directory.listing =
            Some((format!("{} - SG Business Directory", c.name), format!("UEN {} · {}", c.uen, c.name)));
        directory.uen = None;
        sites.push(directory);
        let t = match site.as_mut() {
            Some(s) => {
                let e = s.expected();
                Truth {
                    uen: c.uen.clone(),
                    name: c.name.clone(),
                    case,
                    domain: Some(s.domain()),
                    emails: e.emails,
                    phones: e.phones,
                    linkedin_url: Some(e.linkedin_url),
                    hq_postal: e.hq_postal,
                }
            }
            None => Truth {
                uen: c.uen.clone(),
                name: c.name.clone(),
                case,
                domain: None,
                emails: Vec::new(),
                phones: Vec::new(),
                linkedin_url: None,
                hq_postal: None,
            },
        };
        truth.push(t);
        sites.extend(site);
    }
    (sites, truth)
}

/// The pages a kind answers differently from the standard templates (`None`: the standard page).
pub(super) fn page(site: &SiteSpec, path: &str) -> Option<Response> {
    let home = path.trim_end_matches('/').is_empty();
    let domain = site.domain();
    let name = title_case(&name_tokens(&site.company).join(" "));
    Some(match site.kind {
        SiteKind::MetaRefresh if home => Response::html(
            r#"<html><head><meta http-equiv="refresh" content="0; url=/home.html"><title>Loading</title></head><body>Redirecting...</body></html>"#
                .into(),
        ),
        SiteKind::MetaRefresh if path == "/home.html" => Response::html(pages::home(site)),
        SiteKind::Parked if path != "/robots.txt" => Response::html(format!(
            "<html><head><title>{domain}</title></head><body><h1>{domain}</h1><p>The domain {domain} is for sale! \
             Make an offer today.</p><p>Buy this domain through our secure broker.</p></body></html>"
        )),
        SiteKind::NamesakeAbroad if home => {
            let (place, phone) = if domain.ends_with(".in") {
                ("Andheri East, Mumbai 400069, India", "+91 22 2683 4500".to_owned())
            } else {
                ("1 King Street, London EC2V 8AU, United Kingdom", format!("+44 20 7946 0{:03}", hash(&domain) % 1000))
            };
            Response::html(format!(
                "<html><head><title>{name} Ltd</title></head><body><h1>Welcome to {name} Ltd</h1>\
                 <p>{name} Ltd has served clients across the region for over twenty years with care.</p>\
                 <footer><p>{place}</p><p>Tel {phone} | info@{domain}</p></footer></body></html>"
            ))
        }
        SiteKind::Directory if path.starts_with("/company/") => {
            let others: String = (0..8)
                .map(|i| {
                    format!(
                        "<li>{} HOLDINGS PTE. LTD. UEN 20{:02}{:05}{}</li>",
                        ["ALPHA", "BETA", "GAMMA", "DELTA", "OMEGA", "SIGMA", "THETA", "KAPPA"][i],
                        10 + i,
                        hash(&(path, i)) % 100_000,
                        ["A", "B", "C", "D", "E", "G", "H", "K"][i]
                    )
                })
                .collect();
            Response::html(format!(
                "<html><head><title>{} - SG Business Directory</title></head><body><h1>{}</h1>\
                 <p>Singapore company directory: registered entities and their UENs.</p><ul>{others}</ul></body></html>",
                site.company, site.company
            ))
        }
        SiteKind::NamesakeAbroad | SiteKind::Directory if path != "/robots.txt" => Response::not_found(),
        _ => return None,
    })
}

/// Cloudflare's email protection encoding of `email` with a key from `seed`.
pub fn cf_encode(email: &str, seed: u64) -> String {
    let key = (seed % 200 + 20) as u8;
    std::iter::once(key).chain(email.bytes().map(|b| b ^ key)).map(|b| format!("{b:02x}")).collect()
}

/// The mobile number a WhatsApp site gives (E.164).
pub fn mobile(site: &SiteSpec) -> String {
    format!("+659{:07}", hash(&("mobile", &site.host)) % 10_000_000)
}

/// The London office number a site with an office abroad gives (E.164).
pub fn london(site: &SiteSpec) -> String {
    format!("+4420794600{:02}", hash(&("london", &site.host)) % 100)
}

/// The JSON-LD block of a [`SiteKind::JsonLd`] site: its contact details, address, UEN and LinkedIn.
pub fn json_ld(site: &SiteSpec) -> String {
    let e = site.expected();
    let ld = serde_json::json!({
        "@context": "https://schema.org",
        "@graph": [{
            "@type": "LocalBusiness",
            "name": site.company,
            "taxID": site.uen,
            "email": format!("mailto:sales@{}", site.domain()),
            "telephone": e.phone,
            "faxNumber": "+65 6000 0000",
            "address": {"@type": "PostalAddress", "streetAddress": site.street, "postalCode": e.hq_postal, "addressCountry": "SG"},
            "sameAs": ["https://www.facebook.com/x", e.linkedin_url],
        }]
    });
    format!(r#"<script type="application/ld+json">{ld}</script>"#)
}

fn title_case(s: &str) -> String {
    s.split_whitespace()
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_uppercase().chain(c.flat_map(char::to_lowercase)).collect::<String>(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
