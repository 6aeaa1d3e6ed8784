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
    pub drill_handled: Option<String>,
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
    /// `agenttoken.dev/drill`: a revocation drill, a revoke-now of the
    /// current token that is measured.
    pub drill_trigger: Option<&'a str>,
    /// The drill trigger comes from `spec.drill.schedule`: it waits for
    /// the mint floor and backoff rather than revoke ahead of them.
    pub drill_scheduled: bool,
    /// A revision used from an unexpected address, when `spec.usage` says
    /// to revoke such a token (`onUnexpectedSource: Revoke`).
    pub compromised: Option<i64>,
    /// `spec.usage.onUnused: Revoke` and the token is unused (or the last
    /// one was revoked as unused and still nothing uses the Secret): revoke
    /// the current token, mint none.
    pub dormant: bool,
    /// The last token was revoked as unused (`status.dormantSince`): a mint
    /// now is because something uses the Secret again.
    pub was_dormant: bool,
    /// The issuer is suspended (`spec.suspend`): nothing is minted; a token
    /// to revoke at once is revoked without a replacement.
    pub suspended: bool,
    /// The issuer's kill switch (`spec.revokeIssuedBefore`) covers the
    /// current token (this issuer minted it before that time), or, with no
    /// current token, the newest one it revoked without a replacement.
    pub kill_current: bool,
    /// The kill switch covers the previous token (in its grace period).
    pub kill_previous: bool,
    pub secret: &'a SecretView,
    /// status.revision: the last revision this AgentToken ever minted.
    pub last_revision: i64,
    pub failed_attempts: u32,
    pub last_failure: Option<Timestamp>,
    /// The recent mints (status.history): the mint floor.
    pub recent_mints: &'a [rotation::PastMint],
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
    /// Mint wanted but held back by the per-AgentToken mint floor until
    /// this time ([`rotation::mint_floor`]).
    pub floor_until: Option<Timestamp>,
    /// The previous token's grace is over: revoke it and drop it from the Secret.
    pub retire_previous: bool,
    /// The current token expired and no new one is being minted: remove it
    /// from the Secret rather than leave it stale.
    pub clear_expired: bool,
    /// The current token is unused and `onUnused` is `Revoke`: revoke it
    /// and remove it from the Secret.
    pub revoke_unused: bool,
    /// The previous token (in its grace period) was used from an
    /// unexpected address and `onUnexpectedSource` is `Revoke`, or the
    /// kill switch covers it: revoke it now, without waiting for the grace
    /// period or the consumers.
    pub revoke_previous_now: bool,
    /// The current token must die now but nothing may be minted now (the
    /// issuer is suspended, or the replacement waits for the mint floor or
    /// a failure backoff): revoke it and remove it from the Secret.
    pub withdraw_current: bool,
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

    let mut wanted = wanted_mint(i, current, plan.as_ref());
    if i.suspended {
        // Fail closed: no mint; what had to die now still does.
        d.withdraw_current |= current.is_some() && wanted.is_some_and(|m| m.revoke_current_now);
        wanted = None;
    }
    if let Some(mint) = wanted {
        // Failures back off; every mint, forced or not, respects the floor.
        let backoff = backoff_until(i).filter(|t| *t > i.now);
        let floor = rotation::mint_floor(i.recent_mints, mint.reason.forced(), i.now)
            .filter(|t| *t > i.now);
        d.backoff_until = backoff;
        d.floor_until = floor.filter(|f| backoff.is_none_or(|b| *f > b));
        match backoff.max(floor) {
            Some(until) => {
                // A token to revoke at once is revoked now; its
                // replacement waits (the Secret is empty meanwhile).
                let scheduled = mint.reason == RotationReason::Drill && i.drill_scheduled;
                d.withdraw_current |= mint.revoke_current_now && current.is_some() && !scheduled;
                push_wake(&mut d, until)
            }
            None => d.mint = Some(mint),
        }
    } else if let Some(p) = &plan
        && !i.paused
    {
        push_wake(&mut d, p.due_at);
    }

    if i.dormant && current.is_some() && d.mint.is_none() {
        d.revoke_unused = true;
    }
    // The current token stays until it expires, whatever else fails.
    if let Some(c) = current
        && d.mint.is_none()
        && c.data_intact
        && !d.revoke_unused
        && !d.withdraw_current
    {
        if i.now >= c.expires_at {
            d.clear_expired = true;
        } else {
            push_wake(&mut d, c.expires_at);
        }
    }

    if let Some(prev) = &i.secret.previous {
        if i.compromised == Some(prev.revision) || i.kill_previous {
            d.revoke_previous_now = true;
        } else if i.now >= prev.grace_until {
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
    // A drill: the current token revoked at once and replaced, measured.
    if current.is_some() && changed(i.drill_trigger, i.secret.drill_handled.as_deref()) {
        return Some(Mint {
            reason: RotationReason::Drill,
            revoke_current_now: true,
        });
    }
    // The issuer's kill switch: replaced, the old one revoked at once, even
    // while paused.
    if current.is_some() && i.kill_current {
        return Some(Mint {
            reason: RotationReason::KillSwitch,
            revoke_current_now: true,
        });
    }
    // A token used from where it should not be: replaced, the old one
    // revoked at once, even while paused.
    if let (Some(c), Some(r)) = (current, i.compromised)
        && c.revision == r
    {
        return Some(Mint {
            reason: RotationReason::UnexpectedSource,
            revoke_current_now: true,
        });
    }
    if changed(i.rotate_trigger, i.secret.rotate_handled.as_deref()) {
        return mint(RotationReason::Manual);
    }
    if i.paused || i.dormant {
        return None;
    }
    if i.was_dormant && current.is_none() {
        return mint(RotationReason::InUseAgain);
    }
    let Some(c) = current else {
        // Revoked by the kill switch before its replacement could be
        // minted (the mint floor, a suspended issuer): replaced now.
        if i.kill_current {
            return mint(RotationReason::KillSwitch);
        }
        // A drill whose token was revoked before its replacement could be
        // minted (the mint floor).
        if i.last_revision > 0 && changed(i.drill_trigger, i.secret.drill_handled.as_deref()) {
            return mint(RotationReason::Drill);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn view(issued: &str, expires: &str) -> SecretView {
        SecretView {
            exists: true,
            current: Some(CurrentToken {
                revision: 1,
                fingerprint: "sha256:0000000000000000".into(),
                issued_at: ts(issued),
                expires_at: ts(expires),
                spec_hash: "h".into(),
                data_intact: true,
            }),
            ..Default::default()
        }
    }

    fn inputs<'a>(now: &str, secret: &'a SecretView) -> Inputs<'a> {
        Inputs {
            now: ts(now),
            spec_hash: "h",
            paused: false,
            window: RenewWindow::Percentage(33),
            cron: None,
            jitter_key: "uid/1",
            rotate_trigger: None,
            revoke_trigger: None,
            drill_trigger: None,
            drill_scheduled: false,
            compromised: None,
            dormant: false,
            was_dormant: false,
            suspended: false,
            kill_current: false,
            kill_previous: false,
            secret,
            last_revision: 1,
            failed_attempts: 0,
            last_failure: None,
            recent_mints: &[],
        }
    }

    #[test]
    fn the_kill_switch_replaces_and_suspension_only_withdraws() {
        let v = view("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        let mut with_prev = v.clone();
        with_prev.previous = Some(PreviousToken {
            revision: 0,
            fingerprint: "sha256:1111111111111111".into(),
            expires_at: ts("2026-01-01T00:50:00Z"),
            grace_until: ts("2026-01-01T00:20:00Z"),
        });
        let now = "2026-01-01T00:10:00Z";
        type Edit = fn(&mut Inputs<'_>);
        // (what, edit, mint reason, revoke current now, withdraw current,
        // revoke previous now)
        type Row = (&'static str, Edit, Option<RotationReason>, bool, bool, bool);
        let rows: [Row; 7] = [
            ("nothing", |_| {}, None, false, false, false),
            (
                "kill switch",
                |i| i.kill_current = true,
                Some(RotationReason::KillSwitch),
                true,
                false,
                false,
            ),
            (
                "kill switch while paused",
                |i| {
                    i.kill_current = true;
                    i.paused = true
                },
                Some(RotationReason::KillSwitch),
                true,
                false,
                false,
            ),
            (
                "kill switch on the previous only",
                |i| i.kill_previous = true,
                None,
                false,
                false,
                true,
            ),
            (
                "suspended",
                |i| i.suspended = true,
                None,
                false,
                false,
                false,
            ),
            (
                "suspended and killed",
                |i| {
                    i.suspended = true;
                    i.kill_current = true;
                    i.kill_previous = true
                },
                None,
                false,
                true,
                true,
            ),
            (
                "suspended, revoke trigger",
                |i| {
                    i.suspended = true;
                    i.revoke_trigger = Some("x")
                },
                None,
                false,
                true,
                false,
            ),
        ];
        for (what, edit, reason, now_revoke, withdraw, prev) in rows {
            let mut i = inputs(now, &with_prev);
            edit(&mut i);
            let d = decide(&i);
            assert_eq!(d.mint.map(|m| m.reason), reason, "{what}");
            assert_eq!(
                d.mint.is_some_and(|m| m.revoke_current_now),
                now_revoke,
                "{what}"
            );
            assert_eq!(d.withdraw_current, withdraw, "{what}");
            assert_eq!(d.revoke_previous_now, prev, "{what}");
            assert!(!d.clear_expired, "{what}");
        }
        // Held by the mint floor: the token dies now, the replacement waits.
        let recent = [rotation::PastMint {
            at: ts("2026-01-01T00:09:57Z"),
            forced: false,
        }];
        let mut i = inputs(now, &with_prev);
        i.recent_mints = &recent;
        i.kill_current = true;
        let d = decide(&i);
        assert_eq!((d.mint, d.withdraw_current), (None, true));
        assert!(d.wake_at.is_some());
        // A scheduled drill held by the floor waits whole: nothing revoked.
        let mut i = inputs(now, &with_prev);
        i.recent_mints = &recent;
        i.drill_trigger = Some("scheduled-1");
        i.drill_scheduled = true;
        let d = decide(&i);
        assert_eq!((d.mint, d.withdraw_current), (None, false));
        // Asked for by a person, it revokes now and replaces later.
        i.drill_scheduled = false;
        assert!(decide(&i).withdraw_current);
        // Withdrawn by the kill switch: the replacement says why.
        let none = SecretView::default();
        let mut i = inputs(now, &none);
        i.kill_current = true;
        assert_eq!(
            decide(&i).mint.map(|m| m.reason),
            Some(RotationReason::KillSwitch)
        );
        // Suspended with no token: nothing minted, not even the first.
        let none = SecretView::default();
        let mut i = inputs(now, &none);
        i.last_revision = 0;
        i.suspended = true;
        assert_eq!(decide(&i).mint, None);
    }

    #[test]
    fn every_kind_of_mint_respects_the_floor() {
        // One row per way a tenant can ask for a mint; each was minted 3 s
        // ago, so each waits for the floor and wakes when it ends.
        let v = view("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        let mut drifted = v.clone();
        if let Some(c) = drifted.current.as_mut() {
            c.data_intact = false;
        }
        let missing = SecretView::default();
        let recent = [rotation::PastMint {
            at: ts("2026-01-01T00:00:00Z"),
            forced: false,
        }];
        let now = "2026-01-01T00:00:03Z";
        type Edit = fn(&mut Inputs<'_>);
        let rows: [(&str, &SecretView, Edit); 5] = [
            ("rotate trigger", &v, |i| i.rotate_trigger = Some("1")),
            ("revoke trigger", &v, |i| i.revoke_trigger = Some("1")),
            ("spec change", &v, |i| i.spec_hash = "other"),
            ("edited token", &drifted, |_| {}),
            ("deleted Secret", &missing, |_| {}),
        ];
        for (what, view, edit) in rows {
            let mut i = inputs(now, view);
            i.recent_mints = &recent;
            edit(&mut i);
            let d = decide(&i);
            assert_eq!(d.mint, None, "{what}");
            assert_eq!(d.floor_until, Some(ts("2026-01-01T00:00:10Z")), "{what}");
            assert_eq!(d.wake_at, Some(ts("2026-01-01T00:00:10Z")), "{what}");
            // Once the floor has passed, it mints.
            i.now = ts("2026-01-01T00:00:10Z");
            assert!(decide(&i).mint.is_some(), "{what}");
        }
    }

    #[test]
    fn failure_backoff_and_floor_hold_together_and_the_later_wins() {
        let v = view("2026-01-01T00:00:00Z", "2026-01-01T00:00:05Z");
        let recent = [rotation::PastMint {
            at: ts("2026-01-01T00:00:00Z"),
            forced: false,
        }];
        let mut i = inputs("2026-01-01T00:00:06Z", &v);
        i.recent_mints = &recent;
        i.failed_attempts = 3;
        i.last_failure = Some(ts("2026-01-01T00:00:06Z"));
        let d = decide(&i);
        assert_eq!(d.mint, None);
        assert!(d.backoff_until.is_some());
        assert_eq!(
            d.floor_until, None,
            "the backoff (about 20 s) ends after the floor"
        );
        // The expired token is removed while the mint waits.
        assert!(d.clear_expired);
    }

    #[test]
    fn first_token_is_initial_and_a_lost_one_is_drift() {
        let empty = SecretView::default();
        let mut i = inputs("2026-01-01T00:00:00Z", &empty);
        i.last_revision = 0;
        assert_eq!(decide(&i).mint.unwrap().reason, RotationReason::Initial);
        i.last_revision = 3;
        assert_eq!(decide(&i).mint.unwrap().reason, RotationReason::SecretDrift);
    }

    #[test]
    fn nothing_to_do_before_the_window_and_wake_at_the_due_time() {
        let v = view("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        let d = decide(&inputs("2026-01-01T00:10:00Z", &v));
        assert_eq!(d.mint, None);
        assert_eq!(d.wake_at, d.next_rotation_at);
        let due = d.next_rotation_at.unwrap();
        assert!(
            due > ts("2026-01-01T00:30:00Z") && due <= ts("2026-01-01T00:40:12Z"),
            "{due}"
        );
        // At the due time it rotates as Scheduled.
        let d = decide(&inputs(&due.to_string(), &v));
        assert_eq!(
            d.mint,
            Some(Mint {
                reason: RotationReason::Scheduled,
                revoke_current_now: false
            })
        );
    }

    #[test]
    fn spec_change_edit_and_triggers() {
        let v = view("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        let mut i = inputs("2026-01-01T00:01:00Z", &v);
        i.spec_hash = "other";
        assert_eq!(decide(&i).mint.unwrap().reason, RotationReason::SpecChanged);

        let mut edited = v.clone();
        edited.current.as_mut().unwrap().data_intact = false;
        assert_eq!(
            decide(&inputs("2026-01-01T00:01:00Z", &edited))
                .mint
                .unwrap()
                .reason,
            RotationReason::SecretDrift
        );

        let mut i = inputs("2026-01-01T00:01:00Z", &v);
        i.rotate_trigger = Some("1");
        assert_eq!(decide(&i).mint.unwrap().reason, RotationReason::Manual);
        i.revoke_trigger = Some("2");
        assert_eq!(
            decide(&i).mint,
            Some(Mint {
                reason: RotationReason::Revoked,
                revoke_current_now: true
            })
        );

        // A trigger already handled does nothing.
        let mut handled = v.clone();
        handled.rotate_handled = Some("1".into());
        let mut i = inputs("2026-01-01T00:01:00Z", &handled);
        i.rotate_trigger = Some("1");
        assert_eq!(decide(&i).mint, None);
    }

    #[test]
    fn a_token_used_from_an_unexpected_address_is_replaced_and_revoked_at_once() {
        let v = view("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        let current = v.current.as_ref().unwrap().revision;
        let mut i = inputs("2026-01-01T00:01:00Z", &v);
        i.paused = true;
        i.compromised = Some(current);
        assert_eq!(
            decide(&i).mint,
            Some(Mint {
                reason: RotationReason::UnexpectedSource,
                revoke_current_now: true
            }),
            "even while paused"
        );
        // An older revision's unexpected use is not the current token's:
        // once replaced, nothing more happens.
        i.compromised = Some(current - 1);
        i.paused = false;
        assert_eq!(decide(&i).mint, None);
        // A forced mint: it waits for the mint floor like the others.
        i.compromised = Some(current);
        let recent = [rotation::PastMint {
            at: "2026-01-01T00:00:55Z".parse().unwrap(),
            forced: false,
        }];
        i.recent_mints = &recent;
        let d = decide(&i);
        assert_eq!(d.mint, None);
        assert!(d.floor_until.is_some());
    }

    #[test]
    fn a_stolen_previous_token_is_revoked_now_not_after_its_grace() {
        let mut v = view("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        v.current.as_mut().unwrap().revision = 2;
        v.previous = Some(PreviousToken {
            revision: 1,
            fingerprint: "sha256:1".into(),
            expires_at: "2026-01-01T00:30:00Z".parse().unwrap(),
            grace_until: "2026-01-01T00:20:00Z".parse().unwrap(),
        });
        let current = v.current.as_ref().unwrap().revision;
        assert_ne!(current, 1);
        let mut i = inputs("2026-01-01T00:05:00Z", &v);
        assert!(!decide(&i).revoke_previous_now);
        i.compromised = Some(1);
        let d = decide(&i);
        assert!(d.revoke_previous_now);
        assert_eq!(d.mint, None, "the current token is not the stolen one");
    }

    #[test]
    fn a_dormant_token_is_revoked_and_nothing_minted_until_in_use_again() {
        let v = view("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        let mut i = inputs("2026-01-01T00:50:00Z", &v);
        i.dormant = true;
        let d = decide(&i);
        assert_eq!(d.mint, None, "not even the scheduled rotation");
        assert!(d.revoke_unused);
        assert!(!d.clear_expired);
        // A person's trigger still mints.
        i.rotate_trigger = Some("1");
        assert_eq!(decide(&i).mint.unwrap().reason, RotationReason::Manual);
        // Revoked, still dormant: nothing (no SecretDrift mint).
        let empty = SecretView {
            current: None,
            ..v.clone()
        };
        let mut i = inputs("2026-01-01T00:51:00Z", &empty);
        i.last_revision = 1;
        i.dormant = true;
        i.was_dormant = true;
        let d = decide(&i);
        assert_eq!((d.mint, d.revoke_unused), (None, false));
        // Something uses the Secret again.
        i.dormant = false;
        assert_eq!(decide(&i).mint.unwrap().reason, RotationReason::InUseAgain);
    }

    #[test]
    fn paused_stops_rotation_but_not_person_made_triggers() {
        let v = view("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        let mut i = inputs("2026-01-01T00:50:00Z", &v);
        i.paused = true;
        assert_eq!(decide(&i).mint, None);
        i.revoke_trigger = Some("x");
        assert_eq!(decide(&i).mint.unwrap().reason, RotationReason::Revoked);
    }

    #[test]
    fn failures_back_off_and_an_expired_token_is_cleared() {
        let v = view("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        let mut i = inputs("2026-01-01T00:50:00Z", &v);
        i.failed_attempts = 3;
        i.last_failure = Some(ts("2026-01-01T00:49:59Z"));
        let d = decide(&i);
        assert_eq!(d.mint, None);
        assert!(d.backoff_until.unwrap() > i.now);
        assert!(!d.clear_expired, "a valid token stays while minting fails");

        let mut i = inputs("2026-01-01T01:00:01Z", &v);
        i.failed_attempts = 3;
        i.last_failure = Some(ts("2026-01-01T01:00:00Z"));
        let d = decide(&i);
        assert_eq!(d.mint, None);
        assert!(
            d.clear_expired,
            "an expired token is removed, not left stale"
        );
    }

    #[test]
    fn the_previous_token_is_retired_after_its_grace() {
        let mut v = view("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        v.current.as_mut().unwrap().revision = 2;
        v.previous = Some(PreviousToken {
            revision: 0,
            fingerprint: "sha256:1111111111111111".into(),
            expires_at: ts("2026-01-01T00:20:00Z"),
            grace_until: ts("2026-01-01T00:10:00Z"),
        });
        let d = decide(&inputs("2026-01-01T00:05:00Z", &v));
        assert!(!d.retire_previous);
        assert_eq!(d.wake_at, Some(ts("2026-01-01T00:10:00Z")));
        assert!(decide(&inputs("2026-01-01T00:10:00Z", &v)).retire_previous);
    }
}
