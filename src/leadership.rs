//! Leader election, and how long this replica may still act as the leader.
//!
//! A mint can take far longer than a Lease lasts, so "am I the leader?" is
//! not enough: a replica that starts a mint must know its claim outlives
//! the call. [`Leadership::time_left`] says how long the claim holds,
//! [`Leadership::budget`] turns that into a deadline for an issuer call.
//!
//! # Why our own Lease loop, not kube-lease-manager
//!
//! kube-lease-manager 0.13 (read at its source) keeps the Lease's renewal
//! time private (`LeaseState` is `pub(crate)`), publishes only a bool when
//! leadership flips, keeps that bool `true` while renewals fail (its watch
//! loop logs the error and backs off), and writes the Lease with
//! strategic-merge patches that carry no `resourceVersion` precondition: a
//! renewal that arrives late can land on a Lease another replica has since
//! taken, and the library then still believes its old expiry. Reading the
//! Lease back after its renewals cannot fix that (the renewal moment is not
//! published, and the race is in the writes). So this is a small loop on
//! `coordination.k8s.io/v1` Lease with optimistic concurrency:
//!
//! - Every write (acquire, renew, release) is a `replace` carrying the
//!   `resourceVersion` last read or written: it succeeds only if nobody
//!   wrote the Lease in between, so two replicas never both hold it.
//! - The leader's term is measured on its own monotonic clock from the
//!   moment it SENT its last successful write (`Instant` before the
//!   request): the API server stored it no earlier.
//! - A standby takes over only after it has seen the same Lease record,
//!   unchanged, for the Lease's whole duration on ITS monotonic clock (as
//!   client-go does), never by comparing `renewTime` with its wall clock.
//!   It first sees the record after it was stored, so it cannot take over
//!   before `sent + duration`, whatever the nodes' wall clocks say.
//! - The leader stops counting on its term a safety margin early
//!   ([`safety_margin`]): it absorbs clock-rate drift, and wall-clock skew
//!   against replicas that judge `renewTime` by the wall clock (an older
//!   operator version during an upgrade, which used kube-lease-manager).
//!
//! The record stays what Kubernetes tools expect: `holderIdentity`,
//! `acquireTime`, `renewTime` (wall clock, for people and other tools),
//! `leaseDurationSeconds`, `leaseTransitions`.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Field manager of the Lease writes.
pub const LEASE_MANAGER: &str = "agent-token-operator-leader";

/// Whether this replica may act as the leader, and for how long. Cheap to
/// clone; every clone sees the same state.
#[derive(Clone)]
pub struct Leadership {
    terms: Option<watch::Receiver<Option<Term>>>,
}

/// What the last successful Lease write proves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Term {
    /// When that write was sent: the Lease was stored no earlier.
    renewed_at: Instant,
    /// The `leaseDurationSeconds` it wrote.
    duration: Duration,
}

/// How much earlier than the Lease's end the leader stops counting on it:
/// a fifth of the duration, at least 2 s, at most half of it.
pub fn safety_margin(duration: Duration) -> Duration {
    (duration / 5).max(Duration::from_secs(2)).min(duration / 2)
}

/// Time left in `term` at `now`, after the safety margin; `None` without a
/// term or once it ran out.
fn time_left_at(term: Option<Term>, now: Instant) -> Option<Duration> {
    let term = term?;
    let end = term.renewed_at + term.duration.saturating_sub(safety_margin(term.duration));
    let left = end.checked_duration_since(now)?;
    (!left.is_zero()).then_some(left)
}

/// The deadline an issuer call may have with `left` time as leader:
/// `min(want, left)`, or `None` when less than `min` is left.
pub fn budget_within(left: Option<Duration>, want: Duration, min: Duration) -> Option<Duration> {
    let left = left?;
    (left >= min).then_some(want.min(left))
}

impl Leadership {
    /// No election (`--leader-election=false`): always leader, no limit.
    pub fn unelected() -> Self {
        Leadership { terms: None }
    }

