//! The revocation ledger: one entry per minted revision in
//! `status.history`, which only the operator writes (a namespace admin can
//! edit the token Secret, never the status subresource). Everything the
//! operator revokes, and everything it says about a token's life, comes
//! from here.
//!
//! This module is pure: the transitions of an entry, the typed revocation
//! handle parsed once from what the issuer returned, what is due and when
//! to look again. `reconcile` and `finalize` perform the calls.
//!
//! ```text
//! Minting ──delivered──▶ Live ──rotated──▶ Grace ──grace over──▶ Revoking
//!    │                     │                                       │
//!    │ crash, not findable └───────revoke now / fail closed───────▶│
//!    ▼                                                             ▼
//! Unknown ─expiry─▶ Expired ◀─expiry─ Failed (retry) ◀─────── attempt ──▶ Revoked
//!                                        │                            NotSupported
//!                                        └─ abandoned on purpose ─▶ Abandoned
//! ```

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{
    AgentTokenStatus, HistoryEntry, IssuerRecord, RevocationState, RotationReason, TokenLife,
};
use crate::rotation;

/// Closed entries (terminal states) kept in `status.history`; open ones are
/// always kept.
pub const HISTORY_LIMIT: usize = 10;
/// Open entries beyond which no new token is minted: revocations that do
/// not complete must not pile up tokens.
pub const MAX_OPEN: usize = 20;
/// Revocations attempted in one reconcile (the rest wait for the next pass).
pub const ATTEMPTS_PER_PASS: usize = 4;

/// How a token is revoked, parsed once from the string the issuer returned
/// at mint (`status.history[].handle`). Never resolved by a name a tenant
/// chose: a binding name must be this AgentToken's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handle {
    /// serviceAccount: the binding Secret `<agenttoken>-binding-r<revision>`.
    Binding(String),
    /// vault: a child token's accessor.
    VaultAccessor(String),
    /// vault: a dynamic secret's lease id.
    VaultLease(String),
    /// vault: a child token minted while the operator stopped, before it
    /// heard the accessor; found by its metadata (the stored handle).
    VaultSearch(String),
    /// webhook: the id its mint response returned.
    WebhookId(String),
    /// Revoked by presenting the token itself: oauth2 (RFC 7009), githubApp,
    /// a webhook without ids. The operator keeps the value until revoked.
    ByToken(&'static str),
    /// jwt: signed by the operator; it cannot be revoked before expiry.
    Jwt,
}

impl Handle {
    /// Parses a stored handle; `None` for anything unrecognised or, for a
    /// binding, a name that is not `agent_token`'s binding of `revision`.
    pub fn parse(stored: &str, agent_token: &str, revision: i64) -> Option<Handle> {
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        if let Some(a) = stored.strip_prefix("vault-accessor:") {
            return nonempty(a).map(Handle::VaultAccessor);
        }
        if let Some(l) = stored.strip_prefix("vault-lease:") {
            return nonempty(l).map(Handle::VaultLease);
        }
        if let Some(key) = stored.strip_prefix(crate::issuer::vault::SEARCH) {
            return crate::issuer::vault::parse_search(key)
                .filter(|(_, r)| *r == revision)
                .map(|_| Handle::VaultSearch(stored.to_string()));
        }
        if let Some(id) = stored.strip_prefix("webhook-id:") {
            return nonempty(id).map(Handle::WebhookId);
        }
        if stored.starts_with("webhook:") {
            return Some(Handle::ByToken("webhook"));
        }
        if stored.starts_with("oauth2:") {
            return Some(Handle::ByToken("oauth2"));
        }
        if stored.starts_with("github-installation:") {
            return Some(Handle::ByToken("githubApp"));
        }
        if stored.starts_with("jwt:") {
            return Some(Handle::Jwt);
        }
        (stored == crate::issuer::service_account::binding_name(agent_token, revision))
            .then(|| Handle::Binding(stored.to_string()))
    }

    /// The issuer type that minted a token with this handle.
    pub fn issuer_type(&self) -> &'static str {
        match self {
            Handle::Binding(_) => "serviceAccount",
            Handle::VaultAccessor(_) | Handle::VaultLease(_) | Handle::VaultSearch(_) => "vault",
            Handle::WebhookId(_) => "webhook",
            Handle::ByToken(t) => t,
            Handle::Jwt => "jwt",
        }
    }

    /// Whether revocation needs the token's value.
    pub fn needs_token(&self) -> bool {
        matches!(self, Handle::ByToken(_))
    }
}

/// The handle a revision is revoked with: the recorded one, or for a
/// serviceAccount issuer (entries from before handles were recorded, or a
/// mint interrupted before its record) the binding name derived from the
/// revision.
pub fn handle_of(e: &HistoryEntry, agent_token: &str, issuer_type: Option<&str>) -> Option<Handle> {
    match &e.handle {
        Some(h) => Handle::parse(h, agent_token, e.revision),
        None => (issuer_type == Some("serviceAccount")).then(|| {
            Handle::Binding(crate::issuer::service_account::binding_name(
                agent_token,
                e.revision,
            ))
        }),
    }
}

