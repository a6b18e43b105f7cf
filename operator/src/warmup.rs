//! The operator's warm-up after a start: until the agents have reattached, it does not know
//! which tasks devices still run, so it places no unrecorded pod, refuses no usage report
//! as unknown, and keeps the capacity nodes publish. It ends as soon as every device the
//! pools last counted online has said Hello, or after a timeout scaled to that fleet.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The least warm-up: agents retry within 0.5 to 8 s, and send Hello at once.
pub const BASE: Duration = Duration::from_secs(10);
/// What each expected device adds to the timeout (19,500 swarm agents reattached in 66 s,
/// 3.4 ms each, on a 2-core machine).
pub const PER_DEVICE: Duration = Duration::from_millis(5);
/// The longest warm-up, however large the fleet.
pub const MOST: Duration = Duration::from_secs(300);

/// How long the warm-up may last for a fleet of `expected` devices.
pub fn timeout(expected: usize) -> Duration {
    let scaled = PER_DEVICE.saturating_mul(u32::try_from(expected).unwrap_or(u32::MAX));
    BASE.saturating_add(scaled).min(MOST)
}

/// Whether a warm-up that began at `started` is over at `now`: every expected device is
/// back, or the timeout has passed.
pub fn over(now: Instant, started: Instant, expected: usize, back: usize) -> bool {
    back >= expected || now >= started + timeout(expected)
}

/// The warm-up shared by the pod controller (which hears the Hellos), the usage recorder and
/// the pool controller.
pub struct Warmup {
    started: Instant,
    expected: usize,
    done: AtomicBool,
    /// It ended with every expected device back (set when it ends).
    all_back: AtomicBool,
    back: Mutex<HashSet<String>>,
}

impl Warmup {
    /// A warm-up from `started`, expecting `expected` devices back (the pools' online count).
    pub fn new(started: Instant, expected: usize) -> Warmup {
        Warmup {
            started,
            expected,
            done: AtomicBool::new(expected == 0),
            all_back: AtomicBool::new(expected == 0),
            back: Mutex::default(),
        }
    }

    /// No warm-up (a fresh start with nothing to wait for, or a benchmark).
    pub fn none() -> Warmup {
        Warmup::new(Instant::now(), 0)
    }

    /// A device said Hello.
    pub fn heard(&self, device: &str) {
        if self.done.load(Ordering::Relaxed) {
            return;
        }
        let back = {
            let mut back = self.back.lock().unwrap_or_else(|e| e.into_inner());
            back.insert(device.to_string());
            back.len()
        };
        if back >= self.expected {
            self.finish(back);
        }
    }

    /// Whether the warm-up is over now.
    pub fn is_over(&self) -> bool {
        if self.done.load(Ordering::Relaxed) {
            return true;
        }
        let back = self.back.lock().unwrap_or_else(|e| e.into_inner()).len();
        let over = over(Instant::now(), self.started, self.expected, back);
        if over {
            self.finish(back);
        }
        over
    }

    /// Whether a pod with no recorded attempt may be placed now. Once every expected device is
    /// back, as soon as the warm-up is over. When it ended at its timeout with devices still
    /// away, only once `fence_wait` (the pool's fence and a margin) has passed since the start:
    /// a device still away may run the pod's task, dispatched by the last leader just before it
    /// stopped and never recorded, until its fence stops it. Placing it sooner would run it
    /// twice at once.
    pub fn places_unrecorded(&self, now: Instant, fence_wait: Duration) -> bool {
        self.is_over()
            && (self.all_back.load(Ordering::Relaxed) || now >= self.started + fence_wait)
    }

    /// When it ends at the latest, for a caller that waits.
    pub fn deadline(&self) -> Instant {
        self.started + timeout(self.expected)
    }

    /// Whether published capacity should still be kept: during the warm-up, and in any case
    /// for `BASE` after the start. Keeping capacity a few seconds too long costs nothing, while
    /// a pools' status that lags the fleet (an operator killed right after a join) would end
    /// the warm-up before devices it did not count are back.
    pub fn keeps_capacity(&self) -> bool {
        Instant::now() < self.started + BASE || !self.is_over()
    }

    fn finish(&self, back: usize) {
        if !self.done.swap(true, Ordering::Relaxed) {
            self.all_back
                .store(back >= self.expected, Ordering::Relaxed);
            tracing::info!(
                "warm-up over after {:.2} s: {back} of {} devices back",
                self.started.elapsed().as_secs_f64(),
                self.expected
            );
            self.back.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_grows_with_the_fleet_within_bounds() {
        assert_eq!(timeout(0), BASE);
        assert_eq!(timeout(1_000), Duration::from_secs(15));
        assert_eq!(timeout(19_500), Duration::from_millis(107_500));
        assert_eq!(timeout(usize::MAX), MOST);
    }

    #[test]
    fn it_ends_when_every_expected_device_is_back_or_at_the_timeout() {
        let started = Instant::now();
        assert!(!over(started, started, 3, 2));
        assert!(over(started, started, 3, 3));
        assert!(over(started + timeout(3), started, 3, 0));
        let warmup = Warmup::new(started, 2);
        assert!(!warmup.is_over());
        warmup.heard("dev-a");
        warmup.heard("dev-a");
        assert!(!warmup.is_over(), "one device twice is one device");
        warmup.heard("dev-b");
        assert!(warmup.is_over());
        assert!(Warmup::none().is_over(), "nothing to wait for");
    }

    #[test]
    fn with_devices_still_away_unrecorded_pods_wait_for_the_fence() {
        let fence_wait = Duration::from_secs(40);
        let started = Instant::now() - timeout(2) - Duration::from_secs(1);
        let warmup = Warmup::new(started, 2);
        warmup.heard("dev-a");
        // Over at its timeout, one device still away: not before the fence has passed.
        assert!(warmup.is_over());
        assert!(!warmup.places_unrecorded(Instant::now(), fence_wait));
        assert!(warmup.places_unrecorded(started + fence_wait, fence_wait));
        // Every device back: at once.
        let back = Warmup::new(Instant::now(), 2);
        back.heard("dev-a");
        back.heard("dev-b");
        assert!(back.places_unrecorded(Instant::now(), fence_wait));
        // Nothing to wait for (a first start).
        assert!(Warmup::none().places_unrecorded(Instant::now(), fence_wait));
    }
}
