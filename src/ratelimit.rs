//! Per-issuer request budgets: a token bucket per issuer that callers spend
//! from or learn when to come back, so the operator never exceeds an
//! issuer's `policy.rateLimit`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    per_second: f64,
    burst: f64,
}

/// Token buckets keyed by issuer.
#[derive(Debug, Default)]
pub struct RateLimiters {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiters {
    /// Spends one request of `key`'s budget if there is one now; otherwise
    /// says how long until there is (nothing is reserved: the caller comes
    /// back then and competes again).
    pub fn try_acquire(&self, key: &str, per_second: f64, burst: u32) -> Result<(), Duration> {
        let per_second = per_second.max(0.001);
        let burst = if burst == 0 {
            per_second.max(1.0).floor()
        } else {
            f64::from(burst)
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let b = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            last: now,
            per_second,
            burst,
        });
        b.per_second = per_second;
        b.burst = burst;
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * b.per_second).min(b.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                ((1.0 - b.tokens) / b.per_second).clamp(0.001, 3600.0),
            ))
        }
    }
}

impl RateLimiters {
    /// Spends one revocation of `key`'s budget under `limit`: the shared
    /// budget first; an urgent revocation (kill switch, revoke annotation,
    /// a stolen copy, a drill) then `limit.emergency`, when the platform
    /// set one. Otherwise says how long until either has one.
    pub fn try_revocation(
        &self,
        key: &str,
        limit: &crate::crd::RateLimit,
        urgent: bool,
    ) -> Result<(), Duration> {
        let shared = self.try_acquire(key, f64::from(limit.per_second), limit.burst);
        match (&limit.emergency, shared) {
            (Some(e), Err(wait)) if urgent => self
                .try_acquire(
                    &format!("{key}#emergency"),
                    f64::from(e.per_second),
                    e.burst,
                )
                .map_err(|w| w.min(wait)),
            (_, shared) => shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    impl RateLimiters {
        /// Waits until `key`'s bucket has a request to spend (the
        /// operator never waits: it requeues for what `try_acquire` says).
        async fn acquire(&self, key: &str, per_second: f64, burst: u32) {
            while let Err(wait) = self.try_acquire(key, per_second, burst) {
                tokio::time::sleep(wait).await;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn never_exceeds_rate_after_the_burst() {
        let limiters = Arc::new(RateLimiters::default());
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let l = limiters.clone();
            tasks.push(tokio::spawn(async move {
                l.acquire("issuer", 10.0, 5).await;
                Instant::now().duration_since(start)
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap().as_secs_f64());
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        // 5 at once, then 10 per second: the 50th goes at 4.5 s.
        assert_eq!(times.iter().filter(|t| **t < 0.001).count(), 5);
        assert!((4.4..=4.6).contains(&times[49]), "{}", times[49]);
        // In any 1 s window at most burst + rate requests.
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..].iter().filter(|u| **u < t + 1.0).count();
            assert!(in_window <= 15, "{in_window} requests within 1s from {t}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn urgent_revocations_spend_the_emergency_budget_only_past_the_shared_one() {
        let limit: crate::crd::RateLimit = serde_json::from_value(serde_json::json!({
            "perSecond": 1, "burst": 2, "emergency": {"perSecond": 10, "burst": 5}
        }))
        .unwrap();
        let l = RateLimiters::default();
        let count = |urgent: bool| {
            (0..100)
                .filter(|_| l.try_revocation("i", &limit, urgent).is_ok())
                .count()
        };
        // The shared burst (2), then nothing for ordinary work.
        assert_eq!(count(false), 2);
        // Urgent: the emergency burst on top (5); ordinary work still waits.
        assert_eq!(count(true), 5);
        assert_eq!(count(false), 0);
        // One second on: 1 shared + 10 emergency for urgent work.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(count(true), 6);
        // Without an emergency budget, urgent work keeps within perSecond.
        let plain: crate::crd::RateLimit =
            serde_json::from_value(serde_json::json!({"perSecond": 1, "burst": 2})).unwrap();
        let count = |urgent: bool| {
            (0..100)
                .filter(|_| l.try_revocation("j", &plain, urgent).is_ok())
                .count()
        };
        assert_eq!(count(true), 2);
        let wait = l.try_revocation("j", &plain, true).unwrap_err();
        assert!((0.99..=1.01).contains(&wait.as_secs_f64()), "{wait:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_independent() {
        let l = RateLimiters::default();
        let start = Instant::now();
        l.acquire("a", 1.0, 1).await;
        l.acquire("b", 1.0, 1).await;
        assert!(Instant::now().duration_since(start) < Duration::from_millis(1));
        l.acquire("a", 1.0, 1).await;
        assert!(Instant::now().duration_since(start) >= Duration::from_millis(999));
    }

    #[tokio::test(start_paused = true)]
    async fn try_acquire_says_when_instead_of_waiting() {
        let l = RateLimiters::default();
        assert_eq!(l.try_acquire("a", 2.0, 1), Ok(()));
        let wait = l.try_acquire("a", 2.0, 1).unwrap_err();
        assert!((0.49..=0.51).contains(&wait.as_secs_f64()), "{wait:?}");
        tokio::time::advance(wait).await;
        assert_eq!(l.try_acquire("a", 2.0, 1), Ok(()));
    }
}