/// An entry's state; entries from before the ledger had states are read
/// from their `revocation` summary.
pub fn life(e: &HistoryEntry) -> TokenLife {
    e.state.unwrap_or(match e.revocation {
        RevocationState::Pending => TokenLife::Live,
        RevocationState::Revoked => TokenLife::Revoked,
        RevocationState::NotSupported => TokenLife::NotSupported,
        RevocationState::Failed => TokenLife::Failed,
    })
}

/// The `revocation` summary of a state (the older contract); a `Failed`
/// entry that is retried says `Pending` until its revocation is final.
pub fn summary(l: TokenLife) -> RevocationState {
    match l {
        TokenLife::Minting
        | TokenLife::Live
        | TokenLife::Grace
        | TokenLife::Revoking
        | TokenLife::Unknown => RevocationState::Pending,
        TokenLife::Revoked => RevocationState::Revoked,
        TokenLife::NotSupported | TokenLife::Expired => RevocationState::NotSupported,
        TokenLife::Failed | TokenLife::Abandoned => RevocationState::Failed,
    }
}

/// Whether the entry still needs the operator: a token that may be valid
/// and is not yet dealt with (a `Failed` entry only while a retry is set).
pub fn is_open(e: &HistoryEntry) -> bool {
    match life(e) {
        TokenLife::Minting | TokenLife::Live | TokenLife::Grace | TokenLife::Revoking => true,
        TokenLife::Failed => e.next_attempt_at.is_some(),
        _ => false,
    }
}

fn set(e: &mut HistoryEntry, l: TokenLife) {
    e.state = Some(l);
    e.revocation = summary(l);
}

fn entry_mut(status: &mut AgentTokenStatus, revision: i64) -> Option<&mut HistoryEntry> {
    status.history.iter_mut().find(|h| h.revision == revision)
}

/// What the ledger records before an issuer is asked for a token.
pub struct Intent {
    pub revision: i64,
    pub issuer: IssuerRecord,
    pub reason: RotationReason,
    pub spec_hash: String,
    /// The handle, when known before the mint (serviceAccount bindings).
    pub handle: Option<String>,
    /// The latest time a token from this mint can be valid.
    pub valid_until: Timestamp,
}

/// Records a mint about to start (intent before effect). `status.revision`
/// still counts delivered tokens; the next revision is numbered above every
/// entry, so an intent's number is never reused.
pub fn intend(status: &mut AgentTokenStatus, i: Intent) {
    status.history.retain(|h| h.revision != i.revision);
    let mut e = HistoryEntry {
        revision: i.revision,
        fingerprint: String::new(),
        expires_at: Some(Time(i.valid_until)),
        reason: Some(i.reason),
        handle: i.handle,
        issuer: Some(i.issuer),
        spec_hash: Some(i.spec_hash),
        message: Some("minting".into()),
        ..Default::default()
    };
    set(&mut e, TokenLife::Minting);
    status.history.push(e);
    status.history.sort_by_key(|h| h.revision);
}

/// What the issuer returned, recorded while the entry is still `Minting`
/// (it becomes `Live` once in the Secret).
pub struct Minted<'a> {
    pub fingerprint: String,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub handle: &'a str,
    /// The id uses of it are reported under (`usage::credential_id`).
    pub credential_id: Option<String>,
}

/// Records the issuer's answer to a mint.
pub fn minted(status: &mut AgentTokenStatus, revision: i64, m: Minted<'_>) {
    if let Some(e) = entry_mut(status, revision) {
        e.fingerprint = m.fingerprint;
        e.issued_at = Some(Time(crate::rotation::whole_seconds(m.issued_at)));
        e.expires_at = Some(Time(crate::rotation::whole_seconds(m.expires_at)));
        e.handle = Some(m.handle.to_string());
        e.credential_id = m.credential_id;
        e.message = Some("minted; not yet in the Secret".into());
    }
}

/// The token of `revision` is in the Secret.
pub fn delivered(status: &mut AgentTokenStatus, revision: i64) {
    if let Some(e) = entry_mut(status, revision) {
        set(e, TokenLife::Live);
        e.message = None;
    }
}

/// Points the status summary (`revision`, `tokenFingerprint`, `issuedAt`,
/// `expiresAt`, `lastRotationReason`) at the current token and clears the
/// failure count: what every delivery ends with.
pub fn summarize(status: &mut AgentTokenStatus) {
    let Some(c) = current(status).cloned() else {
        return;
    };
    status.revision = c.revision;
    status.token_fingerprint = Some(c.fingerprint);
    status.issued_at = c.issued_at;
    status.expires_at = c.expires_at;
    if c.reason.is_some() {
        status.last_rotation_reason = c.reason;
    }
    status.failed_attempts = 0;
    status.last_failure_message = None;
    status.last_failure_time = None;
}

