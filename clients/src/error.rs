//! The library's error type.

use thiserror::Error;

use crate::archive::StoreError;
use crate::source::ArticleError;
use crate::tls::TlsError;
use crate::topic::TopicError;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Articles(#[from] ArticleError),
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The first connection failed and `retry` was off.
    #[error("cannot connect to {broker}: {reason}")]
    Connect { broker: String, reason: String },
    /// The broker answered SUBACK with a failure for every filter.
    #[error("the broker refused the subscription to {filters}; check that this certificate's CN may read those topics")]
    SubscriptionRefused { filters: String },
    #[error("cannot encode article as JSON: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The archive cannot be opened (first attempt, without `retry`).
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("archive: {0}")]
    Archive(String),
}
