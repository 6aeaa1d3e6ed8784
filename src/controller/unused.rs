//! Whether a token is unused (issue 20): no workload in its namespace uses
//! the Secret, and nothing has used any of its tokens for
//! `spec.usage.unusedAfter` (since the AgentToken was created, or the last
//! use the usage tracker saw; scheduled rotations do not restart it).
//! Pure: the reconcile reads the workload index and status, this says what
//! they mean.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// What [`judge`] looks at.
#[derive(Clone, Copy, Debug)]
pub struct Inputs {
    pub now: Timestamp,
    /// `spec.usage.unusedAfter`.
    pub after: Duration,
    /// A Deployment, StatefulSet or DaemonSet in the namespace uses the
    /// Secret (when the workload index cannot say, there is no verdict).
    pub has_consumer: bool,
    /// When the AgentToken was created: the clock's start when no token
    /// of it was ever seen used. (Not a token's issue time: a scheduled
    /// rotation must not restart the clock.)
    pub created_at: Option<Timestamp>,
    /// The newest use of any of its tokens (`status.usage.lastUsed`, kept
    /// across rotations).
    pub last_used: Option<Timestamp>,
}

/// The reason [`Verdict::InUse`] gives when a workload uses the Secret.
pub const CONSUMER: &str = "a workload in the namespace uses the Secret";
/// The reason when a Pod, Job or CronJob does ([`super::others`]).
pub const OTHER_CONSUMER: &str = "a Pod, Job or CronJob in the namespace uses the Secret";

/// Whether `why` says something consumes the Secret (not a recent use).
pub fn consumed(why: &str) -> bool {
    why == CONSUMER || why == OTHER_CONSUMER
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A workload uses the Secret, or a use is recent.
    InUse(String),
    /// Unused since `since` (its last activity).
    Unused { since: Timestamp },
}

/// Judges; also says when to look again (the moment it would turn
/// `Unused` if nothing changes).
pub fn judge(i: &Inputs) -> (Verdict, Option<Timestamp>) {
    if i.has_consumer {
        return (Verdict::InUse(CONSUMER.into()), None);
    }
    let last = match (i.created_at, i.last_used) {
        (Some(a), Some(b)) => a.max(b),
        (a, b) => match a.or(b) {
            Some(t) => t,
            None => return (Verdict::InUse("not created yet".into()), None),
        },
    };
    let after = SignedDuration::try_from(i.after).unwrap_or(SignedDuration::MAX);
    match last.checked_add(after) {
        Ok(due) if i.now >= due => (Verdict::Unused { since: last }, None),
        Ok(due) => (
            Verdict::InUse(match i.last_used {
                Some(u) if u >= last => format!("last used at {u}"),
                _ => format!("created at {last}, not used yet"),
            }),
            Some(due),
        ),
        Err(_) => (
            Verdict::InUse("unusedAfter is too long to reach".into()),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_900_000_000 + s).unwrap()
    }

    #[test]
    fn unused_needs_no_consumer_and_no_recent_use() {
        let base = Inputs {
            now: t(1000),
            after: Duration::from_secs(600),
            has_consumer: false,
            created_at: Some(t(0)),
            last_used: None,
        };
        let table: Vec<(&str, Inputs, bool, Option<Timestamp>)> = vec![
            ("never used, issued long ago", base, true, None),
            (
                "a consumer exists",
                Inputs {
                    has_consumer: true,
                    ..base
                },
                false,
                None,
            ),
            (
                "used recently",
                Inputs {
                    last_used: Some(t(900)),
                    ..base
                },
                false,
                Some(t(1500)),
            ),
            (
                "used long ago",
                Inputs {
                    last_used: Some(t(100)),
                    ..base
                },
                true,
                None,
            ),
            (
                "issued recently",
                Inputs {
                    created_at: Some(t(800)),
                    ..base
                },
                false,
                Some(t(1400)),
            ),
            (
                "exactly due",
                Inputs {
                    now: t(600),
                    ..base
                },
                true,
                None,
            ),
            (
                "nothing issued",
                Inputs {
                    created_at: None,
                    ..base
                },
                false,
                None,
            ),
            (
                "huge unusedAfter",
                Inputs {
                    after: Duration::MAX,
                    ..base
                },
                false,
                None,
            ),
        ];
        for (what, i, unused, wake) in table {
            let (v, w) = judge(&i);
            assert_eq!(matches!(v, Verdict::Unused { .. }), unused, "{what}: {v:?}");
            assert_eq!(w, wake, "{what}");
        }
        assert_eq!(judge(&base).0, Verdict::Unused { since: t(0) });
    }
}
