//! Fair, urgency-ordered admission of reconciles.
//!
//! The controller hands every due AgentToken to [`reconcile`]; each one
//! first takes a permit here, and at most `workers` hold one at once. A
//! reconcile that has to wait is a parked future, not a held worker, and
//! permits are granted:
//!
//! 1. by urgency: revocations and deletions, then AgentTokens without a
//!    valid token, then tokens close to expiry, then planned rotations and
//!    everything else, so under overload first tokens are never starved by
//!    rotations of tokens that are still valid;
//! 2. within one urgency, round-robin by namespace, so a namespace with ten
//!    thousand due objects gets one permit in turn with a namespace that
//!    has one, never all of them.
//!
//! A reconcile never waits here for an issuer's rate budget or a slow
//! issuer: those return "wake me at T" (see `reconcile`), and issuer calls
//! have a deadline, so a permit is held for a bounded time.
//!
//! [`reconcile`]: super::reconcile::reconcile

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use tokio::sync::oneshot;

/// How urgent a reconcile is, highest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Urgency {
    /// A revocation is asked for, or the AgentToken is being deleted.
    Revocation = 0,
    /// No valid token is delivered yet (first token, expired, lost).
    NoValidToken = 1,
    /// The token expires within [`NEAR_EXPIRY`].
    NearExpiry = 2,
    /// A planned rotation, a status refresh, anything else.
    Planned = 3,
}

/// Tokens with less than this left are urgent.
pub const NEAR_EXPIRY: jiff::SignedDuration = jiff::SignedDuration::from_mins(10);

impl Urgency {
    const ALL: [Urgency; 4] = [
        Urgency::Revocation,
        Urgency::NoValidToken,
        Urgency::NearExpiry,
        Urgency::Planned,
    ];

    /// From what the cache knows: deletion, an unhandled revoke trigger,
    /// the delivered token's expiry.
    pub fn of(
        deleting: bool,
        revoke_pending: bool,
        expires_at: Option<Timestamp>,
        now: Timestamp,
    ) -> Urgency {
        if deleting || revoke_pending {
            return Urgency::Revocation;
        }
        match expires_at {
            None => Urgency::NoValidToken,
            Some(e) if e <= now => Urgency::NoValidToken,
            Some(e) if e.duration_since(now) < NEAR_EXPIRY => Urgency::NearExpiry,
            Some(_) => Urgency::Planned,
        }
    }

    /// The label value in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Urgency::Revocation => "revocation",
            Urgency::NoValidToken => "no_valid_token",
            Urgency::NearExpiry => "near_expiry",
            Urgency::Planned => "planned",
        }
    }
}

#[derive(Default)]
struct Class {
    /// Namespaces with waiters, in turn order.
    turn: VecDeque<String>,
    /// Waiters per namespace, oldest first.
    waiters: HashMap<String, VecDeque<oneshot::Sender<Permit>>>,
}

struct State {
    free: usize,
    classes: [Class; 4],
}

/// The admission gate (see the module documentation).
#[derive(Clone)]
pub struct FairQueue {
    state: Arc<Mutex<State>>,
}

/// A worker slot, given back when dropped.
pub struct Permit {
    state: Option<Arc<Mutex<State>>>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permit")
    }
}

impl FairQueue {
    /// A gate with `workers` slots (at least one).
    pub fn new(workers: usize) -> Self {
        FairQueue {
            state: Arc::new(Mutex::new(State {
                free: workers.max(1),
                classes: Default::default(),
            })),
        }
    }

    /// Waits for a slot for a reconcile in `namespace` of `urgency`.
    pub async fn admit(&self, namespace: &str, urgency: Urgency) -> Permit {
        let rx = {
            let mut st = lock(&self.state);
            let nobody_waits = st.classes.iter().all(|c| c.turn.is_empty());
            if st.free > 0 && nobody_waits {
                st.free -= 1;
                return Permit {
                    state: Some(self.state.clone()),
                };
            }
            let (tx, rx) = oneshot::channel();
            let class = &mut st.classes[urgency as usize];
            let queue = class.waiters.entry(namespace.to_string()).or_default();
            if queue.is_empty() {
                class.turn.push_back(namespace.to_string());
            }
            queue.push_back(tx);
            // A slot may be free while others wait (a waiter was cancelled).
            grant(&mut st, &self.state);
            rx
        };
        match rx.await {
            Ok(permit) => permit,
            // The sender goes away only with the gate: run unthrottled.
            Err(_) => Permit { state: None },
        }
    }

