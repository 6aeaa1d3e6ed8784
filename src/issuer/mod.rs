//! Where tokens come from: one file per issuer kind behind one trait.
//!
//! The controller speaks only [`Issuer`]; each kind turns a [`MintRequest`]
//! into a [`MintedToken`] and knows how to revoke what it minted from a
//! [`RevocationHandle`] that holds no secret (the token itself is never kept
//! anywhere but in the AgentToken's Secret).

pub mod github_app;
pub mod jwt;
pub mod oauth2;
pub mod service_account;
pub mod vault;
pub mod web;
pub mod webhook;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;
use secrecy::SecretString;

/// What an AgentToken asks its issuer for, after policy has been applied.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MintRequest {
    /// Namespace of the AgentToken.
    pub namespace: String,
    /// Name of the AgentToken.
    pub name: String,
    /// UID of the AgentToken (objects the issuer creates are owned by it).
    pub uid: String,
    /// The revision this token will have (status.revision + 1).
    pub revision: i64,
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    pub service_account_name: Option<String>,
    pub permissions: BTreeMap<String, String>,
    pub repositories: Vec<String>,
    pub parameters: BTreeMap<String, String>,
    /// Requested lifetime; the issuer may grant less.
    pub lifetime: Duration,
}

/// A freshly minted token. `Debug` never shows the token.
pub struct MintedToken {
    pub token: SecretString,
    pub issued_at: Timestamp,
    /// The token's REAL expiry as the issuer reports it.
    pub expires_at: Timestamp,
    pub handle: RevocationHandle,
}

impl std::fmt::Debug for MintedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedToken")
            .field("token", &"<redacted>")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("handle", &self.handle)
            .finish()
    }
}

/// What revocation needs, without the token: an object name, an accessor,
/// a token id. Safe to store in annotations and to show in logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationHandle(pub String);

/// How a revocation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revocation {
    /// The issuer confirmed the token is dead (or it was already gone).
    Revoked,
    /// This issuer cannot revoke; the token dies at its expiry.
    NotSupported,
}

/// Why an issuer call failed. Messages never contain a token or a secret.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// The request does not fit this issuer (a person must change the spec).
    #[error("{0}")]
    Invalid(String),
    /// The issuer refused or failed; retrying may help.
    #[error("{0}")]
    Unavailable(String),
}

impl IssuerError {
    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, IssuerError::Unavailable(_))
    }
}

/// One kind of token source.
pub trait Issuer: Send + Sync {
    /// The kind's name as in the CRD (`serviceAccount`, `oauth2`, ...).
    fn kind(&self) -> &'static str;
    /// Mints a token for `req`.
    fn mint<'a>(&'a self, req: &'a MintRequest) -> BoxFuture<'a, Result<MintedToken, IssuerError>>;
    /// Revokes the token behind `handle`. `token` is the token itself when
    /// it is still held (some protocols, RFC 7009, revoke by the token).
    /// Revoking twice is not an error.
    fn revoke<'a>(
        &'a self,
        namespace: &'a str,
        handle: &'a RevocationHandle,
        token: Option<&'a SecretString>,
    ) -> BoxFuture<'a, Result<Revocation, IssuerError>>;
    /// Checks configuration and reachability without minting, for the
    /// issuer's `Ready` condition.
    fn check(&self) -> BoxFuture<'_, Result<(), IssuerError>> {
        Box::pin(async { Ok(()) })
    }
}
