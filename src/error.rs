//! One error type for the engine. Callers decide what to do from its [`ErrorKind`] (retry, exit, fix the
//! config), never from the message text. The cause is kept as `source()`, not formatted into the message.

use std::fmt;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, as far as a caller needs to know to react.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A setting is missing or invalid; the message names it. Fix the configuration.
    Config,
    /// The database could not be reached or the connection was lost.
    Connect,
    /// A statement failed.
    Database,
    /// The private PostgreSQL cluster could not be set up or started.
    Embedded,
    /// The schema is not what the engine needs (run `acraflow migrate`).
    Schema,
    /// A file or process operation failed.
    Io,
    /// Input data could not be decoded (wire data, reference files).
    Data,
}

#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), source: None }
    }

    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error { kind, message: message.into(), source: Some(Box::new(source)) }
    }

    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    /// A failed statement or lost connection; the kind follows from what Postgres said.
    pub fn db(what: impl Into<String>, err: tokio_postgres::Error) -> Self {
        let kind = if is_connection_error(&err) { ErrorKind::Connect } else { ErrorKind::Database };
        Self::with_source(kind, what, err)
    }

    pub fn io(what: impl Into<String>, err: std::io::Error) -> Self {
        Self::with_source(ErrorKind::Io, what, err)
    }

    /// The SQLSTATE of the database error behind this one, if any.
    pub fn sql_state(&self) -> Option<&tokio_postgres::error::SqlState> {
        self.source.as_deref()?.downcast_ref::<tokio_postgres::Error>()?.code()
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// True when the same operation may succeed if tried again: a lost connection, a server shutting down,
    /// a serialization failure or deadlock.
    pub fn is_retryable(&self) -> bool {
        match self.kind {
            ErrorKind::Connect => true,
            ErrorKind::Database => self
                .source
                .as_ref()
                .and_then(|s| s.downcast_ref::<tokio_postgres::Error>())
                .and_then(|e| e.code())
                .is_some_and(|c| {
                    use tokio_postgres::error::SqlState;
                    *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
                }),
            _ => false,
        }
    }
}

fn is_connection_error(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.code() {
        // Class 08 (connection exception) and 57P01..57P03 (admin shutdown, crash shutdown, cannot connect now).
        Some(code) => code.code().starts_with("08") || code.code().starts_with("57P"),
        // No SQLSTATE: the error came from the socket, not the server.
        None => std::error::Error::source(err).is_some_and(|s| s.is::<std::io::Error>()),
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_are_not_retryable() {
        let e = Error::config("ACRA_DIRECT_MIN_AGE_DAYS='x' is not a whole number");
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(!e.is_retryable());
        assert_eq!(e.to_string(), "ACRA_DIRECT_MIN_AGE_DAYS='x' is not a whole number");
    }
}
