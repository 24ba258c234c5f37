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
//! is an error that says so, not a silent downgrade.
//!
//! A client certificate (mutual TLS, for `cert` authentication or `clientcert=verify-full` in
//! `pg_hba.conf`) is `sslcert` with `sslkey`, else `~/.postgresql/postgresql.crt` and `postgresql.key` when
//! both exist, as libpq does; the key must not be readable by group or others (libpq's rule: 0600, or
//! 0640 when root owns it). The TLS keys are taken out of the DSN before tokio-postgres (which knows
//! neither `verify-ca`, `verify-full` nor client certificates) reads the rest.

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

/// A client certificate chain and its private key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ClientCert {
    fn load(&self) -> Result<(Vec<CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>)> {
        let read = |setting: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| {
                Error::with_source(ErrorKind::Config, format!("{setting} {}: cannot read it", path.display()), e)
            })
        };
        let pem = read("sslcert", &self.cert)?;
        let chain: Vec<CertificateDer<'static>> =
            rustls_pemfile::certs(&mut pem.as_slice()).collect::<std::result::Result<_, _>>().map_err(|e| {
                Error::with_source(ErrorKind::Config, format!("sslcert {}: not PEM", self.cert.display()), e)
            })?;
        if chain.is_empty() {
            return Err(Error::config(format!(
                "sslcert {} holds no certificate (a PEM file with a BEGIN CERTIFICATE block)",
                self.cert.display()
            )));
        }
        key_is_private(&self.key)?;
        let pem = read("sslkey", &self.key)?;
        let key = rustls_pemfile::private_key(&mut pem.as_slice())
            .map_err(|e| Error::with_source(ErrorKind::Config, format!("sslkey {}: not PEM", self.key.display()), e))?
            .ok_or_else(|| {
                Error::config(format!(
                    "sslkey {} holds no private key (PKCS#8, PKCS#1 or SEC1 PEM)",
                    self.key.display()
                ))
            })?;
        Ok((chain, key))
    }
}

/// libpq's rule for a private key file: no access for others, nor for the group unless root owns it.
fn key_is_private(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::with_source(ErrorKind::Config, format!("sslkey {}: cannot read it", path.display()), e))?;
    let mode = meta.mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    if mode & !allowed != 0 {
        return Err(Error::config(format!(
            "sslkey {} may be read by {} (mode {mode:04o}): `chmod 600` it, as libpq requires of a private key",
            path.display(),
            if mode & 0o007 != 0 { "anyone" } else { "its group" }
        )));
    }
    Ok(())
}

/// The TLS half of a DSN.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tls {
    pub mode: SslMode,
    pub roots: Option<Roots>,
    pub client: Option<ClientCert>,
}

/// Parses a DSN (`key=value ...` or a `postgres://` URL): tokio-postgres's config for the rest, and the TLS
/// settings.
pub fn parse(dsn: &str) -> Result<(Config, Tls)> {
    let Parts { rest, mode, rootcert, cert, key } = split(dsn)?;
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
    let in_home = |name: &str| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql").join(name)).filter(|p| p.exists())
    };
    let roots = match rootcert.as_deref() {
        Some("system") => Some(Roots::System),
        Some(path) => Some(Roots::File(PathBuf::from(path))),
        None => in_home("root.crt").map(Roots::File),
    };
    let client = match (cert, key) {
        (Some(cert), Some(key)) => Some(ClientCert { cert: cert.into(), key: key.into() }),
        (Some(_), None) => return Err(Error::config(
            "sslcert is set in POSTGRES_DSN without sslkey: add sslkey=<PEM file with the certificate's private key>",
        )),
        (None, Some(_)) => {
            return Err(Error::config(
                "sslkey is set in POSTGRES_DSN without sslcert: add sslcert=<PEM file with the client certificate>",
            ))
        }
        (None, None) => match (in_home("postgresql.crt"), in_home("postgresql.key")) {
            (Some(cert), Some(key)) => Some(ClientCert { cert, key }),
            _ => None,
        },
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
    Ok((config, Tls { mode, roots, client }))
}

