//! Whether a pod bound to a pool's node may run there at all (pure): its namespace and
//! runtime must be allowed by the pool, and it may not ask for what a device cannot give
//! (host network, host paths, persistent volumes, privileged containers).

use darkcore_crds::{DevicePoolSpec, Runtime};
use k8s_openapi::api::core::v1::Pod;

/// RuntimeClasses darkcore ships, and the runtime each selects.
pub const RUNTIME_CLASSES: [(&str, Runtime); 3] = [
    ("darkcore-process", Runtime::Process),
    ("darkcore-oci", Runtime::Oci),
    ("darkcore-wasm", Runtime::Wasm),
];

/// Why a pod is refused: shown as the pod's reason and message, and in a Warning Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

fn refuse(reason: &'static str, message: String) -> Refusal {
    Refusal { reason, message }
}

/// The runtime a pod asks for: its darkcore RuntimeClass, or `oci` when it names none.
pub fn runtime_of(pod: &Pod) -> Result<Runtime, Refusal> {
    let class = pod
        .spec
        .as_ref()
        .and_then(|s| s.runtime_class_name.as_deref());
    match class {
        None => Ok(Runtime::Oci),
        Some(name) => RUNTIME_CLASSES
            .iter()
            .find(|(class, _)| *class == name)
            .map(|(_, runtime)| *runtime)
            .ok_or_else(|| {
                refuse(
                    "UnknownRuntimeClass",
                    format!(
                        "runtimeClassName {name:?} is not one of darkcore's: use darkcore-process, darkcore-oci or darkcore-wasm"
                    ),
                )
            }),
    }
}

/// Checks a pod against its pool; returns the runtime it will run in.
pub fn admit(pool_name: &str, pool: &DevicePoolSpec, pod: &Pod) -> Result<Runtime, Refusal> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    if !pool.allowed_namespaces.is_empty()
        && !pool.allowed_namespaces.iter().any(|n| n == namespace)
    {
        return Err(refuse(
            "NamespaceNotAllowed",
            format!(
                "pool {pool_name} does not allow pods from namespace {namespace} (it allows {}): run the pod in one of those, or add the namespace to the pool's spec.allowedNamespaces",
                pool.allowed_namespaces.join(", ")
            ),
        ));
    }
    let runtime = runtime_of(pod)?;
    if !pool.runtimes.contains(&runtime) {
        let allowed: Vec<&str> = pool.runtimes.iter().map(|r| r.as_str()).collect();
        return Err(refuse(
            "RuntimeNotAllowed",
            format!(
                "pool {pool_name} does not allow runtime {} (it allows {}): pick one of those runtime classes, or add the runtime to the pool's spec.runtimes",
                runtime.as_str(),
                allowed.join(", ")
            ),
        ));
    }
    if let Some(feature) = unsupported_feature(pod) {
        return Err(refuse(
            "UnsupportedPodFeature",
            format!(
                "{feature}: volunteer devices cannot offer it, so darkcore does not run this pod"
            ),
        ));
    }
    // A pod whose validation cannot work fails here, saying why, rather than run unchecked.
    crate::validation::policy::of(pod, &pool.validation)?;
    Ok(runtime)
}

