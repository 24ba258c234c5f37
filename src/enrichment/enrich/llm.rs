//! llm_extract: one OpenAI-compatible `/v1/chat/completions` call over the crawl corpus, asking for JSON
//! (employees_est, revenue_bucket, about). Optional and best-effort: a failure or an exhausted daily token
//! budget degrades the company's enrichment, it never fails it.

use url::Url;

use super::http::{FetchError, Http};
use crate::enrichment::usage::Usage;

#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// `LLM_BASE_URL`, e.g. `https://api.openai.com` or `http://127.0.0.1:8000/v1`.
    pub base_url: Url,
    /// `LLM_API_KEY` (or `OPENAI_API_KEY`); sent as a bearer token, never logged.
    pub api_key: Option<String>,
    pub model: String,
    /// `LLM_MAX_CHUNKS`
    pub max_chunks: usize,
    /// `EXTRACT_CORPUS_CHAR_LIMIT`
    pub corpus_chars: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LlmOutput {
    pub employees_est: Option<i32>,
    pub revenue_bucket: Option<String>,
    pub about: Option<String>,
    pub tokens: u64,
    pub chunks: usize,
}

const REVENUE_BUCKETS: &[&str] = &["<1M", "1M-10M", "10M-50M", "50M-100M", "100M-500M", ">500M"];

/// The chunks sent: the corpus cut into at most `max_chunks` pieces of `corpus_chars / max_chunks` chars.
pub fn chunks(corpus: &str, max_chunks: usize, corpus_chars: usize) -> Vec<String> {
    let per = (corpus_chars / max_chunks.max(1)).max(1);
    let chars: Vec<char> = corpus.chars().take(corpus_chars).collect();
    chars.chunks(per).take(max_chunks.max(1)).map(|c| c.iter().collect()).collect()
}

pub fn endpoint(base: &Url) -> Url {
    let path = base.path().trim_end_matches('/');
    let mut u = base.clone();
    u.set_path(&if path.ends_with("/v1") {
        format!("{path}/chat/completions")
    } else {
        format!("{path}/v1/chat/completions")
    });
    u
}

/// Calls the model. `Err` carries a message for the history row (never the key).
pub async fn extract(
    http: &Http,
    settings: &LlmSettings,
    budget: &Usage,
    company: &str,
    corpus: &str,
) -> Result<LlmOutput, String> {
    let pieces = chunks(corpus, settings.max_chunks, settings.corpus_chars);
    if pieces.is_empty() {
        return Err("no text to send".into());
    }
    // Reserve an estimate (4 chars a token, plus the answer) so concurrent calls cannot overrun the cap.
    let estimate = (pieces.iter().map(|p| p.len() as u64).sum::<u64>() / 4) + 400;
    match budget.try_take(estimate).await {
        Ok(true) => {}
        Ok(false) => return Err("OPENAI_DAILY_TOKENS_CAP reached for today".into()),
        Err(e) => return Err(format!("llm: could not reserve tokens against OPENAI_DAILY_TOKENS_CAP ({e})")),
    }
    let text: String =
        pieces.iter().enumerate().map(|(i, p)| format!("--- part {} ---\n{p}\n", i + 1)).collect::<Vec<_>>().join("");
    let body = serde_json::json!({
        "model": settings.model,
        "temperature": 0,
        "response_format": {"type": "json_object"},
        "messages": [
            {"role": "system", "content": format!(
                "You read a company's website text and answer in JSON with keys employees_est (integer or null), \
                 revenue_bucket (one of {} or null) and about (one paragraph, or null). Use only the text given.",
                REVENUE_BUCKETS.join(", "))},
            {"role": "user", "content": format!("Company: {company}\n\n{text}")},
        ],
    });
    let answer = http.post_json(&endpoint(&settings.base_url), settings.api_key.as_deref(), &body).await;
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            budget.adjust(-(estimate as i64)).await;
            return Err(describe(&e));
        }
    };
    let used = answer.pointer("/usage/total_tokens").and_then(|v| v.as_u64()).unwrap_or(estimate);
    budget.adjust(used as i64 - estimate as i64).await;
    let content = answer
        .pointer("/choices/0/message/content")
        .and_then(|c| c.as_str())
        .ok_or("the model's answer has no choices[0].message.content")?;
    let mut out = parse_answer(content)?;
    out.tokens = used;
    out.chunks = pieces.len();
    Ok(out)
}

fn describe(e: &FetchError) -> String {
    format!("llm: {e}")
}

/// Reads the model's JSON, tolerating code fences and out-of-range values (dropped, not trusted).
pub fn parse_answer(content: &str) -> Result<LlmOutput, String> {
    let trimmed = content.trim().trim_start_matches("```json").trim_start_matches("```").trim_end_matches("```");
    let v: serde_json::Value =
        serde_json::from_str(trimmed.trim()).map_err(|e| format!("the model's answer is not JSON ({e})"))?;
    let employees = v.get("employees_est").and_then(|e| e.as_i64().or_else(|| e.as_str()?.trim().parse().ok()));
    let bucket = v.get("revenue_bucket").and_then(|b| b.as_str()).map(str::trim);
    let about = v.get("about").and_then(|a| a.as_str()).map(super::extract::squash).filter(|a| a.len() >= 20);
    Ok(LlmOutput {
        employees_est: employees.filter(|n| (1..=5_000_000).contains(n)).map(|n| n as i32),
        revenue_bucket: bucket.filter(|b| REVENUE_BUCKETS.contains(b)).map(str::to_owned),
        about: about.map(|a| super::extract::truncate_chars(&a, 1_000)),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_is_cut_into_bounded_chunks() {
        let c = chunks(&"a".repeat(10_000), 3, 6_000);
        assert_eq!(c.len(), 3);
        assert!(c.iter().all(|p| p.len() == 2_000));
        assert_eq!(chunks("short", 4, 1000), ["short"]);
        assert!(chunks("", 4, 1000).is_empty());
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint(&Url::parse("https://api.openai.com").unwrap()).as_str(),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(
            endpoint(&Url::parse("http://127.0.0.1:9/v1/").unwrap()).as_str(),
            "http://127.0.0.1:9/v1/chat/completions"
        );
    }

    #[test]
    fn answers_are_validated() {
        let a = parse_answer("```json\n{\"employees_est\": \"45\", \"revenue_bucket\": \"1M-10M\", \"about\": \"A freight forwarder in Singapore.\"}\n```").unwrap();
        assert_eq!(a.employees_est, Some(45));
        assert_eq!(a.revenue_bucket.as_deref(), Some("1M-10M"));
        let b = parse_answer(r#"{"employees_est": -3, "revenue_bucket": "lots"}"#).unwrap();
        assert_eq!((b.employees_est, b.revenue_bucket), (None, None));
        assert!(parse_answer("I think about 40 people").is_err());
    }
}