/// The token of `revision` stays in the Secret as the previous one until `until`.
pub fn grace(status: &mut AgentTokenStatus, revision: i64, until: Timestamp) {
    if let Some(e) = entry_mut(status, revision) {
        set(e, TokenLife::Grace);
        e.grace_until = Some(Time(until));
    }
}

/// Queues the token of `revision` for revocation now, saying why.
pub fn retire(status: &mut AgentTokenStatus, revision: i64, why: &str, now: Timestamp) {
    if let Some(e) = entry_mut(status, revision)
        && matches!(
            life(e),
            TokenLife::Minting | TokenLife::Live | TokenLife::Grace
        )
    {
        set(e, TokenLife::Revoking);
        e.grace_until = None;
        e.next_attempt_at = Some(Time(now));
        e.message = Some(why.to_string());
    }
}

/// Queues the token of `revision` for revocation now, as an emergency
/// (see `HistoryEntry::urgent`).
pub fn retire_now(status: &mut AgentTokenStatus, revision: i64, why: &str, now: Timestamp) {
    retire(status, revision, why, now);
    if let Some(e) = entry_mut(status, revision)
        && life(e) == TokenLife::Revoking
    {
        e.urgent = true;
    }
}

/// Puts off the next attempt at `revision`'s revocation until `until`
/// without counting one (the issuer's rate budget is spent).
pub fn defer(status: &mut AgentTokenStatus, revision: i64, until: Timestamp) {
    if let Some(e) = entry_mut(status, revision) {
        e.next_attempt_at = Some(Time(until));
    }
}

/// How one revocation attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The issuer confirmed the token is dead.
    Revoked,
    /// Found by a search, then confirmed dead: recorded with the handle it
    /// was found under.
    RevokedAs(String),
    /// The issuer cannot revoke: the token dies at its expiry.
    NotSupported,
    /// The issuer answered without confirming (it does not know the id):
    /// retrying would get the same answer.
    Unconfirmed(String),
    /// Failed; retrying may help.
    Retry(String),
    /// A token minted while the operator stopped cannot be looked for:
    /// it stays `Unknown` until its latest expiry.
    Unfindable(String),
    /// No attempt can succeed (no handle, the token value is not held, the
    /// issuer that minted it is gone).
    Impossible(String),
}

/// Records an attempt at `now`.
pub fn record(status: &mut AgentTokenStatus, revision: i64, outcome: Outcome, now: Timestamp) {
    let Some(e) = entry_mut(status, revision) else {
        return;
    };
    e.attempts = e.attempts.saturating_add(1);
    e.next_attempt_at = None;
    match outcome {
        Outcome::Revoked => {
            set(e, TokenLife::Revoked);
            e.revoked_at = Some(Time(now));
            // The message keeps why it was retired.
        }
        Outcome::RevokedAs(handle) => {
            set(e, TokenLife::Revoked);
            e.revoked_at = Some(Time(now));
            e.handle = Some(handle);
        }
        Outcome::NotSupported => {
            set(e, TokenLife::NotSupported);
            e.message = Some("the issuer cannot revoke: it dies at its expiry".into());
        }
        Outcome::Unconfirmed(m) | Outcome::Impossible(m) => {
            set(e, TokenLife::Failed);
            e.message = Some(m);
        }
        Outcome::Unfindable(m) => {
            set(e, TokenLife::Unknown);
            e.message = Some(format!("{m}; it may be valid until expiresAt"));
        }
        Outcome::Retry(m) => {
            set(e, TokenLife::Failed);
            // Not final while retries go on.
            e.revocation = RevocationState::Pending;
            let wait = rotation::backoff(e.attempts.max(1) as u32, &format!("r{revision}"));
            e.next_attempt_at = now
                .checked_add(SignedDuration::try_from(wait).unwrap_or_default())
                .ok()
                .map(Time);
            e.message = Some(m);
        }
    }
}

/// A minting entry whose reconcile ended without delivering (the operator
/// stopped): revoke it when it can be found, else say honestly that a token
/// may exist until its latest expiry.
pub fn interrupted(status: &mut AgentTokenStatus, revision: i64, findable: bool, now: Timestamp) {
    unanswered(status, revision, findable, STOPPED, now);
}

/// Why a mint's outcome is not known: the operator stopped.
pub const STOPPED: &str = "the operator stopped during this mint";

/// A minting entry whose issuer call ended without a usable answer (`why`
/// says how: the operator stopped, the call timed out after the request
/// may have reached the issuer): the issuer may have minted. Revoked when
/// it can be found, else `Unknown` until its latest expiry.
pub fn unanswered(
    status: &mut AgentTokenStatus,
    revision: i64,
    findable: bool,
    why: &str,
    now: Timestamp,
) {
    let Some(e) = entry_mut(status, revision) else {
        return;
    };
    if life(e) != TokenLife::Minting {
        return;
    }
    if findable {
        set(e, TokenLife::Revoking);
        e.next_attempt_at = Some(Time(now));
        e.message = Some(format!("{why}: revoking what it minted"));
    } else {
        set(e, TokenLife::Unknown);
        e.message = Some(format!(
            "{why}; the issuer offers no way to find the token: it may be valid until expiresAt"
        ));
    }
}