/// The DSN without its TLS keys, for what reads only the rest (e.g. [`crate::db::describe`]).
pub fn without_tls(dsn: &str) -> String {
    split(dsn).map(|p| p.rest).unwrap_or_else(|_| dsn.to_owned())
}

/// A DSN with its TLS keys taken out.
#[derive(Debug, Default)]
struct Parts {
    /// The rest, as text tokio-postgres can parse.
    rest: String,
    mode: Option<String>,
    rootcert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl Parts {
    /// Keeps the value of a TLS key; false for any other key.
    fn take(&mut self, key: &str, value: &str) -> bool {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.rootcert,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            _ => return false,
        };
        *slot = Some(value.to_owned());
        true
    }
}

fn split(dsn: &str) -> Result<Parts> {
    let trimmed = dsn.trim();
    let mut parts = Parts::default();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let Ok(mut url) = url::Url::parse(trimmed) else { return Ok(Parts { rest: dsn.to_owned(), ..parts }) };
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, v)| !parts.take(k, v))
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        parts.rest = url.to_string();
        return Ok(parts);
    }
    for (key, raw, value) in key_values(trimmed)? {
        if !parts.take(&key, &value) {
            if !parts.rest.is_empty() {
                parts.rest.push(' ');
            }
            parts.rest.push_str(&raw);
        }
    }
    Ok(parts)
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
            builder.dangerous().with_custom_certificate_verifier(webpki)
        } else {
            let v = Arc::new(Relaxed { chain: Some(webpki), provider });
            builder.dangerous().with_custom_certificate_verifier(v)
        }
    } else {
        let v = Arc::new(Relaxed { chain: None, provider });
        builder.dangerous().with_custom_certificate_verifier(v)
    };
    let config = match &tls.client {
        None => config.with_no_client_auth(),
        Some(c) => {
            let (chain, key) = c.load()?;
            config.with_client_auth_cert(chain, key).map_err(|e| {
                Error::config(format!("sslcert {} with sslkey {}: {e}", c.cert.display(), c.key.display()))
            })?
        }
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
        client_cert_pem_path: tls.client.as_ref().map(|c| c.cert.clone()),
        client_key_pem_path: tls.client.as_ref().map(|c| c.key.clone()),
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
        let p = split(
            "host=db.example port=5432 sslmode=verify-full sslrootcert='/etc/ca dir/ca.pem' user=x sslcert=/c.pem \
             sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(p.rest, "host=db.example port=5432 user=x");
        assert_eq!(p.mode.as_deref(), Some("verify-full"));
        assert_eq!(p.rootcert.as_deref(), Some("/etc/ca dir/ca.pem"));
        assert_eq!((p.cert.as_deref(), p.key.as_deref()), (Some("/c.pem"), Some("/k.pem")));
        let p = split("postgres://u:p@db.example:5432/acra?sslmode=require&application_name=a&sslrootcert=%2Fca.pem")
            .unwrap();
        assert_eq!(p.rest, "postgres://u:p@db.example:5432/acra?application_name=a");
        assert_eq!((p.mode.as_deref(), p.rootcert.as_deref()), (Some("require"), Some("/ca.pem")));
        let p = split("postgresql://db/acra?sslmode=disable").unwrap();
        assert_eq!((p.rest.as_str(), p.mode.as_deref()), ("postgresql://db/acra", Some("disable")));
        assert!(split("host='unterminated").is_err());
        assert_eq!(split(r"password='it\'s' host=h").unwrap().rest, r"password='it\'s' host=h");
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
        let missing =
            Tls { mode: SslMode::VerifyCa, roots: Some(Roots::File("/nonexistent/ca.pem".into())), client: None };
        assert!(client_config(&missing).unwrap_err().to_string().contains("/nonexistent/ca.pem"));
        let err = parse("host=h sslcert=/c.pem").unwrap_err().to_string();
        assert!(err.contains("sslkey"), "{err}");
    }
}
