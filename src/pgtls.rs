//! TLS to PostgreSQL, as libpq's `sslmode` and `sslrootcert` say, on every connection the engine opens
//! (sessions and the replication stream alike), with rustls.
//!
//! | `sslmode` | TLS | certificate checked | host name checked | plaintext fallback |
//! |---|---|---|---|---|
//! | `disable` | no | - | - | - |
//! | `prefer` (libpq's default) | tried first | no | no | when the server has no TLS |
//! | `require` | yes | no | no | never |
//! | `verify-ca` | yes | against the CA | no | never |
//! | `verify-full` | yes | against the CA | yes | never |
//!
//! The CA is `sslrootcert` (a PEM file), `sslrootcert=system` for the public web PKI (Mozilla's roots),
//! else `~/.postgresql/root.crt` as libpq looks for it. `verify-ca` and `verify-full` without any of them
//! is an error that says so, not a silent downgrade. Both keys are taken out of the DSN before
//! tokio-postgres (which knows neither `verify-ca` nor `verify-full`) reads the rest.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::Config;

use crate::error::{Error, ErrorKind, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Result<SslMode> {
        Ok(match v {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::config(format!(
                    "sslmode '{other}' in POSTGRES_DSN is not one of disable, prefer, require, verify-ca, verify-full"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// Where the CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    File(PathBuf),
    /// `sslrootcert=system`: the public web PKI.
    System,
}

/// The TLS half of a DSN.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tls {
    pub mode: SslMode,
    pub roots: Option<Roots>,
}

/// Parses a DSN (`key=value ...` or a `postgres://` URL): tokio-postgres's config for the rest, and the TLS
/// settings.
pub fn parse(dsn: &str) -> Result<(Config, Tls)> {
    let (rest, mode, rootcert) = split(dsn)?;
    let mut config: Config = rest.parse().map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("POSTGRES_DSN is not a valid connection string ({})", crate::db::describe(&rest)),
            e,
        )
    })?;
    let mode = match mode {
        Some(m) => SslMode::parse(&m)?,
        None => SslMode::default(),
    };
    let roots = match rootcert.as_deref() {
        Some("system") => Some(Roots::System),
        Some(path) => Some(Roots::File(PathBuf::from(path))),
        None => {
            let home = std::env::var_os("HOME").map(PathBuf::from);
            home.map(|h| h.join(".postgresql/root.crt")).filter(|p| p.exists()).map(Roots::File)
        }
    };
    if mode.verifies() && roots.is_none() {
        return Err(Error::config(format!(
            "sslmode={} in POSTGRES_DSN needs the CA to check the server against: add sslrootcert=<PEM file> \
             (or sslrootcert=system for a publicly signed certificate)",
            mode.as_str()
        )));
    }
    config.ssl_mode(match mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        _ => PgSslMode::Require,
    });
    Ok((config, Tls { mode, roots }))
}

/// The DSN without `sslmode` and `sslrootcert`, for what reads only the rest (e.g. [`crate::db::describe`]).
pub fn without_tls(dsn: &str) -> String {
    split(dsn).map(|(rest, _, _)| rest).unwrap_or_else(|_| dsn.to_owned())
}

/// Takes `sslmode` and `sslrootcert` out of a DSN; returns the rest as text tokio-postgres can parse.
fn split(dsn: &str) -> Result<(String, Option<String>, Option<String>)> {
    let trimmed = dsn.trim();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let Ok(mut url) = url::Url::parse(trimmed) else { return Ok((dsn.to_owned(), None, None)) };
        let mut mode = None;
        let mut root = None;
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter_map(|(k, v)| match k.as_ref() {
                "sslmode" => {
                    mode = Some(v.into_owned());
                    None
                }
                "sslrootcert" => {
                    root = Some(v.into_owned());
                    None
                }
                _ => Some((k.into_owned(), v.into_owned())),
            })
            .collect();
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        return Ok((url.to_string(), mode, root));
    }
    let mut rest = String::new();
    let (mut mode, mut root) = (None, None);
    for (key, raw, value) in key_values(trimmed)? {
        match key.as_str() {
            "sslmode" => mode = Some(value),
            "sslrootcert" => root = Some(value),
            _ => {
                if !rest.is_empty() {
                    rest.push(' ');
                }
                rest.push_str(&raw);
            }
        }
    }
    Ok((rest, mode, root))
}

