//! When a pod's replicas agree (pure), as BOINC's validator decides: results grouped by digest
//! give Validated, more replicas, waiting, or NoQuorum once no group can reach the quorum.

use super::policy::Validation;

/// One finished replica: the device that ran it and the digest of its result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub device: String,
    pub digest: String,
}

/// What to do next with a pod's replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// `quorum` results agree. The first of them is canonical: its output is the pod's.
    Validated {
        digest: String,
        canonical: String,
        agreeing: Vec<String>,
    },
    /// Start this many more replicas, on devices that have not run this pod.
    RunMore(u32),
    /// Enough replicas are running to reach the quorum: wait for them.
    Wait,
    /// No digest can reach the quorum within `max_replicas`: each digest, with its devices.
    NoQuorum { digests: Vec<(String, Vec<String>)> },
}

/// The digests seen so far, in the order each first came, with the devices that gave them.
fn groups(finished: &[Outcome]) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for outcome in finished {
        match groups
            .iter_mut()
            .find(|(digest, _)| *digest == outcome.digest)
        {
            Some((_, devices)) => devices.push(outcome.device.clone()),
            None => groups.push((outcome.digest.clone(), vec![outcome.device.clone()])),
        }
    }
    groups
}

/// Decides on `finished` replicas (in the order they finished) while `running` more run. Only
/// a device's first result counts: one device never makes a quorum with itself.
pub fn decide(finished: &[Outcome], running: u32, validation: &Validation) -> Decision {
    let mut seen = std::collections::HashSet::new();
    let finished: Vec<Outcome> = finished
        .iter()
        .filter(|o| seen.insert(o.device.as_str()))
        .cloned()
        .collect();
    let finished = finished.as_slice();
    let quorum = validation.quorum as usize;
    // The first digest to gather a quorum wins, and its first result is canonical.
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for outcome in finished {
        let count = match counts.iter_mut().find(|(d, _)| *d == outcome.digest) {
            Some((_, count)) => {
                *count += 1;
                *count
            }
            None => {
                counts.push((&outcome.digest, 1));
                1
            }
        };
        if count >= quorum {
            let agreeing: Vec<String> = finished
                .iter()
                .filter(|o| o.digest == outcome.digest)
                .map(|o| o.device.clone())
                .take(quorum)
                .collect();
            return Decision::Validated {
                digest: outcome.digest.clone(),
                canonical: agreeing[0].clone(),
                agreeing,
            };
        }
    }
    let best = counts.iter().map(|(_, count)| *count).max().unwrap_or(0) as u32;
    let started = finished.len() as u32 + running;
    let left = validation.max_replicas.saturating_sub(started);
    if best + running + left < validation.quorum {
        return Decision::NoQuorum {
            digests: groups(finished),
        };
    }
    let needed = validation.quorum - best;
    if running >= needed {
        Decision::Wait
    } else {
        Decision::RunMore((needed - running).min(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validation(quorum: u32, max_replicas: u32) -> Validation {
        Validation::quorum_of(quorum, max_replicas)
    }

    fn outcomes(results: &[(&str, &str)]) -> Vec<Outcome> {
        results
            .iter()
            .map(|(device, digest)| Outcome {
                device: device.to_string(),
                digest: digest.to_string(),
            })
            .collect()
    }

    #[test]
    fn a_new_pod_starts_a_quorum_of_replicas() {
        assert_eq!(decide(&[], 0, &validation(2, 5)), Decision::RunMore(2));
        assert_eq!(decide(&[], 2, &validation(2, 5)), Decision::Wait);
        assert_eq!(decide(&[], 1, &validation(3, 5)), Decision::RunMore(2));
    }

    #[test]
    fn agreeing_results_validate_with_the_first_as_canonical() {
        let finished = outcomes(&[("dev-b", "aa"), ("dev-a", "aa")]);
        assert_eq!(
            decide(&finished, 0, &validation(2, 5)),
            Decision::Validated {
                digest: "aa".into(),
                canonical: "dev-b".into(),
                agreeing: vec!["dev-b".into(), "dev-a".into()],
            }
        );
    }

    #[test]
    fn one_result_of_two_waits_for_the_other() {
        let finished = outcomes(&[("dev-a", "aa")]);
        assert_eq!(decide(&finished, 1, &validation(2, 5)), Decision::Wait);
    }

    #[test]
    fn disagreement_starts_another_replica() {
        let finished = outcomes(&[("dev-a", "aa"), ("liar", "bb")]);
        assert_eq!(
            decide(&finished, 0, &validation(2, 5)),
            Decision::RunMore(1)
        );
        let finished = outcomes(&[("dev-a", "aa"), ("liar", "bb"), ("dev-c", "aa")]);
        match decide(&finished, 0, &validation(2, 5)) {
            Decision::Validated {
                canonical,
                agreeing,
                ..
            } => {
                assert_eq!(canonical, "dev-a");
                assert_eq!(agreeing, vec!["dev-a", "dev-c"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_device_agreeing_with_itself_is_no_quorum() {
        let finished = outcomes(&[("liar", "bb"), ("liar", "bb")]);
        assert_eq!(
            decide(&finished, 0, &validation(2, 5)),
            Decision::RunMore(1)
        );
    }

    #[test]
    fn the_first_digest_to_reach_the_quorum_wins() {
        let finished = outcomes(&[("a", "x"), ("b", "y"), ("c", "y"), ("d", "x")]);
        match decide(&finished, 0, &validation(2, 5)) {
            Decision::Validated { digest, .. } => assert_eq!(digest, "y"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_quorum_once_no_digest_can_reach_it() {
        let finished = outcomes(&[("a", "x"), ("b", "y"), ("c", "z")]);
        assert_eq!(
            decide(&finished, 0, &validation(2, 3)),
            Decision::NoQuorum {
                digests: vec![
                    ("x".into(), vec!["a".into()]),
                    ("y".into(), vec!["b".into()]),
                    ("z".into(), vec!["c".into()]),
                ]
            }
        );
        // One replica left to start could still agree with one of them.
        assert_eq!(
            decide(&finished, 0, &validation(2, 4)),
            Decision::RunMore(1)
        );
        // A replica still running could too.
        assert_eq!(decide(&finished, 1, &validation(2, 4)), Decision::Wait);
    }

    #[test]
    fn never_more_replicas_than_the_pod_allows() {
        let finished = outcomes(&[("a", "x")]);
        assert_eq!(
            decide(&finished, 0, &validation(3, 2)),
            Decision::NoQuorum {
                digests: vec![("x".into(), vec!["a".into()])]
            }
        );
        let finished = outcomes(&[("a", "x"), ("b", "y")]);
        assert_eq!(
            decide(&finished, 0, &validation(3, 5)),
            Decision::RunMore(2)
        );
        let finished = outcomes(&[("a", "x"), ("b", "y"), ("c", "z")]);
        // Two more could still both agree with one of them.
        assert_eq!(
            decide(&finished, 0, &validation(3, 5)),
            Decision::RunMore(2)
        );
        assert_eq!(
            decide(&finished, 0, &validation(3, 4)),
            Decision::NoQuorum {
                digests: vec![
                    ("x".into(), vec!["a".into()]),
                    ("y".into(), vec!["b".into()]),
                    ("z".into(), vec!["c".into()]),
                ]
            }
        );
    }
}
