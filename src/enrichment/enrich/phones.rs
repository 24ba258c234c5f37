//! Telephone numbers in page text, `tel:` and `wa.me` links, and JSON-LD, kept in E.164 with their own
//! country code (`+6561234567`, `+442079460000`), validated by libphonenumber's metadata (the `phonenumber`
//! crate). A number labelled as a fax (`Fax`, `F:`, `Facsimile`, `传真`) is not a phone.
//!
//! Linear in the text: one regex pass for candidate runs, each parsed once; never panics.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use phonenumber::country::Id;
use regex::Regex;

/// A run that may be a number: an optional `+` or `(`, then digits with the separators people use.
static RUN: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?:\+|\(\s?\+?)?\d[\d \t().\-/]{5,22}\d").unwrap());
/// A fax label right before a number: `Fax:`, `F:`, `F.`, `facsimile`, `传真`.
static FAX_LABEL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)(?:fax|facsimile|传真)[^0-9]{0,6}$|(?:^|[^a-z])f\s?[:.]\s*$").unwrap());
/// Singapore numbers written without a country code, inside a run that holds more than one number.
static SG_LOCAL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:^|[^0-9])([3689]\d{3})[ .\-]?(\d{4})(?:$|[^0-9])").unwrap());

/// Most numbers kept from one page: a directory of numbers is not a company's phone list.
pub const MAX_PER_PAGE: usize = 40;

/// Adds the phone numbers in visible text. A number is taken only in a form people write phones in; fax
/// numbers are skipped by their label.
pub fn in_text(text: &str, out: &mut BTreeSet<String>) {
    let mut previous_end = 0;
    for m in RUN.find_iter(text) {
        if out.len() >= MAX_PER_PAGE {
            return;
        }
        let start = m.start();
        let window_start = floor_char(text, start.saturating_sub(16).max(previous_end));
        let label = &text[window_start..start];
        previous_end = m.end();
        if FAX_LABEL.is_match(label) {
            continue;
        }
        let run = m.as_str();
        if let Some(n) = parse(run) {
            out.insert(n);
        } else if !run.trim_start().starts_with(['+', '(']) {
            // Two local numbers written next to each other ("6123 4567 / 9123 4567").
            let mut at = 0;
            while let Some(c) = SG_LOCAL.captures_at(run, at) {
                if let Some(n) = parse(&format!("{}{}", &c[1], &c[2])) {
                    out.insert(n);
                }
                at = c.get(2).map_or(run.len(), |g| g.end());
            }
        }
    }
}

/// A `tel:` link's value (`+65-6123-4567`, `61234567`).
pub fn in_tel_link(value: &str, out: &mut BTreeSet<String>) {
    if let Some(n) = parse(value.split([';', '?']).next().unwrap_or("")) {
        out.insert(n);
    }
}

/// A WhatsApp click-to-chat link: `https://wa.me/6591234567` or `https://api.whatsapp.com/send?phone=65...`.
pub fn in_whatsapp_link(url: &url::Url, out: &mut BTreeSet<String>) {
    let host = url.host_str().unwrap_or("").to_ascii_lowercase();
    let digits = if host == "wa.me" {
        url.path().trim_matches('/').to_owned()
    } else if host.ends_with("whatsapp.com") {
        url.query_pairs().find(|(k, _)| k == "phone").map(|(_, v)| v.into_owned()).unwrap_or_default()
    } else {
        return;
    };
    let digits: String = digits.chars().filter(char::is_ascii_digit).collect();
    if (8..=15).contains(&digits.len()) {
        if let Some(n) = parse(&format!("+{digits}")) {
            out.insert(n);
        }
    }
}