/// Revisions still `Minting` with no answer recorded, of kinds whose token
/// is kept (revoked by value) before its record is written.
pub fn kept_unrecorded(status: &AgentTokenStatus) -> impl Iterator<Item = i64> + '_ {
    status
        .history
        .iter()
        .filter(|e| life(e) == TokenLife::Minting && e.fingerprint.is_empty())
        .filter(|e| by_token_prefix(e).is_some())
        .map(|e| e.revision)
}

/// The handle prefix of a token revoked by value, by the minting issuer's type.
fn by_token_prefix(e: &HistoryEntry) -> Option<&'static str> {
    match e.issuer.as_ref()?.type_.as_str() {
        "oauth2" => Some("oauth2:"),
        "githubApp" => Some("github-installation:0:"),
        "webhook" => Some("webhook:"),
        _ => None,
    }
}

/// Records, for each [`kept_unrecorded`] revision whose token `kept` holds
/// (the operator's own keeper), what the mint's record would have said:
/// its fingerprint and a by-value handle. The interrupted mint is then
/// found, and revoked, instead of `Unknown`.
pub fn found_in_keeper(
    status: &mut AgentTokenStatus,
    kept: impl Fn(i64) -> Option<secrecy::SecretString>,
) {
    use secrecy::ExposeSecret;
    let revisions: Vec<i64> = kept_unrecorded(status).collect();
    for r in revisions {
        let Some(value) = kept(r) else { continue };
        if let Some(e) = entry_mut(status, r)
            && let Some(prefix) = by_token_prefix(e)
        {
            let fp = rotation::fingerprint(value.expose_secret().as_bytes());
            e.handle = Some(format!("{prefix}{fp}"));
            e.fingerprint = fp;
            e.message = Some("minted and kept before the operator stopped".into());
        }
    }
}

/// Gives up the revocation of `revision` on purpose.
pub fn abandon(status: &mut AgentTokenStatus, revision: i64, by: &str, why: &str) {
    if let Some(e) = entry_mut(status, revision)
        && is_open(e)
    {
        set(e, TokenLife::Abandoned);
        e.next_attempt_at = None;
        e.abandoned_by = Some(by.to_string());
        e.message = Some(why.to_string());
    }
}

/// Entries whose token can no longer be valid become `Expired`. The
/// current token stays `Live` (expired, in the Secret) until replaced.
pub fn expire(status: &mut AgentTokenStatus, now: Timestamp) {
    for e in &mut status.history {
        let past = e.expires_at.as_ref().is_some_and(|t| t.0 <= now);
        let waiting =
            matches!(life(e), TokenLife::Unknown) || (is_open(e) && life(e) != TokenLife::Live);
        if past && waiting {
            let was = life(e);
            set(e, TokenLife::Expired);
            // Died on its own: after failed attempts, or unaccounted for,
            // that is a failed revocation; otherwise it simply expired.
            if e.attempts > 0 || was == TokenLife::Unknown {
                e.revocation = RevocationState::Failed;
            }
            e.next_attempt_at = None;
            e.grace_until = None;
            if matches!(was, TokenLife::Revoking | TokenLife::Failed) {
                let m = e.message.take().unwrap_or_default();
                e.message = Some(format!(
                    "expired before its revocation was confirmed (last: {m})"
                ));
            }
        }
    }
}

/// Revisions whose revocation is due now, oldest first.
pub fn due(status: &AgentTokenStatus, now: Timestamp) -> Vec<i64> {
    status
        .history
        .iter()
        .filter(|e| matches!(life(e), TokenLife::Revoking | TokenLife::Failed))
        .filter(|e| e.next_attempt_at.as_ref().is_some_and(|t| t.0 <= now))
        .map(|e| e.revision)
        .collect()
}

/// The earliest time the ledger needs a look: a retry, a grace end, the
/// expiry of a token awaiting revocation or unaccounted for. (The current
/// token's own timing is rotation's.)
pub fn wake(status: &AgentTokenStatus) -> Option<Timestamp> {
    status
        .history
        .iter()
        .filter(|e| (is_open(e) && life(e) != TokenLife::Live) || life(e) == TokenLife::Unknown)
        .flat_map(|e| {
            [
                e.next_attempt_at.as_ref().map(|t| t.0),
                e.grace_until.as_ref().map(|t| t.0),
                e.expires_at.as_ref().map(|t| t.0),
            ]
        })
        .flatten()
        .min()
}

/// The delivered token: the highest `Live` revision.
pub fn current(status: &AgentTokenStatus) -> Option<&HistoryEntry> {
    status
        .history
        .iter()
        .filter(|e| life(e) == TokenLife::Live)
        .max_by_key(|e| e.revision)
}

/// The previous token in its grace period.
pub fn previous(status: &AgentTokenStatus) -> Option<&HistoryEntry> {
    status
        .history
        .iter()
        .filter(|e| life(e) == TokenLife::Grace)
        .max_by_key(|e| e.revision)
}

