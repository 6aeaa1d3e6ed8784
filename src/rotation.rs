//! Pure time maths: when a token is due for rotation (renewal window, jitter,
//! cron), how long to back off after a failure, fingerprints. The clock is
//! injected so every rule here is tested with exact times.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp, tz::TimeZone};
use sha2::{Digest, Sha256};

/// Where "now" comes from.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// `t` to the whole second below it: the precision of a Kubernetes
/// timestamp. A time the operator keeps in memory with nanoseconds would
/// differ from the same time read back from status, and every difference
/// is a write.
pub fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// The real clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// How long before the real expiry a token is renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenewWindow {
    /// This percentage (1-99) of the token's real lifetime.
    Percentage(u8),
    /// A fixed time before expiry. Not shorter than the real lifetime, it
    /// would make every token due at birth: the default percentage applies.
    Before(Duration),
}

/// Percentage of the real lifetime left when a token is renewed by default.
pub const DEFAULT_PERCENTAGE: u8 = 33;

/// Share of the renewal window used to spread tokens minted together.
const JITTER_SHARE: f64 = 0.25;

/// A parsed `rotation.schedule` (5-field cron, UTC).
#[derive(Clone, Debug)]
pub struct CronSchedule(croner::Cron);

impl CronSchedule {
    /// Parses a 5-field cron expression; the error says what is wrong.
    pub fn parse(expr: &str) -> Result<Self, String> {
        let fields = expr.split_whitespace().count();
        if fields != 5 {
            return Err(format!(
                "{expr:?} has {fields} fields; a schedule has 5 (minute hour day-of-month month day-of-week), e.g. \"0 3 * * *\""
            ));
        }
        croner::parser::CronParser::new()
            .parse(expr)
            .map(CronSchedule)
            .map_err(|e| format!("{expr:?} is not a valid cron expression: {e}"))
    }

    /// The first time the schedule fires strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let zoned = t.to_zoned(TimeZone::UTC);
        self.0
            .find_next_occurrence(&zoned, false)
            .ok()
            .map(|z| z.timestamp())
    }
}

/// Why a token is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DueReason {
    /// The renewal window before the real expiry.
    Window,
    /// The cron schedule.
    Cron,
}

/// When a token is due for rotation and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotationPlan {
    pub due_at: Timestamp,
    pub reason: DueReason,
}

/// When a token issued at `issued` and really expiring at `expires` is due.
///
/// The nominal time is `expires - window`; a jitter derived from
/// `jitter_key` moves it earlier by up to a quarter of the window (and at
/// most half the time before the nominal time), so tokens minted together do
/// not rotate together, and never later than nominal.
pub fn next_rotation(
    issued: Timestamp,
    expires: Timestamp,
    window: RenewWindow,
    jitter_key: &str,
    cron: Option<&CronSchedule>,
) -> RotationPlan {
    let lifetime = expires.duration_since(issued).max(SignedDuration::ZERO);
    let lifetime_s = lifetime.as_secs_f64();
    let window_s = match window {
        RenewWindow::Percentage(p) => lifetime_s * f64::from(p.clamp(1, 99)) / 100.0,
        RenewWindow::Before(d) if d.as_secs_f64() < lifetime_s => d.as_secs_f64(),
        RenewWindow::Before(_) => lifetime_s * f64::from(DEFAULT_PERCENTAGE) / 100.0,
    };
    // Jitter never eats more than half of the time before the nominal due
    // time, so a long renewal window still leaves the token some use.
    let max_jitter_s = (window_s * JITTER_SHARE).min((lifetime_s - window_s) / 2.0);
    let jitter_s = max_jitter_s * unit_fraction(jitter_key);
    let before = SignedDuration::from_secs_f64(window_s + jitter_s);
    let due = expires.checked_sub(before).unwrap_or(issued).max(issued);
    let window_plan = RotationPlan {
        due_at: due,
        reason: DueReason::Window,
    };
    match cron.and_then(|c| c.next_after(issued)) {
        Some(at) if at < due => RotationPlan {
            due_at: at,
            reason: DueReason::Cron,
        },
        _ => window_plan,
    }
}

/// Exponential backoff after `attempts` failures: 5s, 10s, 20s ... capped
/// at 5 minutes, with ±20% jitter derived from `key`.
pub fn backoff(attempts: u32, key: &str) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    let base = (5.0 * f64::from(1u32 << exp)).min(300.0);
    let jitter = 0.8 + 0.4 * unit_fraction(&format!("{key}#{attempts}"));
    Duration::from_secs_f64(base * jitter)
}

