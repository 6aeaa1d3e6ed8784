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
    /// What the issuer's audit records will call this token when they
    /// cannot name it otherwise (a Vault child token's HMAC under the
    /// issuer's audit device, which a request with a revoked token is
    /// logged with). An identifier, not a secret.
    pub audit_id: Option<String>,
}

impl std::fmt::Debug for MintedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedToken")
            .field("token", &"<redacted>")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("handle", &self.handle)
            .field("audit_id", &self.audit_id)
            .finish()
    }
}

/// What revocation needs, without the token: an object name, an accessor,
/// a token id. Safe to store in annotations and to show in logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationHandle(pub String);

/// How a revocation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revocation {
    /// The issuer confirmed the token is dead (or it was already gone).
    Revoked,
    /// This issuer cannot revoke; the token dies at its expiry.
    NotSupported,
    /// The issuer answered without confirming: it does not know the token
    /// (a 404 for its id). Not counted as revoked.
    Unconfirmed(String),
    /// A search handle found the token, which the issuer then confirmed
    /// dead; this is the handle it was found under.
    RevokedAs(RevocationHandle),
    /// A search handle ([`Issuer::search_handle`]) found no token: the mint
    /// never reached the issuer, or the token is gone.
    NotFound(String),
    /// A search handle cannot be searched with the operator's access.
    Unsearchable(String),
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
    /// No answer after the request may have reached the issuer (a timeout,
    /// a connection lost mid-call, a body too large to read): it may have
    /// acted on it. A mint that ends so may have minted a token; retrying
    /// may help.
    #[error("{0}")]
    Ambiguous(String),
}

impl IssuerError {
    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            IssuerError::Unavailable(_) | IssuerError::Ambiguous(_)
        )
    }

    /// Whether the issuer may have acted on the request.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, IssuerError::Ambiguous(_))
    }

    /// For an answer to a mint that said success but could not be used (no
    /// token where it should be, an expiry that cannot be read): the issuer
    /// may well have minted, so the mint is ambiguous, not refused.
    pub fn after_success(self) -> IssuerError {
        match self {
            IssuerError::Ambiguous(m) => IssuerError::Ambiguous(m),
            IssuerError::Invalid(m) | IssuerError::Unavailable(m) => IssuerError::Ambiguous(
                format!("{m} (in a success answer: the issuer may have minted)"),
            ),
        }
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
    /// A handle to record before minting `req`, by which the token can be
    /// found and revoked if the operator stops before it hears the answer
    /// (intent before effect). `None`: such a token cannot be found, and
    /// the ledger says `Unknown` for it.
    fn search_handle(&self, req: &MintRequest) -> Option<RevocationHandle> {
        let _ = req;
        None
    }
    /// How much of the ledger's write-ahead a mint of this kind needs
    /// (each step is a status write per token).
    fn write_ahead(&self) -> WriteAhead {
        WriteAhead::Full
    }
    /// Whether the issuer refuses `token` now, asked the way it allows (a
    /// revocation drill measures until it does): `Ok(true)` refused,
    /// `Ok(false)` still accepted, `Err` the question cannot be asked
    /// (why, for the drill's record).
    fn refuses<'a>(&'a self, token: &'a SecretString) -> BoxFuture<'a, Result<bool, String>> {
        let _ = token;
        let kind = self.kind();
        Box::pin(async move {
            Err(format!(
                "the {kind} issuer offers no way to ask whether a token is still accepted"
            ))
        })
    }
    /// How [`Issuer::refuses`] asks (`TokenReview`, ...), for the record.
    fn refusal_check(&self) -> &'static str {
        "not checkable"
    }
}

/// What the ledger records in status around a mint, before the tenant's
/// Secret holds the token. Each step is a status write per token; a kind
/// skips one only where nothing is lost without it after a stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteAhead {
    /// The intent before the issuer call, and the issuer's answer
    /// (fingerprint, handle) before the Secret: a token minted before the
    /// operator stopped is found, revoked by its recorded handle, or
    /// recognised in the Secret by its fingerprint.
    Full,
    /// The answer only. No intent is needed when a token the operator
    /// stops before recording was never held by anyone but the operator
    /// (jwt: signed in memory) or the issuer's own durable record stands
    /// in for the intent (serviceAccount: the binding Secret, created
    /// before the TokenRequest and found by the AgentToken's UID after a
    /// stop, then deleted, which ends the token). The answer is still
    /// recorded before the Secret, so a delivered token is recognised.
    AnswerOnly,
}

/// The message for an expiry beyond what a timestamp can hold.
pub const UNREPRESENTABLE_EXPIRY: &str =
    "the issuer answered an expiry the operator cannot represent";
/// The message for a grant whose expiry is not after its issue time.
pub const ALREADY_EXPIRED: &str = "the issuer granted a token that is already expired";