    /// Campaigns for the Lease `lease`. The returned [`Elector`] does the
    /// work: run it ([`Elector::run`]) for as long as this replica may
    /// lead. Fails when the Lease cannot be read (RBAC, API unreachable).
    pub async fn elect(client: Client, lease: LeaseConfig) -> Result<(Self, Elector), kube::Error> {
        let api: Api<Lease> = Api::namespaced(client, &lease.namespace);
        api.get_opt(&lease.name).await?;
        let (tx, rx) = watch::channel(None);
        let duration = Duration::from_secs(lease.duration.as_secs().clamp(1, i32::MAX as u64));
        let elector = Elector {
            api,
            name: lease.name,
            identity: lease.identity,
            duration,
            period: duration / 5,
            call_timeout: duration / 3,
            tx,
            lease: None,
            holding: false,
            seen: None,
        };
        Ok((Leadership { terms: Some(rx) }, elector))
    }

    /// How long this replica may still act as leader, judged from its last
    /// successful Lease renewal (the moment the write was sent, plus the
    /// Lease duration, minus [`safety_margin`]); `None` when it is not the
    /// leader. Never more than the Lease duration minus the margin (48 s
    /// with the default 60 s Lease); renewals every fifth of the duration
    /// keep it above three fifths of the duration minus the margin while
    /// the API answers. Unelected: `Duration::MAX`.
    pub fn time_left(&self) -> Option<Duration> {
        match &self.terms {
            None => Some(Duration::MAX),
            Some(rx) => time_left_at(*rx.borrow(), Instant::now()),
        }
    }

    /// The deadline an issuer call may have: `min(want, time_left)`, or
    /// `None` when less than `min` is left (the caller then does not start
    /// the mint and looks again soon). `min` must stay well below what
    /// [`Leadership::time_left`] reaches (the Lease duration minus the
    /// margin), or no mint ever starts.
    pub fn budget(&self, want: Duration, min: Duration) -> Option<Duration> {
        budget_within(self.time_left(), want, min)
    }

    /// Whether this replica may act as leader now.
    pub fn is_leader(&self) -> bool {
        self.time_left().is_some()
    }

    /// Resolves once this replica leads (at once when unelected).
    pub async fn elected(&self) {
        let Some(rx) = &self.terms else { return };
        let mut rx = rx.clone();
        loop {
            if time_left_at(*rx.borrow_and_update(), Instant::now()).is_some() {
                return;
            }
            if rx.changed().await.is_err() {
                // The elector stopped: this replica will not lead.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves once this replica may no longer act as leader: the Lease
    /// went to another replica, or its term ran out without a renewal
    /// (never when unelected).
    pub async fn lost(&self) {
        let Some(rx) = &self.terms else {
            return std::future::pending().await;
        };
        let mut rx = rx.clone();
        loop {
            let Some(left) = time_left_at(*rx.borrow_and_update(), Instant::now()) else {
                return;
            };
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        // No more renewals can come: the term just runs out.
                        tokio::time::sleep(left).await;
                    }
                }
                _ = tokio::time::sleep(left) => {}
            }
        }
    }
}

impl Default for Leadership {
    /// Unelected, as with `--leader-election=false`: a lone replica.
    fn default() -> Self {
        Leadership::unelected()
    }
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("elected", &self.terms.is_some())
            .field("time_left", &self.time_left())
            .finish()
    }
}

/// The Lease to campaign for.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (`holderIdentity`).
    pub identity: String,
    /// `leaseDurationSeconds` (whole seconds). The longest issuer call
    /// gets this minus [`safety_margin`]: a longer Lease allows slower
    /// issuers, at the price of a slower takeover after a crash.
    pub duration: Duration,
}

/// Campaigns for the Lease and renews it; what it learns reaches every
/// clone of its [`Leadership`].
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// Between two renewals, and between two looks as a standby.
    period: Duration,
    /// Longest one Lease request may take.
    call_timeout: Duration,
    tx: watch::Sender<Option<Term>>,
    /// The Lease as last read or written.
    lease: Option<Lease>,
    /// Whether this replica believes it holds the Lease.
    holding: bool,
    /// A standby's view of the holder's record.
    seen: Option<Seen>,
}

/// A Lease record as a standby first saw it.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    record: LeaseSpec,
    since: Instant,
}

/// What a standby does after looking at the Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Look {
    /// Nobody holds it, or the holder let it lapse: try to take it.
    Take,
    /// Someone holds it: look again later.
    Wait,
}

