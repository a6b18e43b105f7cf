//! Which devices may run another replica of a pod (pure): never one that ran it, never one of
//! an owner who did, and with homogeneous redundancy only on the first replica's platform.

use darkcore_crds::Homogeneous;

/// A device as replica placement sees it. `owner` is the identity given at join, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub device: &'a str,
    pub owner: Option<&'a str>,
    pub os: &'a str,
    pub arch: &'a str,
}

/// Whether `candidate` may run a replica of a pod whose replicas ran or run on `taken`.
pub fn may_take(
    candidate: &Candidate<'_>,
    taken: &[Candidate<'_>],
    homogeneous: Homogeneous,
) -> bool {
    let independent = taken.iter().all(|other| {
        other.device != candidate.device
            && match (other.owner, candidate.owner) {
                (Some(a), Some(b)) => a != b,
                _ => true,
            }
    });
    let same_class = taken.first().is_none_or(|first| match homogeneous {
        Homogeneous::None => true,
        Homogeneous::Arch => first.arch == candidate.arch,
        Homogeneous::OsArch => first.arch == candidate.arch && first.os == candidate.os,
    });
    independent && same_class
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device<'a>(
        device: &'a str,
        owner: Option<&'a str>,
        os: &'a str,
        arch: &'a str,
    ) -> Candidate<'a> {
        Candidate {
            device,
            owner,
            os,
            arch,
        }
    }

    #[test]
    fn a_device_never_runs_two_replicas_of_one_pod() {
        let a = device("dev-a", None, "linux", "amd64");
        assert!(may_take(&a, &[], Homogeneous::None));
        assert!(!may_take(&a, std::slice::from_ref(&a), Homogeneous::None));
        let b = device("dev-b", None, "linux", "amd64");
        assert!(may_take(&b, &[a], Homogeneous::None));
    }

    #[test]
    fn an_owner_never_runs_two_replicas_of_one_pod() {
        let alice_1 = device("dev-1", Some("alice"), "linux", "amd64");
        let alice_2 = device("dev-2", Some("alice"), "linux", "amd64");
        let bob = device("dev-3", Some("bob"), "linux", "amd64");
        let unknown = device("dev-4", None, "linux", "amd64");
        let taken = [alice_1];
        assert!(!may_take(&alice_2, &taken, Homogeneous::None));
        assert!(may_take(&bob, &taken, Homogeneous::None));
        assert!(
            may_take(&unknown, &taken, Homogeneous::None),
            "unknown owners count as distinct"
        );
    }

    #[test]
    fn homogeneous_redundancy_keeps_replicas_on_one_platform() {
        let first = device("dev-1", None, "linux", "amd64");
        let arm = device("dev-2", None, "linux", "arm64");
        let windows = device("dev-3", None, "windows", "amd64");
        let taken = [first];
        assert!(may_take(&arm, &taken, Homogeneous::None));
        assert!(!may_take(&arm, &taken, Homogeneous::Arch));
        assert!(may_take(&windows, &taken, Homogeneous::Arch));
        assert!(!may_take(&windows, &taken, Homogeneous::OsArch));
    }
}