/// `key=value` pairs of a libpq connection string: the key, the pair's text as written, and the value
/// unquoted.
fn key_values(s: &str) -> Result<Vec<(String, String, String)>> {
    let bad = || Error::config("POSTGRES_DSN is not a valid connection string (an unterminated quote)".to_owned());
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i >= chars.len() {
            break;
        }
        let start = i;
        while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i >= chars.len() || chars[i] != '=' {
            // Not a pair: leave it for tokio-postgres to report.
            out.push((key.clone(), key, String::new()));
            continue;
        }
        i += 1;
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < chars.len() && chars[i] == '\'' {
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err(bad()),
                    Some('\\') => {
                        value.extend(chars.get(i + 1));
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(c) => {
                        value.push(*c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
        }
        out.push((key, chars[start..i].iter().collect(), value));
    }
    Ok(out)
}

/// The rustls client configuration for a mode. `None` for `disable`.
pub fn client_config(tls: &Tls) -> Result<Option<rustls::ClientConfig>> {
    if tls.mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS to PostgreSQL: {e}")))?;
    let config = if tls.mode.verifies() {
        let roots = Arc::new(root_store(tls.roots.as_ref())?);
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| Error::config(format!("sslrootcert: {e}")))?;
        if tls.mode == SslMode::VerifyFull {
            builder.dangerous().with_custom_certificate_verifier(webpki).with_no_client_auth()
        } else {
            let v = Arc::new(Relaxed { chain: Some(webpki), provider });
            builder.dangerous().with_custom_certificate_verifier(v).with_no_client_auth()
        }
    } else {
        let v = Arc::new(Relaxed { chain: None, provider });
        builder.dangerous().with_custom_certificate_verifier(v).with_no_client_auth()
    };
    Ok(Some(config))
}

fn root_store(roots: Option<&Roots>) -> Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Some(Roots::System) | None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(Roots::File(path)) => {
            let pem = std::fs::read(path).map_err(|e| {
                Error::with_source(ErrorKind::Config, format!("sslrootcert {}: cannot read it", path.display()), e)
            })?;
            let certs: Vec<CertificateDer<'static>> =
                rustls_pemfile::certs(&mut pem.as_slice()).collect::<std::result::Result<_, _>>().map_err(|e| {
                    Error::with_source(ErrorKind::Config, format!("sslrootcert {}: not PEM", path.display()), e)
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(Error::config(format!(
                    "sslrootcert {} holds no CA certificate (a PEM file with BEGIN CERTIFICATE blocks)",
                    path.display()
                )));
            }
        }
    }
    Ok(store)
}

/// The TLS settings for the replication connection to `host` (pgwire-replication's own rustls).
///
/// pgwire-replication checks host names only: for a host given as an IP address, `verify-full` checks the
/// chain on the replication connection, and the address in the certificate on every other session the
/// engine opens to the same server (they connect first).
pub fn replication_tls(tls: &Tls, host: &str) -> pgwire_replication::config::TlsConfig {
    use pgwire_replication::config::{SslMode as R, TlsConfig};
    let ip = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok();
    TlsConfig {
        mode: match tls.mode {
            SslMode::Disable => R::Disable,
            SslMode::Prefer => R::Prefer,
            SslMode::Require => R::Require,
            SslMode::VerifyCa => R::VerifyCa,
            SslMode::VerifyFull if ip => R::VerifyCa,
            SslMode::VerifyFull => R::VerifyFull,
        },
        // `None` with verification: pgwire-replication uses the public web PKI, as `system` means here.
        ca_pem_path: match &tls.roots {
            Some(Roots::File(p)) => Some(p.clone()),
            _ => None,
        },
        ..TlsConfig::default()
    }
}

/// `prefer` and `require` (`chain: None`: encrypted, the certificate not checked, as libpq does without a
/// root file) and `verify-ca` (the chain must lead to the CA; the name in the certificate is not checked).
/// Handshake signatures are always checked.
#[derive(Debug)]
struct Relaxed {
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_rootcert_leave_the_dsn() {
        let (rest, mode, root) =
            split("host=db.example port=5432 sslmode=verify-full sslrootcert='/etc/ca dir/ca.pem' user=x").unwrap();
        assert_eq!(rest, "host=db.example port=5432 user=x");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca dir/ca.pem"));
        let (rest, mode, root) =
            split("postgres://u:p@db.example:5432/acra?sslmode=require&application_name=a&sslrootcert=%2Fca.pem")
                .unwrap();
        assert_eq!(rest, "postgres://u:p@db.example:5432/acra?application_name=a");
        assert_eq!((mode.as_deref(), root.as_deref()), (Some("require"), Some("/ca.pem")));
        let (rest, mode, _) = split("postgresql://db/acra?sslmode=disable").unwrap();
        assert_eq!((rest.as_str(), mode.as_deref()), ("postgresql://db/acra", Some("disable")));
        assert!(split("host='unterminated").is_err());
        assert_eq!(split(r"password='it\'s' host=h").unwrap().0, r"password='it\'s' host=h");
    }

    #[test]
    fn modes_are_checked_by_name() {
        assert_eq!(parse("host=h").unwrap().1.mode, SslMode::Prefer, "libpq's default");
        assert_eq!(parse("host=h sslmode=disable").unwrap().1.mode, SslMode::Disable);
        let err = parse("host=h sslmode=strict").unwrap_err().to_string();
        assert!(err.contains("sslmode 'strict'"), "{err}");
        let err = parse("host=h sslmode=verify-full").unwrap_err().to_string();
        assert!(err.contains("sslrootcert"), "{err}");
        let (_, tls) = parse("host=h sslmode=verify-full sslrootcert=system").unwrap();
        assert_eq!(tls.roots, Some(Roots::System));
        assert!(client_config(&tls).unwrap().is_some());
        let missing = Tls { mode: SslMode::VerifyCa, roots: Some(Roots::File("/nonexistent/ca.pem".into())) };
        assert!(client_config(&missing).unwrap_err().to_string().contains("/nonexistent/ca.pem"));
    }
}