/// A standby's decision at `now`, from the Lease's record and what it saw
/// before. The holder's claim runs out only once the same record was seen
/// unchanged for the Lease's duration (and at least `own_duration`), on
/// this replica's monotonic clock. Its own identity counts as anybody's:
/// two processes started with one identity must not share the Lease.
fn look(
    spec: Option<&LeaseSpec>,
    seen: Option<Seen>,
    now: Instant,
    own_duration: Duration,
) -> (Look, Option<Seen>) {
    let record = spec.cloned().unwrap_or_default();
    if record.holder_identity.as_deref().unwrap_or("").is_empty() {
        return (Look::Take, None);
    }
    let seen = match seen {
        Some(s) if s.record == record => s,
        _ => Seen { record, since: now },
    };
    let written = seen
        .record
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    let lapsed = now.saturating_duration_since(seen.since) >= written.max(own_duration);
    (if lapsed { Look::Take } else { Look::Wait }, Some(seen))
}

/// The Lease as `identity` claims (or renews) it at wall-clock `now`; its
/// `resourceVersion` is kept, so the write is conditional.
fn claimed(lease: &Lease, identity: &str, duration: Duration, now: Timestamp) -> Lease {
    let mut lease = lease.clone();
    lease.metadata.managed_fields = None;
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(identity) {
        spec.holder_identity = Some(identity.to_string());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX));
    lease
}

/// The Lease given up: no holder, so a standby takes it at once.
fn released(lease: &Lease) -> Lease {
    let mut lease = lease.clone();
    lease.metadata.managed_fields = None;
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = None;
    spec.acquire_time = None;
    spec.renew_time = None;
    spec.lease_duration_seconds = None;
    lease
}

fn holder(lease: &Lease) -> &str {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .unwrap_or("")
}

/// Why a Lease request failed.
enum Failure {
    /// Somebody wrote the Lease since we read it (409).
    Conflict,
    Other(String),
}

impl Elector {
    /// Campaigns and renews until `stop` resolves, then gives the Lease up
    /// if it holds it. Stop it only once nothing acts as leader any more.
    pub async fn run(mut self, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        loop {
            let wait = tokio::select! {
                biased;
                _ = &mut stop => break,
                wait = self.step() => wait,
            };
            tokio::select! {
                biased;
                _ = &mut stop => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.release().await;
    }

    /// One renewal or one look; returns how long to wait before the next.
    async fn step(&mut self) -> Duration {
        if self.holding {
            self.renew().await
        } else {
            self.campaign().await
        }
    }

    async fn renew(&mut self) -> Duration {
        let Some(current) = self.lease.clone() else {
            self.holding = false;
            return Duration::ZERO;
        };
        let body = claimed(&current, &self.identity, self.duration, Timestamp::now());
        let sent = Instant::now();
        match self.replace(&body).await {
            Ok(lease) => {
                self.lease = Some(lease);
                self.tx.send_replace(Some(Term {
                    renewed_at: sent,
                    duration: self.duration,
                }));
                self.period
            }
            Err(Failure::Conflict) => match self.get().await {
                // Only its metadata changed: renew on the new version.
                Ok(Some(lease)) if lease.spec == current.spec => {
                    self.lease = Some(lease);
                    Duration::from_millis(100)
                }
                // Another write to the record, even one naming this
                // identity, is not this process's: give the Lease up.
                Ok(lease) => {
                    let by = lease.as_ref().map(holder).unwrap_or("").to_string();
                    self.lose(&format!(
                        "the Lease was written by someone else (holder {by:?})"
                    ));
                    self.lease = lease;
                    self.period
                }
                Err(e) => self.renewal_failed(&e),
            },
            Err(Failure::Other(e)) => self.renewal_failed(&e),
        }
    }

    fn renewal_failed(&mut self, error: &str) -> Duration {
        warn!(error, lease = %self.name, "could not renew the leader Lease");
        if time_left_at(*self.tx.borrow(), Instant::now()).is_none() {
            self.lose("no renewal succeeded within the Lease's term");
        }
        (self.period / 2).max(Duration::from_millis(200))
    }

    fn lose(&mut self, why: &str) {
        self.holding = false;
        self.seen = None;
        self.tx.send_replace(None);
        warn!(identity = %self.identity, lease = %self.name, why, "lost the leader Lease");
    }

    async fn campaign(&mut self) -> Duration {
        let lease = match self.get().await {
            Ok(Some(lease)) => lease,
            Ok(None) => return self.create().await,
            Err(e) => {
                warn!(error = e, lease = %self.name, "could not read the leader Lease");
                return self.period;
            }
        };
        let (decision, seen) = look(
            lease.spec.as_ref(),
            self.seen.take(),
            Instant::now(),
            self.duration,
        );
        self.seen = seen;
        if decision == Look::Wait {
            self.lease = Some(lease);
            return self.period;
        }
        let previous = holder(&lease).to_string();
        let body = claimed(&lease, &self.identity, self.duration, Timestamp::now());
        let sent = Instant::now();
        match self.replace(&body).await {
            Ok(lease) => {
                self.took(lease, sent);
                info!(identity = %self.identity, lease = %self.name, previous, "took the leader Lease");
                self.period
            }
            Err(Failure::Conflict) => {
                debug!(lease = %self.name, "another replica wrote the Lease first");
                self.seen = None;
                self.period
            }
            Err(Failure::Other(e)) => {
                warn!(error = e, lease = %self.name, "could not take the leader Lease");
                self.period
            }
        }
    }

    async fn create(&mut self) -> Duration {
        let empty = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..Default::default()
            },
            spec: None,
        };
        let body = claimed(&empty, &self.identity, self.duration, Timestamp::now());
        let sent = Instant::now();
        let pp = self.post_params();
        match self.bounded(self.api.create(&pp, &body)).await {
            Ok(lease) => {
                self.took(lease, sent);
                info!(identity = %self.identity, lease = %self.name, "created and took the leader Lease");
                self.period
            }
            // Somebody created it first: look at it at once.
            Err(Failure::Conflict) => Duration::ZERO,
            Err(Failure::Other(e)) => {
                warn!(error = e, lease = %self.name, "could not create the leader Lease");
                self.period
            }
        }
    }

