//! What a pool's virtual Node looks like: its name, labels, taints and owner (pure).
//! The taint list is atomic under server-side apply, so taints set by Kubernetes are carried.

use std::collections::BTreeMap;

use darkcore_crds::{Arch, DevicePool, DevicePoolSpec, Os};
use k8s_openapi::api::core::v1::{Node, NodeSpec, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
use kube::api::ObjectMeta;

use crate::pool::POOL_LABEL;

/// darkcore's own taint, the one virtual-kubelet providers use, so that charts which already
/// tolerate virtual kubelets work unchanged.
pub const PROVIDER_TAINT_KEY: &str = "virtual-kubelet.io/provider";
pub const PROVIDER_TAINT_VALUE: &str = "darkcore";
/// The pool generation a node was last rendered from; a change re-applies the node.
pub const POOL_GENERATION_ANNOTATION: &str = "darkcore.io/pool-generation";
/// `runtime.darkcore.io/<runtime>=true` marks nodes whose pool allows that runtime.
pub const RUNTIME_LABEL_PREFIX: &str = "runtime.darkcore.io/";

/// One os/arch pair; a pool publishes one node per platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    pub os: Os,
    pub arch: Arch,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os.as_str(), self.arch.as_str())
    }
}

/// The platforms a pool publishes nodes for. Until devices can join, that is every os/arch
/// pair its selector admits (linux/amd64 when it names none).
pub fn platforms(spec: &DevicePoolSpec) -> Vec<Platform> {
    let arches = spec.admitted_arch();
    spec.admitted_os()
        .into_iter()
        .flat_map(|os| arches.iter().map(move |&arch| Platform { os, arch }))
        .collect()
}

/// The name of a pool's node for one platform. Pool names are at most 63 characters (the CRD
/// enforces it), so this stays far below the 253 a node name may have.
pub fn node_name(pool: &str, platform: Platform) -> String {
    node_name_of(pool, platform.os.as_str(), platform.arch.as_str())
}

/// The name of a pool's node for the platform `os`/`arch` as devices report it.
pub fn node_name_of(pool: &str, os: &str, arch: &str) -> String {
    format!("darkcore-{pool}-{os}-{arch}")
}

/// Taints that Kubernetes itself manages on nodes (not-ready, unreachable, ...).
fn is_system_taint(key: &str) -> bool {
    key.starts_with("node.kubernetes.io/") || key.starts_with("node.cloudprovider.kubernetes.io/")
}

/// The node's labels: the pool's extra labels first, then darkcore's, which win.
pub fn node_labels(
    pool: &DevicePool,
    platform: Platform,
    node_name: &str,
) -> BTreeMap<String, String> {
    let mut labels = pool.spec.node.labels.clone();
    let ours = [
        ("type", "virtual-kubelet"),
        ("kubernetes.io/role", "agent"),
        ("kubernetes.io/os", platform.os.as_str()),
        ("kubernetes.io/arch", platform.arch.as_str()),
        ("kubernetes.io/hostname", node_name),
        (
            "node.kubernetes.io/exclude-from-external-load-balancers",
            "true",
        ),
        (POOL_LABEL, &pool.name_any()),
    ];
    labels.extend(ours.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    for runtime in &pool.spec.runtimes {
        labels.insert(
            format!("{RUNTIME_LABEL_PREFIX}{}", runtime.as_str()),
            "true".into(),
        );
    }
    labels
}

/// The node's taints: darkcore's, then the pool's, then whatever Kubernetes put there.
pub fn node_taints(pool: &DevicePool, current: Option<&Node>) -> Vec<Taint> {
    let mut taints = vec![Taint {
        key: PROVIDER_TAINT_KEY.into(),
        value: Some(PROVIDER_TAINT_VALUE.into()),
        effect: "NoSchedule".into(),
        time_added: None,
    }];
    taints.extend(pool.spec.node.taints.iter().map(|t| Taint {
        key: t.key.clone(),
        value: t.value.clone(),
        effect: t.effect.as_str().into(),
        time_added: None,
    }));
    let system = current
        .and_then(|n| n.spec.as_ref())
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| is_system_taint(&t.key));
    taints.extend(system.cloned());
    taints
}