/// The first thing the pod asks for that a device cannot give, in words.
fn unsupported_feature(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return Some("hostNetwork is set".into());
    }
    if spec.host_pid == Some(true) || spec.host_ipc == Some(true) {
        return Some("hostPID or hostIPC is set".into());
    }
    for volume in spec.volumes.iter().flatten() {
        if volume.host_path.is_some() {
            return Some(format!("volume {:?} is a hostPath", volume.name));
        }
        if volume.persistent_volume_claim.is_some() || volume.ephemeral.is_some() {
            return Some(format!(
                "volume {:?} is a persistent volume claim",
                volume.name
            ));
        }
        let supported = volume.config_map.is_some()
            || volume.secret.is_some()
            || volume.empty_dir.is_some()
            || volume.downward_api.is_some()
            || volume.projected.is_some();
        if !supported {
            return Some(format!(
                "volume {:?} is of a kind darkcore does not support (use configMap, secret, emptyDir, downwardAPI or projected)",
                volume.name
            ));
        }
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    for container in containers {
        let security = container.security_context.as_ref();
        if security.and_then(|s| s.privileged) == Some(true) {
            return Some(format!("container {:?} is privileged", container.name));
        }
        if security.and_then(|s| s.allow_privilege_escalation) == Some(true) {
            return Some(format!(
                "container {:?} allows privilege escalation",
                container.name
            ));
        }
        if container
            .ports
            .iter()
            .flatten()
            .any(|p| p.host_port.is_some())
        {
            return Some(format!(
                "container {:?} asks for a hostPort",
                container.name
            ));
        }
    }
    if spec
        .ephemeral_containers
        .as_ref()
        .is_some_and(|e| !e.is_empty())
    {
        return Some("ephemeral containers are set".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, HostPathVolumeSource, PodSpec, SecurityContext, Volume,
    };

    fn pod(namespace: &str, class: Option<&str>) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some(namespace.into());
        pod.spec = Some(PodSpec {
            runtime_class_name: class.map(Into::into),
            containers: vec![Container {
                name: "main".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        pod
    }

    fn spec(runtimes: Vec<Runtime>, namespaces: &[&str]) -> DevicePoolSpec {
        DevicePoolSpec {
            runtimes,
            allowed_namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_runtime_class_picks_the_runtime_and_none_means_oci() {
        let pool = spec(vec![Runtime::Process, Runtime::Oci], &[]);
        assert_eq!(
            admit("p", &pool, &pod("a", Some("darkcore-process"))),
            Ok(Runtime::Process)
        );
        assert_eq!(admit("p", &pool, &pod("a", None)), Ok(Runtime::Oci));
        let refused = admit("p", &pool, &pod("a", Some("darkcore-wasm"))).unwrap_err();
        assert_eq!(refused.reason, "RuntimeNotAllowed");
        assert!(
            refused.message.contains("it allows process, oci"),
            "{}",
            refused.message
        );
        assert_eq!(
            admit("p", &pool, &pod("a", Some("gvisor")))
                .unwrap_err()
                .reason,
            "UnknownRuntimeClass"
        );
    }

    #[test]
    fn pods_asking_for_agreement_are_admitted_unless_their_annotations_are_wrong() {
        let pool = spec(vec![Runtime::Oci], &[]);
        let mut asking = pod("a", None);
        asking.metadata.annotations =
            Some([("darkcore.io/quorum".to_string(), "2".to_string())].into());
        assert_eq!(admit("p", &pool, &asking), Ok(Runtime::Oci));
        asking.metadata.annotations =
            Some([("darkcore.io/quorum".to_string(), "two".to_string())].into());
        assert_eq!(
            admit("p", &pool, &asking).unwrap_err().reason,
            "InvalidValidation"
        );
    }

    #[test]
    fn namespaces_outside_the_allowed_list_are_refused_with_the_fix() {
        let pool = spec(vec![Runtime::Oci], &["batch"]);
        assert!(admit("p", &pool, &pod("batch", None)).is_ok());
        let refused = admit("p", &pool, &pod("web", None)).unwrap_err();
        assert_eq!(refused.reason, "NamespaceNotAllowed");
        assert!(refused.message.contains("spec.allowedNamespaces"));
    }

    #[test]
    fn host_features_and_privileged_containers_are_refused() {
        let pool = spec(vec![Runtime::Oci], &[]);
        let mut host = pod("a", None);
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(
            admit("p", &pool, &host)
                .unwrap_err()
                .message
                .split(':')
                .next(),
            Some("hostNetwork is set")
        );
        let mut path = pod("a", None);
        path.spec.as_mut().unwrap().volumes = Some(vec![Volume {
            name: "h".into(),
            host_path: Some(HostPathVolumeSource {
                path: "/".into(),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        assert!(
            admit("p", &pool, &path)
                .unwrap_err()
                .message
                .contains("hostPath")
        );
        let mut privileged = pod("a", None);
        privileged.spec.as_mut().unwrap().containers[0].security_context = Some(SecurityContext {
            privileged: Some(true),
            ..Default::default()
        });
        assert!(
            admit("p", &pool, &privileged)
                .unwrap_err()
                .message
                .contains("privileged")
        );
    }
}
