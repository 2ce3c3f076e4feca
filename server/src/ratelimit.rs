//! Token-bucket rate limiting, keyed by whatever the caller limits on (source address,
//! (claimer, target), sender). In memory: limits reset on restart, which is acceptable for
//! abuse control. Refill is measured against the server's [`Clock`].

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::clock::Clock;

/// The key a source address is limited by: an IPv4 address (also when it arrives as an
/// IPv4-mapped IPv6 address) as it is, an IPv6 address as its network of `ipv6_prefix` bits.
pub fn source_key(addr: std::net::IpAddr, ipv6_prefix: u8) -> std::net::IpAddr {
    use std::net::IpAddr;
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u32::from(ipv6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        },
    }
}

/// When the map grows past this, full buckets are dropped (they carry no information), at
/// most once per [`PRUNE_EVERY`]: a map kept large by keys that stay partly drained is not
/// scanned on every check.
const PRUNE_AT: usize = 100_000;
/// Least time between two prunes.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Most keys held: past it (keys that a prune cannot drop), new keys are refused until some
/// refill, so memory stays bounded whatever the keys.
const MAX_KEYS: usize = 1_000_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// A token bucket per key: `burst` tokens, refilled at `per_second`.
#[derive(Debug)]
pub struct RateLimiter<K> {
    per_second: f64,
    burst: f64,
    max_keys: usize,
    clock: Clock,
    buckets: Mutex<Buckets<K>>,
}

#[derive(Debug)]
struct Buckets<K> {
    map: HashMap<K, Bucket>,
    pruned: Option<Instant>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter allowing `burst` at once and `per_second` sustained.
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst: f64::from(burst.max(1)),
            max_keys: MAX_KEYS,
            clock: Clock::system(),
            buckets: Mutex::new(Buckets {
                map: HashMap::new(),
                pruned: None,
            }),
        }
    }

    /// The same limiter, measuring refill against `clock` (the system clock by default).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    #[cfg(test)]
    fn with_max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// Takes one token for each key, all or none. On refusal, how long until all keys have one.
    pub fn check_all(&self, keys: &[K]) -> Result<(), Duration> {
        self.check_all_at(keys, self.clock.instant())
    }

    /// Takes one token for `key`.
    pub fn check(&self, key: K) -> Result<(), Duration> {
        let now = self.clock.instant();
        match self.take_known(&key, now) {
            Some(outcome) => outcome,
            None => self.check_all_at(&[key], now),
        }
    }

    /// [`RateLimiter::check`] of a key that has a bucket already (the usual case): one lookup,
    /// no copy of the key, and nothing to prune or bound, as the map does not grow. `None` for
    /// a key without a bucket.
    fn take_known(&self, key: &K, now: Instant) -> Option<Result<(), Duration>> {
        let mut buckets = match self.buckets.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let bucket = buckets.map.get_mut(key)?;
        let tokens = refill(bucket, now, self.per_second, self.burst);
        if tokens < 1.0 {
            return Some(Err(self.wait_for(tokens)));
        }
        bucket.tokens = tokens - 1.0;
        bucket.updated = now;
        Some(Ok(()))
    }

    /// How long until a bucket holding `tokens` (fewer than one) has one.
    fn wait_for(&self, tokens: f64) -> Duration {
        let missing = (1.0 - tokens) / self.per_second.max(f64::MIN_POSITIVE);
        Duration::from_secs_f64(missing.min(86_400.0))
    }

    fn check_all_at(&self, keys: &[K], now: Instant) -> Result<(), Duration> {
        let mut buckets = match self.buckets.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let new_keys = keys
            .iter()
            .filter(|k| !buckets.map.contains_key(*k))
            .count();
        let crowded = buckets.map.len() > PRUNE_AT || buckets.map.len() + new_keys > self.max_keys;
        let due = buckets
            .pruned
            .is_none_or(|at| now.saturating_duration_since(at) >= PRUNE_EVERY);
        if crowded && due {
            let (rate, burst) = (self.per_second, self.burst);
            buckets
                .map
                .retain(|_, b| refill(b, now, rate, burst) < burst);
            buckets.pruned = Some(now);
        }
        let buckets = &mut buckets.map;
        if buckets.len() + new_keys > self.max_keys {
            return Err(PRUNE_EVERY);
        }
        let mut wait = Duration::ZERO;
        for key in keys {
            let bucket = buckets.get(key).copied().unwrap_or(Bucket {
                tokens: self.burst,
                updated: now,
            });
            let tokens = refill(&bucket, now, self.per_second, self.burst);
            if tokens < 1.0 {
                wait = wait.max(self.wait_for(tokens));
            }
        }
        if wait > Duration::ZERO {
            return Err(wait);
        }
        for key in keys {
            let bucket = buckets.entry(key.clone()).or_insert(Bucket {
                tokens: self.burst,
                updated: now,
            });
            bucket.tokens = refill(bucket, now, self.per_second, self.burst) - 1.0;
            bucket.updated = now;
        }
        Ok(())
    }
}

