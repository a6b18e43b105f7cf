//! How fast devices may join: a token bucket per source address and one for all joins, checked
//! before a join costs anything (no parsing, no signing, no API call), so a flood of joins,
//! well-formed or not, is refused cheaply and says when to try again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Source addresses tracked at once; beyond, idle ones are forgotten first.
pub const SOURCES: usize = 65_536;

/// A rate: joins per second, and how many may come at once after a quiet time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    /// `per_second`, with a burst of ten seconds' worth (at least one).
    pub fn per_second(per_second: f64) -> Rate {
        Rate {
            per_second,
            burst: (per_second * 10.0).max(1.0),
        }
    }
}

/// A token bucket: how many joins it holds, as of when.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: rate.burst,
            at: now,
        }
    }

    fn refilled(self, rate: Rate, now: Instant) -> Bucket {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        Bucket {
            tokens: (self.tokens + elapsed * rate.per_second).min(rate.burst),
            at: now,
        }
    }

    /// Takes one join, or says how long until one is there.
    pub fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        *self = self.refilled(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        Err(Duration::from_secs_f64(missing / rate.per_second.max(1e-9)))
    }

    fn is_full(self, rate: Rate, now: Instant) -> bool {
        self.refilled(rate, now).tokens >= rate.burst
    }
}

/// Why a join was refused before anything else was looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Throttled {
    /// Too many from this address.
    Source(Duration),
    /// Too many from everywhere.
    Overall(Duration),
}

impl Throttled {
    pub fn message(self) -> String {
        let (whose, wait) = match self {
            Throttled::Source(wait) => ("from this address", wait),
            Throttled::Overall(wait) => ("to this operator", wait),
        };
        format!(
            "too many joins {whose} just now; try again in {} s (the operator's --join-rate and --join-rate-per-source set the limits)",
            wait.as_secs().max(1)
        )
    }
}

pub struct JoinLimiter {
    per_source: Rate,
    overall: Rate,
    state: Mutex<(Bucket, HashMap<IpAddr, Bucket>)>,
}

impl JoinLimiter {
    pub fn new(per_source: Rate, overall: Rate) -> JoinLimiter {
        JoinLimiter {
            per_source,
            overall,
            state: Mutex::new((Bucket::full(overall, Instant::now()), HashMap::new())),
        }
    }

    /// Admits one join from `source` at `now`, or says why not. A join refused for its source
    /// costs the others nothing.
    pub fn admit(&self, source: Option<IpAddr>, now: Instant) -> Result<(), Throttled> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (overall, sources) = &mut *state;
        if let Some(source) = source {
            if sources.len() >= SOURCES && !sources.contains_key(&source) {
                sources.retain(|_, bucket| !bucket.is_full(self.per_source, now));
            }
            if sources.len() < SOURCES || sources.contains_key(&source) {
                let bucket = sources
                    .entry(source)
                    .or_insert_with(|| Bucket::full(self.per_source, now));
                let mut trial = *bucket;
                trial
                    .take(self.per_source, now)
                    .map_err(Throttled::Source)?;
                overall
                    .take(self.overall, now)
                    .map_err(Throttled::Overall)?;
                *bucket = trial;
                return Ok(());
            }
        }
        overall.take(self.overall, now).map_err(Throttled::Overall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let rate = Rate {
            per_second: 2.0,
            burst: 3.0,
        };
        let start = Instant::now();
        let mut bucket = Bucket::full(rate, start);
        for _ in 0..3 {
            bucket.take(rate, start).unwrap();
        }
        let wait = bucket.take(rate, start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        bucket.take(rate, start + wait).unwrap();
        assert!(bucket.take(rate, start + wait).is_err());
        // A long quiet time refills to the burst, no more.
        let later = start + Duration::from_secs(3600);
        for _ in 0..3 {
            bucket.take(rate, later).unwrap();
        }
        assert!(bucket.take(rate, later).is_err());
    }

    #[test]
    fn one_noisy_address_is_held_back_and_the_others_still_join() {
        let limiter = JoinLimiter::new(Rate::per_second(1.0), Rate::per_second(100.0));
        let now = Instant::now();
        let noisy: IpAddr = "192.0.2.1".parse().unwrap();
        let quiet: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..10 {
            limiter.admit(Some(noisy), now).unwrap();
        }
        let refused = limiter.admit(Some(noisy), now).unwrap_err();
        assert_eq!(refused, Throttled::Source(Duration::from_secs(1)));
        assert!(refused.message().contains("from this address"));
        limiter.admit(Some(quiet), now).unwrap();
        limiter
            .admit(Some(noisy), now + Duration::from_secs(1))
            .unwrap();
    }

    #[test]
    fn all_addresses_together_are_held_to_the_overall_rate() {
        let limiter = JoinLimiter::new(Rate::per_second(100.0), Rate::per_second(0.5));
        let now = Instant::now();
        for i in 0..5u8 {
            limiter
                .admit(Some(IpAddr::from([192, 0, 2, i])), now)
                .unwrap();
        }
        let refused = limiter.admit(Some(IpAddr::from([192, 0, 2, 99])), now);
        assert_eq!(refused, Err(Throttled::Overall(Duration::from_secs(2))));
        // Refused overall: its own bucket was not charged.
        limiter
            .admit(
                Some(IpAddr::from([192, 0, 2, 99])),
                now + Duration::from_secs(2),
            )
            .unwrap();
    }

    #[test]
    fn the_addresses_remembered_are_bounded() {
        let limiter = JoinLimiter::new(Rate::per_second(1.0), Rate::per_second(1e9));
        let now = Instant::now();
        for i in 0..(SOURCES as u32 + 10) {
            let _ = limiter.admit(Some(IpAddr::from(i.to_be_bytes())), now);
        }
        let state = limiter.state.lock().unwrap();
        assert!(state.1.len() <= SOURCES);
    }
}