/// The node's metadata and spec as darkcore applies them. Status is applied separately.
/// `owner` is the installation's anchor (the chart's ClusterRole): when `helm uninstall` deletes
/// it, Kubernetes deletes the node, and the node's lease with it. The pool is not an owner: it
/// outlives an uninstall (its CRD stays), and its finalizer already removes its nodes.
pub fn desired_node(
    pool: &DevicePool,
    platform: Platform,
    current: Option<&Node>,
    owner: Option<&OwnerReference>,
) -> Node {
    let name = node_name(&pool.name_any(), platform);
    Node {
        metadata: ObjectMeta {
            labels: Some(node_labels(pool, platform, &name)),
            annotations: Some(BTreeMap::from([(
                POOL_GENERATION_ANNOTATION.to_string(),
                pool.metadata.generation.unwrap_or_default().to_string(),
            )])),
            owner_references: owner.map(|o| vec![o.clone()]),
            name: Some(name),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: Some(node_taints(pool, current)),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

/// Whether the node in the cluster differs from what darkcore would apply.
pub fn node_spec_outdated(current: Option<&Node>, desired: &Node) -> bool {
    let Some(current) = current else { return true };
    let labels = current.labels();
    let labels_missing = desired
        .labels()
        .iter()
        .any(|(k, v)| labels.get(k) != Some(v));
    let generation_changed = current.annotations().get(POOL_GENERATION_ANNOTATION)
        != desired.annotations().get(POOL_GENERATION_ANNOTATION);
    // Exact, so that nodes made before the installation anchor lose their old pool owner.
    let owner_uids = |n: &Node| -> Vec<String> {
        let mut uids: Vec<String> = n.owner_references().iter().map(|o| o.uid.clone()).collect();
        uids.sort();
        uids
    };
    let owner_changed = owner_uids(current) != owner_uids(desired);
    labels_missing
        || generation_changed
        || owner_changed
        || taint_keys(current) != taint_keys(desired)
}

fn taint_keys(node: &Node) -> Vec<(String, Option<String>, String)> {
    let mut keys: Vec<_> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .map(|t| (t.key.clone(), t.value.clone(), t.effect.clone()))
        .collect();
    keys.sort();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use darkcore_crds::{DevicePoolSpec, NodeTemplate, PoolTaint, Runtime, TaintEffect};

    pub(crate) fn pool(name: &str, spec: DevicePoolSpec) -> DevicePool {
        let mut pool = DevicePool::new(name, spec);
        pool.metadata.uid = Some("uid-1".into());
        pool.metadata.generation = Some(3);
        pool
    }

    fn linux_amd64() -> Platform {
        Platform {
            os: Os::Linux,
            arch: Arch::Amd64,
        }
    }

    #[test]
    fn a_pool_with_no_selector_publishes_linux_amd64() {
        assert_eq!(platforms(&DevicePoolSpec::default()), vec![linux_amd64()]);
    }

    #[test]
    fn a_pool_publishes_one_node_per_admitted_os_and_arch() {
        let mut spec = DevicePoolSpec::default();
        spec.selector.arch = vec![Arch::Arm64, Arch::Amd64, Arch::Arm64];
        spec.selector.os = vec![Os::Linux, Os::Windows];
        let got: Vec<String> = platforms(&spec)
            .iter()
            .map(|p| node_name("lab", *p))
            .collect();
        assert_eq!(
            got,
            [
                "darkcore-lab-linux-amd64",
                "darkcore-lab-linux-arm64",
                "darkcore-lab-windows-amd64",
                "darkcore-lab-windows-arm64"
            ]
        );
    }

    #[test]
    fn node_labels_follow_the_virtual_kubelet_contract_and_cannot_be_overridden() {
        let mut spec = DevicePoolSpec {
            runtimes: vec![Runtime::Oci, Runtime::Wasm],
            ..Default::default()
        };
        spec.node.labels.insert("team".into(), "research".into());
        spec.node.labels.insert("type".into(), "spoofed".into());
        let labels = node_labels(
            &pool("lab", spec),
            linux_amd64(),
            "darkcore-lab-linux-amd64",
        );
        assert_eq!(labels["type"], "virtual-kubelet");
        assert_eq!(labels["kubernetes.io/role"], "agent");
        assert_eq!(labels["kubernetes.io/os"], "linux");
        assert_eq!(labels["kubernetes.io/arch"], "amd64");
        assert_eq!(labels["darkcore.io/pool"], "lab");
        assert_eq!(labels["team"], "research");
        assert_eq!(labels["runtime.darkcore.io/oci"], "true");
        assert!(!labels.contains_key("runtime.darkcore.io/process"));
    }

    #[test]
    fn taints_are_ours_then_the_pools_then_kubernetes_own() {
        let spec = DevicePoolSpec {
            node: NodeTemplate {
                taints: vec![PoolTaint {
                    key: "example.com/gpu".into(),
                    value: None,
                    effect: TaintEffect::NoExecute,
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        let p = pool("lab", spec);
        let mut current = desired_node(&p, linux_amd64(), None, None);
        current
            .spec
            .as_mut()
            .unwrap()
            .taints
            .as_mut()
            .unwrap()
            .extend([
                Taint {
                    key: "node.kubernetes.io/unreachable".into(),
                    effect: "NoExecute".into(),
                    ..Default::default()
                },
                Taint {
                    key: "someone.else/taint".into(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                },
            ]);
        let keys: Vec<String> = node_taints(&p, Some(&current))
            .into_iter()
            .map(|t| t.key)
            .collect();
        assert_eq!(
            keys,
            [
                "virtual-kubelet.io/provider",
                "example.com/gpu",
                "node.kubernetes.io/unreachable"
            ]
        );
    }

    #[test]
    fn an_unchanged_node_is_not_applied_again() {
        let p = pool("lab", DevicePoolSpec::default());
        let mut current = desired_node(&p, linux_amd64(), None, None);
        current
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("added.by/someone".into(), "x".into());
        let desired = desired_node(&p, linux_amd64(), Some(&current), None);
        assert!(!node_spec_outdated(Some(&current), &desired));
    }

    #[test]
    fn a_missing_node_a_new_pool_generation_or_a_lost_taint_is_applied() {
        let mut p = pool("lab", DevicePoolSpec::default());
        let current = desired_node(&p, linux_amd64(), None, None);
        assert!(node_spec_outdated(None, &current));

        let mut untainted = current.clone();
        untainted.spec = None;
        assert!(node_spec_outdated(
            Some(&untainted),
            &desired_node(&p, linux_amd64(), Some(&untainted), None)
        ));

        p.metadata.generation = Some(4);
        assert!(node_spec_outdated(
            Some(&current),
            &desired_node(&p, linux_amd64(), Some(&current), None)
        ));
    }

    #[test]
    fn the_node_is_owned_by_the_installation_not_the_pool() {
        let p = pool("lab", DevicePoolSpec::default());
        let anchor = OwnerReference {
            api_version: "rbac.authorization.k8s.io/v1".into(),
            kind: "ClusterRole".into(),
            name: "darkcore-operator".into(),
            uid: "anchor-uid".into(),
            ..OwnerReference::default()
        };
        let unowned = desired_node(&p, linux_amd64(), None, None);
        assert!(unowned.owner_references().is_empty());
        let owned = desired_node(&p, linux_amd64(), Some(&unowned), Some(&anchor));
        assert_eq!(owned.owner_references(), [anchor]);
        assert!(node_spec_outdated(Some(&unowned), &owned));
        assert!(!node_spec_outdated(Some(&owned), &owned));
    }
}