    fn took(&mut self, lease: Lease, sent: Instant) {
        self.lease = Some(lease);
        self.holding = true;
        self.seen = None;
        self.tx.send_replace(Some(Term {
            renewed_at: sent,
            duration: self.duration,
        }));
    }

    /// Gives the Lease up (conditionally: never one another replica took).
    async fn release(&mut self) {
        let held = std::mem::replace(&mut self.holding, false);
        self.tx.send_replace(None);
        let Some(lease) = self.lease.clone().filter(|_| held) else {
            return;
        };
        match self.replace(&released(&lease)).await {
            Ok(_) => {
                info!(identity = %self.identity, lease = %self.name, "released the leader Lease")
            }
            Err(Failure::Conflict) => {
                debug!(lease = %self.name, "the Lease changed hands already; nothing to release")
            }
            Err(Failure::Other(e)) => {
                warn!(error = e, lease = %self.name, "could not release the leader Lease; it lapses on its own")
            }
        }
    }

    fn post_params(&self) -> PostParams {
        PostParams {
            field_manager: Some(LEASE_MANAGER.into()),
            ..Default::default()
        }
    }

    async fn replace(&self, body: &Lease) -> Result<Lease, Failure> {
        let pp = self.post_params();
        self.bounded(self.api.replace(&self.name, &pp, body)).await
    }

