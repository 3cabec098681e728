//! A token bucket for per-socket message rates.

use std::time::Instant;

/// Allows `rate` messages per second on average and bursts of `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes one token at `now`; `false` if the bucket is empty.
    pub fn try_take_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes one token now.
    pub fn try_take(&mut self) -> bool {
        self.try_take_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0);
        let granted = (0..20).filter(|_| b.try_take_at(t0)).count();
        assert_eq!(granted, 5, "a full bucket grants exactly the burst");
        assert!(!b.try_take_at(t0));
        // 0.5 s at 10/s refills 5 tokens.
        let t1 = t0 + Duration::from_millis(500);
        let granted = (0..20).filter(|_| b.try_take_at(t1)).count();
        assert_eq!(granted, 5);
        // Never more than the burst, however long the pause.
        let t2 = t1 + Duration::from_secs(3600);
        let granted = (0..20).filter(|_| b.try_take_at(t2)).count();
        assert_eq!(granted, 5);
    }
}