/// One number in E.164, or `None` when it is not a valid number. Without a country code it is read as a
/// Singapore number; with one, as that country's.
pub fn parse(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < 7 || digits.len() > 15 {
        return None;
    }
    let international = raw.starts_with('+') || raw.starts_with("(+") || raw.starts_with("( +");
    let text = if international {
        format!("+{digits}")
    } else if digits.len() == 10 && digits.starts_with("65") && raw.starts_with(['6', '(']) {
        // "65 6123 4567", "(65) 6123-4567": Singapore's country code without the plus.
        format!("+{digits}")
    } else if digits.len() == 8 && digits.starts_with(['3', '6', '8', '9']) || digits.starts_with("1800") {
        digits
    } else {
        return None;
    };
    let number = phonenumber::parse(Some(Id::SG), &text).ok()?;
    let e164 = number.format().mode(phonenumber::Mode::E164).to_string();
    // Singapore's numbering plan is checked by its shape (8 digits from 3, 6, 8 or 9; 1800 numbers), not
    // by the library's list of allocated blocks, which lags new allocations; other countries by the list.
    let national = e164.strip_prefix("+65");
    let singapore = national.is_some_and(|n| {
        (n.len() == 8 && n.starts_with(['3', '6', '8', '9'])) || (n.len() == 11 && n.starts_with("1800"))
    });
    (singapore || (national.is_none() && phonenumber::is_valid(&number))).then_some(e164)
}

/// Whether an E.164 number is Singapore's.
pub fn is_singapore(e164: &str) -> bool {
    e164.starts_with("+65")
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(text: &str) -> Vec<String> {
        let mut out = BTreeSet::new();
        in_text(text, &mut out);
        out.into_iter().collect()
    }

    #[test]
    fn singapore_formats_become_e164() {
        assert_eq!(
            all("+6562345678, 65-8123-4567; (+65) 3158 1234 call 6345 6789."),
            ["+6531581234", "+6562345678", "+6563456789", "+6581234567"]
        );
        assert_eq!(all("Hotline 1800 123 4567"), ["+6518001234567"]);
        assert_eq!(all("(65) 6123-4567"), ["+6561234567"]);
        assert_eq!(all("Tel 6123 4567 / 9123 4567"), ["+6561234567", "+6591234567"]);
    }

    #[test]
    fn foreign_numbers_keep_their_country() {
        assert_eq!(all("London office: +44 20 7946 0958"), ["+442079460958"]);
        assert_eq!(all("HK +852 2123 4567, Sydney +61 2 9374 4000"), ["+61293744000", "+85221234567"]);
        assert_eq!(all("Shanghai +86 21 6321 0000"), ["+862163210000"]);
    }

    #[test]
    fn fax_numbers_are_not_phones() {
        assert_eq!(all("Tel: +65 6123 4567 | Fax: +65 6123 4568"), ["+6561234567"]);
        assert_eq!(all("T: 6123 4567 F: 6123 4568"), ["+6561234567"]);
        assert_eq!(all("电话 6123 4567 传真 6123 4568"), ["+6561234567"]);
        assert_eq!(all("Facsimile (65) 6123 4568 Main line (65) 6123 4567"), ["+6561234567"]);
    }

    #[test]
    fn numbers_that_are_not_phones() {
        assert!(all("UEN 201912345K, postal code Singapore 079903, order 12345678901, 5123 4567").is_empty());
        assert!(all("Copyright 1998-2024, invoice 2024/11/30").is_empty());
    }

    #[test]
    fn links() {
        let mut out = BTreeSet::new();
        in_tel_link("+65-6123-4567", &mut out);
        in_tel_link("61234568", &mut out);
        in_whatsapp_link(&url::Url::parse("https://wa.me/6591234567?text=hi").unwrap(), &mut out);
        in_whatsapp_link(&url::Url::parse("https://api.whatsapp.com/send?phone=6581234567").unwrap(), &mut out);
        assert_eq!(out.into_iter().collect::<Vec<_>>(), ["+6561234567", "+6561234568", "+6581234567", "+6591234567"]);
    }

    #[test]
    fn odd_text_is_linear_and_safe() {
        let long = "6".repeat(200_000) + &"1 ".repeat(100_000) + "é传真";
        let _ = all(&long);
        assert!(all("++++((((").is_empty());
    }
}
