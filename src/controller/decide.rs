//! The decide phase: pure. Given what the Secret holds, the spec, the
//! triggers and the clock, say whether to mint (and why), whether the
//! previous token's grace is over, and when to look again.

use jiff::Timestamp;

use crate::crd::RotationReason;
use crate::rotation::{self, CronSchedule, RenewWindow};

/// The token the Secret holds, as recorded in its annotations.
#[derive(Clone, Debug, PartialEq)]
pub struct CurrentToken {
    pub revision: i64,
    pub fingerprint: String,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    /// Hash of the spec fields the token was minted for.
    pub spec_hash: String,
    /// Whether the Secret's token key still holds exactly this token
    /// (false: edited by hand, or removed).
    pub data_intact: bool,
}

/// The previous token, kept during its grace period.
#[derive(Clone, Debug, PartialEq)]
pub struct PreviousToken {
    pub revision: i64,
    pub fingerprint: String,
    pub expires_at: Timestamp,
    pub grace_until: Timestamp,
}

/// What the owned Secret says (a Secret we do not own never gets here).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SecretView {
    pub exists: bool,
    pub current: Option<CurrentToken>,
    pub previous: Option<PreviousToken>,
    /// Trigger values already acted on.
    pub rotate_handled: Option<String>,
    pub revoke_handled: Option<String>,
}

/// Everything decide looks at.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    pub now: Timestamp,
    pub spec_hash: &'a str,
    pub paused: bool,
    pub window: RenewWindow,
    pub cron: Option<&'a CronSchedule>,
    /// Stable per object, so jitter spreads objects created together.
    pub jitter_key: &'a str,
    pub rotate_trigger: Option<&'a str>,
    pub revoke_trigger: Option<&'a str>,
    pub secret: &'a SecretView,
    /// status.revision: the last revision this AgentToken ever minted.
    pub last_revision: i64,
    pub failed_attempts: u32,
    pub last_failure: Option<Timestamp>,
}

/// A mint to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mint {
    pub reason: RotationReason,
    /// Revoke the current token at once instead of keeping it for the grace period.
    pub revoke_current_now: bool,
}

/// The decide phase's answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    pub mint: Option<Mint>,
    /// Mint wanted but held back by failure backoff until this time.
    pub backoff_until: Option<Timestamp>,
    /// The previous token's grace is over: revoke it and drop it from the Secret.
    pub retire_previous: bool,
    /// The current token expired and no new one is being minted: remove it
    /// from the Secret rather than leave it stale.
    pub clear_expired: bool,
    /// When the current token is due to rotate (for status).
    pub next_rotation_at: Option<Timestamp>,
    /// When to reconcile again even if nothing changes.
    pub wake_at: Option<Timestamp>,
}

/// Decides what to do now.
pub fn decide(i: &Inputs<'_>) -> Decision {
    let mut d = Decision::default();
    let current = i.secret.current.as_ref();

    // When the current token is due by time (expiry window or cron).
    let plan = current.map(|c| {
        rotation::next_rotation(c.issued_at, c.expires_at, i.window, i.jitter_key, i.cron)
    });
    d.next_rotation_at = plan.as_ref().map(|p| p.due_at);

    let wanted = wanted_mint(i, current, plan.as_ref());
    if let Some(mint) = wanted {
        match backoff_until(i) {
            Some(until) if until > i.now => {
                d.backoff_until = Some(until);
                push_wake(&mut d, until);
            }
            _ => d.mint = Some(mint),
        }
    } else if let Some(p) = &plan
        && !i.paused
    {
        push_wake(&mut d, p.due_at);
    }

    // The current token stays until it expires, whatever else fails.
    if let Some(c) = current
        && d.mint.is_none()
        && c.data_intact
    {
        if i.now >= c.expires_at {
            d.clear_expired = true;
        } else {
            push_wake(&mut d, c.expires_at);
        }
    }

    if let Some(prev) = &i.secret.previous {
        if i.now >= prev.grace_until {
            d.retire_previous = true;
        } else {
            push_wake(&mut d, prev.grace_until);
        }
    }
    d
}

fn wanted_mint(
    i: &Inputs<'_>,
    current: Option<&CurrentToken>,
    plan: Option<&rotation::RotationPlan>,
) -> Option<Mint> {
    let mint = |reason| {
        Some(Mint {
            reason,
            revoke_current_now: false,
        })
    };
    // Person-made triggers work even while paused.
    if changed(i.revoke_trigger, i.secret.revoke_handled.as_deref()) {
        return Some(Mint {
            reason: RotationReason::Revoked,
            revoke_current_now: true,
        });
    }
    if changed(i.rotate_trigger, i.secret.rotate_handled.as_deref()) {
        return mint(RotationReason::Manual);
    }
    if i.paused {
        return None;
    }
    let Some(c) = current else {
        // Never minted, or the Secret (or its token) was removed.
        return if i.last_revision == 0 {
            mint(RotationReason::Initial)
        } else {
            mint(RotationReason::SecretDrift)
        };
    };
    if !c.data_intact {
        return if i.now >= c.expires_at {
            mint(RotationReason::Expiring)
        } else {
            mint(RotationReason::SecretDrift)
        };
    }
    if c.spec_hash != i.spec_hash {
        return mint(RotationReason::SpecChanged);
    }
    if i.now >= c.expires_at {
        return mint(RotationReason::Expiring);
    }
    match plan {
        Some(p) if i.now >= p.due_at => mint(match p.reason {
            rotation::DueReason::Cron => RotationReason::Cron,
            _ => RotationReason::Scheduled,
        }),
        _ => None,
    }
}

/// A trigger annotation counts when it is set and differs from the value
/// already handled.
fn changed(trigger: Option<&str>, handled: Option<&str>) -> bool {
    match trigger {
        Some(t) if !t.is_empty() => handled != Some(t),
        _ => false,
    }
}

fn backoff_until(i: &Inputs<'_>) -> Option<Timestamp> {
    if i.failed_attempts == 0 {
        return None;
    }
    let last = i.last_failure?;
    let wait = rotation::backoff(i.failed_attempts, i.jitter_key);
    let wait = jiff::SignedDuration::try_from(wait).ok()?;
    last.checked_add(wait).ok()
}

fn push_wake(d: &mut Decision, at: Timestamp) {
    d.wake_at = Some(match d.wake_at {
        Some(w) if w <= at => w,
        _ => at,
    });
}
