//! How reliable a device is: the share of time it was connected, of the time the operator
//! observed it, each stretch weighing less as it ages (halved every day). Pure; the reputation
//! store keeps the counters durably, and reissued replicas go first to reliable devices.

/// Observed time loses half its weight in this long.
pub const HALF_LIFE_MS: u64 = 24 * 60 * 60 * 1000;

/// A device's decayed counters: time connected, and time observed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Uptime {
    pub online_ms: u64,
    pub observed_ms: u64,
}

impl Uptime {
    /// Adds a stretch of `ms`, connected or not, after ageing what came before by it.
    pub fn observe(self, ms: u64, online: bool) -> Uptime {
        let kept = 0.5f64.powf(ms as f64 / HALF_LIFE_MS as f64);
        let age = |value: u64| (value as f64 * kept) as u64;
        Uptime {
            online_ms: age(self.online_ms).saturating_add(if online { ms } else { 0 }),
            observed_ms: age(self.observed_ms).saturating_add(ms),
        }
    }

    /// The share connected, in parts per million; none before anything was observed.
    pub fn ppm(&self) -> Option<u32> {
        (self.observed_ms > 0).then(|| {
            let share = u128::from(self.online_ms.min(self.observed_ms)) * 1_000_000
                / u128::from(self.observed_ms);
            share as u32
        })
    }
}

/// A device's reliability for placement: its share, or an even chance when nothing is known.
pub fn for_placement(ppm: Option<u32>) -> u32 {
    ppm.unwrap_or(500_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_that_drops_off_half_the_time_is_half_reliable_and_recent_time_weighs_most() {
        let steady = Uptime::default().observe(3_600_000, true);
        assert_eq!(steady.ppm(), Some(1_000_000));
        let flaky = Uptime::default()
            .observe(60_000, true)
            .observe(60_000, false)
            .observe(60_000, true)
            .observe(60_000, false);
        let share = flaky.ppm().unwrap();
        assert!((499_000..=501_000).contains(&share), "{share}");
        // A day offline after a day online: the recent day counts twice as much.
        let left = Uptime::default()
            .observe(HALF_LIFE_MS, true)
            .observe(HALF_LIFE_MS, false);
        let share = left.ppm().unwrap();
        assert!((330_000..=336_000).contains(&share), "{share}");
        assert_eq!(Uptime::default().ppm(), None);
        assert_eq!(for_placement(None), 500_000);
    }
}
