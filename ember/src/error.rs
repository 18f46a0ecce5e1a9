//! Why a request was not served, and the HTTP status each reason maps to.

/// Why a request was not served. [`status`](Self::status) is the HTTP status the Goodfire SDK
/// maps it from (goodfire-api.md §1.6); the worker sends the same number to the page.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EmberError {
    /// The body is not JSON at all (HTTP 400).
    #[error("{0}")]
    Malformed(String),
    /// The request is well-formed JSON but cannot be served as sent (HTTP 422).
    #[error("{0}")]
    Invalid(String),
    /// The request names a model this service does not run (HTTP 404).
    #[error("unknown model {found:?}: this server runs {serves:?}")]
    UnknownModel { found: String, serves: String },
    /// No route has this method and path (HTTP 404).
    #[error("no such endpoint: {method} {path}")]
    NoRoute { method: String, path: String },
    /// The provider behind this service cannot do this operation (HTTP 422): a remote model
    /// without conditional rules, say. The message names the operation and why.
    #[error("{provider} cannot serve {operation}: {why}")]
    Unsupported {
        operation: &'static str,
        provider: String,
        why: String,
    },
    /// The request's client went away, or the server is stopping (HTTP 499, as nginx logs a
    /// closed request; nobody reads the answer).
    #[error("cancelled: the client went away or the server is stopping")]
    Cancelled,
    /// The service cannot answer yet: its model is still loading (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    /// The provider failed (HTTP 500).
    #[error("{0}")]
    Failed(String),
    /// A remote provider's rate limit was reached, or would be by this request (HTTP 429).
    #[error("{0}")]
    RateLimited(String),
    /// A remote provider failed, or answered what cannot be read (HTTP 502).
    #[error("{0}")]
    BadGateway(String),
}

impl EmberError {
    /// The HTTP status the Goodfire SDK maps this error from.
    pub fn status(&self) -> u16 {
        match self {
            EmberError::Malformed(_) => 400,
            EmberError::Invalid(_) | EmberError::Unsupported { .. } => 422,
            EmberError::UnknownModel { .. } | EmberError::NoRoute { .. } => 404,
            EmberError::Cancelled => 499,
            EmberError::Unavailable(_) => 503,
            EmberError::Failed(_) => 500,
            EmberError::RateLimited(_) => 429,
            EmberError::BadGateway(_) => 502,
        }
    }
}
