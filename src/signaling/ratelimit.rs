//! Rate limits: a token bucket for per-socket message rates, and a
//! per-address limit on joins.

use std::net::IpAddr;
use std::time::Instant;

use dashmap::DashMap;

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
        Self::new_at(rate, burst, Instant::now())
    }

    /// A full bucket, as of `now`.
    pub fn new_at(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Whether the bucket would be full at `now`.
    pub fn is_full_at(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
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

/// Addresses tracked before idle ones are forgotten: bounds the memory a
/// scan from many addresses can take.
const MAX_TRACKED_ADDRESSES: usize = 10_000;

/// Limits joins per client IP address: one token bucket per address, kept
/// in a bounded map.
#[derive(Debug)]
pub struct JoinLimiter {
    rate: f64,
    burst: f64,
    exempt_loopback: bool,
    buckets: DashMap<IpAddr, TokenBucket>,
}

impl JoinLimiter {
    /// `rate` joins per second with bursts of `burst` per address; a rate
    /// of 0 disables the limit. Loopback addresses are exempt when
    /// `exempt_loopback` (a local reverse proxy or load test).
    pub fn new(rate: f64, burst: f64, exempt_loopback: bool) -> Self {
        JoinLimiter {
            rate,
            burst,
            exempt_loopback,
            buckets: DashMap::new(),
        }
    }

    /// Counts a join from `ip` at `now`; `false` if over the limit.
    pub fn allow_at(&self, ip: IpAddr, now: Instant) -> bool {
        if self.rate <= 0.0 || (self.exempt_loopback && ip.is_loopback()) {
            return true;
        }
        if self.buckets.len() >= MAX_TRACKED_ADDRESSES && !self.buckets.contains_key(&ip) {
            self.forget_idle(now);
        }
        self.buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new_at(self.rate, self.burst, now))
            .try_take_at(now)
    }

    /// Counts a join from `ip` now.
    pub fn allow(&self, ip: IpAddr) -> bool {
        self.allow_at(ip, Instant::now())
    }

    /// Addresses currently tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    /// Forgets the addresses whose bucket has refilled (they behave as new),
    /// and if that is not enough, all of them: the bound wins over the
    /// limit's memory.
    fn forget_idle(&self, now: Instant) {
        self.buckets.retain(|_, b| !b.is_full_at(now));
        if self.buckets.len() >= MAX_TRACKED_ADDRESSES {
            self.buckets.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn joins_are_limited_per_address_with_a_bounded_map() {
        let t0 = Instant::now();
        let limiter = JoinLimiter::new(1.0, 3.0, true);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let granted = (0..10).filter(|_| limiter.allow_at(a, t0)).count();
        assert_eq!(granted, 3, "the burst, then refused");
        assert!(
            limiter.allow_at(b, t0),
            "another address has its own bucket"
        );
        assert!(limiter.allow_at(a, t0 + Duration::from_secs(1)));
        // Loopback is exempt here; a limiter without the exemption counts it.
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!((0..100).all(|_| limiter.allow_at(lo, t0)));
        let strict = JoinLimiter::new(1.0, 3.0, false);
        assert_eq!((0..10).filter(|_| strict.allow_at(lo, t0)).count(), 3);
        // A disabled limiter grants everything.
        let off = JoinLimiter::new(0.0, 3.0, false);
        assert!((0..100).all(|_| off.allow_at(a, t0)));
        // Many addresses: the map stays bounded.
        let many = JoinLimiter::new(1.0, 3.0, false);
        for i in 0..(MAX_TRACKED_ADDRESSES as u32 + 500) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(many.allow_at(ip, t0));
        }
        assert!(many.tracked() <= MAX_TRACKED_ADDRESSES);
    }

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
