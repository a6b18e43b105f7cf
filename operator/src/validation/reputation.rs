//! How far a device's results are trusted (pure), by BOINC's rule: an error rate that starts at
//! 0.1, shrinks by 5% with each validated result and grows by 0.05 with each invalid one.
//! Trusted devices run quorum pods alone but for spot checks; bad ones are quarantined.

use darkcore_crds::AdaptiveReplication;
use serde::{Deserialize, Serialize};

/// A new device's error rate: one result in ten assumed wrong until it proves otherwise.
pub const INITIAL_ERROR_RATE: f64 = 0.1;
/// Each validated result multiplies the error rate by this.
pub const VALIDATED_FACTOR: f64 = 0.95;
/// Each invalid result adds this to the error rate (at most 1).
pub const INVALID_STEP: f64 = 0.05;

/// One device's record of judged results.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reputation {
    pub error_rate: f64,
    pub validated: u64,
    pub invalid: u64,
}

impl Default for Reputation {
    fn default() -> Self {
        Reputation {
            error_rate: INITIAL_ERROR_RATE,
            validated: 0,
            invalid: 0,
        }
    }
}

/// Where a device stands for the pods that ask for a quorum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Its results are replicated and checked.
    Unproven,
    /// It may run a quorum pod alone, but for spot checks.
    Trusted,
    /// It is no longer enlisted: its error rate passed the pool's limit.
    Quarantined,
}

/// How a quorum pod's first replicas are planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Run the quorum of replicas and compare them.
    Replicate,
    /// Run it once on the trusted device: the result is accepted unverified.
    Alone,
}

impl Reputation {
    /// The record after a result of this device agreed with the canonical one.
    pub fn validated(self) -> Reputation {
        Reputation {
            error_rate: self.error_rate * VALIDATED_FACTOR,
            validated: self.validated + 1,
            ..self
        }
    }

    /// The record after a result of this device disagreed with the canonical one.
    pub fn invalid(self) -> Reputation {
        Reputation {
            error_rate: (self.error_rate + INVALID_STEP).min(1.0),
            invalid: self.invalid + 1,
            ..self
        }
    }

    /// The error rate in parts per million, as stored: thresholds compare in whole numbers,
    /// so 0.1 + 0.05 is exactly 15%, not a hair above it.
    pub fn error_rate_ppm(&self) -> u32 {
        (self.error_rate * 1e6).round().clamp(0.0, 1e6) as u32
    }

    /// Where the device stands under `policy`.
    pub fn standing(&self, policy: &AdaptiveReplication) -> Standing {
        let ppm = self.error_rate_ppm();
        let percent_ppm = |percent: u32| percent.saturating_mul(10_000);
        if ppm > percent_ppm(policy.quarantine_error_rate_percent) {
            Standing::Quarantined
        } else if policy.enabled
            && self.validated >= u64::from(policy.min_validated)
            && ppm <= percent_ppm(policy.trusted_error_rate_percent)
        {
            Standing::Trusted
        } else {
            Standing::Unproven
        }
    }
}

/// The plan for a quorum pod whose first device stands at `standing`; `draw` is uniform in
/// [0, 100): below the pool's spot-check percentage, a trusted device is checked anyway.
pub fn plan(standing: Standing, policy: &AdaptiveReplication, draw: f64) -> Plan {
    match standing {
        Standing::Trusted if draw >= f64::from(policy.spot_check_percent) => Plan::Alone,
        _ => Plan::Replicate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AdaptiveReplication {
        AdaptiveReplication::default()
    }

    fn after(validated: usize, invalid: usize) -> Reputation {
        let mut reputation = Reputation::default();
        for _ in 0..validated {
            reputation = reputation.validated();
        }
        for _ in 0..invalid {
            reputation = reputation.invalid();
        }
        reputation
    }

    #[test]
    fn a_new_device_is_unproven_and_replicated() {
        let fresh = Reputation::default();
        assert_eq!(fresh.error_rate, 0.1);
        assert_eq!(fresh.standing(&policy()), Standing::Unproven);
        assert_eq!(
            plan(fresh.standing(&policy()), &policy(), 99.0),
            Plan::Replicate
        );
    }

    #[test]
    fn validated_results_earn_trust() {
        // 0.1 * 0.95^14 = 0.0488: under 5% after 14 validated results.
        assert_eq!(after(13, 0).standing(&policy()), Standing::Unproven);
        let trusted = after(14, 0);
        assert!((trusted.error_rate - 0.04877).abs() < 1e-4, "{trusted:?}");
        assert_eq!(trusted.standing(&policy()), Standing::Trusted);
    }

    #[test]
    fn trusted_devices_run_alone_but_for_spot_checks() {
        let policy = policy();
        assert_eq!(policy.spot_check_percent, 10);
        assert_eq!(plan(Standing::Trusted, &policy, 9.99), Plan::Replicate);
        assert_eq!(plan(Standing::Trusted, &policy, 10.0), Plan::Alone);
        let off = AdaptiveReplication {
            enabled: false,
            ..policy
        };
        assert_eq!(after(50, 0).standing(&off), Standing::Unproven);
    }

    #[test]
    fn a_liar_is_quarantined_after_five_invalid_results() {
        // 0.1 + 4 * 0.05 = 0.30 is not past 30%; the fifth passes it.
        assert_eq!(after(0, 4).standing(&policy()), Standing::Unproven);
        assert_eq!(after(0, 5).standing(&policy()), Standing::Quarantined);
        assert_eq!(
            plan(Standing::Quarantined, &policy(), 99.0),
            Plan::Replicate
        );
    }

    #[test]
    fn an_invalid_result_costs_a_trusted_device_its_trust() {
        let trusted = after(20, 0);
        assert_eq!(trusted.standing(&policy()), Standing::Trusted);
        assert_eq!(trusted.invalid().standing(&policy()), Standing::Unproven);
        assert_eq!(after(0, 40).error_rate, 1.0, "never above 1");
    }

    #[test]
    fn thresholds_are_met_exactly_not_by_rounding_errors() {
        let policy = AdaptiveReplication {
            quarantine_error_rate_percent: 15,
            ..policy()
        };
        // 0.1 + 0.05 is 0.15000000000000002 in floating point: still exactly 15%.
        assert_eq!(after(0, 1).standing(&policy), Standing::Unproven);
        assert_eq!(after(0, 2).standing(&policy), Standing::Quarantined);
    }
}