/// A number of seconds an issuer answered (`expires_in`, `lease_duration`,
/// a webhook's `expiresInPath`): a JSON integer, a JSON number with a
/// fraction (truncated) or a string holding either. `Ok(None)` when `v` is
/// not a number at all (an object, `true`, `"soon"`, `"NaN"`, `"inf"`); an
/// error when it is a number no timestamp can be that far from.
pub fn granted_seconds(v: &serde_json::Value) -> Result<Option<i64>, IssuerError> {
    let too_far = || IssuerError::Unavailable(UNREPRESENTABLE_EXPIRY.into());
    let from_f64 = |f: f64| -> Result<Option<i64>, IssuerError> {
        if !f.is_finite() {
            return Ok(None);
        }
        // [-2^63, 2^63) is i64's range; anything inside fits, once truncated.
        const LIMIT: f64 = 9_223_372_036_854_775_808.0;
        let t = f.trunc();
        if !(-LIMIT..LIMIT).contains(&t) {
            return Err(too_far());
        }
        Ok(Some(t as i64))
    };
    match v {
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else if n.as_u64().is_some() {
                Err(too_far())
            } else {
                n.as_f64().map_or(Ok(None), from_f64)
            }
        }
        serde_json::Value::String(s) => {
            let s = s.trim();
            if let Ok(i) = s.parse::<i64>() {
                return Ok(Some(i));
            }
            let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(too_far());
            }
            // "NaN", "inf" and "infinity" parse as floats: not finite, so None.
            s.parse::<f64>().map_or(Ok(None), from_f64)
        }
        _ => Ok(None),
    }
}

/// `issued_at + seconds`, for a grant of `seconds`: an error when the grant
/// is not positive (already expired at birth) or lands beyond any
/// representable time.
pub fn expiry_after(issued_at: Timestamp, seconds: i64) -> Result<Timestamp, IssuerError> {
    if seconds <= 0 {
        return Err(IssuerError::Unavailable(format!(
            "{ALREADY_EXPIRED} (it lives {seconds}s)"
        )));
    }
    issued_at
        .checked_add(jiff::SignedDuration::from_secs(seconds))
        .map_err(|_| IssuerError::Unavailable(UNREPRESENTABLE_EXPIRY.into()))
}

/// `expires_at` itself when it is after `issued_at`, else the error every
/// issuer gives for a token that is dead at birth.
pub fn after_issue(issued_at: Timestamp, expires_at: Timestamp) -> Result<Timestamp, IssuerError> {
    if expires_at <= issued_at {
        return Err(IssuerError::Unavailable(format!(
            "{ALREADY_EXPIRED} (expiry {expires_at}, issued {issued_at})"
        )));
    }
    Ok(expires_at)
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_unusable_success_answer_is_an_ambiguous_mint() {
        for e in [
            IssuerError::Unavailable("no token".into()),
            IssuerError::Invalid("bad expiry".into()),
        ] {
            let a = e.after_success();
            assert!(a.is_ambiguous() && a.is_transient(), "{a}");
            assert!(a.to_string().contains("may have minted"));
        }
    }
    use super::*;
    use serde_json::json;

    fn at() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    #[test]
    fn granted_seconds_reads_numbers_and_numeric_strings() {
        assert_eq!(granted_seconds(&json!(600)).unwrap(), Some(600));
        assert_eq!(granted_seconds(&json!("600")).unwrap(), Some(600));
        assert_eq!(granted_seconds(&json!(" 600 ")).unwrap(), Some(600));
        assert_eq!(granted_seconds(&json!(3599.9)).unwrap(), Some(3599));
        assert_eq!(granted_seconds(&json!("3599.9")).unwrap(), Some(3599));
        assert_eq!(granted_seconds(&json!(-5)).unwrap(), Some(-5));
        assert_eq!(granted_seconds(&json!("-5")).unwrap(), Some(-5));
        assert_eq!(granted_seconds(&json!(0)).unwrap(), Some(0));
    }

    #[test]
    fn granted_seconds_refuses_what_is_not_a_number() {
        for v in [
            json!(null),
            json!(true),
            json!({"s": 1}),
            json!([600]),
            json!("soon"),
            json!(""),
            json!("NaN"),
            json!("nan"),
            json!("inf"),
            json!("-infinity"),
            json!("1e"),
        ] {
            assert_eq!(granted_seconds(&v).unwrap(), None, "{v}");
        }
    }

    #[test]
    fn huge_grants_are_an_issuer_error_not_a_panic() {
        for v in [
            json!(u64::MAX),
            json!(1e300),
            json!(-1e300),
            json!(9.3e18),
            json!("99999999999999999999"),
            json!("-99999999999999999999"),
            json!("1e300"),
        ] {
            let e = granted_seconds(&v).unwrap_err();
            assert!(e.is_transient(), "{v}");
            assert_eq!(e.to_string(), UNREPRESENTABLE_EXPIRY, "{v}");
        }
        // Representable as seconds, but far beyond the year 9999.
        for s in [i64::MAX, 1 << 40] {
            let e = expiry_after(at(), s).unwrap_err();
            assert_eq!(e.to_string(), UNREPRESENTABLE_EXPIRY);
        }
    }

    #[test]
    fn a_grant_that_is_not_positive_is_already_expired() {
        for s in [0, -1, i64::MIN] {
            let e = expiry_after(at(), s).unwrap_err();
            assert!(e.to_string().starts_with(ALREADY_EXPIRED), "{e}");
            assert!(e.is_transient());
        }
        assert_eq!(
            expiry_after(at(), 60).unwrap(),
            Timestamp::from_second(1_800_000_060).unwrap()
        );
        assert!(after_issue(at(), at()).is_err());
        assert!(after_issue(at(), Timestamp::from_second(1).unwrap()).is_err());
        assert!(after_issue(at(), Timestamp::MAX).is_ok());
    }
}