/// Open entries (see [`MAX_OPEN`]).
pub fn open(status: &AgentTokenStatus) -> usize {
    status.history.iter().filter(|e| is_open(e)).count()
}

/// Brings an older ledger to one current and at most one previous token:
/// entries from before states were recorded are `Live`; every `Live` entry
/// below the highest, and every `Grace` entry below the highest, is retired.
pub fn normalize(status: &mut AgentTokenStatus, now: Timestamp) {
    let top_live = current(status).map(|e| e.revision);
    let top_grace = previous(status).map(|e| e.revision);
    let stale: Vec<i64> = status
        .history
        .iter()
        .filter(|e| {
            (life(e) == TokenLife::Live && Some(e.revision) != top_live)
                || (life(e) == TokenLife::Grace && Some(e.revision) != top_grace)
        })
        .map(|e| e.revision)
        .collect();
    for r in stale {
        retire(status, r, "superseded", now);
    }
}

/// Keeps every open entry and the newest [`HISTORY_LIMIT`] closed ones.
pub fn prune(status: &mut AgentTokenStatus) {
    status.history.sort_by_key(|h| h.revision);
    let closed = status.history.iter().filter(|e| !is_open(e)).count();
    let mut drop = closed.saturating_sub(HISTORY_LIMIT);
    status.history.retain(|e| {
        if drop > 0 && !is_open(e) && life(e) != TokenLife::Unknown {
            drop -= 1;
            false
        } else {
            true
        }
    });
}

/// `now + d`, saturating at `cap`.
pub fn after(now: Timestamp, d: Duration, cap: Timestamp) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| now.checked_add(d).ok())
        .unwrap_or(cap)
        .min(cap)
}

/// Entries someone else changed between `base` and `theirs` (by revision;
/// `None`: they removed it). In practice an admin abandoning a revocation
/// (`kubectl agenttoken abandon`) while a reconcile was running.
pub type Foreign = std::collections::BTreeMap<i64, Option<HistoryEntry>>;

/// What `theirs` changed relative to `base`.
pub fn foreign(base: &AgentTokenStatus, theirs: &AgentTokenStatus) -> Foreign {
    let find = |s: &AgentTokenStatus, r: i64| s.history.iter().find(|e| e.revision == r).cloned();
    base.history
        .iter()
        .chain(&theirs.history)
        .map(|e| e.revision)
        .filter_map(|r| {
            let t = find(theirs, r);
            (t != find(base, r)).then_some((r, t))
        })
        .collect()
}

/// Their changes applied onto ours: an entry they changed is theirs,
/// unless ours records what happened to the token itself (`Revoked` or
/// `Expired`: the issuer's word, or the clock's).
pub fn apply_foreign(ours: &mut AgentTokenStatus, f: &Foreign) {
    for (r, t) in f {
        let mine = ours.history.iter().position(|e| e.revision == *r);
        if mine.is_some_and(|i| {
            matches!(
                life(&ours.history[i]),
                TokenLife::Revoked | TokenLife::Expired
            )
        }) {
            continue;
        }
        if let Some(i) = mine {
            ours.history.remove(i);
        }
        if let Some(t) = t {
            ours.history.push(t.clone());
        }
    }
    ours.history.sort_by_key(|e| e.revision);
}