    async fn get(&self) -> Result<Option<Lease>, String> {
        match self.bounded(self.api.get_opt(&self.name)).await {
            Ok(lease) => Ok(lease),
            Err(Failure::Conflict) => Err("conflict on read".into()),
            Err(Failure::Other(e)) => Err(e),
        }
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => Err(Failure::Conflict),
            Ok(Err(e)) => Err(Failure::Other(e.to_string())),
            Err(_) => Err(Failure::Other(format!(
                "no answer within {:?}",
                self.call_timeout
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(non_snake_case)]
    fn SECS(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn term(at: Instant, secs: u64) -> Option<Term> {
        Some(Term {
            renewed_at: at,
            duration: SECS(secs),
        })
    }

    #[test]
    fn the_margin_is_a_fifth_at_least_two_seconds_at_most_half() {
        assert_eq!(safety_margin(SECS(15)), SECS(3));
        assert_eq!(safety_margin(SECS(60)), SECS(12));
        assert_eq!(safety_margin(SECS(5)), SECS(2));
        assert_eq!(safety_margin(SECS(2)), SECS(1));
    }

    #[test]
    fn time_left_counts_from_the_write_minus_the_margin() {
        let t0 = Instant::now();
        // 15 s Lease renewed at t0: 12 s of it may be used.
        assert_eq!(time_left_at(term(t0, 15), t0), Some(SECS(12)));
        assert_eq!(time_left_at(term(t0, 15), t0 + SECS(5)), Some(SECS(7)));
        assert_eq!(
            time_left_at(term(t0, 15), t0 + Duration::from_millis(11_999)),
            Some(Duration::from_millis(1))
        );
        // At the margin's start and after: not the leader any more.
        assert_eq!(time_left_at(term(t0, 15), t0 + SECS(12)), None);
        assert_eq!(time_left_at(term(t0, 15), t0 + SECS(14)), None);
        assert_eq!(time_left_at(term(t0, 15), t0 + SECS(3600)), None);
        // No term: not the leader.
        assert_eq!(time_left_at(None, t0), None);
    }

    #[test]
    fn budget_is_the_wanted_deadline_cut_to_the_time_left() {
        let want = SECS(90);
        let min = SECS(5);
        assert_eq!(budget_within(Some(SECS(12)), want, min), Some(SECS(12)));
        assert_eq!(budget_within(Some(Duration::MAX), want, min), Some(want));
        assert_eq!(budget_within(Some(SECS(120)), want, min), Some(want));
        assert_eq!(budget_within(Some(SECS(5)), want, min), Some(SECS(5)));
        assert_eq!(
            budget_within(Some(Duration::from_millis(4_999)), want, min),
            None
        );
        assert_eq!(budget_within(None, want, min), None);
        // A small want is never stretched.
        assert_eq!(
            budget_within(Some(SECS(12)), SECS(2), SECS(1)),
            Some(SECS(2))
        );
    }

    #[test]
    fn unelected_is_always_leader_with_no_limit() {
        let l = Leadership::unelected();
        assert_eq!(l.time_left(), Some(Duration::MAX));
        assert_eq!(l.budget(SECS(90), SECS(5)), Some(SECS(90)));
        assert!(l.is_leader());
    }

    #[tokio::test(start_paused = true)]
    async fn a_term_runs_out_without_renewals_and_lost_resolves_then() {
        let (tx, rx) = watch::channel(None);
        let l = Leadership { terms: Some(rx) };
        assert_eq!(l.time_left(), None);
        assert_eq!(l.budget(SECS(90), SECS(1)), None);
        let start = Instant::now();
        tx.send_replace(term(start, 15));
        l.elected().await;
        assert_eq!(l.budget(SECS(90), SECS(5)), Some(SECS(12)));
        tokio::time::advance(SECS(8)).await;
        assert_eq!(l.budget(SECS(90), SECS(5)), None, "4 s left, 5 s needed");
        assert_eq!(l.budget(SECS(90), SECS(1)), Some(SECS(4)));
        // A renewal at 8 s extends the term to 20 s...
        tx.send_replace(term(start + SECS(8), 15));
        l.lost().await;
        // ... and with no renewal after it, the claim ends there.
        assert_eq!(Instant::now() - start, SECS(20));
        assert!(!l.is_leader());
    }

    #[tokio::test(start_paused = true)]
    async fn lost_resolves_at_once_when_the_lease_goes_to_another_replica() {
        let (tx, rx) = watch::channel(None);
        let l = Leadership { terms: Some(rx) };
        let start = Instant::now();
        tx.send_replace(term(start, 15));
        let lost = tokio::spawn({
            let l = l.clone();
            async move { l.lost().await }
        });
        tokio::time::advance(SECS(2)).await;
        tx.send_replace(None);
        lost.await.unwrap();
        assert_eq!(Instant::now() - start, SECS(2));
    }

    fn spec(holder: &str, renew_secs: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: (!holder.is_empty()).then(|| holder.to_string()),
            renew_time: Some(MicroTime(
                Timestamp::from_second(1_700_000_000 + renew_secs).unwrap(),
            )),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        }
    }

    #[test]
    fn a_standby_takes_a_free_lease_at_once() {
        let now = Instant::now();
        assert_eq!(look(None, None, now, SECS(15)).0, Look::Take);
        assert_eq!(
            look(Some(&spec("", 0, 15)), None, now, SECS(15)).0,
            Look::Take
        );
    }

    #[test]
    fn a_standby_waits_out_an_unchanged_record_on_its_own_clock() {
        let t0 = Instant::now();
        let held = spec("a", 0, 15);
        let (d, seen) = look(Some(&held), None, t0, SECS(15));
        assert_eq!(d, Look::Wait);
        let (d, seen) = look(Some(&held), seen, t0 + SECS(14), SECS(15));
        assert_eq!(d, Look::Wait, "14 s of 15 seen");
        // A renewal (new renewTime) starts the count again.
        let renewed = spec("a", 14, 15);
        let (d, seen) = look(Some(&renewed), seen, t0 + SECS(16), SECS(15));
        assert_eq!(d, Look::Wait);
        let (d, seen) = look(Some(&renewed), seen, t0 + SECS(30), SECS(15));
        assert_eq!(d, Look::Wait, "14 s since the renewal was first seen");
        let (d, _) = look(Some(&renewed), seen, t0 + SECS(31), SECS(15));
        assert_eq!(d, Look::Take);
    }

    #[test]
    fn a_standby_ignores_the_wall_clock_in_renew_time() {
        // A renewTime far in the past (skewed clocks, or a standby that
        // just started): still a full duration of watching first.
        let t0 = Instant::now();
        let stale = spec("a", -86_400, 15);
        let (d, seen) = look(Some(&stale), None, t0, SECS(15));
        assert_eq!(d, Look::Wait);
        assert_eq!(
            look(Some(&stale), seen, t0 + SECS(15), SECS(15)).0,
            Look::Take
        );
    }

    #[test]
    fn a_standby_waits_the_longer_of_the_written_and_its_own_duration() {
        let t0 = Instant::now();
        let long = spec("a", 0, 60);
        let (_, seen) = look(Some(&long), None, t0, SECS(15));
        let (d, seen) = look(Some(&long), seen, t0 + SECS(59), SECS(15));
        assert_eq!(d, Look::Wait);
        assert_eq!(
            look(Some(&long), seen, t0 + SECS(60), SECS(15)).0,
            Look::Take
        );
        // A zero or negative duration written by someone else: ours.
        let zero = spec("a", 0, -5);
        let (_, seen) = look(Some(&zero), None, t0, SECS(15));
        let (d, seen) = look(Some(&zero), seen, t0 + SECS(1), SECS(15));
        assert_eq!(d, Look::Wait);
        assert_eq!(
            look(Some(&zero), seen, t0 + SECS(15), SECS(15)).0,
            Look::Take
        );
    }

    #[test]
    fn its_own_identity_in_the_lease_is_waited_out_like_any_other() {
        let t0 = Instant::now();
        let mine = spec("me", 0, 15);
        let (d, seen) = look(Some(&mine), None, t0, SECS(15));
        assert_eq!(d, Look::Wait);
        assert_eq!(
            look(Some(&mine), seen, t0 + SECS(15), SECS(15)).0,
            Look::Take
        );
    }

    #[test]
    fn a_claim_keeps_the_resource_version_and_counts_transitions() {
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                resource_version: Some("42".into()),
                managed_fields: Some(vec![Default::default()]),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                lease_transitions: Some(3),
                ..spec("a", 0, 15)
            }),
        };
        let taken = claimed(&lease, "b", SECS(15), now);
        assert_eq!(taken.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(taken.metadata.managed_fields, None);
        let s = taken.spec.clone().unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("b"));
        assert_eq!(s.lease_transitions, Some(4));
        assert_eq!(s.acquire_time, Some(MicroTime(now)));
        assert_eq!(s.renew_time, Some(MicroTime(now)));
        assert_eq!(s.lease_duration_seconds, Some(15));
        // Renewing keeps acquireTime and the transition count.
        let later = now + k8s_openapi::jiff::SignedDuration::from_secs(3);
        let renewed = claimed(&taken, "b", SECS(15), later).spec.unwrap();
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, Some(MicroTime(now)));
        assert_eq!(renewed.renew_time, Some(MicroTime(later)));
        // Released: no holder, so a standby takes it at once.
        let free = released(&taken);
        assert_eq!(free.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(holder(&free), "");
        assert_eq!(
            look(free.spec.as_ref(), None, Instant::now(), SECS(15)).0,
            Look::Take
        );
    }
}
