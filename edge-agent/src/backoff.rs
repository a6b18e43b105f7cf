//! Reconnect delays: exponential with full jitter, capped, reset after a connection that
//! lasted. A fleet that lost its operator at the same moment does not come back in lockstep.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    attempt: u32,
    seed: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            initial,
            max,
            attempt: 0,
            seed: seed | 1,
        }
    }

    /// The next delay: uniform in [ceiling/2, ceiling], where the ceiling doubles per attempt
    /// up to `max`. Half the ceiling is kept, so retries never bunch up at zero.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt += 1;
        let fraction = 0.5 + 0.5 * self.random_unit();
        ceiling.mul_f64(fraction)
    }

    /// After a connection that worked for a while, start again from `initial`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// xorshift64: plenty for jitter, and no dependency.
    fn random_unit(&mut self) -> f64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        (self.seed >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stay_jittered() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 42);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(500) && delays[0] <= Duration::from_secs(1));
        assert!(delays[3] >= Duration::from_secs(4) && delays[3] <= Duration::from_secs(8));
        for d in &delays[8..] {
            assert!(
                *d >= Duration::from_secs(30) && *d <= Duration::from_secs(60),
                "{d:?}"
            );
        }
    }

    #[test]
    fn two_agents_with_different_seeds_do_not_retry_in_lockstep() {
        let mut a = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 1);
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 2);
        let same = (0..10).filter(|_| a.next_delay() == b.next_delay()).count();
        assert!(same < 2);
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 7);
        for _ in 0..6 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
