//! contacts: people at the company from a configured endpoint (an Apify LinkedIn actor's
//! run-sync-get-dataset-items URL, or anything that answers the same way), stored in `contacts`.
//! Optional (`ENABLE_APIFY_LINKEDIN`) and best-effort.

use url::Url;

use super::http::Http;

const MAX_CONTACTS: usize = 50;

#[derive(Debug, Clone)]
pub struct ContactsSettings {
    /// `APIFY_LINKEDIN_URL`
    pub url: Url,
    /// `APIFY_TOKEN`; a bearer token, never logged.
    pub token: Option<String>,
    /// `APIFY_LINKEDIN_RATE`: lookups across every worker (`None`: unpaced).
    pub rate: Option<crate::config::Rate>,
    /// `APIFY_MAX_LOOKUPS`: lookups per UTC day across runs and workers (`None`: no cap).
    pub daily_cap: Option<u64>,
}

/// The kind of spend a lookup is counted as (`enrichment_usage`).
pub const LOOKUPS: &str = "contact_lookups";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub name: String,
    pub title: Option<String>,
    pub linkedin_url: Option<String>,
    pub email: Option<String>,
}

pub async fn fetch(
    http: &Http,
    settings: &ContactsSettings,
    company: &str,
    domain: Option<&str>,
    linkedin_url: Option<&str>,
) -> Result<Vec<Contact>, String> {
    let input = serde_json::json!({ "companyName": company, "domain": domain, "companyUrl": linkedin_url });
    let answer =
        http.post_json(&settings.url, settings.token.as_deref(), &input).await.map_err(|e| format!("contacts: {e}"))?;
    Ok(parse(&answer))
}

/// Dataset items: `[{"fullName"|"name", "title"|"headline"|"position", "profileUrl"|"linkedin_url"|"url", "email"}]`,
/// or `{"items": [...]}`. Items without a name are skipped.
pub fn parse(answer: &serde_json::Value) -> Vec<Contact> {
    let items = answer.as_array().or_else(|| answer.get("items").and_then(|i| i.as_array()));
    let field = |item: &serde_json::Value, keys: &[&str]| {
        keys.iter()
            .find_map(|k| item.get(*k).and_then(|v| v.as_str()))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    items
        .map(|items| {
            items
                .iter()
                .filter_map(|item| {
                    Some(Contact {
                        name: field(item, &["fullName", "name"])?,
                        title: field(item, &["title", "headline", "position"]),
                        linkedin_url: field(item, &["profileUrl", "linkedin_url", "url"]),
                        email: field(item, &["email"]).map(|e| e.to_ascii_lowercase()),
                    })
                })
                .take(MAX_CONTACTS)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn dataset_items() {
        let v = serde_json::json!([{"fullName": "Tan Mei Ling", "headline": "Director", "profileUrl": "https://www.linkedin.com/in/tml"},
                                   {"title": "no name"}, {"name": "Lim Wei", "email": "WEI@ACME.SG"}]);
        let c = super::parse(&v);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].title.as_deref(), Some("Director"));
        assert_eq!(c[1].email.as_deref(), Some("wei@acme.sg"));
        assert!(super::parse(&serde_json::json!({"error": "x"})).is_empty());
    }
}