/// Our changes replayed onto a status someone else wrote since `base`:
/// per entry, one they did not touch is ours; one they changed is theirs
/// ([`apply_foreign`]); one we added is ours; one we dropped stays dropped
/// unless they changed it. Everything outside the history is ours.
pub fn rebase(
    base: &AgentTokenStatus,
    ours: &AgentTokenStatus,
    theirs: &AgentTokenStatus,
) -> AgentTokenStatus {
    let mut out = ours.clone();
    apply_foreign(&mut out, &foreign(base, theirs));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::IssuerKind;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_900_000_000 + s).unwrap()
    }

    fn issuer() -> IssuerRecord {
        IssuerRecord {
            kind: IssuerKind::TokenIssuer,
            name: "i".into(),
            uid: "u".into(),
            type_: "webhook".into(),
        }
    }

    #[test]
    fn a_token_kept_before_its_record_is_found_by_value() {
        let minting = |r: i64, kind: &str| HistoryEntry {
            revision: r,
            state: Some(TokenLife::Minting),
            issuer: Some(IssuerRecord {
                kind: IssuerKind::TokenIssuer,
                name: "i".into(),
                uid: "u".into(),
                type_: kind.into(),
            }),
            ..Default::default()
        };
        let mut s = AgentTokenStatus {
            history: vec![
                minting(1, "oauth2"),
                minting(2, "vault"),
                minting(3, "webhook"),
            ],
            ..Default::default()
        };
        assert_eq!(kept_unrecorded(&s).collect::<Vec<_>>(), [1, 3]);
        // The keeper holds revision 1's token, not revision 3's.
        found_in_keeper(&mut s, |r| {
            (r == 1).then(|| secrecy::SecretString::from("kept-1".to_string()))
        });
        let fp = rotation::fingerprint(b"kept-1");
        assert_eq!(s.history[0].fingerprint, fp);
        assert_eq!(
            Handle::parse(s.history[0].handle.as_deref().unwrap(), "bot", 1),
            Some(Handle::ByToken("oauth2"))
        );
        assert!(s.history[1].handle.is_none() && s.history[2].handle.is_none());
    }

    /// What someone else changed during a reconcile is kept by every later
    /// write of that reconcile, not only the one that met the conflict: the
    /// caller's copy was computed before it.
    #[test]
    fn their_change_survives_the_later_writes_of_the_same_reconcile() {
        let e = |r: i64, l: TokenLife| HistoryEntry {
            revision: r,
            fingerprint: format!("sha256:{r}"),
            state: Some(l),
            ..Default::default()
        };
        let st = |es: Vec<HistoryEntry>| AgentTokenStatus {
            history: es,
            ..Default::default()
        };
        let read = st(vec![e(5, TokenLife::Failed), e(6, TokenLife::Live)]);
        let theirs = st(vec![e(5, TokenLife::Abandoned), e(6, TokenLife::Live)]);
        // Write 1 (the intent of revision 7) met the conflict.
        let f = foreign(&read, &theirs);
        let mut intent = read.clone();
        intent.history.push(e(7, TokenLife::Minting));
        apply_foreign(&mut intent, &f);
        assert_eq!(intent.history[0].state, Some(TokenLife::Abandoned));
        // Write 2 (what the issuer answered) starts from the caller's copy,
        // which still says Failed: the carried change keeps the abandon.
        let mut minted = read.clone();
        minted.history.push(e(7, TokenLife::Minting));
        minted.history[0].attempts = 3;
        apply_foreign(&mut minted, &f);
        assert_eq!(minted.history[0].state, Some(TokenLife::Abandoned));
        assert_eq!(minted.history.len(), 3);
    }

    #[test]
    fn rebase_keeps_what_others_wrote_unless_the_token_itself_settled_it() {
        let e = |r: i64, l: TokenLife, by: Option<&str>| HistoryEntry {
            revision: r,
            fingerprint: format!("sha256:{r}"),
            state: Some(l),
            abandoned_by: by.map(String::from),
            ..Default::default()
        };
        let st = |es: Vec<HistoryEntry>| AgentTokenStatus {
            history: es,
            ..Default::default()
        };
        let abandoned = e(1, TokenLife::Abandoned, Some("admin"));
        // (case, base, ours, theirs, want)
        let rows = [
            (
                "an abandon made while we recorded a failed attempt stays",
                st(vec![e(1, TokenLife::Revoking, None)]),
                st(vec![e(1, TokenLife::Failed, None)]),
                st(vec![abandoned.clone()]),
                st(vec![abandoned.clone()]),
            ),
            (
                "a confirmed revocation wins over an abandon",
                st(vec![e(1, TokenLife::Revoking, None)]),
                st(vec![e(1, TokenLife::Revoked, None)]),
                st(vec![abandoned.clone()]),
                st(vec![e(1, TokenLife::Revoked, None)]),
            ),
            (
                "our new entry and our change to an untouched one are kept",
                st(vec![
                    e(1, TokenLife::Live, None),
                    e(2, TokenLife::Revoking, None),
                ]),
                st(vec![
                    e(1, TokenLife::Grace, None),
                    e(2, TokenLife::Revoking, None),
                    e(3, TokenLife::Live, None),
                ]),
                st(vec![
                    e(1, TokenLife::Live, None),
                    e(2, TokenLife::Abandoned, Some("admin")),
                ]),
                st(vec![
                    e(1, TokenLife::Grace, None),
                    e(2, TokenLife::Abandoned, Some("admin")),
                    e(3, TokenLife::Live, None),
                ]),
            ),
            (
                "an entry we pruned stays pruned; one they changed comes back",
                st(vec![
                    e(1, TokenLife::Revoked, None),
                    e(2, TokenLife::Failed, None),
                ]),
                st(vec![]),
                st(vec![
                    e(1, TokenLife::Revoked, None),
                    e(2, TokenLife::Abandoned, Some("admin")),
                ]),
                st(vec![e(2, TokenLife::Abandoned, Some("admin"))]),
            ),
        ];
        for (case, base, ours, theirs, want) in rows {
            assert_eq!(
                rebase(&base, &ours, &theirs).history,
                want.history,
                "{case}"
            );
        }
    }

    fn minted_entry(status: &mut AgentTokenStatus, revision: i64, now: i64) {
        intend(
            status,
            Intent {
                revision,
                issuer: issuer(),
                reason: RotationReason::Initial,
                spec_hash: "h".into(),
                handle: None,
                valid_until: t(now + 7200),
            },
        );
        minted(
            status,
            revision,
            Minted {
                fingerprint: format!("sha256:{revision}"),
                issued_at: t(now),
                expires_at: t(now + 3600),
                handle: &format!("webhook-id:{revision}"),
                credential_id: None,
            },
        );
    }

    #[test]
    fn handles_parse_to_their_kind_and_a_foreign_binding_is_refused() {
        let cases = [
            (
                "vault-accessor:abc",
                Some(Handle::VaultAccessor("abc".into())),
            ),
            (
                "vault-lease:db/creds/x/1",
                Some(Handle::VaultLease("db/creds/x/1".into())),
            ),
            ("webhook-id:tok-1", Some(Handle::WebhookId("tok-1".into()))),
            ("webhook:sha256:aa", Some(Handle::ByToken("webhook"))),
            ("oauth2:sha256:aa", Some(Handle::ByToken("oauth2"))),
            (
                "github-installation:1:sha256:aa",
                Some(Handle::ByToken("githubApp")),
            ),
            ("jwt:abc", Some(Handle::Jwt)),
            (
                "vault-search:uid-1/r3",
                Some(Handle::VaultSearch("vault-search:uid-1/r3".into())),
            ),
            // A search for another revision, or nothing to search for.
            ("vault-search:uid-1/r2", None),
            ("vault-search:/r3", None),
            (
                "bot-binding-r3",
                Some(Handle::Binding("bot-binding-r3".into())),
            ),
            // Another AgentToken's binding, another revision, empty ids.
            ("victim-binding-r3", None),
            ("bot-binding-r2", None),
            ("vault-accessor:", None),
            ("webhook-id:", None),
            ("", None),
        ];
        for (stored, want) in cases {
            assert_eq!(Handle::parse(stored, "bot", 3), want, "{stored}");
        }
        assert!(Handle::ByToken("oauth2").needs_token());
        assert!(!Handle::WebhookId("x".into()).needs_token());
        assert_eq!(Handle::VaultLease("l".into()).issuer_type(), "vault");
    }

    #[test]
    fn a_mint_is_recorded_before_it_happens_and_lives_once_delivered() {
        let mut s = AgentTokenStatus::default();
        intend(
            &mut s,
            Intent {
                revision: 1,
                issuer: issuer(),
                reason: RotationReason::Initial,
                spec_hash: "h".into(),
                handle: None,
                valid_until: t(7200),
            },
        );
        // status.revision counts delivered tokens; the intent is in history.
        assert_eq!(s.revision, 0);
        assert_eq!(life(&s.history[0]), TokenLife::Minting);
        assert_eq!(s.history[0].revocation, RevocationState::Pending);
        assert!(is_open(&s.history[0]));
        assert!(current(&s).is_none());
        minted(
            &mut s,
            1,
            Minted {
                fingerprint: "sha256:1".into(),
                issued_at: t(0),
                expires_at: t(3600),
                handle: "webhook-id:1",
                credential_id: None,
            },
        );
        delivered(&mut s, 1);
        assert_eq!(current(&s).map(|e| e.revision), Some(1));
        assert_eq!(s.history[0].expires_at, Some(Time(t(3600))));
    }

    #[test]
    fn revocation_outcomes_table() {
        // (outcome, state, summary, retry set, revoked_at set)
        let rows = [
            (
                Outcome::Revoked,
                TokenLife::Revoked,
                RevocationState::Revoked,
                false,
                true,
            ),
            (
                Outcome::NotSupported,
                TokenLife::NotSupported,
                RevocationState::NotSupported,
                false,
                false,
            ),
            (
                Outcome::Unconfirmed("404".into()),
                TokenLife::Failed,
                RevocationState::Failed,
                false,
                false,
            ),
            (
                Outcome::Retry("503".into()),
                TokenLife::Failed,
                RevocationState::Pending,
                true,
                false,
            ),
            (
                Outcome::Impossible("gone".into()),
                TokenLife::Failed,
                RevocationState::Failed,
                false,
                false,
            ),
        ];
        for (outcome, state, summary_, retry, revoked) in rows {
            let mut s = AgentTokenStatus::default();
            minted_entry(&mut s, 1, 0);
            delivered(&mut s, 1);
            retire(&mut s, 1, "rotated", t(10));
            assert_eq!(due(&s, t(10)), vec![1]);
            record(&mut s, 1, outcome.clone(), t(10));
            let e = &s.history[0];
            assert_eq!(life(e), state, "{outcome:?}");
            assert_eq!(e.revocation, summary_, "{outcome:?}");
            assert_eq!(e.next_attempt_at.is_some(), retry, "{outcome:?}");
            assert_eq!(e.revoked_at.is_some(), revoked, "{outcome:?}");
            assert_eq!(is_open(e), retry, "{outcome:?}");
            assert_eq!(e.attempts, 1);
        }
    }

    #[test]
    fn retries_back_off_and_stop_at_expiry() {
        let mut s = AgentTokenStatus::default();
        minted_entry(&mut s, 1, 0);
        delivered(&mut s, 1);
        retire(&mut s, 1, "rotated", t(100));
        record(&mut s, 1, Outcome::Retry("503".into()), t(100));
        let first = s.history[0].next_attempt_at.clone().unwrap().0;
        assert!(first > t(100) && first <= t(107), "{first}");
        assert!(due(&s, t(101)).is_empty());
        assert_eq!(due(&s, first), vec![1]);
        record(&mut s, 1, Outcome::Retry("503".into()), first);
        let second = s.history[0].next_attempt_at.clone().unwrap().0;
        assert!(second.duration_since(first) > SignedDuration::from_secs(7));
        assert_eq!(wake(&s), Some(second));
        // The token died on its own: no more retries, said so.
        expire(&mut s, t(3600));
        let e = &s.history[0];
        assert_eq!(life(e), TokenLife::Expired);
        assert!(e.next_attempt_at.is_none());
        assert!(e.message.as_deref().unwrap().contains("503"));
        assert!(!is_open(e));
    }

    #[test]
    fn an_interrupted_mint_is_revoked_when_findable_else_unknown_until_its_bound() {
        let mut s = AgentTokenStatus::default();
        for r in [1, 2] {
            intend(
                &mut s,
                Intent {
                    revision: r,
                    issuer: issuer(),
                    reason: RotationReason::Initial,
                    spec_hash: "h".into(),
                    handle: None,
                    valid_until: t(7200),
                },
            );
        }
        interrupted(&mut s, 1, true, t(5));
        interrupted(&mut s, 2, false, t(5));
        assert_eq!(life(&s.history[0]), TokenLife::Revoking);
        assert_eq!(due(&s, t(5)), vec![1]);
        assert_eq!(life(&s.history[1]), TokenLife::Unknown);
        assert_eq!(s.history[1].expires_at, Some(Time(t(7200))));
        assert!(!is_open(&s.history[1]));
        assert_eq!(wake(&s), Some(t(5)));
        expire(&mut s, t(7200));
        assert_eq!(life(&s.history[1]), TokenLife::Expired);
    }

    #[test]
    fn grace_then_retire_and_only_open_entries_survive_pruning() {
        let mut s = AgentTokenStatus::default();
        for r in 1..=30 {
            minted_entry(&mut s, r, r * 10);
            delivered(&mut s, r);
            if r > 1 {
                grace(&mut s, r - 1, t(r * 10 + 60));
            }
            normalize(&mut s, t(r * 10));
            for d in due(&s, t(r * 10)) {
                record(&mut s, d, Outcome::Revoked, t(r * 10));
            }
        }
        assert_eq!(current(&s).map(|e| e.revision), Some(30));
        assert_eq!(previous(&s).map(|e| e.revision), Some(29));
        // Failed-with-retry entries are open and never pruned.
        retire(&mut s, 29, "revoke", t(400));
        record(&mut s, 29, Outcome::Retry("503".into()), t(400));
        prune(&mut s);
        let closed = s.history.iter().filter(|e| !is_open(e)).count();
        assert_eq!(closed, HISTORY_LIMIT);
        assert!(s.history.iter().any(|e| e.revision == 29 && is_open(e)));
        assert!(s.history.iter().any(|e| e.revision == 30 && is_open(e)));
        assert_eq!(open(&s), 2);
    }

    #[test]
    fn legacy_entries_read_from_their_summary_and_normalize_to_one_live() {
        let mut s = AgentTokenStatus::default();
        for r in 1..=3 {
            s.history.push(HistoryEntry {
                revision: r,
                revocation: RevocationState::Pending,
                expires_at: Some(Time(t(3600))),
                ..Default::default()
            });
        }
        s.history.push(HistoryEntry {
            revision: 4,
            revocation: RevocationState::Revoked,
            ..Default::default()
        });
        normalize(&mut s, t(0));
        assert_eq!(current(&s).map(|e| e.revision), Some(3));
        assert_eq!(due(&s, t(0)), vec![1, 2]);
        assert_eq!(life(&s.history[3]), TokenLife::Revoked);
        // A legacy serviceAccount entry without a handle still revokes its
        // own binding; another kind without a handle has none.
        assert_eq!(
            handle_of(&s.history[0], "bot", Some("serviceAccount")),
            Some(Handle::Binding("bot-binding-r1".into()))
        );
        assert_eq!(handle_of(&s.history[0], "bot", Some("vault")), None);
    }

    #[test]
    fn abandon_is_recorded_and_terminal() {
        let mut s = AgentTokenStatus::default();
        minted_entry(&mut s, 1, 0);
        delivered(&mut s, 1);
        retire(&mut s, 1, "rotated", t(1));
        record(&mut s, 1, Outcome::Retry("503".into()), t(1));
        abandon(&mut s, 1, "alice", "issuer decommissioned");
        let e = &s.history[0];
        assert_eq!(life(e), TokenLife::Abandoned);
        assert_eq!(e.abandoned_by.as_deref(), Some("alice"));
        assert!(!is_open(e) && due(&s, t(1000)).is_empty());
    }
}