/// Shortest time between two mints of one AgentToken, whatever asks for
/// them.
pub const MINT_FLOOR: Duration = Duration::from_secs(10);
/// Longest the floor grows to for an AgentToken that keeps forcing mints.
pub const MINT_FLOOR_MAX: Duration = Duration::from_secs(900);
/// Forced mints within [`MINT_FLOOR_WINDOW`] before the floor doubles.
pub const MINT_FLOOR_FREE: usize = 3;
/// How far back forced mints count towards the floor.
pub const MINT_FLOOR_WINDOW: Duration = Duration::from_secs(3600);

/// A past mint, as `status.history` records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PastMint {
    pub at: Timestamp,
    /// Whether someone other than the clock asked for it (see
    /// [`RotationReason::forced`]); `false` for entries from before reasons
    /// were recorded.
    pub forced: bool,
}

/// When the next mint may start. Every mint waits [`MINT_FLOOR`] after the
/// last one. A forced mint (a trigger annotation, a deleted or edited
/// Secret, a spec change) also waits for the forced floor: past
/// [`MINT_FLOOR_FREE`] forced mints in the last hour it doubles with each,
/// up to [`MINT_FLOOR_MAX`]. The history is status, which only the operator
/// writes, so no success, forced or not, resets it; and a token its issuer
/// grants for a minute still rotates every 40 s, as its expiry asks.
pub fn mint_floor(recent: &[PastMint], forced: bool, now: Timestamp) -> Option<Timestamp> {
    let base = |t: Timestamp, d: Duration| t.checked_add(SignedDuration::try_from(d).ok()?).ok();
    let last = recent.iter().map(|m| m.at).max()?;
    let floor = base(last, MINT_FLOOR);
    if !forced {
        return floor;
    }
    let window = SignedDuration::try_from(MINT_FLOOR_WINDOW).unwrap_or(SignedDuration::ZERO);
    let forced_recent: Vec<Timestamp> = recent
        .iter()
        .filter(|m| m.forced && now.duration_since(m.at) < window)
        .map(|m| m.at)
        .collect();
    let Some(last_forced) = forced_recent.iter().max() else {
        return floor;
    };
    let doublings = forced_recent.len().saturating_sub(MINT_FLOOR_FREE).min(16) as u32;
    let forced_floor = base(
        *last_forced,
        MINT_FLOOR
            .saturating_mul(1u32 << doublings)
            .min(MINT_FLOOR_MAX),
    );
    floor.max(forced_floor)
}

/// `sha256:` and the first 16 hex characters of the SHA-256 of `token`.
pub fn fingerprint(token: &[u8]) -> String {
    let digest = Sha256::digest(token);
    format!("sha256:{}", &hex::encode(digest)[..16])
}

