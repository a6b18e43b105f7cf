//! What a pod asks of validation (pure): its `darkcore.io/quorum`, `max-replicas` and
//! `result-paths` annotations over its pool's `spec.validation`, each checked with a clear refusal.

use darkcore_crds::ValidationPolicy;
use darkcore_crds::device_pool::{MAX_MAX_REPLICAS, MAX_QUORUM};
use k8s_openapi::api::core::v1::Pod;

use crate::pods::admission::Refusal;

/// Agreeing results a pod needs (absent: the pool's `spec.validation.quorum`).
pub const QUORUM: &str = "darkcore.io/quorum";
/// The most replicas of a pod, counting re-runs after disagreement.
pub const MAX_REPLICAS: &str = "darkcore.io/max-replicas";
/// Comma-separated absolute paths of files that belong to the result, inside the container.
pub const RESULT_PATHS: &str = "darkcore.io/result-paths";
/// `"false"` leaves stdout out of the result (for programs that print timings, say).
pub const RESULT_STDOUT: &str = "darkcore.io/result-stdout";

/// Result files one pod may declare.
pub const MAX_RESULT_PATHS: usize = 16;

/// How one pod's results are checked: `quorum` agreeing replicas out of at most
/// `max_replicas`, each replica's result being the digest of its exit code, the listed files and
/// (unless `stdout` is false) its stdout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validation {
    pub quorum: u32,
    pub max_replicas: u32,
    pub result_paths: Vec<String>,
    pub stdout: bool,
    /// Seconds a reissued replica has to return its result (the pool's), if limited.
    pub reissue_deadline_seconds: Option<u32>,
}

impl Validation {
    /// `quorum` of at most `max_replicas`, over exit codes and stdout only.
    pub fn quorum_of(quorum: u32, max_replicas: u32) -> Validation {
        Validation {
            quorum,
            max_replicas,
            result_paths: Vec::new(),
            stdout: true,
            reissue_deadline_seconds: None,
        }
    }
}

fn invalid(message: String) -> Refusal {
    Refusal {
        reason: "InvalidValidation",
        message,
    }
}

/// A whole number from `min` to `max` in annotation `key`, or a refusal that says so.
fn whole(key: &str, value: &str, min: u32, max: u32) -> Result<u32, Refusal> {
    value
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            invalid(format!(
                "annotation {key} is {value:?}: give a whole number from {min} to {max}"
            ))
        })
}

/// The paths in `darkcore.io/result-paths`: absolute, without `..`, at most [`MAX_RESULT_PATHS`].
fn result_paths(value: &str) -> Result<Vec<String>, Refusal> {
    let paths: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    if paths.len() > MAX_RESULT_PATHS {
        return Err(invalid(format!(
            "annotation {RESULT_PATHS} lists {} paths: at most {MAX_RESULT_PATHS}; put the results in a directory's files and list fewer",
            paths.len()
        )));
    }
    for path in &paths {
        if !path.starts_with('/') || path.split('/').any(|part| part == "..") {
            return Err(invalid(format!(
                "annotation {RESULT_PATHS} has {path:?}: give absolute paths inside the container, without \"..\""
            )));
        }
    }
    Ok(paths)
}

/// What `pod` asks for over `pool`'s defaults: `None` when its results are taken as they come
/// (a quorum of 1 and no annotation asking for more).
pub fn of(pod: &Pod, pool: &ValidationPolicy) -> Result<Option<Validation>, Refusal> {
    let annotations = pod.metadata.annotations.as_ref();
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    let quorum = match get(QUORUM) {
        Some(value) => whole(QUORUM, value, 1, MAX_QUORUM)?,
        None => pool.quorum,
    };
    let max_replicas = match get(MAX_REPLICAS) {
        Some(value) => whole(MAX_REPLICAS, value, 1, MAX_MAX_REPLICAS)?,
        None => pool.max_replicas.max(quorum),
    };
    if max_replicas < quorum {
        return Err(invalid(format!(
            "annotation {MAX_REPLICAS} is {max_replicas}, below the quorum of {quorum}: no quorum could ever be reached; raise {MAX_REPLICAS} to at least {quorum}"
        )));
    }
    let result_paths = get(RESULT_PATHS).map(result_paths).transpose()?;
    let stdout = match get(RESULT_STDOUT) {
        None | Some("true") => true,
        Some("false") => false,
        Some(other) => {
            return Err(invalid(format!(
                "annotation {RESULT_STDOUT} is {other:?}: give \"true\" or \"false\""
            )));
        }
    };
    if quorum == 1 {
        return Ok(None);
    }
    let result_paths = result_paths.unwrap_or_default();
    if let Some(path) = result_paths.iter().find(|p| !on_a_volume(pod, p)) {
        return Err(invalid(format!(
            "annotation {RESULT_PATHS} has {path:?}, which is on none of the containers' volumeMounts: the device reads result files from volumes only; mount an emptyDir at its directory"
        )));
    }
    Ok(Some(Validation {
        quorum,
        max_replicas,
        result_paths,
        stdout,
        reissue_deadline_seconds: pool.reissue_deadline_seconds,
    }))
}