    /// Reconciles waiting, by urgency (for metrics and tests).
    pub fn waiting(&self) -> [(Urgency, usize); 4] {
        let st = lock(&self.state);
        Urgency::ALL.map(|u| {
            (
                u,
                st.classes[u as usize]
                    .waiters
                    .values()
                    .map(VecDeque::len)
                    .sum(),
            )
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            let mut st = lock(&state);
            st.free += 1;
            grant(&mut st, &state);
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hands free slots to waiters: most urgent class first, namespaces in turn.
fn grant(st: &mut State, shared: &Arc<Mutex<State>>) {
    while st.free > 0 {
        let Some(class) = st.classes.iter_mut().find(|c| !c.turn.is_empty()) else {
            return;
        };
        let Some(ns) = class.turn.pop_front() else {
            return;
        };
        let Some(queue) = class.waiters.get_mut(&ns) else {
            continue;
        };
        let tx = queue.pop_front();
        if queue.is_empty() {
            class.waiters.remove(&ns);
        } else {
            class.turn.push_back(ns);
        }
        let Some(tx) = tx else { continue };
        // Taken before sending: a receiver that is gone gives it back at once.
        st.free -= 1;
        let permit = Permit {
            state: Some(shared.clone()),
        };
        if let Err(mut unsent) = tx.send(permit) {
            // The waiter was cancelled. Dropping its permit here would lock
            // again: take the slot back by hand.
            unsent.state = None;
            st.free += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn urgency_from_what_the_cache_knows() {
        let now = ts("2026-01-01T00:00:00Z");
        let later = |m: i64| now + jiff::SignedDuration::from_mins(m);
        let rows = [
            (true, false, Some(later(60)), Urgency::Revocation),
            (false, true, Some(later(60)), Urgency::Revocation),
            (false, false, None, Urgency::NoValidToken),
            (false, false, Some(now), Urgency::NoValidToken),
            (false, false, Some(later(5)), Urgency::NearExpiry),
            (false, false, Some(later(60)), Urgency::Planned),
        ];
        for (deleting, revoke, expires, want) in rows {
            assert_eq!(Urgency::of(deleting, revoke, expires, now), want);
        }
    }

    /// Runs `jobs` (namespace, urgency) through a gate of `workers`, each
    /// holding its permit for 10 ms, and returns the order they started in.
    async fn order(
        workers: usize,
        jobs: Vec<(&'static str, Urgency)>,
    ) -> Vec<(&'static str, Urgency)> {
        let q = FairQueue::new(workers);
        // Fill the gate so every job queues, then release.
        let blockers: Vec<Permit> = {
            let mut v = Vec::new();
            for _ in 0..workers {
                v.push(q.admit("blocker", Urgency::Planned).await);
            }
            v
        };
        let started = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for job in jobs {
            let q = q.clone();
            let started = started.clone();
            tasks.push(tokio::spawn(async move {
                let _p = q.admit(job.0, job.1).await;
                started.lock().unwrap().push(job);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
            // Let each job reach the queue in this order.
            tokio::task::yield_now().await;
        }
        drop(blockers);
        for t in tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(started).unwrap().into_inner().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_flooding_namespace_takes_turns_with_the_others() {
        let mut jobs = vec![("flood", Urgency::Planned); 20];
        jobs.push(("quiet", Urgency::Planned));
        jobs.push(("other", Urgency::Planned));
        let started = order(2, jobs).await;
        let pos = |ns: &str| started.iter().position(|j| j.0 == ns).unwrap();
        // Queued after twenty flood jobs, each quiet one starts within the
        // first round of turns instead of after the flood.
        assert!(pos("quiet") <= 2, "{started:?}");
        assert!(pos("other") <= 3, "{started:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn urgent_work_goes_first_and_first_tokens_beat_planned_rotations() {
        let mut jobs = vec![("a", Urgency::Planned); 10];
        jobs.push(("b", Urgency::NearExpiry));
        jobs.push(("c", Urgency::NoValidToken));
        jobs.push(("d", Urgency::Revocation));
        let started = order(1, jobs).await;
        let firsts: Vec<Urgency> = started.iter().take(3).map(|j| j.1).collect();
        assert_eq!(
            firsts,
            vec![
                Urgency::Revocation,
                Urgency::NoValidToken,
                Urgency::NearExpiry
            ],
            "{started:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_workers_and_a_cancelled_waiter_loses_nothing() {
        let q = FairQueue::new(2);
        let a = q.admit("x", Urgency::Planned).await;
        let _b = q.admit("x", Urgency::Planned).await;
        // A third waits; cancel it.
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.admit("y", Urgency::Planned).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(q.waiting()[3].1, 1);
        waiting.abort();
        let _ = waiting.await;
        drop(a);
        // The freed slot is still usable: the cancelled waiter did not keep it.
        let c = tokio::time::timeout(Duration::from_secs(1), q.admit("z", Urgency::Planned)).await;
        assert!(c.is_ok(), "a slot was lost to a cancelled waiter");
        // And a fourth now waits: two are held.
        let d =
            tokio::time::timeout(Duration::from_millis(50), q.admit("z", Urgency::Planned)).await;
        assert!(d.is_err(), "more permits than workers");
    }
}