fn refill(bucket: &Bucket, now: Instant, per_second: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
    (bucket.tokens + elapsed * per_second).min(burst)
}

#[cfg(test)]
mod tests {

    #[test]
    fn ipv6_sources_share_their_network_and_ipv4_stays_per_address() {
        use std::net::IpAddr;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let limiter = RateLimiter::new(0.0001, 2);
        // Two registrations from one /64, whatever the host part: the third is refused.
        for host in ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9"] {
            limiter.check(source_key(ip(host), 64)).unwrap();
        }
        assert!(
            limiter
                .check(source_key(ip("2001:db8:1:2::77"), 64))
                .is_err()
        );
        // Another /64 has its own budget.
        limiter
            .check(source_key(ip("2001:db8:1:3::1"), 64))
            .unwrap();
        // IPv4, also mapped into IPv6, is per address.
        assert_eq!(source_key(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(source_key(ip("192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(source_key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(source_key(ip("2001:db8::1"), 0), ip("::"));
    }

    use super::*;

    #[test]
    fn keys_are_bounded_and_full_buckets_make_room() {
        let limiter = RateLimiter::new(1.0, 2).with_max_keys(3);
        let start = Instant::now();
        for key in ["a", "b", "c"] {
            limiter.check_all_at(&[key], start).unwrap();
        }
        // A fourth key while the three are partly drained: refused, the others still served.
        assert!(limiter.check_all_at(&["d"], start).is_err());
        limiter.check_all_at(&["a"], start).unwrap();
        // Once they refilled, a prune drops them and the new key gets in.
        let later = start + Duration::from_secs(5);
        limiter.check_all_at(&["d"], later).unwrap();
        // Prunes are spaced: right after one, a full map is not scanned again.
        let buckets = limiter.buckets.lock().unwrap();
        assert_eq!(buckets.map.len(), 1);
        assert_eq!(buckets.pruned, Some(later));
    }

    #[test]
    fn burst_then_refill() {
        let limiter = RateLimiter::new(1.0, 3);
        let start = Instant::now();
        for _ in 0..3 {
            limiter.check_all_at(&["a"], start).unwrap();
        }
        let wait = limiter.check_all_at(&["a"], start).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        // Other keys are independent.
        limiter.check_all_at(&["b"], start).unwrap();
        limiter
            .check_all_at(&["a"], start + Duration::from_secs(1))
            .unwrap();
    }

    /// One key's checks (a bucket that exists after the first): the burst, then a refusal
    /// saying how long until the next token, then the refill, as `check_all` counts them.
    #[test]
    fn a_known_key_spends_its_burst_then_refills() {
        let clock = crate::clock::ManualClock::new();
        let limiter = RateLimiter::new(2.0, 3).with_clock(clock.clock());
        for _ in 0..3 {
            limiter.check("a").unwrap();
        }
        let wait = limiter.check("a").unwrap_err();
        assert!(wait > Duration::from_millis(450) && wait <= Duration::from_millis(500));
        // A refusal takes nothing: half a second later the one token is there, once.
        clock.advance(Duration::from_millis(500));
        limiter.check("a").unwrap();
        assert!(limiter.check("a").is_err());
        // The same bucket seen through check_all.
        assert!(limiter.check_all(&["a"]).is_err());
        limiter.check("b").unwrap();
    }

    #[test]
    fn all_or_nothing() {
        let limiter = RateLimiter::new(1.0, 1);
        let now = Instant::now();
        limiter.check_all_at(&["a"], now).unwrap();
        assert!(limiter.check_all_at(&["b", "a"], now).is_err());
        // "b" was not consumed by the refused call.
        limiter.check_all_at(&["b"], now).unwrap();
    }
}