/// Whether `path` is at or under a volume mount of one of the pod's containers.
fn on_a_volume(pod: &Pod, path: &str) -> bool {
    let containers = pod.spec.iter().flat_map(|s| &s.containers);
    containers
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .any(|m| {
            let mount = m.mount_path.trim_end_matches('/');
            path.strip_prefix(mount)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod with these annotations whose container mounts a volume at /out.
    fn pod(annotations: &[(&str, &str)]) -> Pod {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "spec": {"containers": [{"name": "main", "volumeMounts": [{"name": "out", "mountPath": "/out/"}]}]}
        }))
        .unwrap();
        pod.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        pod
    }

    fn refusal(annotations: &[(&str, &str)]) -> String {
        of(&pod(annotations), &ValidationPolicy::default())
            .unwrap_err()
            .message
    }

    #[test]
    fn a_pod_without_annotations_follows_its_pool() {
        assert_eq!(of(&pod(&[]), &ValidationPolicy::default()), Ok(None));
        let pool = ValidationPolicy {
            quorum: 2,
            max_replicas: 4,
            ..Default::default()
        };
        let asked = of(&pod(&[]), &pool).unwrap().unwrap();
        assert_eq!((asked.quorum, asked.max_replicas), (2, 4));
        assert!(asked.stdout && asked.result_paths.is_empty());
    }

    #[test]
    fn annotations_ask_for_more_than_the_pool() {
        let asked = of(
            &pod(&[
                (QUORUM, "3"),
                (MAX_REPLICAS, "5"),
                (RESULT_PATHS, "/out/result.json, /out/log.txt"),
                (RESULT_STDOUT, "false"),
            ]),
            &ValidationPolicy::default(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            asked,
            Validation {
                quorum: 3,
                max_replicas: 5,
                result_paths: vec!["/out/result.json".into(), "/out/log.txt".into()],
                stdout: false,
                reissue_deadline_seconds: None,
            }
        );
    }

    #[test]
    fn result_files_must_be_on_a_volume() {
        let said = refusal(&[(QUORUM, "2"), (RESULT_PATHS, "/outside/result.json")]);
        assert!(said.contains("mount an emptyDir"), "{said}");
        let said = refusal(&[(QUORUM, "2"), (RESULT_PATHS, "/output.json")]);
        assert!(
            said.contains("on none of the containers' volumeMounts"),
            "{said}"
        );
        let on_it = of(
            &pod(&[(QUORUM, "2"), (RESULT_PATHS, "/out")]),
            &ValidationPolicy::default(),
        );
        assert!(on_it.is_ok(), "{on_it:?}");
    }

    #[test]
    fn a_quorum_alone_gets_at_least_as_many_replicas() {
        let asked = of(&pod(&[(QUORUM, "7")]), &ValidationPolicy::default())
            .unwrap()
            .unwrap();
        assert_eq!((asked.quorum, asked.max_replicas), (7, 7));
    }

    #[test]
    fn a_quorum_of_one_asks_for_nothing() {
        assert_eq!(
            of(&pod(&[(QUORUM, "1")]), &ValidationPolicy::default()),
            Ok(None)
        );
    }

    #[test]
    fn bad_annotations_are_refused_naming_the_fix() {
        let said = refusal(&[(QUORUM, "two")]);
        assert!(
            said.contains("darkcore.io/quorum is \"two\"") && said.contains("from 1 to 10"),
            "{said}"
        );
        let said = refusal(&[(QUORUM, "0")]);
        assert!(said.contains("from 1 to 10"), "{said}");
        let said = refusal(&[(QUORUM, "3"), (MAX_REPLICAS, "2")]);
        assert!(
            said.contains("raise darkcore.io/max-replicas to at least 3"),
            "{said}"
        );
        let said = refusal(&[(QUORUM, "2"), (RESULT_PATHS, "out/result.json")]);
        assert!(said.contains("absolute paths"), "{said}");
        let said = refusal(&[(QUORUM, "2"), (RESULT_PATHS, "/out/../../etc/shadow")]);
        assert!(said.contains("without \"..\""), "{said}");
        let many = (0..17)
            .map(|i| format!("/out/{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let said = refusal(&[(QUORUM, "2"), (RESULT_PATHS, &many)]);
        assert!(said.contains("at most 16"), "{said}");
        let said = refusal(&[(QUORUM, "2"), (RESULT_STDOUT, "no")]);
        assert!(said.contains("\"true\" or \"false\""), "{said}");
        assert_eq!(
            of(&pod(&[(QUORUM, "x")]), &ValidationPolicy::default())
                .unwrap_err()
                .reason,
            "InvalidValidation"
        );
    }
}