/// A duration the way a person writes it: `1h30m`, `10m`, `45s`.
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let mut out = String::new();
    for (unit, size) in [("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

/// A stable number in [0, 1) from a key.
fn unit_fraction(key: &str) -> f64 {
    let digest = Sha256::digest(key.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn percentage_window_with_jitter_stays_in_bounds() {
        let issued = ts("2026-01-01T00:00:00Z");
        let expires = ts("2026-01-01T01:00:00Z");
        for i in 0..200 {
            let p = next_rotation(
                issued,
                expires,
                RenewWindow::Percentage(33),
                &format!("k{i}"),
                None,
            );
            // Nominal: 33% of 1h = 19m48s before expiry; jitter adds up to 25% of that.
            let before = expires.duration_since(p.due_at).as_secs_f64();
            assert!((1188.0..=1188.0 * 1.25).contains(&before), "{before}");
            assert_eq!(p.reason, DueReason::Window);
        }
    }

    #[test]
    fn jitter_spreads_tokens_minted_together() {
        let issued = ts("2026-01-01T00:00:00Z");
        let expires = ts("2026-01-01T00:10:00Z");
        let mut seconds: Vec<i64> = (0..1000)
            .map(|i| {
                next_rotation(
                    issued,
                    expires,
                    RenewWindow::Percentage(33),
                    &format!("uid-{i}/1"),
                    None,
                )
                .due_at
                .as_second()
            })
            .collect();
        seconds.sort();
        seconds.dedup();
        // A 10m token has a 198s window and ~49s of jitter: the rotations
        // spread over many distinct seconds rather than one.
        assert!(
            seconds.len() >= 40,
            "only {} distinct seconds",
            seconds.len()
        );
    }

    #[test]
    fn mint_floor_grows_for_a_forced_loop_only() {
        let t0 = ts("2026-01-01T00:00:00Z");
        let at = |s: i64| t0 + SignedDuration::from_secs(s);
        let forced = |s: i64| PastMint {
            at: at(s),
            forced: true,
        };
        let planned = |s: i64| PastMint {
            at: at(s),
            forced: false,
        };
        assert_eq!(mint_floor(&[], true, t0), None);
        // One mint: 10 s, forced or not.
        assert_eq!(mint_floor(&[planned(0)], false, at(1)), Some(at(10)));
        assert_eq!(mint_floor(&[forced(0)], true, at(1)), Some(at(10)));
        // A forced loop: 10 s three times, then 20, 40, 80 ... up to 15 min.
        let mut recent = vec![forced(0), forced(10), forced(20)];
        let mut t = 20;
        let mut gaps = Vec::new();
        for _ in 0..8 {
            let next = mint_floor(&recent, true, at(t + 1)).unwrap();
            let gap = next.duration_since(at(t)).as_secs();
            gaps.push(gap);
            t += gap;
            recent.push(forced(t));
            // status.history keeps the last ten.
            if recent.len() > 10 {
                recent.remove(0);
            }
        }
        assert_eq!(gaps, vec![10, 20, 40, 80, 160, 320, 640, 900], "{gaps:?}");
        // The same history does not hold a rotation the expiry asks for.
        assert_eq!(mint_floor(&recent, false, at(t + 1)), Some(at(t + 10)));
        // A token granted for a minute rotates every 40 s for an hour: the
        // floor never exceeds 10 s for it, and one forced rotation after it
        // waits 10 s too.
        let short: Vec<PastMint> = (0..10).map(|i| planned(i * 40)).collect();
        assert_eq!(mint_floor(&short, false, at(361)), Some(at(370)));
        assert_eq!(mint_floor(&short, true, at(361)), Some(at(370)));
    }

    #[test]
    fn renew_before_not_shorter_than_the_lifetime_falls_back_to_the_default() {
        // `renewBefore: 24h` on a token granted 10m must not make it due at
        // birth (a mint loop): a third of the lifetime left applies instead.
        let issued = ts("2026-01-01T00:00:00Z");
        let expires = ts("2026-01-01T00:10:00Z");
        for before in [600, 3600, 86_400] {
            let p = next_rotation(
                issued,
                expires,
                RenewWindow::Before(Duration::from_secs(before)),
                "k",
                None,
            );
            let after = p.due_at.duration_since(issued).as_secs_f64();
            assert!(
                (300.0..=402.0).contains(&after),
                "{before}: due {after}s after issue"
            );
        }
        let p = next_rotation(
            issued,
            expires,
            RenewWindow::Before(Duration::from_secs(120)),
            "k",
            None,
        );
        let before = expires.duration_since(p.due_at).as_secs_f64();
        assert!((120.0..=150.0).contains(&before), "{before}");
    }

    #[test]
    fn the_real_expiry_drives_rotation_not_the_request() {
        // Asked for 1h, granted 10m: rotation follows the 10m.
        let issued = ts("2026-01-01T00:00:00Z");
        let expires = ts("2026-01-01T00:10:00Z");
        let p = next_rotation(issued, expires, RenewWindow::Percentage(50), "k", None);
        assert!(p.due_at <= ts("2026-01-01T00:05:00Z") && p.due_at >= ts("2026-01-01T00:03:45Z"));
    }

    #[test]
    fn cron_wins_when_earlier() {
        let cron = CronSchedule::parse("0 3 * * *").unwrap();
        let issued = ts("2026-01-01T02:00:00Z");
        let expires = ts("2026-01-02T02:00:00Z");
        let p = next_rotation(
            issued,
            expires,
            RenewWindow::Percentage(33),
            "k",
            Some(&cron),
        );
        assert_eq!(
            p,
            RotationPlan {
                due_at: ts("2026-01-01T03:00:00Z"),
                reason: DueReason::Cron
            }
        );
        // Issued right at the cron time: the next firing is tomorrow, after the window.
        let issued = ts("2026-01-01T03:00:00Z");
        let expires = ts("2026-01-01T04:00:00Z");
        assert_eq!(
            next_rotation(
                issued,
                expires,
                RenewWindow::Percentage(33),
                "k",
                Some(&cron)
            )
            .reason,
            DueReason::Window
        );
    }

    #[test]
    fn bad_cron_says_why() {
        let e = CronSchedule::parse("every day").unwrap_err();
        assert!(e.contains("5 fields") || e.contains("has 2 fields"), "{e}");
        assert!(CronSchedule::parse("61 * * * *").is_err());
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b1 = backoff(1, "k").as_secs_f64();
        let b3 = backoff(3, "k").as_secs_f64();
        let b20 = backoff(20, "k").as_secs_f64();
        assert!((4.0..=6.0).contains(&b1), "{b1}");
        assert!((16.0..=24.0).contains(&b3), "{b3}");
        assert!((240.0..=360.0).contains(&b20), "{b20}");
        assert_ne!(backoff(3, "a"), backoff(3, "b"));
    }

    #[test]
    fn fingerprint_and_durations() {
        assert_eq!(fingerprint(b"abc"), "sha256:ba7816bf8f01cfea");
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
    }
}
